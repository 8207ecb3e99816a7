"""Fused MoE at world size 2 on CPU (gloo), one torchrun spawn: expert parallel EP=2 (one expert
half per rank, tokens exchanged by all-to-all) must reproduce EP=1 on one rank from the same seed,
and its distributed checkpoint (experts sharded over EP) must resume at EP=1 with EP=1's losses."""

import shutil

import pytest

from megatron_ext.training import checkpoint
from tests.helpers import receipt, train_inprocess, train_losses, train_torchrun

pytestmark = pytest.mark.multirank
MODEL = ["--train-iters", "6", "--eval-iters", "0", "--lr-warmup-iters", "1", "--save-interval", "3",
         "--num-layers", "2", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--num-experts", "4", "--moe-aux-loss-coeff", "0.01",
         "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
         "--moe-router-bias-update-rate", "0.01", "--moe-z-loss-coeff", "0.001",
         "--moe-shared-expert-intermediate-size", "16", "--moe-backend", "torch"]


def test_ep2_matches_ep1_and_its_checkpoint_resumes_at_ep1(tmp_path):
    ws1 = tmp_path / "ep1"
    assert train_inprocess(ws1, *MODEL) == 0
    ep2 = tmp_path / "ep2"
    proc = train_torchrun(ep2, 2, *MODEL, "--expert-model-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lane = receipt(ep2)["lane"]
    assert (lane["ep"], lane["dp"], lane["world_size"]) == (2, 2, 2)
    assert train_losses(ep2) == pytest.approx(train_losses(ws1), rel=1e-5)
    bias1 = receipt(ws1)["moe"]["layers"]["1"]["expert_bias"]
    bias2 = receipt(ep2)["moe"]["layers"]["1"]["expert_bias"]
    assert bias2 == pytest.approx(bias1, rel=1e-5, abs=1e-7)

    resumed = tmp_path / "ep2_to_ep1"
    shutil.copytree(ep2, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_0000006")
    (resumed / "checkpoints" / checkpoint.TRACKER).write_text("3")
    assert train_inprocess(resumed, *MODEL, "--resume") == 0
    assert receipt(resumed)["loss"]["start_iteration"] == 3
    assert train_losses(resumed) == pytest.approx(train_losses(ws1), rel=1e-5)
