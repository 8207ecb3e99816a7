"""MoE ops (megatron_ext.ops.moe): moe_ffn against independent fp64 dense math, permute/unpermute,
and every router option against formulas computed here, plus every config error.

CPU lane throughout; the grouped_mm backend (bf16, sm >= 90) has one ``gpu`` test.
"""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops import moe  # noqa: E402
from megatron_ext.ops.moe import RouterConfig, route  # noqa: E402
from megatron_ext.ops.moe.routing import pointwise_scores  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------- moe_ffn

def _dense_fp64(x, probs, indices, w1, w2, activation):
    """Every expert on every token, weighted by a one-hot gating matrix G [T, E] (fp64)."""
    E = w1.shape[0]
    G = (F.one_hot(indices, E).to(torch.float64) * probs.to(torch.float64)[..., None]).sum(1)
    a = torch.einsum("th,ehn->etn", x.double(), w1.double())
    if activation == "swiglu":
        gate, up = a.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(a)
    y = torch.einsum("etf,efh->eth", h, w2.double())
    return torch.einsum("te,eth->th", G, y)


def _make_case(case, activation, g):
    H, Fd = 16, 12
    T, E, k = {"random": (37, 6, 2), "k1": (29, 5, 1), "k8": (19, 8, 8),
               "empty_experts": (23, 7, 2), "one_expert": (31, 4, 1)}[case]
    if case == "empty_experts":  # experts 1, 3, 4, 5, 6 get no token
        idx = torch.stack([torch.zeros(T, dtype=torch.int64), torch.full((T,), 2)], 1)
    elif case == "one_expert":
        idx = torch.full((T, 1), 3, dtype=torch.int64)
    else:
        idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    probs = torch.rand(T, idx.shape[1], generator=g, dtype=torch.float64).float()
    x = _randn(T, H, g=g)
    n1 = 2 * Fd if activation == "swiglu" else Fd
    w1 = _randn(E, H, n1, g=g, scale=H ** -0.5)
    w2 = _randn(E, Fd, H, g=g, scale=Fd ** -0.5)
    return x, probs, idx, w1, w2


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", ["random", "k1", "k8", "empty_experts", "one_expert"])
def test_moe_ffn_matches_dense_fp64_fwd_and_grads(case, activation):
    g = _gen(["random", "k1", "k8", "empty_experts", "one_expert"].index(case) * 2
             + (activation == "gelu"))
    x, probs, idx, w1, w2 = _make_case(case, activation, g)
    ins = [t.clone().requires_grad_(True) for t in (x, probs, w1, w2)]
    ins64 = [t.double().clone().requires_grad_(True) for t in (x, probs, w1, w2)]
    out = moe.moe_ffn(ins[0], ins[1], idx, ins[2], ins[3], activation=activation, backend="torch")
    want = _dense_fp64(ins64[0], ins64[1], idx, ins64[2], ins64[3], activation)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    gout = _randn(*out.shape, g=g)
    grads = torch.autograd.grad((out * gout).sum(), ins)
    grads64 = torch.autograd.grad((want * gout.double()).sum(), ins64)
    for name, got, ref in zip(("x", "probs", "w1", "w2"), grads, grads64):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


def test_moe_ffn_reference_exact_in_fp64():
    g = _gen(1)
    x, probs, idx, w1, w2 = (t.double() if t.is_floating_point() else t
                             for t in _make_case("random", "swiglu", g))
    got = moe.moe_ffn_reference(x, probs, idx, w1, w2, "swiglu")
    torch.testing.assert_close(got, _dense_fp64(x, probs, idx, w1, w2, "swiglu"),
                               rtol=1e-12, atol=1e-12)


def test_moe_ffn_auto_resolves_torch_on_cpu_and_grouped_mm_by_name_fails():
    g = _gen(2)
    x, probs, idx, w1, w2 = _make_case("random", "swiglu", g)
    out = moe.moe_ffn(x, probs, idx, w1, w2)
    rec = [r for r in backends.records() if r["op"] == "moe_ffn" and r["requested"] == "auto"]
    assert rec and rec[0]["observed"] == "torch"
    assert "grouped_mm: devices=['cpu']" in rec[0]["reason"]
    torch.testing.assert_close(out, moe.moe_ffn_reference(x, probs, idx, w1, w2))
    with pytest.raises(backends.BackendUnavailable, match="backend='grouped_mm'"):
        moe.moe_ffn(x, probs, idx, w1, w2, backend="grouped_mm")


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(x=a["x"][None]), r"^x\.shape=\(1, 37, 16\): .*; use \[T, H\]"),
    (lambda a: a.update(indices=a["indices"][:5]), r"^indices\.shape="),
    (lambda a: a.update(indices=a["indices"].float()), r"^indices\.dtype="),
    (lambda a: a.update(probs=a["probs"][:, :1]), r"^probs\.shape="),
    (lambda a: a.update(w1=a["w1"][:, :8]), r"^w1\.shape=.*maps H=16"),
    (lambda a: a.update(w2=a["w2"][:3]), r"^w2\.shape="),
    (lambda a: a.update(activation="gelu"), r"^w1\.shape=.*needs w1's last dim 12"),
    (lambda a: a.update(activation="tanh"), r"^activation='tanh': unknown"),
    (lambda a: a.update(indices=a["indices"] + 5), r"^indices in \[\d+, \d+\]: .*E=6"),
])
def test_moe_ffn_shape_errors(mutate, match):
    x, probs, idx, w1, w2 = _make_case("random", "swiglu", _gen(3))
    args = dict(x=x, probs=probs, indices=idx, w1=w1, w2=w2, activation="swiglu")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        moe.moe_ffn(**args)


def test_permute_unpermute_roundtrip_and_stable_order():
    g = _gen(4)
    T, E, k, H = 41, 5, 3, 8
    x = _randn(T, H, g=g)
    idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    probs = torch.rand(T, k, generator=g)
    xs, order, tpe = moe.permute(x, idx, E)
    assert xs.shape == (T * k, H)
    assert tpe.tolist() == torch.bincount(idx.reshape(-1), minlength=E).tolist()
    experts = idx.reshape(-1)[order]
    assert torch.all(experts[1:] >= experts[:-1])                      # grouped by expert
    same = experts[1:] == experts[:-1]
    assert torch.all((order[1:] > order[:-1])[same])                   # token order kept inside
    torch.testing.assert_close(moe.unpermute(xs, order, torch.ones(T, k), T), k * x)
    torch.testing.assert_close(moe.unpermute(xs, order, probs, T), probs.sum(1, keepdim=True) * x)
    kept = torch.rand(T, k, generator=g) > 0.4
    xs, order, tpe = moe.permute(x, idx, E, kept=kept)
    assert xs.shape[0] == int(kept.sum()) == int(tpe.sum())
    torch.testing.assert_close(moe.unpermute(xs, order, probs, T),
                               (probs * kept).sum(1, keepdim=True) * x)


# ----------------------------------------------------------------------------- router: gates

HAND = torch.tensor([[1.0, 3.0, 0.0, 2.0],
                     [-1.0, 0.5, 4.0, 0.25]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gather_and_combine_rows_fixed_order_fwd_and_grads(dtype):
    """``ops.moe.pairs``: rows[r] = x[order[r] // k] and out[t] = sum_j y[inv[t*k+j]] against a
    plain loop (and autograd of it in fp64); the sums are j = 0..k-1 in fp32 (fp64 for fp64), so
    the result equals materialising fp32 pair rows and adding them in that order, bit for bit."""
    from megatron_ext.ops.moe.pairs import combine_rows, gather_rows, inverse_order, sum_pairs

    g = _gen(3)
    T, k, H = 13, 3, 8
    idx = torch.rand(T, 5, generator=g).topk(k, dim=-1).indices
    order = torch.sort(idx.reshape(-1), stable=True).indices
    inv = inverse_order(order)
    assert torch.equal(order[inv], torch.arange(T * k)) and torch.equal(inv[order], torch.arange(T * k))
    x = _randn(T, H, g=g, dtype=dtype).requires_grad_(True)
    y = _randn(T * k, H, g=g, dtype=dtype).requires_grad_(True)
    rows = gather_rows(x, order, inv, k)
    out = combine_rows(y, order, inv, k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and rows.dtype == dtype
    assert torch.equal(rows, x.detach()[order // k])
    pairs = torch.zeros(T * k, H, dtype=acc).index_copy(0, order, y.detach().to(acc))
    want = pairs.view(T, k, H)[:, 0].clone()
    for j in range(1, k):
        want = want + pairs.view(T, k, H)[:, j]
    assert torch.equal(out, want)
    d_rows, d_out = _randn(T * k, H, g=g, dtype=dtype), _randn(T, H, g=g)
    gx, gy = torch.autograd.grad((rows, out), (x, y), (d_rows, d_out))
    # references: the same maps by autograd in fp64
    x64, y64 = (t.detach().double().requires_grad_(True) for t in (x, y))
    r64 = x64[order // k]
    o64 = torch.zeros(T * k, H, dtype=torch.float64).index_copy(0, order, y64).view(T, k, H).sum(1)
    wx, wy = torch.autograd.grad((r64, o64), (x64, y64), (d_rows.double(), d_out.double()))
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert gx.dtype == dtype and gy.dtype == dtype
    assert torch.allclose(gx.double(), wx, atol=tol * 4, rtol=tol), (gx.double() - wx).abs().max()
    assert torch.allclose(gy.double(), wy, atol=tol, rtol=tol)
    # a token's sum depends only on its own rows: a shuffled, larger batch gives the same bits
    perm = torch.randperm(T, generator=g)
    idx2 = torch.cat([idx[perm], torch.rand(7, 5, generator=g).topk(k, dim=-1).indices])
    o2 = torch.sort(idx2.reshape(-1), stable=True).indices
    y2 = torch.randn(20 * k, H, generator=g).to(dtype)
    pos = o2.argsort()   # pair p of the new batch sits at sorted row pos[p]
    src = (perm[:, None] * k + torch.arange(k)).reshape(-1)   # old pairs of the new first T tokens
    y2[pos[: T * k]] = y.detach()[inv[src]]
    assert torch.equal(sum_pairs(y2, inverse_order(o2), k)[:T], out.detach()[perm])


def test_softmax_after_topk_exact():
    r = route(HAND, RouterConfig(num_experts=4, topk=2).validate(), training=False)
    assert r.indices.tolist() == [[1, 3], [2, 1]]
    e1 = math.exp(3) / (math.exp(3) + math.exp(2))
    e2 = math.exp(4) / (math.exp(4) + math.exp(0.5))
    torch.testing.assert_close(r.probs, torch.tensor([[e1, 1 - e1], [e2, 1 - e2]]))


def test_softmax_pre_softmax_exact():
    r = route(HAND, RouterConfig(num_experts=4, topk=2, pre_softmax=True), training=False)
    full = torch.softmax(HAND.double(), -1)
    torch.testing.assert_close(r.probs.double(), full.gather(1, r.indices), rtol=1e-6, atol=1e-7)
    assert r.indices[0].tolist() == [1, 3]


def test_sigmoid_normalised_scaled_exact():
    cfg = RouterConfig(num_experts=4, topk=2, score_function="sigmoid", topk_scaling_factor=2.5)
    r = route(HAND, cfg.validate(), training=False)
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    a, b = s(3.0), s(2.0)
    assert r.indices[0].tolist() == [1, 3]
    torch.testing.assert_close(r.probs[0], torch.tensor([2.5 * a / (a + b), 2.5 * b / (a + b)]))
    r = route(HAND, RouterConfig(num_experts=4, topk=2, score_function="sigmoid",
                                 normalize_topk=False), training=False)
    torch.testing.assert_close(r.probs[0], torch.tensor([a, b]))


def test_sqrtsoftplus_normalised_scaled_exact_with_bias():
    """Megatron >= 0.19's sqrtsoftplus gate: sqrt(softplus(l)), the bias shifting the selection
    only, gates normalised over the k chosen and scaled; by hand in fp64. Logits so low that fp32
    softplus underflows (Megatron's expression gives NaN gradients there) score 0 with gradient 0."""
    sq = lambda v: math.sqrt(math.log1p(math.exp(v)))  # noqa: E731
    cfg = RouterConfig(num_experts=4, topk=2, score_function="sqrtsoftplus", enable_expert_bias=True,
                       topk_scaling_factor=2.0).validate()
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])   # lifts expert 2 into the selection
    r = route(HAND, cfg, training=False, expert_bias=bias)
    row = HAND[0].double().tolist()
    assert r.indices[0].tolist() == [2, 1]
    a, b = sq(row[2]), sq(row[1])
    torch.testing.assert_close(r.probs[0].double(), torch.tensor([2 * a / (a + b), 2 * b / (a + b)],
                                                                 dtype=torch.float64), rtol=1e-6, atol=0)
    low = torch.tensor([[-300.0, -120.0, 1.0, 2.0]], requires_grad=True)
    r = route(low, RouterConfig(num_experts=4, topk=4, score_function="sqrtsoftplus",
                                normalize_topk=False).validate(), training=False)
    r.probs.sum().backward()
    assert r.probs[0, 2:].tolist() == [0.0, 0.0] and torch.isfinite(low.grad).all()
    assert low.grad[0, :2].tolist() == [0.0, 0.0] and (low.grad[0, 2:] > 0).all()


def test_bf16_logits_give_fp32_outputs_and_grad():
    logits = _randn(33, 8, g=_gen(5), dtype=torch.bfloat16).requires_grad_(True)
    cfg = RouterConfig(num_experts=8, topk=2, load_balancing_type="aux_loss",
                       aux_loss_coeff=1e-2, z_loss_coeff=1e-3, capacity_factor=1.0)
    r = route(logits, cfg.validate(), training=True)
    assert r.probs.dtype == torch.float32 and r.indices.dtype == torch.int64
    assert r.aux_loss.dtype == r.z_loss.dtype == torch.float32
    (r.probs.sum() + r.aux_loss + r.z_loss).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- router: losses

def _aux_formula(logits, indices, E, k, coeff, score_function="softmax"):
    """E * sum_e f_e P_e * coeff, by plain loops in fp64."""
    T = logits.shape[0]
    lg = logits.double()
    if score_function == "softmax":
        s = torch.softmax(lg, -1)
    else:
        s = torch.sigmoid(lg) if score_function == "sigmoid" else torch.nn.functional.softplus(lg).sqrt()
        s = s / s.sum(-1, keepdim=True)
    total = 0.0
    for e in range(E):
        f = sum(int((indices[t] == e).sum()) for t in range(T)) / (T * k)
        P = float(s[:, e].sum()) / T
        total += f * P
    return coeff * E * total


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_loss_and_z_loss_equal_formulas(score_function):
    logits = _randn(45, 6, g=_gen(6), scale=2.0)
    cfg = RouterConfig(num_experts=6, topk=2, score_function=score_function,
                       load_balancing_type="aux_loss", aux_loss_coeff=0.03, z_loss_coeff=0.007)
    r = route(logits, cfg.validate(), training=True)
    want_aux = _aux_formula(logits, r.indices, 6, 2, 0.03, score_function)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.double().tolist())
    want_z = 0.007 * z / 45
    assert r.aux_loss.item() == pytest.approx(want_aux, rel=1e-5)
    assert r.z_loss.item() == pytest.approx(want_z, rel=1e-5)


def test_seq_aux_loss_is_mean_of_per_sequence_losses():
    s_len, b, E, k = 13, 3, 5, 2
    logits = _randn(s_len * b, E, g=_gen(7))
    cfg = RouterConfig(num_experts=E, topk=k, load_balancing_type="seq_aux_loss",
                       aux_loss_coeff=0.1, pre_softmax=True)
    ids = moe.seq_ids_for_layout(s_len, b)
    r = route(logits, cfg, training=True, seq_ids=ids)
    per = [_aux_formula(logits[ids == j], r.indices[ids == j], E, k, 0.1) for j in range(b)]
    assert r.aux_loss.item() == pytest.approx(sum(per) / b, rel=1e-5)
    # the layer passes the sequence count it knows (no host read of the largest id)
    assert torch.equal(route(logits, cfg, training=True, seq_ids=ids, num_seqs=b).aux_loss, r.aux_loss)
    # packed variable-length sequences
    ids = moe.seq_ids_from_lengths([10, 4, 25])
    r = route(logits, cfg, training=True, seq_ids=ids)
    per = [_aux_formula(logits[ids == j], r.indices[ids == j], E, k, 0.1) for j in range(3)]
    assert r.aux_loss.item() == pytest.approx(sum(per) / 3, rel=1e-5)
    # one sequence == the micro-batch aux loss
    r1 = route(logits, cfg, training=True, seq_ids=torch.zeros(s_len * b, dtype=torch.long))
    r2 = route(logits, RouterConfig(num_experts=E, topk=k, load_balancing_type="aux_loss",
                                    aux_loss_coeff=0.1, pre_softmax=True), training=True)
    assert r1.aux_loss.item() == pytest.approx(r2.aux_loss.item(), rel=1e-6)


def test_global_aux_loss_uses_global_counts():
    E, k = 4, 1
    logits = _randn(20, E, g=_gen(8))
    cfg = RouterConfig(num_experts=E, topk=k, pre_softmax=True,
                       load_balancing_type="global_aux_loss", aux_loss_coeff=0.5)
    gcounts = torch.tensor([10.0, 30.0, 0.0, 60.0])
    r = route(logits, cfg.validate(), training=True,
              reduce_counts=lambda counts, n: (gcounts, torch.tensor(100.0)))
    P = torch.softmax(logits.double(), -1).mean(0)
    want = 0.5 * E * float((gcounts.double() / (100 * k) * P).sum())
    assert r.aux_loss.item() == pytest.approx(want, rel=1e-6)
    local = route(logits, cfg, training=True)
    assert local.aux_loss.item() == pytest.approx(
        _aux_formula(logits, local.indices, E, k, 0.5), rel=1e-5)


def test_aux_loss_counts_the_plain_topk_not_the_biased_grouped_selection():
    """DeepSeek-V3 eq. 18 / Megatron: f_e counts the top-k of the scores themselves, not the
    selection the expert bias and the group limit steer (which still picks the experts)."""
    E, k = 8, 2
    logits = _randn(40, E, g=_gen(31), scale=2.0)
    bias = _randn(E, g=_gen(32))
    cfg = RouterConfig(num_experts=E, topk=k, score_function="sigmoid", enable_expert_bias=True,
                       num_groups=4, group_topk=2, load_balancing_type="aux_loss", aux_loss_coeff=0.03).validate()
    r = route(logits, cfg, training=True, expert_bias=bias)
    plain = torch.sigmoid(logits).topk(k, dim=-1).indices
    assert not torch.equal(r.indices.sort(-1).values, plain.sort(-1).values)   # the bias steered
    want = _aux_formula(logits, plain, E, k, 0.03, "sigmoid")
    assert r.aux_loss.item() == pytest.approx(want, rel=1e-5)
    assert r.aux_loss.item() != pytest.approx(_aux_formula(logits, r.indices, E, k, 0.03, "sigmoid"), rel=1e-3)
    # a replayed selection is not what f_e counts either
    replay = torch.rand(40, E, generator=_gen(33)).topk(k, -1).indices
    rr = route(logits, cfg, training=True, expert_bias=bias, replay_indices=replay)
    assert rr.aux_loss.item() == pytest.approx(want, rel=1e-5)


def test_listed_aux_loss_types_sum_their_terms():
    """Megatron's list form: each type with its own coefficient; the terms are the single-type
    losses, aux_loss is their sum, and so is the logits' gradient."""
    s_len, b, E, k = 7, 3, 6, 2
    g = _gen(34)
    logits = _randn(s_len * b, E, g=g)
    ids = moe.seq_ids_for_layout(s_len, b)
    types, coeffs = ["aux_loss", "seq_aux_loss", "global_aux_loss"], [0.01, 0.02, 0.05]
    both = RouterConfig(num_experts=E, topk=k, load_balancing_type=types, aux_loss_coeff=coeffs).validate()
    assert both.load_balancing_type == tuple(types) and both.aux_coeffs() == dict(zip(types, coeffs))
    lg = logits.clone().requires_grad_()
    r = route(lg, both, training=True, seq_ids=ids, num_seqs=b)
    r.aux_loss.backward()
    assert list(r.aux_losses) == types
    want_grad = torch.zeros_like(logits)
    for t, c in zip(types, coeffs):
        one = logits.clone().requires_grad_()
        single = route(one, RouterConfig(num_experts=E, topk=k, load_balancing_type=t, aux_loss_coeff=c),
                       training=True, seq_ids=ids, num_seqs=b)
        single.aux_loss.backward()
        want_grad += one.grad
        assert torch.equal(r.aux_losses[t], single.aux_loss), t
    torch.testing.assert_close(r.aux_loss, sum(r.aux_losses.values()))
    torch.testing.assert_close(lg.grad, want_grad, rtol=1e-6, atol=1e-9)
    # a zero coefficient in the list is no term at all
    off = RouterConfig(num_experts=E, topk=k, load_balancing_type=["aux_loss", "none"], aux_loss_coeff=[0.0, 0.0])
    assert route(logits, off.validate(), training=True).aux_losses == {}


def test_global_aux_loss_takes_f_from_the_reduce_counts_callback():
    """The layer's hook: called with the plain top-k counts and the token count of this batch,
    its answer is what f_e is taken over."""
    E, k = 4, 2
    logits = _randn(12, E, g=_gen(35))
    cfg = RouterConfig(num_experts=E, topk=k, load_balancing_type="global_aux_loss", aux_loss_coeff=0.5).validate()
    seen = {}

    def reduce_counts(counts, n):
        seen["counts"], seen["n"] = counts.clone(), n.clone()
        return counts * 3 + torch.arange(E), n * 3

    r = route(logits, cfg, training=True, reduce_counts=reduce_counts)
    plain = torch.softmax(logits, -1).topk(k, -1).indices
    assert torch.equal(seen["counts"], moe.expert_counts(plain, E).float()) and seen["n"].item() == 12
    P = torch.softmax(logits.double(), -1).mean(0)
    want = 0.5 * E * float(((seen["counts"].double() * 3 + torch.arange(E)) / (36 * k) * P).sum())
    assert r.aux_loss.item() == pytest.approx(want, rel=1e-6)


def _qb_reference(logits, k, beta):
    """Quantile balancing by loops in fp64: per token its (k+1)-th largest l - beta; per expert the
    (T*k/E + 1)-th largest of l - alpha over tokens."""
    T, E = logits.shape
    lg = logits.double()
    alpha = [sorted((lg[t] - beta.double()).tolist(), reverse=True)[k] for t in range(T)]
    share = T * k // E
    return torch.tensor([sorted([lg[t, e].item() - alpha[t] for t in range(T)], reverse=True)[share]
                         for e in range(E)], dtype=torch.float64)


@pytest.mark.parametrize("score_function,pre_softmax", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_quantile_balancing_picks_topk_of_biased_logits_and_estimates_each_share(score_function, pre_softmax):
    T, E, k = 48, 8, 2
    g = _gen(36)
    logits = _randn(T, E, g=g, scale=2.0)
    beta = _randn(E, g=g) * 0.5
    cfg = RouterConfig(num_experts=E, topk=k, score_function=score_function, pre_softmax=pre_softmax,
                       load_balancing_type="quantile_balancing", topk_scaling_factor=1.5).validate()
    lg = logits.clone().requires_grad_()
    r = route(lg, cfg, training=True, qb_beta=beta)
    want_ids = (logits - beta).topk(k, -1).indices
    assert torch.equal(r.indices, want_ids)
    # the gates are the score function's at those experts (as a replay of them), with gradient
    ref = route(logits, RouterConfig(num_experts=E, topk=k, score_function=score_function,
                                     pre_softmax=pre_softmax, topk_scaling_factor=1.5),
                training=True, replay_indices=want_ids)
    torch.testing.assert_close(r.probs, ref.probs)
    r.probs.sum().backward()
    assert lg.grad.abs().sum() > 0
    q = r.qb_quantile
    torch.testing.assert_close(q.double(), _qb_reference(logits, k, beta), rtol=0, atol=1e-6)
    # q_e is the bias at which expert e takes exactly its share of this batch's tokens
    alpha = (logits - beta).topk(k + 1, -1).values[:, k:]
    assert ((logits - alpha) > q).sum(0).tolist() == [T * k // E] * E
    # eval: selection only, no estimate; no gradient: the same
    assert route(logits, cfg, training=False, qb_beta=beta).qb_quantile is None
    with torch.no_grad():
        assert route(logits, cfg, training=True, qb_beta=beta).qb_quantile is None


def test_quantile_balancing_balances_a_skewed_router():
    T, E, k = 4096, 8, 2
    offset = torch.linspace(1.5, -1.5, E)
    cfg = RouterConfig(num_experts=E, topk=k, load_balancing_type="quantile_balancing",
                       quantile_balancing_ema=0.5).validate()
    g = _gen(37)
    beta = torch.zeros(E)
    first = route(_randn(T, E, g=g) + offset, cfg, training=True, qb_beta=beta)
    assert first.load.max() / first.load.mean() > 2.5      # skewed: the first expert takes 2.8x its share
    for _ in range(15):
        r = route(_randn(T, E, g=g) + offset, cfg, training=True, qb_beta=beta)
        beta = moe.update_qb_beta(beta, r.qb_quantile, cfg.quantile_balancing_ema)
        assert abs(beta.mean().item()) < 1e-6
    # three fresh batches: within sampling noise of the share (about 2 % per expert here)
    load = sum(route(_randn(T, E, g=g) + offset, cfg, training=True, qb_beta=beta).load for _ in range(3))
    assert load.max() / load.mean() < 1.1


def test_quantile_balancing_runtime_errors():
    cfg = RouterConfig(num_experts=8, topk=2, load_balancing_type="quantile_balancing").validate()
    logits = _randn(10, 8, g=_gen(38))
    with pytest.raises(ValueError, match=r"tokens=10: .* 10\*2/8"):
        route(logits, cfg, training=True, qb_beta=torch.zeros(8))
    with pytest.raises(ValueError, match=r"^qb_beta=None: load_balancing_type='quantile_balancing'"):
        route(logits, cfg, training=False)
    with pytest.raises(ValueError, match=r"^valid=a padding mask: load_balancing_type='quantile_balancing'"):
        route(logits[:8], cfg, training=True, qb_beta=torch.zeros(8), valid=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^qb_beta=a tensor"):
        route(logits, RouterConfig(num_experts=8, topk=2), training=False, qb_beta=torch.zeros(8))


# ----------------------------------------------------------------------------- router: balancing

def test_sinkhorn_rows_and_columns_balanced():
    T, E = 64, 8
    logits = _randn(T, E, g=_gen(9), scale=2.0) + torch.linspace(3, -3, E)   # skewed
    P = moe.sinkhorn_balance(logits, iters=200, eps=1e-8)
    assert P.dtype == torch.float32
    torch.testing.assert_close(P.sum(1), torch.ones(T), rtol=0, atol=1e-3)
    torch.testing.assert_close(P.sum(0), torch.full((E,), T / E), rtol=0, atol=1e-3)
    # bf16 in, extreme logits: fp32 out, no inf/NaN thanks to the max-shift and eps clamp
    extreme = torch.full((T, E), -1e4, dtype=torch.bfloat16)
    extreme[:, 0] = 1e4
    assert torch.isfinite(moe.sinkhorn_balance(extreme, iters=10)).all()


def test_sinkhorn_routing_balances_training_selection_only():
    T, E = 256, 8
    logits = _randn(T, E, g=_gen(10)) + torch.linspace(2, -2, E)
    cfg = RouterConfig(num_experts=E, topk=1, load_balancing_type="sinkhorn",
                       sinkhorn_iters=50).validate()
    train = route(logits, cfg, training=True)
    evl = route(logits, cfg, training=False)
    # argmax of a soft balanced plan is not exactly balanced, but nowhere near the raw skew
    assert train.load.max() / train.load.min() < 2.0
    assert evl.load.max() / max(evl.load.min(), 1) > 10
    torch.testing.assert_close(train.probs, torch.sigmoid(logits).gather(1, train.indices))


def test_aux_free_bias_balances_a_skewed_router():
    T, E, k = 2048, 8, 2
    offset = torch.linspace(1.5, -1.5, E)
    cfg = RouterConfig(num_experts=E, topk=k, score_function="sigmoid", enable_expert_bias=True,
                       bias_update_rate=0.01).validate()
    g = _gen(11)
    bias = torch.zeros(E)
    first = route(_randn(T, E, g=g) + offset, cfg, training=True, expert_bias=bias)
    assert first.load.max() / first.load.min() > 3                      # really skewed at start
    for _ in range(150):
        r = route(_randn(T, E, g=g) + offset, cfg, training=True, expert_bias=bias)
        bias = moe.update_expert_bias(bias, r.load, cfg.bias_update_rate)
    r = route(_randn(T, E, g=g) + offset, cfg, training=True, expert_bias=bias)
    assert r.load.max() / r.load.min() < 1.5
    # the bias picks experts but never enters the gate values
    s = torch.sigmoid(_randn(4, E, g=_gen(12)))
    rb = route(torch.logit(s), cfg, training=False, expert_bias=bias)
    chosen = s.gather(1, rb.indices)
    torch.testing.assert_close(rb.probs, chosen / chosen.sum(1, keepdim=True))


def test_update_expert_bias_is_sign_based():
    b = moe.update_expert_bias(torch.zeros(3), torch.tensor([10, 2, 3]), 0.1)
    torch.testing.assert_close(b, torch.tensor([-0.1, 0.1, 0.1]))


# ----------------------------------------------------------------------------- router: capacity

def _two_expert_logits(a):
    """Token t with logit a[t] > 0 prefers expert 0, the last token expert 1 (k=1, pre-softmax)."""
    rows = [[v, 0.0] for v in a] + [[0.0, 3.0]]
    return torch.tensor(rows)


@pytest.mark.parametrize("policy,dropped_tokens", [("probs", [0, 2]), ("position", [3, 4])])
def test_capacity_drops_exact_tokens(policy, dropped_tokens):
    logits = _two_expert_logits([1.0, 5.0, 2.0, 4.0, 3.0])   # 5 tokens to expert 0, 1 to expert 1
    cfg = RouterConfig(num_experts=2, topk=1, pre_softmax=True, capacity_factor=1.0,
                       drop_policy=policy).validate()
    r = route(logits, cfg, training=True)
    assert r.capacity == 3                                    # ceil(6 * 1 / 2 * 1.0)
    assert r.dropped_mask[:, 0].nonzero().flatten().tolist() == dropped_tokens
    assert r.num_dropped == 2 and r.tokens_per_expert.tolist() == [3, 1]
    assert r.load.tolist() == [5.0, 1.0]
    assert torch.all(r.probs[r.dropped_mask] == 0) and torch.all(r.probs[r.kept] > 0)


def test_capacity_ties_fall_back_to_position():
    logits = _two_expert_logits([2.0] * 5)
    cfg = RouterConfig(num_experts=2, topk=1, pre_softmax=True, capacity_factor=1.0)
    r = route(logits, cfg, training=True)
    assert r.dropped_mask[:, 0].nonzero().flatten().tolist() == [3, 4]


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drop_counts_topk2(policy):
    T, E, k = 40, 4, 2
    logits = _randn(T, E, g=_gen(13)) + torch.tensor([1.5, 0.5, 0.0, -1.0])
    cfg = RouterConfig(num_experts=E, topk=k, capacity_factor=0.75, drop_policy=policy)
    r = route(logits, cfg, training=True)
    cap = math.ceil(T * k / E * 0.75)
    assert r.capacity == cap
    assert r.num_dropped == int((r.load - cap).clamp_min(0).sum()) > 0
    assert r.tokens_per_expert.tolist() == r.load.clamp_max(cap).long().tolist()
    dropless = route(logits, RouterConfig(num_experts=E, topk=k), training=True)
    assert dropless.num_dropped == 0 and dropless.capacity is None
    assert torch.equal(dropless.indices, r.indices)


def test_dropped_pairs_contribute_zero_to_moe_ffn():
    g = _gen(14)
    T, E, k, H, Fd = 40, 4, 2, 8, 6
    logits = _randn(T, E, g=g) + torch.tensor([1.5, 0.5, 0.0, -1.0])
    r = route(logits, RouterConfig(num_experts=E, topk=k, capacity_factor=0.5), training=True)
    x, w1, w2 = _randn(T, H, g=g), _randn(E, H, 2 * Fd, g=g), _randn(E, Fd, H, g=g)
    full = moe.moe_ffn(x, r.probs, r.indices, w1, w2)
    xs, order, tpe = moe.permute(x, r.indices, E, kept=r.kept)
    assert tpe.tolist() == r.tokens_per_expert.tolist()
    ys = torch.cat([moe.expert_activation(xe @ w1[e], "swiglu") @ w2[e]
                    for e, xe in enumerate(xs.split(tpe.tolist()))])
    torch.testing.assert_close(moe.unpermute(ys, order, r.probs, T), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ router: groups, noise

@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_group_limited_experts_lie_in_top_groups(score_function):
    T, E, G, g_top, k = 57, 16, 4, 2, 4
    logits = _randn(T, E, g=_gen(15), scale=2.0)
    cfg = RouterConfig(num_experts=E, topk=k, score_function=score_function, num_groups=G,
                       group_topk=g_top, pre_softmax=score_function == "softmax").validate()
    r = route(logits, cfg, training=False)
    s = torch.softmax(logits, -1) if score_function == "softmax" else \
        pointwise_scores(logits, score_function)
    gs = s.view(T, G, E // G).topk(k // g_top, dim=-1).values.sum(-1)
    top_groups = gs.topk(g_top, dim=-1).indices
    allowed = (r.indices // (E // G))[:, :, None] == top_groups[:, None, :]
    assert allowed.any(-1).all()
    # within the allowed groups it is a plain top-k
    mask = torch.zeros(T, G, dtype=torch.bool).scatter(1, top_groups, True)
    mask = mask.repeat_interleave(E // G, 1)
    want = s.masked_fill(~mask, -1).topk(k, -1).indices
    assert torch.equal(r.indices.sort(-1).values, want.sort(-1).values)
    plain = route(logits, RouterConfig(num_experts=E, topk=k, score_function=score_function,
                                       pre_softmax=score_function == "softmax"), training=False)
    assert not torch.equal(plain.indices.sort(-1).values, r.indices.sort(-1).values)


@pytest.mark.parametrize("knob", [{"input_jitter_eps": 0.2}, {"noise_std": 0.5}])
def test_noise_only_in_training_and_deterministic(knob):
    logits = _randn(50, 8, g=_gen(16))
    cfg = RouterConfig(num_experts=8, topk=2, **knob).validate()
    clean = route(logits, RouterConfig(num_experts=8, topk=2), training=True)
    evl = route(logits, cfg, training=False, generator=_gen(1))
    assert torch.equal(evl.probs, clean.probs) and torch.equal(evl.indices, clean.indices)
    a = route(logits, cfg, training=True, generator=_gen(1))
    b = route(logits, cfg, training=True, generator=_gen(1))
    c = route(logits, cfg, training=True, generator=_gen(2))
    assert torch.equal(a.probs, b.probs) and torch.equal(a.indices, b.indices)
    assert not torch.equal(a.probs, clean.probs) and not torch.equal(a.probs, c.probs)


# ----------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("kwargs,field", [
    (dict(num_experts=4, topk=5), "topk=5"),
    (dict(num_experts=4, topk=0), "topk=0"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(num_experts=6, expert_parallel_size=4), "expert_parallel_size=4"),
    (dict(num_experts=8, capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(num_experts=8, capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(num_experts=8, score_function="relu"), "score_function='relu'"),
    (dict(num_experts=8, num_groups=3, group_topk=1), "num_groups=3"),
    (dict(num_experts=8, num_groups=4), "num_groups=4"),
    (dict(num_experts=8, num_groups=4, group_topk=5), "group_topk=5"),
    (dict(num_experts=8, topk=3, num_groups=4, group_topk=1), "topk=3"),
    (dict(num_experts=8, load_balancing_type="switch"), "load_balancing_type='switch'"),
    (dict(num_experts=8, drop_policy="random", capacity_factor=1.0), "drop_policy='random'"),
    (dict(num_experts=8, pad_to_capacity=True), "pad_to_capacity=True"),
    (dict(num_experts=8, enable_expert_bias=True), "enable_expert_bias=True"),
    (dict(num_experts=8, score_function="sigmoid", pre_softmax=True), "pre_softmax=True"),
    (dict(num_experts=8, topk=1), "pre_softmax=False"),
    (dict(num_experts=8, aux_loss_coeff=0.01), "aux_loss_coeff=0.01"),
    (dict(num_experts=8, load_balancing_type="aux_loss", aux_loss_coeff=-1.0),
     "aux_loss_coeff=-1.0"),
    (dict(num_experts=8, load_balancing_type="sinkhorn", capacity_factor=1.0),
     "capacity_factor=1.0"),
    (dict(num_experts=8, input_jitter_eps=1.5), "input_jitter_eps=1.5"),
    (dict(num_experts=8, noise_std=0.0), "noise_std=0.0"),
    (dict(num_experts=8, z_loss_coeff=-0.1), "z_loss_coeff=-0.1"),
    (dict(num_experts=8, topk_scaling_factor=0.0), "topk_scaling_factor=0.0"),
    (dict(num_experts=8, score_function="sigmoid", bias_update_rate=0.0), "bias_update_rate=0.0"),
    (dict(num_experts=8, load_balancing_type=["aux_loss", "sinkhorn"], aux_loss_coeff=[0.1, 0.0]),
     "load_balancing_type=['aux_loss', 'sinkhorn']"),
    (dict(num_experts=8, load_balancing_type=["aux_loss", "aux_loss"], aux_loss_coeff=[0.1, 0.1]),
     "load_balancing_type=['aux_loss', 'aux_loss']"),
    (dict(num_experts=8, load_balancing_type=["aux_loss", "seq_aux_loss"], aux_loss_coeff=[0.1]),
     "aux_loss_coeff=[0.1]"),
    (dict(num_experts=8, load_balancing_type="aux_loss", aux_loss_coeff=[0.1, 0.2]), "aux_loss_coeff=[0.1, 0.2]"),
    (dict(num_experts=8, load_balancing_type=["aux_loss", "none"], aux_loss_coeff=[0.1, 0.2]),
     "aux_loss_coeff=[0.1, 0.2]"),
    (dict(num_experts=8, load_balancing_type=["aux_loss"], aux_loss_coeff=[-0.1]), "aux_loss_coeff=[-0.1]"),
    (dict(num_experts=8, load_balancing_type="quantile_balancing", aux_loss_coeff=0.1), "aux_loss_coeff=0.1"),
    (dict(num_experts=8, load_balancing_type="quantile_balancing", num_groups=4, group_topk=2), "num_groups=4"),
    (dict(num_experts=8, load_balancing_type="quantile_balancing", score_function="sigmoid",
          enable_expert_bias=True), "enable_expert_bias=True"),
    (dict(num_experts=8, load_balancing_type="quantile_balancing", capacity_factor=1.0), "capacity_factor=1.0"),
    (dict(num_experts=8, topk=8, load_balancing_type="quantile_balancing"), "topk=8"),
    (dict(num_experts=8, load_balancing_type="quantile_balancing", quantile_balancing_ema=1.0),
     "quantile_balancing_ema=1.0"),
])
def test_config_errors_name_field_value_and_fix(kwargs, field):
    with pytest.raises(ValueError) as err:
        RouterConfig(**kwargs).validate()
    msg = str(err.value)
    assert msg.startswith(field + ": ") and "; use " in msg, msg


def test_expert_counts_match_bincount_without_reading_the_ids():
    g = _gen(23)
    ids = torch.randint(0, 9, (57, 3), generator=g)
    ids[:5] = 8                                      # the top bin, and bins 0..7 mostly filled
    keep = torch.rand(57, 3, generator=g) < 0.6
    assert torch.equal(moe.expert_counts(ids, 11), torch.bincount(ids.reshape(-1), minlength=11))
    assert torch.equal(moe.expert_counts(ids, 11, keep), torch.bincount(ids[keep], minlength=11))
    assert moe.expert_counts(ids, 11).dtype == torch.int64
    # route()'s load and tokens_per_expert are these counts
    logits = _randn(57, 9, g=g)
    r = route(logits, RouterConfig(num_experts=9, topk=3, capacity_factor=0.8), training=True)
    assert torch.equal(r.load, torch.bincount(r.indices.reshape(-1), minlength=9).float())
    assert torch.equal(r.tokens_per_expert, torch.bincount(r.indices[r.kept], minlength=9))
    assert int(r.tokens_per_expert.sum()) == int(r.kept.sum()) < 57 * 3


def test_route_argument_errors():
    cfg = RouterConfig(num_experts=4, topk=2)
    with pytest.raises(ValueError, match=r"^logits\.shape=\(3, 5\)"):
        route(torch.zeros(3, 5), cfg, training=True)
    with pytest.raises(ValueError, match=r"^seq_ids=None"):
        route(torch.zeros(3, 4), RouterConfig(num_experts=4, load_balancing_type="seq_aux_loss",
                                              aux_loss_coeff=0.1), training=True)
    with pytest.raises(ValueError, match=r"^expert_bias=None: enable_expert_bias=True"):
        route(torch.zeros(3, 4), RouterConfig(num_experts=4, score_function="sigmoid",
                                              enable_expert_bias=True), training=True)
    with pytest.raises(ValueError, match=r"^replay_indices in \[0, 4\]: expert ids out of range "
                                         r"for num_experts=4"):
        route(torch.zeros(3, 4), cfg, training=True,
              replay_indices=torch.tensor([[0, 1], [2, 3], [4, 0]]))


# ----------------------------------------------------------------------------- GPU

def _grouped_mm_ok():
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _grouped_mm_ok(), reason="needs CUDA with sm >= 90 for grouped_mm")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_matches_reference_bf16(activation):
    g = _gen(17)
    T, E, k, H, Fd = 1000, 16, 4, 256, 128
    dev = "cuda"
    x = _randn(T, H, g=g, dtype=torch.bfloat16).to(dev)
    n1 = 2 * Fd if activation == "swiglu" else Fd
    w1 = _randn(E, H, n1, g=g, scale=H ** -0.5, dtype=torch.bfloat16).to(dev)
    w2 = _randn(E, Fd, H, g=g, scale=Fd ** -0.5, dtype=torch.bfloat16).to(dev)
    logits = _randn(T, E, g=g).to(dev)
    r = route(logits, RouterConfig(num_experts=E, topk=k), training=False)
    idx = r.indices.clone()
    idx[: T // 4] = torch.arange(k, device=dev)                       # skew: experts 0..k-1 hot
    ins = [t.clone().requires_grad_(True) for t in (x, r.probs, w1, w2)]
    ref_ins = [t.clone().requires_grad_(True) for t in (x, r.probs, w1, w2)]
    out = moe.moe_ffn(ins[0], ins[1], idx, ins[2], ins[3], activation, backend="grouped_mm")
    ref = moe.moe_ffn_reference(ref_ins[0], ref_ins[1], idx, ref_ins[2], ref_ins[3], activation)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * gout.float()).sum(), ins)
    ref_grads = torch.autograd.grad((ref.float() * gout.float()).sum(), ref_ins)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
