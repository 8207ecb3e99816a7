"""Fused MoE at world size 2 on CPU (gloo), torchrun spawns against one world-size-1 run:

The model has a gated shared expert (Megatron's --moe-shared-expert-gate), so its gate's gradient is
checked on every lane below too.

* expert parallel EP=2 (one expert half per rank, tokens exchanged by all-to-all, the dispatch
  overlapped with the shared expert), with the MoE layer recomputed in backward, reproduces
  world size 1, and its checkpoint (experts sharded over EP) resumes at EP=1 with world size
  1's losses, and world size 1's at EP=2 (the optimizer one way a chain, the other one);
* expert tensor parallel TP=2 + sequence parallel (every expert and the shared expert split
  along F) reproduces world size 1, routes the same tokens to the same experts (routing logs),
  and its checkpoint (experts sharded over TP) resumes at TP=1;
* TP=2 + SP without expert TP (--expert-tensor-parallel-size 1), alone and with EP=2 over the
  same ranks, reproduces world size 1, and the EP=2 run's checkpoint resumes at world size 1;
* checkpoints in Megatron MoELayer's layout (--moe-checkpoint-format megatron) written on two
  ranks move between the fused layer and Megatron's, optimizer state included.

Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * TP, so every run
here pads to 256 (128 * 2 for the TP=2 run)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import (EP2_ONE_DEVICE_PREAMBLE, EP2_ONE_DEVICE_TEARDOWN, ROOT, receipt, resume_from,
                           subprocess_env, torchrun_script, train_inprocess, train_losses, train_torchrun)

pytestmark = pytest.mark.multirank
MODEL = ["--train-iters", "6", "--eval-iters", "0", "--lr-warmup-iters", "1", "--save-interval", "3",
         "--num-layers", "2", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--num-experts", "4", "--moe-aux-loss-coeff", "0.01",
         "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
         "--moe-router-bias-update-rate", "0.01", "--moe-z-loss-coeff", "0.001",
         "--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-gate", "--moe-backend", "torch"]
VOCAB_256 = ["--make-vocab-size-divisible-by", "256"]


@pytest.fixture(scope="module")
def ws1(tmp_path_factory):
    run = tmp_path_factory.mktemp("moe") / "ws1"
    assert train_inprocess(run, *MODEL, *VOCAB_256, "--moe-routing-log", str(run / "routing_log")) == 0
    return run


def _resume_at_world_size_1(src, dst, *extra):
    resume_from(src, dst, 3)
    assert train_inprocess(dst, *MODEL, *extra, "--resume") == 0
    assert receipt(dst)["loss"]["start_iteration"] == 3
    return train_losses(dst)


def _grad_norms(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [r["grad_norm"] for r in rows if r["kind"] == "train"]


def _flat(nested):
    return [v for row in nested for tok in row for v in tok]


def _saved(run, name, iteration=6):
    """Parameter ``name`` of the MoE layers (stacked over layers) in ``run``'s checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import torch

    out = run / f"{name}.pt"
    dcp_to_torch_save(str(run / "checkpoints" / f"iter_{iteration:07d}"), str(out))
    state = torch.load(out, weights_only=False)
    return state[f"decoder.layers.mlp.{name}"]


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ep2_matches_ep1_and_its_checkpoint_resumes_at_ep1(ws1, tmp_path):
    """EP=2 with Megatron's MoE layer recompute (--recompute-modules moe): backward runs the
    dispatch, the experts and the combine again, exchanges included, and still gives world size 1's
    losses."""
    ep2 = tmp_path / "ep2"
    proc = train_torchrun(ep2, 2, *MODEL, *VOCAB_256, "--expert-model-parallel-size", "2",
                          "--recompute-granularity", "selective", "--recompute-modules", "moe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lane = receipt(ep2)["lane"]
    assert (lane["ep"], lane["dp"], lane["world_size"]) == (2, 2, 2)
    assert {r["op"]: r for r in receipt(ep2)["backends"]}["moe_recompute"]["requested"] == "moe"
    assert train_losses(ep2) == pytest.approx(train_losses(ws1), rel=1e-5)
    bias1 = receipt(ws1)["moe"]["layers"]["1"]["expert_bias"]
    bias2 = receipt(ep2)["moe"]["layers"]["1"]["expert_bias"]
    assert bias2 == pytest.approx(bias1, rel=1e-5, abs=1e-7)
    resumed = _resume_at_world_size_1(ep2, tmp_path / "ep2_to_ep1", *VOCAB_256)
    assert resumed == pytest.approx(train_losses(ws1), rel=1e-5)

    # and back: world size 1's checkpoint (one optimizer) resumes at EP=2 (a chain [dense, expert])
    up = resume_from(ws1, tmp_path / "ep1_to_ep2", 3)
    proc = train_torchrun(up, 2, *MODEL, *VOCAB_256, "--expert-model-parallel-size", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimizer state written by one optimizer, loaded into a chain of 2 optimizers" in proc.stdout + proc.stderr
    assert receipt(up)["loss"]["start_iteration"] == 3
    assert train_losses(up) == pytest.approx(train_losses(ws1), rel=1e-5)


def test_tp2_sequence_parallel_matches_ws1_routes_alike_and_resumes_at_tp1(ws1, tmp_path):
    tp2 = tmp_path / "tp2"
    proc = train_torchrun(tp2, 2, *MODEL, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                          "--moe-routing-log", str(tp2 / "routing_log"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lane = receipt(tp2)["lane"]
    assert (lane["tp"], lane["sp"], lane["dp"], lane["world_size"]) == (2, True, 1, 2)
    assert train_losses(tp2) == pytest.approx(train_losses(ws1), rel=2e-5)
    bias1 = receipt(ws1)["moe"]["layers"]["2"]["expert_bias"]
    assert receipt(tp2)["moe"]["layers"]["2"]["expert_bias"] == pytest.approx(bias1, rel=1e-4, abs=1e-7)

    # the TP ranks route alike, so only TP rank 0 logs; its log is world size 1's
    assert sorted(p.name for p in (tp2 / "routing_log").iterdir()) == ["rank00000.jsonl"]
    want, got = _log(ws1 / "routing_log" / "rank00000.jsonl"), _log(tp2 / "routing_log" / "rank00000.jsonl")
    assert len(want) == len(got) == 6 * 2 * 2  # iterations x micro-batches x layers
    assert [(r["iteration"], r["micro_batch"], r["layer"]) for r in got] == \
        [(r["iteration"], r["micro_batch"], r["layer"]) for r in want]
    first = got[0]
    assert (first["batch"], first["seq"], first["topk"]) == (2, 32, 2)
    assert first["expert_ids"] == want[0]["expert_ids"]
    assert _flat(first["probs"]) == pytest.approx(_flat(want[0]["probs"]), rel=1e-5, abs=1e-6)
    pairs = [a == b for r, w in zip(got, want) for a, b in zip(_flat(r["expert_ids"]), _flat(w["expert_ids"]))]
    assert sum(pairs) >= 0.99 * len(pairs)  # later steps: a near-tie may flip on rounding

    # the shared expert's gate: each TP rank's gradient covers its F slice of the shared output,
    # summed over TP (a missing sum would leave the losses close but move the gate differently)
    gate1, gate2 = _saved(ws1, "shared_gate_weight"), _saved(tp2, "shared_gate_weight")
    assert gate1.shape == (2, 1, 32)  # [layers, 1, H]
    assert (gate1 - _saved(ws1, "shared_gate_weight", 3)).abs().max() > 1e-4  # it trained
    torch.testing.assert_close(gate2, gate1, rtol=1e-4, atol=1e-6)

    resumed = _resume_at_world_size_1(tp2, tmp_path / "tp2_to_tp1", *VOCAB_256)
    assert resumed == pytest.approx(train_losses(ws1), rel=2e-5)


def test_tp2_without_expert_tp_matches_ws1_and_resumes_at_world_size_1(ws1, tmp_path):
    """TP=2 + SP with --expert-tensor-parallel-size 1 (whole experts on each rank, each running its
    own tokens; Megatron's MoE parallel folding): alone (the expert-DP group is the TP pair, so DDP
    sums the expert gradients of the two token halves) and with EP=2 over the same two ranks (each
    dispatches only its own tokens). Both reproduce world size 1; the EP=2 checkpoint resumes there."""
    runs = {}
    for name, extra in (("etp1", []), ("etp1_ep2", ["--expert-model-parallel-size", "2"])):
        run = tmp_path / name
        proc = train_torchrun(run, 2, *MODEL, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--expert-tensor-parallel-size", "1", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run
    for name, ep in (("etp1", 1), ("etp1_ep2", 2)):
        lane = receipt(runs[name])["lane"]
        assert (lane["tp"], lane["etp"], lane["ep"], lane["sp"], lane["world_size"]) == (2, 1, ep, True, 2)
        assert train_losses(runs[name]) == pytest.approx(train_losses(ws1), rel=2e-5), name
        # the expert weights count once in the clipped grad norm, as at world size 1
        assert _grad_norms(runs[name]) == pytest.approx(_grad_norms(ws1), rel=1e-4), name
        bias1 = receipt(ws1)["moe"]["layers"]["2"]["expert_bias"]
        assert receipt(runs[name])["moe"]["layers"]["2"]["expert_bias"] == \
            pytest.approx(bias1, rel=1e-4, abs=1e-7), name
        # the shared expert's gate: each TP rank's gradient covers its own tokens, summed over TP
        torch.testing.assert_close(_saved(runs[name], "shared_gate_weight"), _saved(ws1, "shared_gate_weight"),
                                   rtol=1e-4, atol=1e-6, msg=name)
    resumed = _resume_at_world_size_1(runs["etp1_ep2"], tmp_path / "etp1_ep2_to_ws1", *VOCAB_256)
    assert resumed == pytest.approx(train_losses(ws1), rel=2e-5)


def test_megatron_layout_across_ranks_moves_between_the_two_layers(tmp_path):
    """--moe-checkpoint-format megatron on two ranks, optimizer state included: the fused layer at
    TP=2 + SP (every expert split along F, the [gate; up] halves of linear_fc1 sharded as Megatron's
    SwiGLU factory shards them) resumes at world size 1 as Megatron's MoELayer, and Megatron's
    MoELayer at EP=2 (its optimizer a chain [dense, expert]) resumes at world size 1 as the fused
    layer (one optimizer): each repeats its source run's losses."""
    fused = ["--moe-checkpoint-format", "megatron", *VOCAB_256]
    megatron = ["--moe-impl", "megatron", *VOCAB_256]
    for name, src, lane, dst in (
            ("fused_tp2", fused, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], megatron),
            ("megatron_ep2", megatron, ["--expert-model-parallel-size", "2"], fused)):
        run = tmp_path / name
        proc = train_torchrun(run, 2, *MODEL, *src, *lane)
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = _resume_at_world_size_1(run, tmp_path / f"{name}_to_ws1", *dst)
        assert resumed == pytest.approx(train_losses(run), rel=2e-5), name


def test_ep_scaling_script_runs_on_gloo(tmp_path):
    """scripts/moe_ep_scaling.py at tiny sizes, all tokens routed to the last rank: a row per EP
    size, the bytes it counts are consistent (each row sent off-rank in the dispatch comes back in
    the combine), and a rank whose experts get no rows still completes forward and backward. With
    --anchor, Megatron's MoELayer (local spec) is timed at each EP size too."""
    out = tmp_path / "scaling.json"
    # every token to the last rank's experts: rank 0 receives no rows, yet must join the dispatch's
    # reverse exchange in backward (it once skipped it: NCCL hung, gloo aborted)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "scripts" / "moe_ep_scaling.py"), "--device", "cpu", "--tiny", "--json", str(out),
           "--route-to-last-rank", "--anchor"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fwd+bwd ms" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["ep"] for r in rows] == [1, 2]
    ep1, ep2 = rows
    assert ep1["fwd_bwd_ms"] > 0 and ep1["dispatch_ms"] is None
    assert ep2["dispatch_ms"] > 0 and ep2["combine_ms"] > 0 and ep2["dispatch_gbps"] > 0
    h = ep2["hidden"]
    rows_out = ep2["dispatch_bytes_per_rank"] / (4 * h + 4 + 8)  # fp32 row + fp32 gate + int64 id
    assert rows_out == pytest.approx(ep2["combine_bytes_per_rank"] / (4 * h))
    assert rows_out > 0
    assert ep2["route_to_last_rank"] and ep2["min_rows_received"] == 0
    assert ep1["megatron_ms"] > 0 and ep2["megatron_ms"] > 0 and "x Megatron" in proc.stdout


# EP=2 on two CPU ranks under Megatron's DistributedDataParallel: the deferred zeroing of the fused
# experts' gradient slices (patches/grad_buffers.py), and the overlapped grad reduce, on a rank
# whose experts receive no rows in a step after one in which they did. Every buffer is filled with NaN before each step's
# zero_grad_buffer, so a slice that nothing settles shows up as NaN.
_EP2_DEFERRED_ZEROING_SCRIPT = EP2_ONE_DEVICE_PREAMBLE + r"""
from megatron.core.distributed import DistributedDataParallel
from megatron_ext.config import MoEConfig
from megatron_ext.modules.moe import FusedMoELayer
from megatron_ext.ops.moe.autograd import STALE
H, T, k, E = 32, 24, 2, 4
ROUTES = ("spread", "rank 1 receives nothing", "spread")
lanes = {"fused": ("triton", True), "unfused": ("torch", False), "torch": ("torch", True)}
for dist_opt, overlap in ((False, False), (True, True)):
    got = {}
    for lane, (backend, fuse) in lanes.items():
        tconfig = transformer_config(from_preset("test", hidden_size=H, num_attention_heads=4, num_experts=E,
                                                 moe_ffn_hidden_size=48, moe_router_topk=k,
                                                 expert_model_parallel_size=2), dev, False)
        tconfig.moe = MoEConfig(backend=backend, gradient_accumulation_fusion=fuse)
        torch.manual_seed(0)
        layer = FusedMoELayer(tconfig)
        layer.set_layer_number(1)
        assert layer.ep_size == 2 and layer.num_local_experts == E // 2
        ddp = DistributedDataParallel(tconfig, compat.ddp_config(grad_reduce_in_fp32=True,
                                                                 use_distributed_optimizer=dist_opt,
                                                                 overlap_grad_reduce=overlap), layer)
        g = torch.Generator(device=dev).manual_seed(5 + rank)   # each rank its own tokens, the same in every lane
        for step, route in enumerate(ROUTES):
            for p in layer.parameters():
                p.main_grad.fill_(float("nan"))   # whatever the buffer holds from the last step
            ddp.zero_grad_buffer()
            for p in (layer.w1, layer.w2):   # deferred: the slice still holds NaN
                assert getattr(p, STALE, False) == fuse and p.main_grad.isnan().all().item() == fuse
            x = torch.randn(T, H, device=dev, generator=g, requires_grad=True)
            probs = torch.rand(T, k, device=dev, generator=g)
            width = E if route == "spread" else E // 2   # E // 2: rank 0's experts only
            idx = torch.rand(T, width, device=dev, generator=g).argsort(-1)[:, :k]
            layer._routed(x, probs, idx).backward(torch.randn(T, H, device=dev, generator=g))
            empty = route != "spread" and rank == 1
            assert (layer.last_recv_rows == 0) == empty, (lane, step, layer.last_recv_rows)
            stored = lane == "fused" and not empty   # the kernel wrote main_grad, not the DDP hook
            assert all(p.grad_added_to_main_grad == stored for p in (layer.w1, layer.w2)), (lane, step)
            ddp.finish_grad_sync()   # settles a slice no gradient reached, then reduces
            got[lane, step] = {n: p.main_grad.clone() for n, p in layer.named_parameters()}
            for n, v in got[lane, step].items():
                assert v.isfinite().all(), (lane, dist_opt, overlap, step, n)
            experts = (got[lane, step]["w1"], got[lane, step]["w2"])
            assert all((not v.any()) if empty else v.abs().sum() > 0 for v in experts), (lane, step)
    seen = {(r["op"], r["observed"]) for r in backends.records()}
    assert ("moe_ffn", "triton") in seen and ("moe_ffn", "torch") in seen, seen
    for lane in ("fused", "torch"):
        for step in range(len(ROUTES)):
            for n, want in got["unfused", step].items():
                torch.testing.assert_close(got[lane, step][n], want, rtol=1e-5, atol=1e-6,
                                           msg=f"{lane}, dist_opt={dist_opt}, overlap={overlap}, step {step}: {n}")
    print(f"rank {rank} dist_opt={dist_opt} overlap={overlap}: three lanes agree over {len(ROUTES)} steps",
          flush=True)
print(f"ep2-deferred-ok rank {rank}", flush=True)
""" + EP2_ONE_DEVICE_TEARDOWN


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU lane: the Triton interpreter runs where no GPU is "
                    "(on a CUDA host the kernels compile, and two ranks sharing one GPU cannot run "
                    "Megatron's grad sync over gloo, which refuses CUDA tensors); on the GPU the "
                    "deferral runs at world size 1 in test_ops_moe_triton.py and test_moe_layer.py")
def test_ep2_rank_without_rows_gets_zeros_not_last_steps_expert_grads(tmp_path):
    """EP=2 under Megatron's DDP (plain buffers; then the distributed optimizer's with the
    overlapped grad reduce), fp32 gradient buffers: with the experts' gradient-accumulation fusion,
    ``zero_grad_buffer`` leaves their slices unzeroed for the first micro-batch's store. A step in
    which rank 1's experts receive no rows (after one in which they did, and before one in which
    they do again) must leave zeros there after the grad sync, not the old contents; and under the
    overlapped reduce, which a bucket starts once every weight in it has had its gradient hook,
    the empty rank's experts still get a (zero) gradient (without one, ``finish_grad_sync``
    stopped: "Communication call has not been issued for this bucket"). The fused Triton store (under its CPU
    interpreter) and the torch backend with the fusion asked for (Megatron's DDP hook adds, after
    the weight's own hook zeroed the slice) give in every step what the torch backend without the
    fusion gives, whose buffers are zeroed as Megatron zeroes them."""
    torchrun_script(_EP2_DEFERRED_ZEROING_SCRIPT, tmp_path, 2, "ep2-deferred-ok", DEV="cpu",
                    TRITON_INTERPRET="1")
