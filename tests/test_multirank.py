"""World size 2 on CPU with gloo, launched by torchrun like a user would.

TP=2 + sequence parallel must reproduce world size 1 (same seed, same padded vocab: Megatron pads
the vocabulary to a multiple of make_vocab_size_divisible_by * TP, so world size 1 uses 256 where
TP=2 uses 128). PP=2 initialises its stages from different RNG positions and unties embeddings, so
it is checked for a falling loss and a checkpoint, not for equality.
"""

import pytest

from megatron_ext.training import checkpoint
from tests.helpers import receipt, train_inprocess, train_losses, train_torchrun

pytestmark = pytest.mark.multirank
ITERS = ["--train-iters", "6", "--eval-iters", "0", "--lr-warmup-iters", "1"]


def test_tp2_sequence_parallel_matches_world_size_1(tmp_path):
    ws1 = tmp_path / "ws1"
    assert train_inprocess(ws1, *ITERS, "--make-vocab-size-divisible-by", "256") == 0
    tp2 = tmp_path / "tp2sp"
    proc = train_torchrun(tp2, 2, *ITERS, "--tensor-model-parallel-size", "2", "--sequence-parallel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tp2) == pytest.approx(train_losses(ws1), rel=2e-5)
    lane = receipt(tp2)["lane"]
    assert (lane["tp"], lane["sp"], lane["dp"], lane["world_size"]) == (2, True, 1, 2)


def test_pp2_trains_and_checkpoints(tmp_path):
    run = tmp_path / "pp2"
    proc = train_torchrun(run, 2, *ITERS, "--pipeline-model-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert checkpoint.latest_iteration(run / "checkpoints") == 6
    assert receipt(run)["lane"]["pp"] == 2
