"""`megatron-ext train` end to end on the CPU lane (gloo, world size 1): loss falls, the run folder
holds receipt.json / loss.png / checkpoints, and a killed run resumes onto the same loss curve."""

import json

import pytest

from megatron_ext.training import checkpoint
from tests.helpers import receipt, train_inprocess, train_losses

RECEIPT_KEYS = {"versions", "device", "lane", "backends", "patches", "throughput", "goodput",
                "memory_bytes", "loss", "config", "runtime"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    # the profiler and the hang watchdog ride along: neither changes the numbers
    assert train_inprocess(run, "--profile", "--use-pytorch-profiler", "--profile-step-start", "3",
                           "--profile-step-end", "5", "--hang-dump-seconds", "600") == 0
    return run


def test_profile_range_writes_a_trace_and_a_top_table(full_run):
    trace = json.loads((full_run / "profile" / "rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)
    top = (full_run / "profile" / "rank0_top.txt").read_text()
    assert top.startswith("steps 3..4, sorted by self_cpu_time_total") and "aten::" in top


def test_loss_falls_and_run_folder_is_complete(full_run):
    losses = train_losses(full_run)
    assert len(losses) == 20
    assert losses[0] == pytest.approx(5.95, abs=0.1)  # ln(384): uniform over the padded vocab at init
    assert losses[-1] < losses[0] - 2.0
    png = (full_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert checkpoint.latest_iteration(full_run / "checkpoints") == 20
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == [
        "iter_0000010", "iter_0000020", "latest_checkpointed_iteration.txt"]


def test_receipt_records_what_the_issue_asks(full_run):
    r = receipt(full_run)
    assert RECEIPT_KEYS <= set(r)
    assert {"torch", "megatron-core"} <= set(r["versions"])
    assert r["lane"] == {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": None, "dp": 1, "sp": False, "fsdp2": False,
                         "world_size": 1, "backend": "gloo", "device_lane": "cpu"}  # etp: MoE models only
    assert {"op": "core_attention", "requested": "auto", "observed": "torch_sdpa"}.items() <= r["backends"][0].items()
    assert "cpu_rng_tracker" in r["patches"] and "cpu_clip_grads" in r["patches"]
    t = r["throughput"]
    assert t["steps_this_run"] == 20 and t["tokens_per_step"] == 8 * 64 and t["tokens_per_s"] > 0
    assert 0 < t["step_time_s"]["p50"] <= t["step_time_s"]["p90"] <= t["step_time_s"]["p99"]
    g = r["goodput"]
    assert 0 < g["goodput_fraction"] < 1
    assert {"startup", "data", "checkpoint", "eval", "compile_warmup"} <= set(g["badput_s"])
    assert g["goodput_s"] + sum(g["badput_s"].values()) == pytest.approx(g["wall_s"], rel=0.01)
    assert r["memory_bytes"]["host_max_rss"] > 0
    assert r["loss"]["final"] == pytest.approx(train_losses(full_run)[-1])
    assert r["loss"]["final_validation"] < r["loss"]["first"]


def test_profile_range_must_fit_the_run():
    from megatron_ext.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match=r"profile_step_start='5..5': the profiled steps \[start, end\) must lie"):
        validate(TrainConfig(profile=True, profile_step_start=5, profile_step_end=5), world_size=1)


def test_killed_run_resumes_onto_the_same_curve(full_run, tmp_path):
    run = tmp_path / "killed"
    assert train_inprocess(run, "--exit-after-iters", "13") == 0
    assert checkpoint.latest_iteration(run / "checkpoints") == 10  # 11..13 were never saved
    assert train_inprocess(run, "--resume") == 0
    reference = train_losses(full_run)
    resumed = train_losses(run)
    assert len(resumed) == 20
    assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-6)
    r = receipt(run)
    assert r["loss"]["start_iteration"] == 10 and r["throughput"]["steps_this_run"] == 10
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [10, 20]


def test_bf16_on_cpu_trains_near_fp32_and_resumes_onto_the_same_curve(tmp_path, monkeypatch):
    """The GPU's precision path on the CPU lane: Float16Module, Megatron's mixed-precision optimizer
    (bf16 model weights, fp32 masters) and their checkpoint, with mHC streams and a fused MoE layer
    in the model; under `make test-mcore-next` the same on megatron-core 0.19.2."""
    # The kernel tests set TRITON_INTERPRET=1 for the whole session; bf16 is refused under it (the
    # interpreter's tl.dot is wrong on bf16), and the torch mixers keep these runs fast anyway.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = ["--mhc-num-streams", "4", "--mhc-backend", "torch", "--num-experts", "4", "--train-iters", "6",
            "--save-interval", "3", "--eval-iters", "0"]
    fp32, bf16, killed = tmp_path / "fp32", tmp_path / "bf16", tmp_path / "killed"
    assert train_inprocess(fp32, *args) == 0
    assert train_inprocess(bf16, *args, "--bf16") == 0
    assert train_inprocess(killed, *args, "--bf16", "--exit-after-iters", "5") == 0
    assert checkpoint.latest_iteration(killed / "checkpoints") == 3
    assert train_inprocess(killed, *args, "--bf16", "--resume") == 0

    reference, losses = train_losses(fp32), train_losses(bf16)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert losses == pytest.approx(reference, rel=2e-2)  # bf16 rounding, not a different model
    assert losses != reference
    assert train_losses(killed) == pytest.approx(losses, rel=1e-6)
    r = receipt(killed)
    assert r["runtime"]["dtype"] == "bf16" and "cpu_mixed_precision_optimizer" in r["patches"]
    assert receipt(fp32)["runtime"]["dtype"] == "fp32"

    # Megatron's distributed optimizer (at world size 1 the same Adam on the same fp32 masters),
    # killed and resumed: its checkpoint format and three upstream resume bugs without apex/TE
    dist = tmp_path / "distopt"
    assert train_inprocess(dist, *args, "--bf16", "--use-distributed-optimizer", "--exit-after-iters", "5") == 0
    assert train_inprocess(dist, *args, "--bf16", "--use-distributed-optimizer", "--resume") == 0
    assert train_losses(dist) == pytest.approx(losses, rel=2e-5)
    assert {"dist_optimizer_fresh_state_dict", "dist_optimizer_loaded_step", "dist_optimizer_step_per_param",
            "cpu_dist_optimizer_gather"} <= set(receipt(dist)["patches"])


def test_resuming_across_optimizer_layouts_is_a_clear_error(tmp_path, capsys):
    """The distributed optimizer stores its fp32 masters under other keys than Megatron's other
    optimizers: resuming with the other one is refused, naming the flag, before any state loads."""
    run = tmp_path / "distopt"
    args = ["--train-iters", "2", "--lr-warmup-iters", "1", "--save-interval", "2", "--eval-iters", "0"]
    assert train_inprocess(run, *args, "--use-distributed-optimizer") == 0
    capsys.readouterr()
    assert train_inprocess(run, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert ("use_distributed_optimizer=False: " in err and "optimizer state written with "
            "--use-distributed-optimizer" in err and "resume with --use-distributed-optimizer" in err), err


def test_distributed_optimizer_resumes_in_megatrons_default_format(tmp_path, monkeypatch):
    """Megatron's own pretrain saves the distributed optimizer as 'dp_reshardable' (train uses
    'fully_reshardable'); without apex/TE its resume restarted Adam's step at the load's placeholder
    0 (the loss left the curve) until patched: a killed run must continue the uninterrupted one."""
    monkeypatch.setattr(checkpoint, "OPTIMIZER_METADATA", {"distrib_optim_sharding_type": "dp_reshardable"})
    args = ["--num-experts", "4", "--train-iters", "6", "--save-interval", "3", "--eval-iters", "0",
            "--use-distributed-optimizer"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train_inprocess(whole, *args) == 0
    assert train_inprocess(killed, *args, "--exit-after-iters", "5") == 0
    assert train_inprocess(killed, *args, "--resume") == 0
    assert train_losses(killed) == pytest.approx(train_losses(whole), rel=1e-6)


def _rows(run, kind="train"):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line and json.loads(line)["kind"] == kind]


def test_mtp_layers_log_their_losses_and_resume_onto_the_same_curves(tmp_path):
    """--mtp-num-layers 2 (DeepSeek-V3's multi-token prediction) on fused MoE layers under mHC
    streams: every step logs Megatron's `mtp_1 loss` and `mtp_2 loss` beside the LM loss, both
    fall, the receipt keeps the last ones, and a killed run resumes onto the uninterrupted curves
    of all three (the MTP layers, their MoE and their Adam states are in the checkpoint)."""
    args = ["--mtp-num-layers", "2", "--num-experts", "4", "--mhc-num-streams", "2", "--mhc-backend", "torch",
            "--train-iters", "8", "--save-interval", "4", "--eval-iters", "0", "--moe-backend", "torch",
            "--moe-aux-loss-coeff", "0.01"]
    # an earlier run in this process with fewer MoE layers sized Megatron's aux-loss tracker
    assert train_inprocess(tmp_path / "two_layers", "--num-experts", "4", "--moe-aux-loss-coeff", "0.01",
                           "--train-iters", "1", "--eval-iters", "0", "--lr-warmup-iters", "0") == 0
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train_inprocess(whole, *args, "--moe-routing-trace-out", str(tmp_path / "trace")) == 0
    assert train_inprocess(killed, *args, "--exit-after-iters", "6") == 0
    assert checkpoint.latest_iteration(killed / "checkpoints") == 4
    assert train_inprocess(killed, *args, "--resume") == 0

    rows = _rows(whole)
    assert len(rows) == 8
    for name in ("loss", "mtp_1 loss", "mtp_2 loss"):
        curve = [r[name] for r in rows]
        assert curve[0] == pytest.approx(5.95, abs=0.15)   # ln(384): uniform over the padded vocab
        assert curve[-1] < curve[0] - 0.8, name
        assert [r[name] for r in _rows(killed)] == pytest.approx(curve, rel=1e-5), name
    assert rows[-1]["mtp_1 loss"] != rows[-1]["mtp_2 loss"] != rows[-1]["loss"]
    r = receipt(killed)
    assert r["loss"]["final_mtp"] == pytest.approx([rows[-1]["mtp_1 loss"], rows[-1]["mtp_2 loss"]], rel=1e-5)
    assert r["config"]["mtp_num_layers"] == 2
    # the MTP layers' MoE layers are numbers 3 and 4, after the decoder's 2: their statistics and
    # routing traces are written with the decoder's
    moe = _rows(whole, "moe")[-1]["layers"]
    assert sorted(int(k) for k in moe) == [1, 2, 3, 4]
    assert json.loads((tmp_path / "trace" / "meta.json").read_text())["moe_layers"] == [1, 2, 3, 4]
    traced = sorted(p.name for p in (tmp_path / "trace" / "rank000" / "iter0000008").iterdir())
    assert traced == [f"layer{n:03d}_mb{m:03d}.pt" for n in (1, 2, 3, 4) for m in (0, 1)]


def test_mtp_loss_scaled_to_zero_leaves_the_lm_curve_alone(tmp_path):
    """--mtp-loss-scaling-factor 0: the MTP layer runs and logs its loss, but its gradient is zero,
    so the LM loss follows the run without MTP layers (same seed; the MTP layer is built after the
    decoder and the output layer shares the embedding, so the decoder's initial weights agree);
    with Megatron's default 0.1 the MTP gradient reaches the shared trunk and the curve moves."""
    args = ["--train-iters", "6", "--eval-iters", "0"]
    plain, zero, tenth = tmp_path / "plain", tmp_path / "zero", tmp_path / "tenth"
    assert train_inprocess(plain, *args) == 0
    assert train_inprocess(zero, *args, "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0") == 0
    assert train_inprocess(tenth, *args, "--mtp-num-layers", "1") == 0
    assert train_losses(zero) == pytest.approx(train_losses(plain), rel=1e-6)
    assert all(r["mtp_1 loss"] > 5.0 for r in _rows(zero))   # logged, not trained
    assert train_losses(tenth)[1:] != pytest.approx(train_losses(plain)[1:], rel=1e-4)
    assert "mtp_1 loss" not in _rows(plain)[0]


def test_deterministic_mode_repeats_bit_for_bit_and_leaves_the_process_as_it_was(tmp_path):
    """Megatron's --deterministic-mode in train: the fused MoE and mHC deterministic modes, torch's
    deterministic algorithms and the cuBLAS / NCCL settings for the run; two runs give the same
    losses bit for bit, and the process's torch mode and environment are put back after each."""
    import os

    import torch

    args = ["--deterministic-mode", "--num-experts", "4", "--mhc-num-streams", "2", "--mhc-backend", "torch",
            "--moe-backend", "torch", "--train-iters", "4", "--eval-iters", "0"]
    before = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO")}
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_inprocess(a, *args) == 0
    assert train_inprocess(b, *args) == 0
    assert train_losses(a) == train_losses(b)
    assert not torch.are_deterministic_algorithms_enabled()
    assert {k: os.environ.get(k) for k in before} == before
    r = receipt(a)
    assert r["runtime"]["deterministic_algorithms"] is True and r["config"]["deterministic_mode"] is True
    lanes = {(x["op"], x["observed"]) for x in r["backends"]}
    assert ("moe_ffn", "deterministic_chunks") in lanes and ("mhc_tilings", "pinned") in lanes, lanes


def test_deterministic_mode_refuses_a_nondeterministic_environment(tmp_path, capsys, monkeypatch):
    from megatron_ext.cli import main

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    runs = tmp_path / "runs"
    assert main(["train", "--runs-root", str(runs), "--deterministic-mode"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("megatron-ext: error: deterministic_mode=True: CUBLAS_WORKSPACE_CONFIG=':0:0' in the "
                   "environment does not give bitwise-repeatable steps; use CUBLAS_WORKSPACE_CONFIG unset "
                   "or one of [':4096:8', ':16:8']")
    assert not runs.exists()


@pytest.mark.parametrize("recompute", [["--recompute-granularity", "full"],
                                       ["--recompute-granularity", "selective", "--recompute-modules", "moe,core_attn"]],
                         ids=["full", "selective_moe"])
def test_mtp_layers_under_activation_recompute_repeat_the_plain_run(tmp_path, recompute):
    """Megatron's activation recompute with an MTP layer on fused MoE layers: the recomputed
    forward (the MTP layer's included) gives the plain run's LM and MTP losses bit for bit."""
    args = ["--mtp-num-layers", "1", "--num-experts", "4", "--moe-aux-loss-coeff", "0.01", "--train-iters", "4",
            "--eval-iters", "0"]
    plain, again = tmp_path / "plain", tmp_path / "recompute"
    assert train_inprocess(plain, *args) == 0
    assert train_inprocess(again, *args, *recompute) == 0
    rows = [[(r["loss"], r["mtp_1 loss"]) for r in _rows(run)] for run in (plain, again)]
    assert len(rows[0]) == 4 and rows[0] == rows[1]
