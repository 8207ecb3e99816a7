"""The fused top-k gate (``triton_router.topk_gate``, ``route(backend="triton")``) against the
torch expressions of ``route()`` (the spec) and fp64: selection, gates and the logit gradient for
every score mode, the whole router result with losses and capacity, ties, the lane's fallbacks;
CPU interpreter here, the benchmark's shape on the GPU."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops.moe.routing import RouterConfig, _group_limited_topk, pointwise_scores, route  # noqa: E402

needs_triton = triton_mark("megatron_ext.ops.moe.triton_moe")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _fp64_gate(logits, k, mode, bias, normalize, scale, groups=None):
    """The gate in fp64 with torch.topk and route()'s group-limited selection (``groups`` =
    (num_groups, group_topk)); ties have probability 0 for random logits."""
    def select(scores):
        if groups is None:
            return scores.topk(k, -1).indices
        return _group_limited_topk(scores, k, *groups)

    if mode == "softmax":
        idx = select(logits)
        p = torch.softmax(logits.gather(1, idx), -1)
    elif mode == "pre_softmax":
        s = torch.softmax(logits, -1)
        idx = select(s)
        p = s.gather(1, idx)
    else:
        s = pointwise_scores(logits, mode)
        idx = select(s + (0 if bias is None else bias.double()))
        p = s.gather(1, idx)
        if normalize:
            p = p / (p.sum(-1, keepdim=True) + 1e-20)
    return p * scale, idx


def _fp64_given_ids(logits, idx, mode, normalize, scale):
    """The gates of the given ids in fp64 (route()'s expressions after the selection)."""
    if mode == "softmax":
        p = torch.softmax(logits.gather(1, idx), -1)
    elif mode == "pre_softmax":
        p = torch.softmax(logits, -1).gather(1, idx)
    else:
        p = pointwise_scores(logits, mode).gather(1, idx)
        if normalize:
            p = p / (p.sum(-1, keepdim=True) + 1e-20)
    return p * scale


def _assert_gpu_selection(idx, idx_ref, sel64, probs, p_ref, tol):
    """GPU runs select on fp32 scores (sigmoid, softmax) that round differently from fp64: at
    8192 tokens a near-tie may flip. Where the ids differ, the chosen sets must score the same in
    fp64 (sum of selection values within ``tol``), and at most 0.1 % of tokens may differ; the
    gates are compared on the tokens that agree."""
    same = (idx == idx_ref).all(1)
    diff = (~same).nonzero().flatten()
    assert diff.numel() <= idx.shape[0] // 1000, f"{diff.numel()} tokens choose other experts"
    for t in diff.tolist():
        got, want = sel64[t, idx[t]].sum().item(), sel64[t, idx_ref[t]].sum().item()
        assert abs(got - want) <= tol, (t, idx[t].tolist(), idx_ref[t].tolist(), got, want)
    assert (probs.double() - p_ref)[same].abs().max().item() <= 1e-6 * max(1.0, p_ref.abs().max().item())


GATES = [("softmax", False, False), ("pre_softmax", False, False), ("sigmoid", False, False),
         ("sigmoid", True, False), ("sigmoid", True, True), ("sqrtsoftplus", False, False),
         ("sqrtsoftplus", True, True)]


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
@pytest.mark.parametrize("mode,normalize,with_bias", GATES)
@pytest.mark.parametrize("T,E,k,G,g", [(41, 16, 4, 4, 2), (23, 64, 8, 8, 4), (17, 24, 3, 3, 1),
                                       (9, 160, 6, 8, 3), (13, 8, 8, 2, 2)])
def test_topk_gate_group_limited_matches_fp64(mode, normalize, with_bias, T, E, k, G, g):
    """Group-limited selection (DeepSeek-V3: 8 groups, top-4 groups, k=8; group sizes not a
    power of two; k = every allowed expert) against route()'s torch selection in fp64."""
    from megatron_ext.ops.moe.triton_router import topk_gate

    gen = _gen(T + E + k + G)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    bias = torch.randn(E, generator=gen) * 0.1 if with_bias else None
    dp = torch.randn(T, k, generator=gen, dtype=torch.float64)
    lf = logits.float().to(DEVICE).requires_grad_()
    probs, idx = topk_gate(lf, k, mode, None if bias is None else bias.to(DEVICE), normalize, 1.5,
                           num_groups=G, group_topk=g)
    (probs.double() * dp.to(DEVICE)).sum().backward()
    ref = logits.clone().requires_grad_()
    p_ref, idx_ref = _fp64_gate(ref, k, mode, bias, normalize, 1.5, groups=(G, g))
    (p_ref * dp).sum().backward()
    assert torch.equal(idx.cpu(), idx_ref)
    assert (probs.double().cpu() - p_ref).abs().max().item() <= 2e-6
    assert (lf.grad.double().cpu() - ref.grad).abs().max().item() <= 4e-6
    # every chosen expert lies in one of the g chosen groups
    assert all(len(set((row // (E // G)).tolist())) <= g for row in idx.cpu())


@needs_triton
def test_topk_gate_bad_arguments_name_the_field():
    from megatron_ext.ops.moe.triton_router import topk_gate

    logits = torch.randn(4, 16, device=DEVICE)
    for kwargs, match in [(dict(k=2, mode="softmax", bias=torch.zeros(16, device=DEVICE)),
                           "bias given with mode='softmax'"),
                          (dict(k=2, mode="tanh"), "mode='tanh'"),
                          (dict(k=17, mode="softmax"), "k=17, E=16"),
                          (dict(k=2, mode="softmax", num_groups=3, group_topk=1), "num_groups=3"),
                          (dict(k=2, mode="softmax", indices=torch.zeros(4, 3, dtype=torch.long)),
                           "indices.shape=")]:
        with pytest.raises(ValueError, match=match):
            topk_gate(logits, **kwargs)


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
    # NaN ranks first, as in torch.topk; ids stay distinct and in range
    nan = torch.tensor([[0.1, 0.9, float("nan"), 0.3, 0.2]], device=DEVICE)
    for mode in ("softmax", "sigmoid", "sqrtsoftplus"):
        _, idx = topk_gate(nan, 3, mode)
        assert idx.cpu().tolist() == [[2, 1, 3]], mode


@needs_triton
def test_sqrtsoftplus_gate_exact_over_the_whole_range():
    """sqrt(softplus(l)) from logits of -200 to 200 (where exp(l) underflows and where softplus is
    l): every score within 2e-6 relative of fp64 (the GPU's exp and log are approximate), or
    within 1e-19 where fp32 underflows (the GPU flushes denormals: scores below ~1e-19 are 0); the
    gradient finite and equal to fp64's sigmoid(l) / (2 sqrt(softplus(l))) to the same tolerances."""
    from megatron_ext.ops.moe.triton_router import topk_gate

    row = torch.tensor([-200.0, -104.0, -90.0, -30.0, -16.0, -1e-3, 0.0, 3e-4, 0.7, 15.0, 25.0, 200.0],
                       dtype=torch.float64)
    E = row.numel()
    logits = torch.stack([row, row.flip(0) * 0.5])
    lf = logits.float().to(DEVICE).requires_grad_()
    probs, idx = topk_gate(lf, E, "sqrtsoftplus")   # every expert, in descending order
    dp = torch.randn(2, E, generator=_gen(3), dtype=torch.float64)
    (probs.double() * dp.to(DEVICE)).sum().backward()
    ref = logits.float().double()
    want = torch.nn.functional.softplus(ref).sqrt().gather(1, idx.cpu())
    assert torch.allclose(probs.double().cpu(), want, rtol=2e-6, atol=1e-19)
    grad = torch.sigmoid(ref) / (2 * torch.nn.functional.softplus(ref).sqrt())
    grad = torch.where(torch.nn.functional.softplus(ref) > 0, grad, 0.0)
    dl = torch.zeros_like(ref).scatter(1, idx.cpu(), dp)
    assert torch.isfinite(lf.grad).all()
    assert torch.allclose(lf.grad.double().cpu(), dl * grad, rtol=2e-6, atol=1e-19)


ROUTERS = [
    dict(num_experts=16, topk=4),
    dict(num_experts=32, topk=8, score_function="sigmoid", enable_expert_bias=True,
         topk_scaling_factor=2.5, num_groups=8, group_topk=4),
    dict(num_experts=16, topk=4, pre_softmax=True, load_balancing_type="aux_loss",
         aux_loss_coeff=1e-2, z_loss_coeff=1e-3),
    dict(num_experts=12, topk=3, score_function="sigmoid", enable_expert_bias=True,
         topk_scaling_factor=2.5),
    dict(num_experts=8, topk=2, capacity_factor=0.75, drop_policy="probs",
         load_balancing_type="aux_loss", aux_loss_coeff=1e-2),
    dict(num_experts=16, topk=4, score_function="sqrtsoftplus", enable_expert_bias=True,
         topk_scaling_factor=2.0, num_groups=4, group_topk=2, load_balancing_type="aux_loss",
         aux_loss_coeff=1e-2),
]
ROUTER_IDS = ["softmax", "deepseek_v3", "pre_softmax_losses", "sigmoid_bias", "capacity",
              "sqrtsoftplus_bias_groups"]


@needs_triton
@pytest.mark.parametrize("kw", ROUTERS, ids=ROUTER_IDS)
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


@needs_triton
@pytest.mark.parametrize("kw", ROUTERS, ids=ROUTER_IDS)
def test_route_replay_through_the_fused_gate_equals_the_torch_lane(kw):
    """Routing replay: the recorded ids (here a random other routing) pass through unchanged and
    the fused gate's gates, losses and logit gradients for them equal the torch lane's."""
    cfg = RouterConfig(**kw).validate()
    g = _gen(7 + len(kw))
    T, E, k = 21, cfg.num_experts, cfg.topk
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    replay = torch.rand(T, E, generator=g).topk(k, dim=-1).indices   # not what the logits pick
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE) if cfg.enable_expert_bias else None
    w = torch.randn(T, k, generator=g).to(DEVICE)
    out = {}
    for lane in ("triton", "torch"):
        lg = logits.clone().requires_grad_()
        r = route(lg, cfg, training=True, expert_bias=bias, replay_indices=replay, backend=lane)
        ((r.probs * w).sum() + r.aux_loss + r.z_loss).backward()
        out[lane] = (r, lg.grad)
    (a, ga), (b, gb) = out["triton"], out["torch"]
    assert torch.equal(a.indices.cpu(), replay) and torch.equal(b.indices.cpu(), replay)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    assert torch.allclose(a.probs, b.probs, rtol=1e-6, atol=1e-7)
    assert torch.allclose(a.aux_loss, b.aux_loss, rtol=1e-6)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("kw", [dict(score_function="sigmoid", topk_scaling_factor=2.0),
                                dict(pre_softmax=True), dict()], ids=["sigmoid", "pre_softmax", "softmax"])
def test_quantile_balancing_through_the_fused_gate_equals_the_torch_lane(kw):
    """Quantile balancing picks top-k of ``logits - beta`` in torch; the fused gate computes the
    gates of those ids (as a replay): ids, gates, the step's estimate and the logit gradient as the
    torch lane's."""
    cfg = RouterConfig(num_experts=16, topk=4, load_balancing_type="quantile_balancing", **kw).validate()
    g = _gen(41)
    logits = torch.randn(32, 16, generator=g).to(DEVICE)
    beta = (torch.randn(16, generator=g) * 0.3).to(DEVICE)
    w = torch.randn(32, 4, generator=g).to(DEVICE)
    out = {}
    for lane in ("triton", "torch"):
        lg = logits.clone().requires_grad_()
        r = route(lg, cfg, training=True, qb_beta=beta, backend=lane)
        (r.probs * w).sum().backward()
        out[lane] = (r, lg.grad)
    (a, ga), (b, gb) = out["triton"], out["torch"]
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, (logits - beta).topk(4, -1).indices)
    assert torch.equal(a.qb_quantile, b.qb_quantile)
    assert torch.allclose(a.probs, b.probs, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw,why", [
    (dict(num_experts=8, topk=2, load_balancing_type="sinkhorn"), "sinkhorn"),
    (dict(num_experts=1040, topk=2), "num_experts=1040"),
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
    ref = logits.float().double()
    p_ref, idx_ref = _fp64_gate(ref, k, mode, bias, normalize, 1.0)
    sel64 = {"softmax": ref, "pre_softmax": torch.softmax(ref, -1),
             "sigmoid": torch.sigmoid(ref), "sqrtsoftplus": pointwise_scores(ref, "sqrtsoftplus")}[mode]
    if bias is not None:
        sel64 = sel64 + bias.double()
    _assert_gpu_selection(idx, idx_ref, sel64, probs, p_ref, 1e-5)
    # the logit gradient, against fp64 on the kernel's own selection
    (probs.double() * dp).sum().backward()
    ref = ref.requires_grad_()
    _fp64_given_ids(ref, idx, mode, normalize, 1.0).mul(dp).sum().backward()
    assert (lf.grad.double() - ref.grad).abs().max().item() <= 2e-6


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_topk_gate_deepseek_v3_router():
    """DeepSeek-V3's router on the GPU (E=256 in 8 groups, top-4 groups, k=8, sigmoid + expert
    bias + normalisation + scaling 2.5) against fp64 route() selection, at T=8192."""
    from megatron_ext.ops.moe.triton_router import topk_gate

    torch.manual_seed(1)
    T, E, k = 8192, 256, 8
    logits = torch.randn(T, E, device="cuda", dtype=torch.float64)
    bias = torch.randn(E, device="cuda") * 0.1
    dp = torch.randn(T, k, device="cuda", dtype=torch.float64)
    lf = logits.float().requires_grad_()
    probs, idx = topk_gate(lf, k, "sigmoid", bias, True, 2.5, num_groups=8, group_topk=4)
    ref = logits.float().double()
    p_ref, idx_ref = _fp64_gate(ref, k, "sigmoid", bias, True, 2.5, groups=(8, 4))
    _assert_gpu_selection(idx, idx_ref, torch.sigmoid(ref) + bias.double(), probs, p_ref, 1e-5)
    assert all(len(set((row // 32).tolist())) <= 4 for row in idx.cpu())   # 4 groups at most
    (probs.double() * dp).sum().backward()
    ref = ref.requires_grad_()
    _fp64_given_ids(ref, idx, "sigmoid", True, 2.5).mul(dp).sum().backward()
    assert (lf.grad.double() - ref.grad).abs().max().item() <= 1e-5


@needs_triton
def test_route_falls_back_once_where_the_gate_does_not_build(monkeypatch):
    """A kernel build failure at the first launch (a Triton or GPU the gate was not tested on):
    auto logs the fallback with the cause, routes through torch, and keeps this router on torch;
    asked for by name it is an error naming the cause."""
    from megatron_ext.ops.moe import routing, triton_router

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")
            return launch

    real_probe = routing._gate_probe
    monkeypatch.setattr(triton_router, "_topk_gate_fwd_kernel", Unbuildable())
    monkeypatch.setattr(triton_router, "_BUILT", set())
    monkeypatch.setattr(routing, "_gate_probe", lambda *a: (lambda: None))   # as on a GPU
    cfg = RouterConfig(num_experts=8, topk=2).validate()
    logits = torch.randn(16, 8, generator=_gen(4))
    want = route(logits, cfg, training=True, backend="torch")
    got = route(logits, cfg, training=True)
    assert torch.equal(got.indices, want.indices) and torch.allclose(got.probs, want.probs)
    rec = [r for r in backends.records() if r["op"] == "moe.route" and r["observed"] == "torch"
           and r["requested"] == "triton"]
    assert len(rec) == 1 and "PassManager::run failed" in rec[0]["reason"]
    assert "did not build" in real_probe(logits, cfg, "auto")()
    with pytest.raises(backends.BackendUnavailable, match="did not build"):
        route(logits, cfg, training=True, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode,normalize,with_bias", GATES)
def test_gpu_topk_gate_replayed_ids(mode, normalize, with_bias):
    """Given ids (routing replay) on the GPU: they come back unchanged, and gates and the logit
    gradient match fp64 for them."""
    from megatron_ext.ops.moe.triton_router import topk_gate

    torch.manual_seed(2)
    T, E, k = 8192, 64, 6
    logits = torch.randn(T, E, device="cuda", dtype=torch.float64)
    bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
    given = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
    dp = torch.randn(T, k, device="cuda", dtype=torch.float64)
    lf = logits.float().requires_grad_()
    probs, idx = topk_gate(lf, k, mode, bias, normalize, 1.0, indices=given)
    (probs.double() * dp).sum().backward()
    ref = logits.float().double().requires_grad_()
    p_ref = _fp64_given_ids(ref, given, mode, normalize, 1.0)
    (p_ref * dp).sum().backward()
    assert torch.equal(idx, given)
    assert (probs.double() - p_ref).abs().max().item() <= 1e-6
    assert (lf.grad.double() - ref.grad).abs().max().item() <= 2e-6
