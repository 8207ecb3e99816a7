"""Helpers for tests that run ``megatron-ext train`` in-process or under torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    """This repo first on the path, keeping whatever the caller's PYTHONPATH already holds."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", PYTHONPATH=path)
    # Kernel tests set TRITON_INTERPRET=1 for this process; a training run must not inherit it.
    env.pop("TRITON_INTERPRET", None)
    # An in-process run of this pytest process set the rendezvous of its world of one (its store
    # may still hold that port): a child must start its own, not join or collide with that one.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def train_inprocess(run_dir: Path, *extra: str, device: str = "cpu") -> int:
    """The CPU lane unless ``device`` says otherwise, so the suite means the same on a GPU host."""
    from megatron_ext.cli import main

    return main(["train", "--preset", "test", "--runs-root", str(run_dir.parent),
                 "--run-dir", str(run_dir), "--progress", "log", "--device", device,
                 "--data-cache-dir", str(run_dir.parent / ".data-cache"), *extra])


def train_torchrun(run_dir: Path, nproc: int, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_ext", "train", "--preset", "test", "--runs-root", str(run_dir.parent),
           "--run-dir", str(run_dir), "--progress", "log", "--device", "cpu",
           "--data-cache-dir", str(run_dir.parent / ".data-cache"), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# The ends of a script run by torchrun_script on two ranks that share one device over gloo at EP=2
# (DEV=cuda, the default: both ranks on GPU 0, where NCCL refuses two ranks on one device and gloo
# carries the CUDA tensors through the host; DEV=cpu: the CPU lane). The preamble defines ``dev``,
# ``rank``, ``dist``, ``backends``, ``compat``, ``from_preset`` and ``transformer_config``.
EP2_ONE_DEVICE_PREAMBLE = r"""
import os, torch, torch.distributed as dist
dev = os.environ.get("DEV", "cuda")
if dev == "cuda":
    torch.cuda.set_device(0)
dist.init_process_group("gloo")
from patches import apply_patches
apply_patches(dev)
from megatron_ext import backends, compat
compat.initialize_model_parallel(1, 1, 2)
compat.seed_model_parallel(1234)
from megatron_ext.config import from_preset
from megatron_ext.training.model import transformer_config
rank = dist.get_rank()
"""
EP2_ONE_DEVICE_TEARDOWN = r"""
compat.destroy_model_parallel()
dist.destroy_process_group()   # a rank that exits with the group alive can abort in gloo's teardown
"""


def torchrun_script(script: str, tmp_path: Path, nproc: int, marker: str, timeout: int = 600,
                    **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source) on ``nproc`` ranks under torchrun from the repository root
    and check that every rank printed ``marker``."""
    from megatron_ext.training.distributed import free_port

    path = tmp_path / "torchrun_script.py"
    path.write_text(script)
    env = dict(subprocess_env(), OMP_NUM_THREADS="1", **env_extra)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--master-port", str(free_port()), str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.stdout.count(marker) == nproc, proc.stdout[-2000:]
    return proc


def train_losses(run_dir: Path) -> List[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def receipt(run_dir: Path) -> dict:
    return json.loads((run_dir / "receipt.json").read_text())


@contextlib.contextmanager
def cpu_model_parallel(seed: Optional[int] = None):
    """World size 1 on gloo with Megatron's parallel state (TP = PP = EP = 1) and the CPU-lane
    patches, for tests that build Megatron modules in this process; the process group is torn
    down again only if this call created it."""
    import torch.distributed as dist

    import patches
    from megatron_ext import compat
    from megatron_ext.training.distributed import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    patches.apply_patches("cpu")
    compat.initialize_model_parallel(1, 1, 1)
    if seed is not None:
        compat.seed_model_parallel(seed)
    try:
        yield
    finally:
        compat.destroy_model_parallel(destroy_groups=True)
        if created:
            dist.destroy_process_group()


def resume_from(src: Path, dst: Path, iteration: int) -> Path:
    """A copy of run folder ``src`` whose newest checkpoint is ``iteration`` (as if stopped after it)."""
    import shutil

    from megatron_ext.training import checkpoint

    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for d in ckpts.glob("iter_*"):
        if int(d.name.split("_")[1].split(".")[0]) > iteration:
            shutil.rmtree(d)
    (ckpts / checkpoint.TRACKER).write_text(str(iteration))
    (dst / "receipt.json").unlink(missing_ok=True)  # written at a run's end; this one "stopped" earlier
    return dst


def forward_with_late_params(module, *args, **kwargs):
    """``module(*args, **kwargs)`` with every parameter NaN until a forward pre-hook of the module
    that owns it (directly) runs, which puts its value back: how Megatron's DDP with
    ``--overlap-param-gather`` treats parameters (it waits for a bucket's all-gather in the
    owning module's forward pre-hook), so a parameter read before its module is called shows as
    NaN in the output. Returns ``(output, names of the parameters no hook reached)``; every value
    is restored afterwards."""
    import torch

    saved = {}
    with torch.no_grad():
        for p in module.parameters():
            saved[p] = p.detach().clone()
            p.fill_(float("nan"))

    def gathered(mod, *unused):
        with torch.no_grad():
            for p in mod.parameters(recurse=False):
                if p in saved:
                    p.copy_(saved.pop(p))

    handles = [m.register_forward_pre_hook(gathered) for m in module.modules()]
    names = {p: n for n, p in module.named_parameters()}
    try:
        out = module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        missed = sorted(names[p] for p in saved)
        with torch.no_grad():
            for p, v in saved.items():
                p.copy_(v)
    return out, missed
