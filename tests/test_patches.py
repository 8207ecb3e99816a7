"""Runtime patches: registered with a reason and a version range, idempotent, lane-scoped."""

import pytest
from packaging.version import Version

import patches
from megatron_ext import compat


def test_every_patch_says_why_and_for_which_versions():
    reg = patches.registered()
    assert {"cpu_rng_tracker", "cpu_current_device", "cpu_clip_grads", "moe_te_general_gemm_name"} <= set(reg)
    for p in reg.values():
        assert len(p.reason) > 30 and p.lane in ("cpu", "any")
        assert Version(p.min_version) < Version(p.max_version)


def test_apply_is_idempotent_and_lane_scoped():
    first = patches.apply_patches("cpu")
    assert patches.apply_patches("cpu") == []
    assert set(first) <= set(patches.applied())
    version = compat.mcore_version()
    for name in patches.applied():
        assert patches.registered()[name].wanted(version, "cpu")
    # a CUDA lane never gets CPU patches
    assert not any(p.wanted(version, "cuda") for p in patches.registered().values() if p.lane == "cpu")


def test_version_guard_excludes_unsupported_versions():
    p = patches.registered()["cpu_rng_tracker"]
    assert p.wanted(Version("0.16.1"), "cpu") and p.wanted(Version("0.19.2"), "cpu")
    assert not p.wanted(Version("0.15.0"), "cpu") and not p.wanted(Version("0.21.0"), "cpu")


def test_bad_registration_is_rejected():
    with pytest.raises(ValueError, match="lane='gpu'"):
        patches.patch("x", reason="r", lane="gpu")
    with pytest.raises(ValueError, match="registered twice"):
        patches.patch("cpu_rng_tracker", reason="r", lane="cpu")(lambda: None)


def test_cpu_rng_tracker_forks_reproducibly():
    patches.apply_patches("cpu")
    from megatron.core.tensor_parallel import random as mr

    tracker = mr.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 7)
    outer = __import__("torch").get_rng_state()
    with tracker.fork("a"):
        x = __import__("torch").rand(4)
    with tracker.fork("a"):
        y = __import__("torch").rand(4)
    import torch

    assert torch.equal(torch.get_rng_state(), outer), "fork must restore the outer RNG state"
    assert not torch.equal(x, y), "the forked stream must advance"
    tracker.reset()
    tracker.add("a", 7)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(4), x)


def test_the_megatron_core_under_test_is_the_one_asked_for():
    """The second CI lane (``scripts/mcore_overlay.py``) puts a newer megatron-core first on the path
    and names it in MEGATRON_EXT_EXPECT_MCORE; if the overlay did not take, every test of that lane
    would silently test the installed release again."""
    import os

    import megatron.core

    expected = os.environ.get("MEGATRON_EXT_EXPECT_MCORE")
    version = compat.mcore_version()
    lo, hi = compat.SUPPORTED_MCORE
    assert lo <= version < hi
    if expected:
        assert version == Version(expected), f"imported megatron-core {version} from {megatron.core.__file__}"
        assert compat.package_versions().get("megatron-core") == expected


def test_megatron_core_imports_without_dynamo_when_compile_is_off():
    """With TORCH_COMPILE_DISABLE=1, ``compat.import_megatron_core`` gives Megatron's import-time
    torch.compile decorators the plain functions (a fresh process: this one has Megatron already),
    so TorchDynamo and Inductor are not imported, torch.compile is put back, and a fused function
    computes what its unfused expression does."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    script = (
        "import sys, torch\n"
        "compile_fn = torch.compile\n"
        "from megatron_ext.compat import import_megatron_core, _eager_compile\n"
        "import_megatron_core()\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
        "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules\n"
        "assert torch.compile is compile_fn and jit.jit_fuser is _eager_compile\n"
        "assert type(bias_gelu).__name__ == 'function', type(bias_gelu)   # not a compile wrapper\n"
        "b, y = torch.randn(8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)\n"
        "x = b + y\n"
        "ref = x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))\n"
        "assert torch.allclose(bias_gelu(b, y), ref, rtol=1e-12, atol=1e-12)\n"
        "print('eager-import-ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(subprocess_env(), TORCH_COMPILE_DISABLE="1"), timeout=120)
    assert proc.returncode == 0 and "eager-import-ok" in proc.stdout, proc.stderr[-3000:]


def test_synchronous_saves_read_their_results_in_process():
    """``compat.in_process_save_results``: inside, Megatron's file writer hands its results through
    an in-process queue (no manager process); Megatron's own queue is back afterwards, also after
    an error."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    before = fa._results_queue
    with compat.in_process_save_results():
        assert isinstance(fa._results_queue, queue.Queue)
    assert fa._results_queue is before
    with pytest.raises(RuntimeError), compat.in_process_save_results():
        raise RuntimeError("save failed")
    assert fa._results_queue is before
