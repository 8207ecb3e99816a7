"""Checkpoints across lanes, and a killed rank, on CPU with gloo (two torchrun launches in all).

Megatron's distributed checkpoints store every tensor with its global shape and each rank's slice,
so a checkpoint saved at TP=2 (+SP) loads at TP=1 and the other way round, as long as both lanes
pad the vocabulary to the same size (``make_vocab_size_divisible_by * TP`` equal on both sides).
TP=2 + SP reproduces world size 1 step for step to ~1e-6 relative (tests/test_multirank.py), so a
resumed run at the other lane must land on the same curve as the run that kept going.

One chain of runs covers the three claims (saves every 3 steps, 10 steps):
  ws1       world size 1 from scratch: the uninterrupted curve                        (in-process)
  killed    TP=2+SP resuming ws1's step-3 checkpoint (TP1 -> TP2); saves step 6 at TP=2;
            rank 1 dies right after step 7; steps 4..7 == ws1's                          (torchrun)
  killed, relaunched with --resume: starts at 6 (the last save), its step 7 == the one the
            killed run logged, steps 7..10 == ws1's                                      (torchrun)
  tp1       the killed run's step-6 TP=2 checkpoint resumed at TP=1 (TP2 -> TP1): steps 7..10 ==
            the relaunched TP=2 run's                                                    (in-process)
"""


import pytest

from megatron_ext.training import checkpoint, faults
from tests.helpers import receipt, resume_from, train_inprocess, train_losses, train_torchrun

pytestmark = pytest.mark.multirank
COMMON = ["--train-iters", "10", "--eval-iters", "0", "--lr-warmup-iters", "1", "--save-interval", "3"]
# Both lanes pad the vocabulary to a multiple of 256: TP=1 by itself, TP=2 as 128 * 2.
WS1 = ["--make-vocab-size-divisible-by", "256"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--make-vocab-size-divisible-by", "128"]
REL = 2e-5  # TP=2 vs TP=1 reduce in a different order; same-lane comparisons are much tighter


def test_checkpoints_reshard_between_tp1_and_tp2_and_survive_a_killed_rank(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    ws1 = tmp_path / "ws1"
    assert train_inprocess(ws1, *COMMON, *WS1) == 0
    ref = train_losses(ws1)
    assert len(ref) == 10 and ref[-1] < ref[0]

    # TP=1 -> TP=2: ws1's step-3 checkpoint resumed on two tensor-parallel ranks, whose rank 1 then
    # dies right after step 7; the last save is its own step 6, written at TP=2.
    killed = resume_from(ws1, tmp_path / "killed", 3)
    monkeypatch.setenv(faults.ENV, "1@7")
    proc = train_torchrun(killed, 2, *COMMON, *TP2, "--resume")
    monkeypatch.delenv(faults.ENV)
    assert proc.returncode != 0 and f"{faults.ENV}: rank 1 killed after iteration 7" in proc.stderr
    assert "resumed from iteration 3" in proc.stderr + proc.stdout
    assert checkpoint.latest_iteration(killed / "checkpoints") == 6
    assert not (killed / "receipt.json").exists()
    before_kill = train_losses(killed)
    assert len(before_kill) >= 7  # rank 0 logged step 7 (and maybe 8 was under way) before it was stopped
    assert before_kill[:7] == pytest.approx(ref[:7], rel=REL)
    tp2_to_tp1 = resume_from(killed, tmp_path / "tp2_to_tp1", 6)  # the TP=2 step-6 checkpoint, for below

    # Relaunch in place: starts at the last save and lands on the uninterrupted curve.
    proc = train_torchrun(killed, 2, *COMMON, *TP2, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from iteration 6" in proc.stderr + proc.stdout
    lane, loss = receipt(killed)["lane"], receipt(killed)["loss"]
    assert (lane["tp"], lane["sp"], lane["world_size"], loss["start_iteration"]) == (2, True, 2, 6)
    relaunched = train_losses(killed)
    assert len(relaunched) == 10
    assert relaunched[6] == pytest.approx(before_kill[6], rel=1e-6)  # step 7 again: same lane, same state
    assert relaunched == pytest.approx(ref, rel=REL)

    # TP=2 -> TP=1: the step-6 checkpoint saved at TP=2, resumed on one rank, continues like the TP=2 run
    assert train_inprocess(tp2_to_tp1, *COMMON, *WS1, "--resume") == 0
    assert receipt(tp2_to_tp1)["lane"]["tp"] == 1 and receipt(tp2_to_tp1)["loss"]["start_iteration"] == 6
    assert train_losses(tp2_to_tp1)[6:] == pytest.approx(relaunched[6:], rel=REL)
