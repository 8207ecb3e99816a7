"""The same `megatron-ext train` on the CUDA lane (NCCL, bf16). Skipped without a GPU.

Runs in a subprocess: CPU-lane tests in this pytest process install CPU-only patches (e.g. a
no-op torch.cuda.synchronize) that must never meet a CUDA run.
"""

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, receipt, subprocess_env, train_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_lane_trains_in_bf16(tmp_path):
    run = tmp_path / "gpu"
    cmd = [sys.executable, "-m", "megatron_ext", "train", "--preset", "test", "--device", "cuda",
           "--nproc-per-node", "1", "--runs-root", str(tmp_path), "--run-dir", str(run),
           "--train-iters", "30", "--lr-warmup-iters", "3", "--progress", "log"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(run)
    assert len(losses) == 30 and losses[-1] < losses[0] - 2.0
    r = receipt(run)
    assert r["lane"]["backend"] == "nccl" and r["runtime"]["dtype"] == "bf16"
    assert not [p for p in r["patches"] if p.startswith("cpu_")]
    assert r["memory_bytes"]["device_max_allocated"] > 0
