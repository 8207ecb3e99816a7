"""FSDP2 in ``megatron-ext train``: config rejections, and on CPU with gloo (one torchrun launch for
every world-size-2 run) the same loss and grad-norm curve as replicated data parallelism at world
size 1, resume after a save, and checkpoints that cross between the two layouts.

One chain of runs (6 steps, a save every 3, validation at 3 and 6):
  ref          world size 1, Megatron DDP: the reference curve                            (in-process)
  fsdp         world size 2, --use-torch-fsdp2, stopped after step 3, then --resume: steps 1..6 == ref
  ddp_to_fsdp  ref's step-3 checkpoint resumed under --lanes fsdp2 at world size 2: steps 4..6 == ref
  fsdp_to_ddp  fsdp's step-3 checkpoint resumed at world size 1 without FSDP2: 4..6 == fsdp  (in-process)
The vocabulary is padded to 259 rows so the embedding (an odd row count) takes the gathered path of
uneven shards while the other weights are saved as per-rank rows.
"""

import json
import subprocess
import sys

import pytest

from megatron_ext.config import ConfigError, TrainConfig, validate
from megatron_ext.training import checkpoint
from tests.helpers import ROOT, receipt, resume_from, subprocess_env, train_inprocess, train_losses

COMMON = ["--train-iters", "6", "--eval-iters", "1", "--eval-interval", "3", "--lr-warmup-iters", "1",
          "--save-interval", "3", "--make-vocab-size-divisible-by", "7"]
REL = 1e-5  # fp32, two ranks reduce-scatter what one rank sums over two micro-batches


@pytest.mark.parametrize("fields,message", [
    (dict(tensor_model_parallel_size=2), "tensor_model_parallel_size=2: FSDP2 in train shards over data "
                                         "parallelism only"),
    (dict(pipeline_model_parallel_size=2), "pipeline_model_parallel_size=2: FSDP2 does not run under pipeline"),
    (dict(num_experts=2, expert_model_parallel_size=2), "expert_model_parallel_size=2: FSDP2 does not shard"),
    (dict(num_experts=2), "num_experts=2: MoE layers are not run under FSDP2 in train yet"),
    (dict(mhc_num_streams=2, mhc_fp32_params=True), "mhc_fp32_params=True: FSDP2 gathers every parameter"),
])
def test_fsdp2_rejects_lanes_it_does_not_compose_with(fields, message):
    cfg = TrainConfig(num_layers=2, hidden_size=64, num_attention_heads=4, micro_batch_size=1,
                      global_batch_size=4, use_torch_fsdp2=True, **fields)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=4)
    assert validate(TrainConfig(num_layers=2, hidden_size=64, num_attention_heads=4, micro_batch_size=1,
                                global_batch_size=4, use_torch_fsdp2=True), world_size=4) == 4


def _grad_norms(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["grad_norm"] for r in rows if r["kind"] == "train"]


def _argv(run_dir, *extra):
    return ["train", "--preset", "test", "--runs-root", str(run_dir.parent), "--run-dir", str(run_dir),
            "--progress", "log", "--device", "cpu", "--data-cache-dir", str(run_dir.parent / ".data-cache"),
            *COMMON, *extra]


@pytest.mark.multirank
def test_fsdp2_matches_ddp_resumes_and_crosses_layouts(tmp_path):
    ref = tmp_path / "ref"
    assert train_inprocess(ref, *COMMON) == 0
    ref_losses, ref_norms = train_losses(ref), _grad_norms(ref)
    assert len(ref_losses) == 6 and ref_losses[-1] < ref_losses[0]
    assert max(ref_norms) > 1.0  # above clip_grad=1.0: the clipped path is what gets compared

    fsdp, ddp_to_fsdp = tmp_path / "fsdp", resume_from(ref, tmp_path / "ddp_to_fsdp", 3)
    runs = [_argv(fsdp, "--use-torch-fsdp2", "--exit-after-iters", "3"),
            _argv(fsdp, "--use-torch-fsdp2", "--resume"),
            _argv(ddp_to_fsdp, "--lanes", "fsdp2", "--resume")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "tests" / "fsdp2_driver.py"), json.dumps(runs)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(l for l in out.splitlines() if "rank1" in l or "Error" in l)[-4000:]
    assert "dp=2 (fsdp2)" in out and out.count("resumed from iteration 3") == 2

    # world size 2 with FSDP2 == world size 1 with DDP, through a save and a resume
    assert receipt(fsdp)["lane"]["fsdp2"] and receipt(fsdp)["lane"]["dp"] == 2
    assert receipt(fsdp)["loss"]["start_iteration"] == 3
    assert train_losses(fsdp) == pytest.approx(ref_losses, rel=REL)
    assert _grad_norms(fsdp) == pytest.approx(ref_norms, rel=REL)
    # each rank wrote its own rows (two chunks per weight); the odd-sized embedding went gathered
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint.iteration_dir(fsdp / "checkpoints", 3))).read_metadata()
    chunks = {k: len(v.chunks) for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks")}
    assert chunks["decoder.final_layernorm.weight"] == 2 and chunks["embedding.word_embeddings.weight"] == 1
    assert meta.state_dict_metadata["embedding.word_embeddings.weight"].size[0] == 259

    # DDP (world size 1) checkpoint -> FSDP2 (world size 2), picked by the lane planner
    lane = receipt(ddp_to_fsdp)["lane"]
    assert lane["fsdp2"] and lane["world_size"] == 2
    assert train_losses(ddp_to_fsdp)[3:] == pytest.approx(ref_losses[3:], rel=REL)

    # FSDP2 (world size 2) checkpoint -> DDP (world size 1)
    fsdp_to_ddp = resume_from(fsdp, tmp_path / "fsdp_to_ddp", 3)
    assert train_inprocess(fsdp_to_ddp, *COMMON, "--resume") == 0
    assert not receipt(fsdp_to_ddp)["lane"]["fsdp2"] and receipt(fsdp_to_ddp)["loss"]["start_iteration"] == 3
    assert train_losses(fsdp_to_ddp)[3:] == pytest.approx(train_losses(fsdp)[3:], rel=REL)
