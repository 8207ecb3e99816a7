"""World size 2 on CPU with gloo, launched by torchrun like a user would.

TP=2 + sequence parallel must reproduce world size 1 from the same seed (Megatron pads the
vocabulary to a multiple of make_vocab_size_divisible_by * TP, so world size 1 uses 256 where TP=2
uses 128). PP=2 stages draw their initial weights from their own RNG positions, so PP is compared
by resuming a world-size-1 checkpoint on two stages (Megatron's distributed checkpoints reshard
across lanes) and checking that the next iterations equal world size 1's.
"""

import json
import shutil

import pytest

from megatron_ext.training import checkpoint
from tests.helpers import receipt, train_inprocess, train_losses, train_torchrun

pytestmark = pytest.mark.multirank
ITERS = ["--train-iters", "6", "--eval-iters", "0", "--lr-warmup-iters", "1"]
RESUMABLE = ["--train-iters", "10", "--eval-iters", "0", "--lr-warmup-iters", "1", "--save-interval", "5",
             "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "256"]


def _tp2_matches_ws1(tmp_path, tag, *model):
    ws1 = tmp_path / f"{tag}_ws1"
    assert train_inprocess(ws1, *ITERS, *model, "--make-vocab-size-divisible-by", "256") == 0
    tp2 = tmp_path / f"{tag}_tp2sp"
    proc = train_torchrun(tp2, 2, *ITERS, *model, "--tensor-model-parallel-size", "2", "--sequence-parallel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tp2) == pytest.approx(train_losses(ws1), rel=2e-5)
    lane = receipt(tp2)["lane"]
    assert (lane["tp"], lane["sp"], lane["dp"], lane["world_size"]) == (2, True, 1, 2)
    return ws1, tp2


def _pp2_continues_ws1(tmp_path, tag, *model):
    ws1 = tmp_path / f"{tag}_ws1_resumable"
    assert train_inprocess(ws1, *RESUMABLE, *model) == 0
    pp2 = tmp_path / f"{tag}_pp2"
    shutil.copytree(ws1, pp2)
    shutil.rmtree(pp2 / "checkpoints" / "iter_0000010")
    (pp2 / "checkpoints" / checkpoint.TRACKER).write_text("5")
    proc = train_torchrun(pp2, 2, *RESUMABLE, *model, "--pipeline-model-parallel-size", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert receipt(pp2)["lane"]["pp"] == 2 and receipt(pp2)["loss"]["start_iteration"] == 5
    assert train_losses(pp2) == pytest.approx(train_losses(ws1), rel=2e-5)
    assert train_losses(pp2)[-1] < train_losses(pp2)[0] - 0.5
    return ws1, pp2


def test_tp2_sequence_parallel_matches_world_size_1(tmp_path):
    _tp2_matches_ws1(tmp_path, "dense")


def test_pp2_resumes_a_world_size_1_checkpoint_exactly(tmp_path):
    _pp2_continues_ws1(tmp_path, "dense")


def test_mhc_tp2_sequence_parallel_matches_world_size_1(tmp_path):
    _tp2_matches_ws1(tmp_path, "mhc", "--mhc-num-streams", "4", "--mhc-backend", "torch")


def test_mhc_pp2_carries_the_streams_between_stages(tmp_path):
    _pp2_continues_ws1(tmp_path, "mhc", "--mhc-num-streams", "4", "--mhc-backend", "torch")


def _mtp_losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["mtp_1 loss"] for r in rows if r["kind"] == "train"]


def test_mtp_tp2_sequence_parallel_matches_world_size_1(tmp_path):
    """--mtp-num-layers at TP=2 + SP, with a fused MoE layer in the MTP layer: the MTP layer's
    shifted labels and its embedding of the next tokens are split over the sequence like the decoder's."""
    ws1, tp2 = _tp2_matches_ws1(tmp_path, "mtp", "--mtp-num-layers", "1", "--num-experts", "4")
    assert _mtp_losses(tp2) == pytest.approx(_mtp_losses(ws1), rel=2e-5)


def test_mtp_pp2_keeps_the_last_stages_embedding_copy_in_step(tmp_path):
    """--mtp-num-layers at PP=2: the MTP layer runs on the last stage, which keeps its own copy of
    the word embeddings (Megatron all-reduces its gradient with the first stage's); resumed from a
    world-size-1 checkpoint, the LM and MTP losses follow world size 1's."""
    ws1, pp2 = _pp2_continues_ws1(tmp_path, "mtp", "--mtp-num-layers", "1", "--num-experts", "4")
    assert _mtp_losses(pp2) == pytest.approx(_mtp_losses(ws1), rel=2e-5)
    assert "cpu_embedding_copy" in receipt(pp2)["patches"]


@pytest.mark.parametrize("lane,model", [
    (["--use-distributed-optimizer"], ["--num-experts", "4", "--mhc-num-streams", "2", "--mhc-backend", "torch"]),
    (["--use-distributed-optimizer", "--expert-model-parallel-size", "2"], ["--num-experts", "4"]),
    # bf16 model with fp32 mixer weights: the optimizer's groups mix dtypes (dist_optimizer_mixed_dtype_index)
    (["--use-distributed-optimizer"], ["--mhc-num-streams", "2", "--mhc-backend", "torch", "--bf16",
                                       "--mhc-fp32-params"]),
], ids=["dp2_moe_mhc", "ep2_moe", "dp2_bf16_fp32_mixers"])
def test_distributed_optimizer_matches_world_size_1_and_resumes_there(tmp_path, lane, model, monkeypatch):
    """Megatron's distributed optimizer over gloo equals world size 1: at DP=2 (gradients
    reduce-scattered, Adam states and fp32 masters sharded, parameters all-gathered), and at EP=2
    (dense parameters sharded over DP=2, experts split over EP with expert-DP 1). Its checkpoint
    ('fully_reshardable') then resumes at world size 1, EP=1, onto world size 1's losses."""
    model = [*model, "--save-interval", "3"]
    if "--bf16" in model:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # bf16 is refused under the interpreter
    ws1 = tmp_path / "ws1"
    assert train_inprocess(ws1, *ITERS, *model) == 0
    two = tmp_path / "two_ranks"
    proc = train_torchrun(two, 2, *ITERS, *model, *lane)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert receipt(two)["lane"]["dp"] == 2
    assert train_losses(two) == pytest.approx(train_losses(ws1), rel=2e-5)
    resumed = tmp_path / "resumed_at_ws1"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_0000006")
    (resumed / "checkpoints" / checkpoint.TRACKER).write_text("3")
    assert train_inprocess(resumed, *ITERS, *model, "--use-distributed-optimizer", "--resume") == 0
    assert receipt(resumed)["loss"]["start_iteration"] == 3
    assert train_losses(resumed) == pytest.approx(train_losses(ws1), rel=2e-5)
