"""The deterministic mode's batch-invariant row GEMM (``ops.moe.invariant_mm``): values and both
gradients against fp64 (interpreter on CPU, compiled on the GPU), and on the GPU bitwise equal
rows across batches and runs, then the fused MoE layer's deterministic mode built on it."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import EP2_ONE_DEVICE_PREAMBLE, EP2_ONE_DEVICE_TEARDOWN  # noqa: E402

needs_triton = triton_mark("megatron_ext.ops.moe.invariant_mm")


def _inputs(n, k, m, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    w = torch.randn(k, m, generator=g, dtype=torch.float64) / k ** 0.5
    dy = torch.randn(n, m, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (a, w, dy))


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("n,k,m", [(37, 50, 23), (64, 128, 64), (1, 16, 5)])
def test_values_and_gradients_match_fp64(dtype, tol, n, k, m):
    """Shapes off every tile edge; fp32 (the router's IEEE dots) and fp16 (tensor cores; the
    interpreter's dot is wrong on bf16, which the GPU test below covers)."""
    from megatron_ext.ops.moe.invariant_mm import invariant_mm

    a, w, dy = _inputs(n, k, m, dtype, seed=n + k + m)
    a.requires_grad_(True)
    w.requires_grad_(True)
    y = invariant_mm(a, w)
    y.backward(dy)
    a64, w64 = a.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = a64 @ w64
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == (n, m)
    for got, want in ((y, y64), (a.grad, a64.grad), (w.grad, w64.grad)):
        scale = want.abs().max().clamp(min=1.0)
        assert (got.double() - want).abs().max() / scale < tol


def test_bad_operands_name_what_is_wrong():
    from megatron_ext.ops.moe.invariant_mm import invariant_mm

    with pytest.raises(ValueError, match=r"a \(4, 8\) @ w \(7, 3\): need \[n, K\] @ \[K, N\]"):
        invariant_mm(torch.zeros(4, 8), torch.zeros(7, 3))
    with pytest.raises(ValueError, match="dtypes torch.float32 and torch.float64"):
        invariant_mm(torch.zeros(4, 8), torch.zeros(8, 3, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rows_are_bitwise_batch_invariant_and_runs_repeat(dtype):
    """A row's output and input gradient carry the same bits alone, in a batch of 8191 others
    and shuffled; two identical runs give identical bits, weight gradient included. (A library
    GEMM on the same rows differs: shown for the record, not required.)"""
    from megatron_ext.ops.moe.invariant_mm import invariant_mm

    a, w, dy = _inputs(8192, 2048, 320, dtype, seed=1)

    def run(rows, grads):
        ai, wi = rows.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = invariant_mm(ai, wi)
        y.backward(grads)
        return y, ai.grad, wi.grad

    full = run(a, dy)
    again = run(a, dy)
    for name, x, z in zip(("out", "da", "dw"), full, again):
        assert torch.equal(x, z), f"{name} differs between two identical runs"
    perm = torch.randperm(8192, device="cuda")
    shuffled = run(a[perm], dy[perm])
    pick = torch.tensor([0, 5, 777, 8191], device="cuda")
    alone = run(a[pick], dy[pick])
    for i, name in enumerate(("out", "da")):
        assert torch.equal(shuffled[i], full[i][perm]), f"{name} rows changed with their order"
        assert torch.equal(alone[i], full[i][pick]), f"{name} rows changed with the batch size"
    lib = (a[pick] @ w, (a @ w)[pick])
    print("library GEMM rows bitwise equal across batch sizes:", torch.equal(*lib))


# The layer scripts' shared part: given `layer`, `x`, `dy`, two identical steps must agree bit for
# bit, and the first 3 sequence positions alone must give the same output and input-gradient rows
# (no aux loss in these layers: its gradient is a function of the whole batch's load by definition);
# `first` holds the steps' tensors and `seen` the (op, observed backend) pairs of the receipt.
_DET_STEPS = r"""
def step(xs, dys):
    layer.zero_grad()
    xi = xs.clone().requires_grad_()
    y = layer(xi)[0]
    y.backward(dys)
    return [y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()]
first, second = step(x, dy), step(x, dy)
assert all(torch.equal(a, b) for a, b in zip(first, second)), "two identical steps differ"
part = step(x[:3].contiguous(), dy[:3].contiguous())
assert torch.equal(part[0], first[0][:3]) and torch.equal(part[1], first[1][:3]), "rows changed with the batch"
seen = {(r["op"], r["observed"]) for r in backends.records()}
"""


_LAYER_GPU_SCRIPT = r"""
import time, torch
from bench.parallel import ensure_model_parallel
ensure_model_parallel(cpu=False)
from megatron_ext import backends
from megatron_ext.config import from_preset
from megatron_ext.modules.moe import FusedMoELayer
from megatron_ext.training.model import transformer_config
tconfig = transformer_config(from_preset("test", hidden_size=512, num_attention_heads=4, num_experts=16,
                                         moe_ffn_hidden_size=384, moe_router_topk=4,
                                         moe_shared_expert_intermediate_size=512, moe_deterministic=True),
                             "cuda", True)
torch.manual_seed(0)
layer = FusedMoELayer(tconfig).to(device="cuda", dtype=torch.bfloat16).train()
layer.set_layer_number(1)
g = torch.Generator(device="cuda").manual_seed(5)
x = torch.randn(512, 4, 512, device="cuda", generator=g, dtype=torch.bfloat16)
dy = torch.randn(512, 4, 512, device="cuda", generator=g, dtype=torch.bfloat16)
""" + _DET_STEPS + r"""
assert ("moe_ffn", "triton") in seen and ("moe.deterministic_gemm", "triton") in seen, seen
assert not any(o == "deterministic_chunks" for _, o in seen), seen
print("det-layer-ok", flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_gpu_deterministic_moe_layer_runs_the_fused_lanes_batch_invariant():
    """--moe-deterministic on the GPU: the Triton experts and the fixed-tiling GEMMs of the router
    and the shared expert give bitwise repeatable steps, and a token's output and input gradient
    do not depend on the rest of the batch (subprocess: see tests/test_train_gpu.py why)."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-c", _LAYER_GPU_SCRIPT], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "det-layer-ok" in proc.stdout


# Two ranks on one GPU (tests.helpers.EP2_ONE_DEVICE_PREAMBLE). DEV=cpu runs the same script on the
# CPU lane (the chunked experts), which checks the script itself where no GPU is.
_EP_SCRIPT = EP2_ONE_DEVICE_PREAMBLE + r"""
from megatron_ext.modules import moe as moe_mod
tconfig = transformer_config(from_preset("test", hidden_size=256, num_attention_heads=4, num_experts=8,
                                         moe_ffn_hidden_size=192, moe_router_topk=2,
                                         moe_shared_expert_intermediate_size=256, moe_deterministic=True,
                                         expert_model_parallel_size=2), dev, True)
torch.manual_seed(0)
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
layer = moe_mod.FusedMoELayer(tconfig).to(device=dev, dtype=dtype).train()
layer.set_layer_number(1)
assert layer.ep_size == 2 and layer.num_local_experts == 4
g = torch.Generator(device=dev).manual_seed(5 + rank)   # each rank its own tokens
x = torch.randn(96, 2, 256, device=dev, generator=g).to(dtype)
dy = torch.randn(96, 2, 256, device=dev, generator=g).to(dtype)
""" + _DET_STEPS + r"""
if dev == "cuda":
    assert ("moe_ffn.deterministic", "triton") in seen, seen
    assert not any(o == "deterministic_chunks" for _, o in seen), seen
    # the lane it replaced at EP > 1 (each expert's rows through the fixed-tiling GEMM, fp32 back)
    # gives the same values up to bf16 rounding
    moe_mod.batch_invariant = lambda *a, **k: False
    ref = step(x, dy)
    for i, (a, b) in enumerate(zip(first, ref)):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 2e-2, (i, err)
else:
    assert ("moe_ffn", "deterministic_chunks") in seen, seen
print(f"ep-det-ok rank {rank}", flush=True)
""" + EP2_ONE_DEVICE_TEARDOWN


def _run_ep_script(dev: str, tmp_path):
    from tests.helpers import torchrun_script

    torchrun_script(_EP_SCRIPT, tmp_path, 2, "ep-det-ok", DEV=dev)


@pytest.mark.multirank
def test_ep2_deterministic_layer_repeats_and_is_batch_invariant_on_cpu(tmp_path):
    """--moe-deterministic at EP=2 (gloo, CPU lane: the chunked experts): two steps bitwise
    equal, a token's rows the same in a smaller batch."""
    _run_ep_script("cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_gpu_ep2_deterministic_layer_runs_the_triton_experts(tmp_path):
    """--moe-deterministic at EP=2 on the GPU (two ranks on one device over gloo): the Triton
    experts after the dispatch, bitwise repeatable and batch-invariant, within bf16 rounding of
    the per-expert fixed-tiling lane they replace."""
    _run_ep_script("cuda", tmp_path)
