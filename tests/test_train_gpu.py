"""The same `megatron-ext train` on the CUDA lane (NCCL, bf16). Skipped without a GPU.

Runs in a subprocess: CPU-lane tests in this pytest process install CPU-only patches (e.g. a
no-op torch.cuda.synchronize) that must never meet a CUDA run.
"""

import json
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


def test_gpu_lane_trains_mtp_layers_on_fused_moe_under_mhc(tmp_path):
    """--mtp-num-layers on the GPU: the MTP layer's fused MoE (Triton experts and gate) and the
    decoder's mHC sites (Triton mixers) in bf16; both losses fall and a killed run resumes onto
    the uninterrupted curves."""
    base = [sys.executable, "-m", "megatron_ext", "train", "--preset", "test", "--device", "cuda",
            "--nproc-per-node", "1", "--runs-root", str(tmp_path), "--train-iters", "20",
            "--lr-warmup-iters", "3", "--progress", "log", "--eval-iters", "0", "--save-interval", "10",
            "--mtp-num-layers", "1", "--num-experts", "4", "--mhc-num-streams", "4", "--mhc-deterministic"]
    runs = {}
    for name, extra in (("whole", []), ("killed", ["--exit-after-iters", "13"]), ("killed", ["--resume"])):
        runs[name] = tmp_path / name
        proc = subprocess.run([*base, "--run-dir", str(runs[name]), *extra], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for name, run in runs.items()}
    whole = [r for r in rows["whole"] if r["kind"] == "train"]
    killed = [r for r in rows["killed"] if r["kind"] == "train"]
    assert len(whole) == 20 and whole[-1]["loss"] < whole[0]["loss"] - 1.0
    assert whole[-1]["mtp_1 loss"] < whole[0]["mtp_1 loss"] - 1.0
    for key in ("loss", "mtp_1 loss"):
        assert [r[key] for r in killed] == pytest.approx([r[key] for r in whole], rel=1e-5), key
    r = receipt(runs["whole"])
    assert r["runtime"]["dtype"] == "bf16"
    observed = {b["op"]: b["observed"] for b in r["backends"]}
    assert [observed.get(op) for op in ("moe_ffn", "mhc_mix_pre", "mhc_post_res")] == ["triton"] * 3, observed


def test_gpu_deterministic_mode_repeats_bit_for_bit(tmp_path):
    """Megatron's --deterministic-mode on the GPU, with fused MoE layers (Triton experts and
    fixed-tiling GEMMs), Triton mHC mixers (pinned tilings) and an MTP layer in bf16: two runs give
    the same LM and MTP losses bit for bit."""
    rows = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "megatron_ext", "train", "--preset", "test", "--device", "cuda",
               "--nproc-per-node", "1", "--runs-root", str(tmp_path), "--run-dir", str(tmp_path / name),
               "--train-iters", "12", "--lr-warmup-iters", "2", "--progress", "log", "--eval-iters", "0",
               "--deterministic-mode", "--num-experts", "4", "--mhc-num-streams", "4", "--mtp-num-layers", "1"]
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append([(r["loss"], r["mtp_1 loss"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl")
                                                                 .read_text().splitlines()) if r["kind"] == "train"])
    assert len(rows[0]) == 12 and rows[0] == rows[1]
    assert rows[0][-1][0] < rows[0][0][0] - 1.0
    r = receipt(tmp_path / "a")
    assert r["runtime"]["deterministic_algorithms"] is True
    lanes = {(b["op"], b["observed"]) for b in r["backends"]}
    assert {("moe_ffn.deterministic", "triton"), ("moe.deterministic_gemm", "triton"),
            ("mhc_tilings", "pinned")} <= lanes, lanes
