"""Run the tests against a second megatron-core release on this machine's Python.

megatron-core 0.16.1 is the newest release whose wheel installs on Python 3.11; later releases
(0.17+) declare ``Requires-Python >= 3.12`` but are plain Python apart from the GPT dataset helper
extension. This script lays such a release out as an overlay directory (the wheel's ``megatron/``
and its ``.dist-info``, unpacked, not installed) and runs pytest with the overlay first on
``PYTHONPATH``, so the CPU lane exercises the same compat paths the GPU lane takes::

    python scripts/mcore_overlay.py --version 0.19.2 -- -q tests/test_train.py

The wheel comes from ``--wheel-dir`` (default ``.whl``, where GPU runs keep the cp312 wheel) or is
downloaded with ``pip download --no-deps --python-version 3.12``. The dataset helper extension is
built for the wheel's Python; when its C++ source is byte-identical to the installed release's, the
installed release's build for this Python is reused, otherwise GPT-dataset tests fail with the data
module's own message naming the missing ``helpers_cpp``.

If the wheel cannot be obtained (no index reachable and none on disk), the lane is reported as
NOT RUN with the reason, and the exit status is 0 unless ``--require`` is given.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "megatron-core overlay"


def _say(msg: str) -> None:
    print(f"[{TAG}] {msg}", file=sys.stderr, flush=True)


def _find_wheel(version: str, dirs) -> Path | None:
    for d in dirs:
        hits = sorted(glob.glob(str(Path(d) / f"megatron_core-{version}-*.whl")))
        if hits:
            return Path(hits[-1])
    return None


def _download(version: str, dest: Path) -> tuple[Path | None, str]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--dest", str(dest), f"megatron-core=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(version, [dest])
    if wheel is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"`pip download megatron-core=={version}` failed (exit {proc.returncode}): {tail[0]}"
    return wheel, ""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reuse_helpers(site: Path) -> str:
    """Give the overlay a dataset helper extension built for this Python, or say why not."""
    ds = site / "megatron" / "core" / "datasets"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    if (ds / f"helpers_cpp{suffix}").exists():
        return "helpers_cpp: built for this Python already"
    spec = importlib.util.find_spec("megatron.core.datasets")  # the installed release (no overlay yet)
    if spec is None or not spec.submodule_search_locations:
        return "helpers_cpp: no installed megatron-core to take a build from"
    installed = Path(list(spec.submodule_search_locations)[0])
    built = sorted(installed.glob(f"helpers_cpp{suffix}"))
    if not built or not (installed / "helpers.cpp").exists() or not (ds / "helpers.cpp").exists():
        return f"helpers_cpp: the installed release has no helpers.cpp + helpers_cpp{suffix} to reuse"
    if _sha(installed / "helpers.cpp") != _sha(ds / "helpers.cpp"):
        return "helpers_cpp: helpers.cpp differs from the installed release's; GPT-dataset tests will fail"
    shutil.copy2(built[0], ds / built[0].name)
    return f"helpers_cpp: reused the installed release's build (helpers.cpp identical, sha256 {_sha(ds / 'helpers.cpp')[:12]})"


def build_overlay(version: str, root: Path, wheel_dirs) -> tuple[Path | None, str]:
    site = root / version / "site"
    stamp = site / ".complete"
    if stamp.exists():
        return site, "reused " + stamp.read_text().strip()
    wheel = _find_wheel(version, wheel_dirs)
    if wheel is None:
        wheel, why = _download(version, root / "wheels")
        if wheel is None:
            return None, why
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist()
                   if m.startswith("megatron/") or m.startswith(f"megatron_core-{version}.dist-info/")]
        zf.extractall(site, members)
    helpers = _reuse_helpers(site)
    stamp.write_text(f"{wheel.name}; {helpers}\n")
    return site, f"unpacked {wheel.name}; {helpers}"


def _check_version(site: Path, version: str, env) -> str:
    probe = "import megatron.core.package_info as p, megatron.core as m; print(p.__version__, m.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"[{TAG}] importing megatron.core from {site} failed:\n{out.stderr[-2000:]}")
    got, where = out.stdout.split()
    if got != version or not Path(where).resolve().is_relative_to(site.resolve()):
        raise SystemExit(f"[{TAG}] the overlay did not take: imported megatron.core {got} from {where}, "
                         f"expected {version} from {site}")
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", required=True, help="megatron-core release to test, e.g. 0.19.2")
    ap.add_argument("--root", default=str(ROOT / ".mcore"), help="where overlays and downloads live")
    ap.add_argument("--wheel-dir", action="append", default=None,
                    help="look for the wheel here before downloading (default: .whl)")
    ap.add_argument("--require", action="store_true", help="fail (exit 2) when the wheel cannot be had")
    ap.add_argument("pytest_args", nargs="*", help="arguments for pytest, after --")
    args = ap.parse_args(argv)

    wheel_dirs = args.wheel_dir or [str(ROOT / ".whl")]
    site, how = build_overlay(args.version, Path(args.root), wheel_dirs)
    if site is None:
        _say(f"megatron-core {args.version} lane NOT RUN: {how}")
        return 2 if args.require else 0
    _say(f"megatron-core {args.version} from {site} ({how})")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MEGATRON_EXT_EXPECT_MCORE"] = args.version  # tests assert the overlay is what they import
    env.setdefault("TORCH_COMPILE_DISABLE", "1")
    # megatron-core appends the short sha of any git checkout around its package dir to its version;
    # the overlay sits inside this repo, so that would be this repo's commit
    env["NO_VCS_VERSION"] = "1"
    _check_version(site, args.version, env)
    return subprocess.call([sys.executable, "-m", "pytest", *args.pytest_args], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
