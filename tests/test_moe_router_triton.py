"""The fused top-k gate (``triton_router.topk_gate``, ``route(backend="triton")``) against the
torch expressions of ``route()`` (the spec) and fp64: selection, gates and the logit gradient for
every score mode, the whole router result with losses and capacity, ties, the lane's fallbacks;
CPU interpreter here, the benchmark's shape on the GPU."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops.moe.routing import RouterConfig, route  # noqa: E402

needs_triton = triton_mark("megatron_ext.ops.moe.triton_moe")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _fp64_gate(logits, k, mode, bias, normalize, scale):
    """The gate in fp64 with torch.topk (ties have probability 0 for random logits)."""
    if mode == "softmax":
        idx = logits.topk(k, -1).indices
        p = torch.softmax(logits.gather(1, idx), -1)
    elif mode == "pre_softmax":
        s = torch.softmax(logits, -1)
        idx = s.topk(k, -1).indices
        p = s.gather(1, idx)
    else:
        s = torch.sigmoid(logits)
        idx = (s + (0 if bias is None else bias.double())).topk(k, -1).indices
        p = s.gather(1, idx)
        if normalize:
            p = p / (p.sum(-1, keepdim=True) + 1e-20)
    return p * scale, idx


GATES = [("softmax", False, False), ("pre_softmax", False, False), ("sigmoid", False, False),
         ("sigmoid", True, False), ("sigmoid", True, True)]


@needs_triton
@pytest.mark.parametrize("mode,normalize,with_bias", GATES)
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (19, 64, 6), (5, 130, 8), (6, 4, 4), (9, 5, 1)])
def test_topk_gate_matches_fp64_fwd_and_grad(mode, normalize, with_bias, T, E, k):
    from megatron_ext.ops.moe.triton_router import topk_gate

    g = _gen(T * E + k)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    bias = torch.randn(E, generator=g) * 0.1 if with_bias else None
    dp = torch.randn(T, k, generator=g, dtype=torch.float64)
    scale = 2.5
    lf = logits.float().to(DEVICE).requires_grad_()
    probs, idx = topk_gate(lf, k, mode, None if bias is None else bias.to(DEVICE), normalize, scale)
    (probs.double() * dp.to(DEVICE)).sum().backward()
    ref = logits.clone().requires_grad_()
    p_ref, idx_ref = _fp64_gate(ref, k, mode, bias, normalize, scale)
    (p_ref * dp).sum().backward()
    assert probs.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), idx_ref)
    assert (probs.double().cpu() - p_ref).abs().max().item() <= 1e-6 * scale
    assert (lf.grad.double().cpu() - ref.grad).abs().max().item() <= 2e-6 * scale
    if mode != "pre_softmax":   # only the pre-softmax gate reaches unselected logits
        off = torch.ones(T, E, dtype=torch.bool)
        off[torch.arange(T)[:, None], idx_ref] = False
        assert torch.all(lf.grad.cpu()[off] == 0)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered")   # the -inf row's softmax is NaN
def test_topk_gate_ties_pick_distinct_lowest_ids():
    """Equal values (and rows of -inf): the lowest free ids, each once, in order."""
    from megatron_ext.ops.moe.triton_router import topk_gate

    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [0.5, 0.5, 0.5, 0.5, 0.5],
                           [float("-inf")] * 5], device=DEVICE)
    probs, idx = topk_gate(logits, 3, "softmax")
    assert idx.cpu().tolist() == [[1, 2, 3], [0, 1, 2], [0, 1, 2]]
    assert torch.allclose(probs[:2].cpu(), torch.full((2, 3), 1 / 3))


ROUTERS = [
    dict(num_experts=16, topk=4),
    dict(num_experts=16, topk=4, pre_softmax=True, load_balancing_type="aux_loss",
         aux_loss_coeff=1e-2, z_loss_coeff=1e-3),
    dict(num_experts=12, topk=3, score_function="sigmoid", enable_expert_bias=True,
         topk_scaling_factor=2.5),
    dict(num_experts=8, topk=2, capacity_factor=0.75, drop_policy="probs",
         load_balancing_type="aux_loss", aux_loss_coeff=1e-2),
]


@needs_triton
@pytest.mark.parametrize("kw", ROUTERS, ids=["softmax", "pre_softmax_losses", "sigmoid_bias",
                                             "capacity"])
def test_route_triton_equals_torch_lane(kw):
    """The whole router result through the fused gate equals the torch lane's: ids, kept pairs and
    counts exactly, gates, losses and the logits' gradient (gates + losses) to fp32 rounding."""
    cfg = RouterConfig(**kw).validate()
    g = _gen(len(kw))
    T, E = 29, cfg.num_experts
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE) if cfg.enable_expert_bias else None
    w = torch.randn(T, cfg.topk, generator=g).to(DEVICE)
    out = {}
    for lane in ("triton", "torch"):
        lg = logits.clone().requires_grad_()
        r = route(lg, cfg, training=True, expert_bias=bias, backend=lane)
        ((r.probs * w).sum() + r.aux_loss + r.z_loss).backward()
        out[lane] = (r, lg.grad)
    (a, ga), (b, gb) = out["triton"], out["torch"]
    assert torch.equal(a.indices, b.indices) and torch.equal(a.kept, b.kept)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and torch.equal(a.load, b.load)
    assert torch.allclose(a.probs, b.probs, rtol=1e-6, atol=1e-7)
    assert torch.allclose(a.aux_loss, b.aux_loss, rtol=1e-6) and torch.allclose(a.z_loss, b.z_loss)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
    recs = {r["observed"] for r in backends.records() if r["op"] == "moe.route"}
    assert recs == {"triton", "torch"}


@pytest.mark.parametrize("kw,why", [
    (dict(num_experts=8, topk=2, load_balancing_type="sinkhorn"), "sinkhorn"),
    (dict(num_experts=8, topk=2, num_groups=4, group_topk=2), "num_groups=4"),
])
def test_route_lanes_outside_the_fused_gate_fall_back_with_the_reason(kw, why):
    """auto: selections the gate does not do run the torch expressions, recorded with the reason;
    asking for the fused gate there is an error naming it."""
    cfg = RouterConfig(**kw).validate()
    logits = torch.randn(16, cfg.num_experts, generator=_gen(1))
    route(logits, cfg, training=True)
    rec = [r for r in backends.records() if r["op"] == "moe.route"]
    assert [r["observed"] for r in rec] == ["torch"] and why in rec[0]["reason"]
    with pytest.raises(backends.BackendUnavailable, match=why):
        route(logits, cfg, training=True, backend="triton")


def test_route_auto_on_cpu_takes_torch_and_says_why():
    cfg = RouterConfig(num_experts=8, topk=2).validate()
    route(torch.randn(4, 8, generator=_gen(2)), cfg, training=False)
    rec = [r for r in backends.records() if r["op"] == "moe.route"]
    assert [r["observed"] for r in rec] == ["torch"] and "devices=['cpu']" in rec[0]["reason"]
    route(torch.randn(4, 8, generator=_gen(2)), cfg, training=False, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode,normalize,with_bias", GATES)
def test_gpu_topk_gate_at_benchmark_shape(mode, normalize, with_bias):
    """T=8192, E=64, k=6 (the MoE benchmark's router) on the GPU against fp64."""
    from megatron_ext.ops.moe.triton_router import topk_gate

    torch.manual_seed(0)
    T, E, k = 8192, 64, 6
    logits = torch.randn(T, E, device="cuda", dtype=torch.float64)
    bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
    dp = torch.randn(T, k, device="cuda", dtype=torch.float64)
    lf = logits.float().requires_grad_()
    probs, idx = topk_gate(lf, k, mode, bias, normalize, 1.0)
    (probs.double() * dp).sum().backward()
    ref = logits.float().double().requires_grad_()
    p_ref, idx_ref = _fp64_gate(ref, k, mode, bias, normalize, 1.0)
    (p_ref * dp).sum().backward()
    assert torch.equal(idx, idx_ref)
    assert (probs.double() - p_ref).abs().max().item() <= 1e-6
    assert (lf.grad.double() - ref.grad).abs().max().item() <= 2e-6
