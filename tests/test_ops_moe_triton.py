"""Triton ``moe_ffn`` backend: fused gather/grouped-GEMM/combine kernels vs the torch reference vs
fp64 dense math, forward and grads of x, probs, w1, w2, with the routing edge cases (empty
experts, all tokens to one expert, k=1, k=8, T and F not multiples of a tile); CPU interpreter
here (fp32/fp16), bf16 at real sizes and determinism / batch invariance on the GPU (bitwise
properties are GPU-only: the interpreter's dot is numpy's BLAS, whose rounding depends on where a
row sits in a tile)."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops import moe  # noqa: E402
from megatron_ext.ops.moe import triton_moe  # noqa: E402
from megatron_ext.ops.moe.autograd import triton_moe_ffn  # noqa: E402
from tests.test_moe_layer import megatron_world  # noqa: E402,F401  (fixture)

needs_triton = triton_mark("megatron_ext.ops.moe.triton_moe")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _dense_fp64(x, probs, indices, w1, w2, activation):
    """Every expert on every token, weighted by a one-hot gating matrix (independent of the sort)."""
    E = w1.shape[0]
    G = (F.one_hot(indices, E).double() * probs.double()[..., None]).sum(1)
    a = torch.einsum("th,ehn->etn", x.double(), w1.double())
    if activation == "swiglu":
        gate, up = a.chunk(2, dim=-1)
        h = F.silu(gate) * up
    elif activation == "geglu":
        gate, up = a.chunk(2, dim=-1)
        h = F.gelu(gate) * up
    else:
        h = moe.expert_activation(a, activation)
    return torch.einsum("te,eth->th", G, torch.einsum("etf,efh->eth", h, w2.double()))


CASES = {  # name: (T, E, k, H, F)
    "random": (37, 6, 2, 32, 48),
    "k1": (29, 5, 1, 32, 48),
    "k8": (19, 8, 8, 32, 24),
    "empty_experts": (23, 7, 2, 32, 48),
    "one_expert": (45, 4, 1, 32, 48),
    "odd_dims": (21, 4, 3, 40, 20),     # H, F not multiples of the 16-wide interpreter tiles
}


def _case(name, activation, seed=0):
    g = _gen(seed)
    T, E, k, H, Fd = CASES[name]
    if name == "empty_experts":  # experts 1, 3, 4, 5, 6 get no token
        idx = torch.stack([torch.zeros(T, dtype=torch.int64), torch.full((T,), 2)], 1)
    elif name == "one_expert":
        idx = torch.full((T, 1), 3, dtype=torch.int64)
    else:
        idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    probs = torch.rand(T, idx.shape[1], generator=g, dtype=torch.float64)
    x = _randn(T, H, g=g)
    n1 = 2 * Fd if activation in ("swiglu", "geglu") else Fd
    w1 = _randn(E, H, n1, g=g, scale=H ** -0.5)
    w2 = _randn(E, Fd, H, g=g, scale=Fd ** -0.5)
    return x, probs, idx, w1, w2


def _run(fn, x, probs, idx, w1, w2, gout):
    ins = [t.clone().requires_grad_(True) for t in (x, probs, w1, w2)]
    out = fn(ins[0], ins[1], idx, ins[2], ins[3])
    grads = torch.autograd.grad(out, ins, gout.to(out.dtype))
    return [out] + list(grads)


def _compare(name, activation, dtype, tol, seed=0, device=DEVICE):
    x, probs, idx, w1, w2 = _case(name, activation, seed)
    gout = _randn(*x.shape, g=_gen(seed + 100))
    want = _run(lambda *a: _dense_fp64(*a, activation), x, probs, idx, w1, w2, gout)
    cast = [t.to(device=device, dtype=dtype) for t in (x, w1, w2)]
    args = (cast[0], probs.float().to(device), idx.to(device), cast[1], cast[2], gout.to(device))
    got = _run(lambda *a: moe.moe_ffn(*a, activation=activation, backend="triton"), *args)
    ref = _run(lambda *a: moe.moe_ffn_reference(*a, activation), *args)
    for what, g_, r_, w_ in zip(("out", "dx", "dprobs", "dw1", "dw2"), got, ref, want):
        assert g_.dtype == r_.dtype and g_.shape == r_.shape, what
        scale = max(1.0, w_.abs().max().item())
        err = (g_.double().cpu() - w_).abs().max().item()
        ref_err = (r_.double().cpu() - w_).abs().max().item()
        # vs fp64: the dtype's tolerance; vs the reference: no worse than it (+ the tolerance)
        assert err <= tol * scale, f"{name}/{activation}/{what}: err {err:.3g} vs fp64"
        assert err <= 2 * ref_err + tol * scale / 4, \
            f"{name}/{activation}/{what}: err {err:.3g}, reference's {ref_err:.3g}"


@needs_triton
@pytest.mark.parametrize("name,activation", [(n, "swiglu") for n in CASES] + [
    (n, "gelu") for n in ("random", "k1", "one_expert", "odd_dims")])
def test_triton_matches_reference_and_fp64_fp32(name, activation):
    _compare(name, activation, torch.float32, 1e-4, seed=len(name))


@needs_triton
@pytest.mark.parametrize("name,activation", [("random", "swiglu"), ("k8", "gelu"),
                                             ("random", "geglu")])
def test_triton_matches_fp16(name, activation):
    _compare(name, activation, torch.float16, 2e-2, seed=7)


@needs_triton
@pytest.mark.parametrize("name,split_dh,flat,pre", [
    ("random", True, False, False), ("odd_dims", True, False, True), ("odd_dims", False, False, False),
    ("empty_experts", True, True, True), ("k8", True, True, False), ("random", True, False, True)])
def test_triton_tma_and_occupancy_variants_match_fp64(name, split_dh, flat, pre):
    """Weight operands AND contiguous row operands (h, da; with ``pre`` also the pregathered
    x / dout rows) through TMA tensor descriptors (unmasked tiles that run past an expert's
    rows or F) and 2 programs per SM, with the backward d(h) split (plain GEMM + row pass) or
    fused (activation backward in the GEMM epilogue), and (``flat``) the persistent GEMMs' tile
    and K loops flattened into one loop, with the grouped-GEMM weight-gradient lane asked for
    (on CPU it cannot run: the kernel runs and the record says why), and (``pre``) x and dout
    gathered into sorted rows once: same results as the default pointer path, within fp32 of
    fp64."""
    import dataclasses

    base = triton_moe.default_config(torch.float32)
    cfg = dataclasses.replace(base, split_dh=split_dh, wgrad_grouped_mm=flat, pregather=pre,
                              **{k: dataclasses.replace(getattr(base, k), tma=True, a_tma=True,
                                                        programs_per_sm=2, flatten=flat)
                                 for k in ("up", "down", "dh", "dx", "wgrad")})
    backends.reset()
    x, probs, idx, w1, w2 = _case(name, "swiglu", seed=5)
    gout = _randn(*x.shape, g=_gen(105))
    want = _run(lambda *a: _dense_fp64(*a, "swiglu"), x, probs, idx, w1, w2, gout)
    args = [t.to(device=DEVICE, dtype=torch.float32) for t in (x, probs)] + [idx.to(DEVICE)] + \
        [t.to(device=DEVICE, dtype=torch.float32) for t in (w1, w2, gout)]
    plain = _run(lambda *a: triton_moe_ffn(*a, "swiglu", base), *args)
    got = _run(lambda *a: triton_moe_ffn(*a, "swiglu", cfg), *args)
    for what, g_, p_, w_ in zip(("out", "dx", "dprobs", "dw1", "dw2"), got, plain, want):
        scale = max(1.0, w_.abs().max().item())
        assert (g_.double().cpu() - w_).abs().max().item() <= 1e-4 * scale, what
        # same K order per output element: the descriptor path gives the pointer path's values
        assert torch.allclose(g_, p_, rtol=1e-6, atol=1e-6 * scale), what
    lanes = [r for r in backends.records() if r["op"] == "moe_ffn.triton.weight_grads"]
    if flat and DEVICE == "cpu":
        assert [(r["observed"], "devices=['cpu']" in r["reason"]) for r in lanes] == \
            [("triton", True)], lanes
    elif not flat:
        assert lanes == [], lanes


@needs_triton
@pytest.mark.parametrize("T,E,k,bm", [(53, 9, 3, 16), (1100, 130, 4, 32)])
def test_triton_routing_metadata_tables(T, E, k, bm):
    """Counting sort = stable sort by expert (the second shape spans many histogram blocks and
    scan chunks); tile table: every sorted row of every expert lies in exactly one tile of its
    expert."""
    g = _gen(3)
    idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    idx[idx == 4] = 5                                    # expert 4 empty, 5 hot
    idx[: T // 3, 0] = 7                                 # expert 7 hot
    probs = torch.rand(T, k, generator=g)
    r = triton_moe.routing_metadata(idx.to(DEVICE), probs.to(DEVICE), E, (bm,))
    order = r.order.long().cpu()
    flat = idx.reshape(-1)
    assert torch.equal(torch.sort(flat, stable=True).indices, order)
    assert torch.equal(r.token.long().cpu(), order // k)
    assert torch.equal(r.prob.cpu(), probs.reshape(-1)[order])
    counts = torch.bincount(flat, minlength=E)
    assert r.bounds.cpu().tolist() == [0] + torch.cumsum(counts, 0).tolist()
    table, n_tiles, max_tiles = r.tables[bm]
    table = table.cpu()
    assert int(n_tiles) == int(((counts + bm - 1) // bm).sum()) <= max_tiles
    covered = torch.zeros(T * k, dtype=torch.int64)
    for i in range(int(n_tiles)):
        e, lo, hi = table[:, i].tolist()
        rows = torch.arange(lo, min(lo + bm, hi))
        assert len(rows) > 0 and torch.all(flat[order[rows]] == e)
        covered[rows] += 1
    assert torch.all(covered == 1)
    assert torch.all(table[1:, int(n_tiles):] == 0)      # padding tiles are empty


@needs_triton
@pytest.mark.parametrize("width", [32, 40])
def test_gather_rows_copies_the_sorted_rows(width):
    """The pregather lane's row gather: ``out[r] = src[token[r]]`` bit for bit (widths a multiple
    of the column step and not), for a routing where one id is negative (its pair has no sorted
    row; the token table there stays 0, a valid row to copy)."""
    g = _gen(11)
    T, E, k = 37, 6, 2
    idx = torch.randint(0, E, (T, k), generator=g)
    src = _randn(T, width, g=g).to(DEVICE)
    r = triton_moe.routing_metadata(idx.to(DEVICE), torch.rand(T, k, generator=g).to(DEVICE), E,
                                    (16,))
    out = triton_moe.gather_rows(src, r, triton_moe.default_config(torch.float32))
    assert torch.equal(out, src[r.token.long()])
    idx[3, 1] = -1                                       # no expert: one sorted row fewer
    r = triton_moe.routing_metadata(idx.to(DEVICE), torch.rand(T, k, generator=g).to(DEVICE), E,
                                    (16,))
    assert int(r.bounds[-1]) == T * k - 1 and int(r.token[-1]) == 0
    out = triton_moe.gather_rows(src, r, triton_moe.default_config(torch.float32))
    assert torch.equal(out[:-1], src[r.token.long()[:-1]]) and torch.equal(out[-1], src[0])


@needs_triton
def test_pregather_switch_of_moe_ffn_sets_what_backward_keeps():
    """``moe_ffn(..., pregather=)``: True keeps the ``[T*k, H]`` sorted copy of x for backward,
    False keeps x itself; both give the fp64 output and gradients."""
    x, probs, idx, w1, w2 = _case("random", "swiglu", seed=5)   # T=37, k=2, H=32, 2F=96
    T, H, k = x.shape[0], x.shape[1], idx.shape[1]
    gout = _randn(*x.shape, g=_gen(105))
    want = _run(lambda *a: _dense_fp64(*a, "swiglu"), x, probs, idx, w1, w2, gout)
    cast = [t.to(device=DEVICE, dtype=torch.float32) for t in (x, w1, w2)]
    args = (cast[0], probs.float().to(DEVICE), idx.to(DEVICE), cast[1], cast[2], gout.to(DEVICE))
    for pregather in (True, False):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            got = _run(lambda *a: moe.moe_ffn(*a, activation="swiglu", backend="triton",
                                              pregather=pregather), *args)
        assert ((T * k, H) in kept) == pregather and ((T, H) in kept) == (not pregather), kept
        for what, g_, w_ in zip(("out", "dx", "dprobs", "dw1", "dw2"), got, want):
            err = (g_.double().cpu() - w_).abs().max().item()
            assert err <= 1e-4 * max(1.0, w_.abs().max().item()), f"pregather={pregather} {what}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_combine_through_a_permutation_equals_the_fixed_order_loop(dtype):
    """``_combine_kernel`` reading pair rows through ``rows`` (the EP / deterministic layer's
    combine, ``ops.moe.pairs``): the same bits as the torch loop 0 + y0 + y1 + ... in fp32."""
    from megatron_ext.ops.moe.pairs import inverse_order, sum_pairs

    g = _gen(11)
    T, k, H = 37, 3, 40
    idx = torch.rand(T, 6, generator=g).topk(k, dim=-1).indices
    inv = inverse_order(torch.sort(idx.reshape(-1), stable=True).indices)
    y = torch.randn(T * k, H, generator=g).to(dtype)
    want = torch.zeros(T, H)
    for j in range(k):
        want = want + y[inv.view(T, k)[:, j]].float()
    out = torch.empty(T, H, device=DEVICE)
    triton_moe.launch_combine(y.to(DEVICE), out, k, triton_moe.default_config(dtype),
                              rows=inv.to(torch.int32).to(DEVICE))
    assert torch.equal(out.cpu(), want)
    if DEVICE == "cuda":   # the op picks the kernel on CUDA and records it
        assert torch.equal(sum_pairs(y.cuda(), inv.cuda(), k).cpu(), want)
        assert [r["observed"] for r in backends.records() if r["op"] == "moe.combine_pairs"] == ["triton"]


@needs_triton
def test_auto_never_picks_the_interpreter_and_named_triton_records():
    x, probs, idx, w1, w2 = (t.float() if t.is_floating_point() else t
                             for t in _case("random", "swiglu"))
    if NO_CUDA:
        moe.moe_ffn(x, probs, idx, w1, w2)
        rec = [r for r in backends.records() if r["requested"] == "auto"]
        assert rec[0]["observed"] == "torch" and "triton: devices=['cpu']" in rec[0]["reason"]
    out = moe.moe_ffn(x.to(DEVICE), probs.to(DEVICE), idx.to(DEVICE), w1.to(DEVICE),
                      w2.to(DEVICE), backend="triton")
    assert any(r["observed"] == "triton" and r["requested"] == "triton"
               for r in backends.records())
    assert out.shape == x.shape
    with pytest.raises(backends.BackendUnavailable, match=r"backend='triton'.*dtypes="):
        moe.moe_ffn(x.to(DEVICE), probs.to(DEVICE), idx.to(DEVICE), w1.double().to(DEVICE),
                    w2.to(DEVICE), backend="triton")


@needs_triton
def test_triton_without_flattened_loops_is_refused_with_the_version(monkeypatch, request):
    """A Triton whose tl.range has no ``flatten=`` (< 3.3) cannot build the kernels: asked for by
    name it is an error naming the version; under auto the next backend runs, recorded."""
    import triton.language as tl

    class OldRange:   # tl.range as Triton 3.2 had it
        def __init__(self, arg1, arg2=None, step=None, num_stages=None, loop_unroll_factor=None):
            pass

    monkeypatch.setattr(tl, "range", OldRange)
    moe._triton_too_old.cache_clear()    # the check is cached per process; drop it before and after
    request.addfinalizer(moe._triton_too_old.cache_clear)
    x, probs, idx, w1, w2 = (t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE)
                             for t in _case("random", "swiglu"))
    with pytest.raises(backends.BackendUnavailable, match=r"tl.range\(flatten=...\), Triton >= 3.3"):
        moe.moe_ffn(x, probs, idx, w1, w2, backend="triton")
    moe.moe_ffn(x, probs, idx, w1, w2)
    rec = [r for r in backends.records() if r["requested"] == "auto"]
    assert rec[0]["observed"] != "triton" and "Triton >= 3.3" in rec[0]["reason"]


def _ddp_weight(t, main_grad=None, **attrs):
    """A parameter as Megatron's DDP leaves it: ``main_grad`` (its gradient buffer, here holding
    an earlier micro-batch's sum) and ``grad_added_to_main_grad`` (False until something adds)."""
    p = torch.nn.Parameter(t.clone())
    if main_grad is not None:
        p.main_grad = main_grad.clone()
        p.grad_added_to_main_grad = False
    for k_, v in attrs.items():
        setattr(p, k_, v)
    return p


def _wgrad_modes(monkeypatch):
    """A list that records, per launch of the weight-gradient kernel, whether it added into its
    output (True) or stored (False)."""
    modes, launch = [], triton_moe.launch_wgrad

    def spy(*args, **kwargs):
        modes.append(args[7] if len(args) > 7 else kwargs.get("accumulate", False))
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_moe, "launch_wgrad", spy)
    return modes


@needs_triton
@pytest.mark.parametrize("name,pre,buf_dtype", [("random", False, torch.float32),
                                                ("empty_experts", True, torch.float32),
                                                ("odd_dims", True, torch.float16)])
def test_weight_grads_accumulate_into_megatron_main_grad(name, pre, buf_dtype):
    """``accumulate_wgrad``: where a weight carries Megatron DDP's buffer, the weight-gradient
    kernel adds into it: main_grad = earlier sum + the fp64 gradient (one rounding to the
    buffer's dtype), ``grad_added_to_main_grad`` set, autograd handed a placeholder (zeros where
    ``zero_out_wgrad`` asks the hook to add it); an expert with no rows keeps its buffer bit for
    bit; dx and dprobs are those of the unfused call."""
    import dataclasses

    x, probs, idx, w1, w2 = _case(name, "swiglu", seed=9)
    gout = _randn(*x.shape, g=_gen(109))
    want = _run(lambda *a: _dense_fp64(*a, "swiglu"), x, probs, idx, w1, w2, gout)
    cfg = dataclasses.replace(triton_moe.default_config(torch.float32), pregather=pre)
    dev = lambda t: t.to(device=DEVICE, dtype=torch.float32)  # noqa: E731
    old1 = _randn(*w1.shape, g=_gen(1)).to(device=DEVICE, dtype=buf_dtype)
    old2 = _randn(*w2.shape, g=_gen(2)).to(device=DEVICE, dtype=buf_dtype)
    p1 = _ddp_weight(dev(w1), old1)
    p2 = _ddp_weight(dev(w2), old2, zero_out_wgrad=True)
    xin, pin = dev(x).requires_grad_(), dev(probs).requires_grad_()
    triton_moe_ffn(xin, pin, idx.to(DEVICE), p1, p2, "swiglu", cfg,
                   accumulate_wgrad=True).backward(dev(gout))
    plain = _run(lambda *a: triton_moe_ffn(*a, "swiglu", cfg), dev(x), dev(probs), idx.to(DEVICE),
                 dev(w1), dev(w2), dev(gout))
    assert p1.grad_added_to_main_grad and p2.grad_added_to_main_grad
    assert p1.grad.shape == p1.shape and torch.equal(p2.grad, torch.zeros_like(p2))
    tol = 1e-4 if buf_dtype == torch.float32 else 2e-3
    for what, p, old, w_ in (("dw1", p1, old1, want[3]), ("dw2", p2, old2, want[4])):
        assert p.main_grad.dtype == buf_dtype
        expect = old.double().cpu() + w_
        err = (p.main_grad.double().cpu() - expect).abs().max().item()
        assert err <= tol * max(1.0, expect.abs().max().item()), f"{what}: err {err:.3g}"
        assert (p.main_grad.double().cpu() != old.double().cpu()).any(), what
        empty = torch.bincount(idx.flatten(), minlength=w1.shape[0]) == 0
        assert torch.equal(p.main_grad[empty.to(DEVICE)], old[empty.to(DEVICE)]), what
    assert torch.allclose(xin.grad, plain[1], rtol=1e-6, atol=1e-6)
    assert torch.allclose(pin.grad, plain[2], rtol=1e-6, atol=1e-6)
    assert not [r for r in backends.records() if r["op"] == "moe_ffn.weight_grad_accumulation"]


@needs_triton
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float16])
def test_a_zeroed_buffer_gets_the_gradient_stored_not_added(buf_dtype, monkeypatch):
    """A weight whose buffer Megatron's DDP has just zeroed (the mark ``zero_grad_buffer`` sets,
    ``grad_added_to_main_grad`` clear) gets the step's first gradient stored: the kernel does not
    read the buffer (filled here with stale values a store must replace), the values equal those
    of adding to zero, and the mark is gone afterwards, so the next micro-batch adds. A mark left
    after a gradient went to autograd (a weight without the fused lane, which the DDP hook adds)
    is cleared by the weight's post-accumulate hook. A buffer ``zero_grad_buffer`` left unwritten
    (NaN here) is zeroed before anything but the kernel's store writes it."""
    import dataclasses

    from megatron_ext.ops.moe.autograd import STALE, ZEROED, track_zeroed_main_grad

    x, probs, idx, w1, w2 = _case("random", "swiglu", seed=12)
    gout = _randn(*x.shape, g=_gen(112))
    cfg = dataclasses.replace(triton_moe.default_config(torch.float32), pregather=True)
    dev = lambda t: t.to(device=DEVICE, dtype=torch.float32)  # noqa: E731
    ps = [_ddp_weight(dev(w), torch.full(w.shape, 7.0, dtype=buf_dtype, device=DEVICE))
          for w in (w1, w2)]
    for p in ps:
        track_zeroed_main_grad(p)
        setattr(p, ZEROED, True)
    zeroed = [_ddp_weight(dev(w), torch.zeros(w.shape, dtype=buf_dtype, device=DEVICE)) for w in (w1, w2)]
    modes = _wgrad_modes(monkeypatch)
    for weights in (ps, zeroed, ps):
        triton_moe_ffn(dev(x), dev(probs), idx.to(DEVICE), *weights, "swiglu", cfg,
                       accumulate_wgrad=True).backward(dev(gout))
    # first call: stored (no read of the 7s); the zero buffer without a mark: added; then added
    assert modes == [False, False, True, True, True, True]
    for p, z in zip(ps, zeroed):
        assert not getattr(p, ZEROED) and p.grad_added_to_main_grad
        torch.testing.assert_close(p.main_grad, (2 * z.main_grad.double()).to(buf_dtype),
                                   rtol=2e-3 if buf_dtype == torch.float16 else 1e-6, atol=1e-6)
    # a gradient through autograd (the unfused lane; the DDP hook would add it) clears the mark,
    # and zeroes a buffer zero_grad_buffer left unwritten (STALE) before that hook adds
    q = _ddp_weight(dev(w1), torch.full(w1.shape, float("nan"), device=DEVICE))
    track_zeroed_main_grad(q)
    setattr(q, ZEROED, True)
    setattr(q, STALE, True)
    (q * 2).sum().backward()
    assert not getattr(q, ZEROED) and not getattr(q, STALE) and q.grad is not None
    assert not q.main_grad.any()
    # a kernel that adds (the mark gone) into an unwritten buffer zeroes it first
    stale = [_ddp_weight(dev(w), torch.full(w.shape, float("nan"), dtype=buf_dtype, device=DEVICE))
             for w in (w1, w2)]
    for p in stale:
        track_zeroed_main_grad(p)
        setattr(p, STALE, True)
    triton_moe_ffn(dev(x), dev(probs), idx.to(DEVICE), *stale, "swiglu", cfg,
                   accumulate_wgrad=True).backward(dev(gout))
    assert modes[-2:] == [True, True]
    for p, z in zip(stale, zeroed):
        assert not getattr(p, STALE)
        torch.testing.assert_close(p.main_grad, z.main_grad, rtol=0, atol=0)


@needs_triton
def test_weight_grad_accumulation_leaves_other_weights_to_autograd():
    """Weights without Megatron DDP's buffer get ordinary gradients (no record: nothing to fuse);
    a Megatron-FSDP weight (buffer allocated by its own hook) and a misshapen buffer also get
    them, each recorded as a fallback with its reason; a backend without the fusion records that
    its gradients go to the hook."""
    x, probs, idx, w1, w2 = (t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE)
                             for t in _case("random", "swiglu", seed=4))
    gout = torch.randn_like(x)
    cfg = triton_moe.default_config(torch.float32)
    want = _run(lambda *a: triton_moe_ffn(*a, "swiglu", cfg), x, probs, idx, w1, w2, gout)
    fsdp = _ddp_weight(w1, torch.zeros_like(w1), get_main_grad=lambda: None)
    odd = _ddp_weight(w2, torch.zeros(w2.shape[0], w2.shape[2], w2.shape[1], device=DEVICE))
    for p1, p2 in ((_ddp_weight(w1), _ddp_weight(w2)), (fsdp, odd)):
        triton_moe_ffn(x, probs, idx, p1, p2, "swiglu", cfg, accumulate_wgrad=True).backward(gout)
        assert torch.allclose(p1.grad, want[3], rtol=1e-6, atol=1e-6)
        assert torch.allclose(p2.grad, want[4], rtol=1e-6, atol=1e-6)
    assert not fsdp.main_grad.any() and not odd.main_grad.any()
    assert not fsdp.grad_added_to_main_grad and not odd.grad_added_to_main_grad
    recs = [r for r in backends.records() if r["op"] == "moe_ffn.weight_grad_accumulation"]
    assert [(r["requested"], r["observed"]) for r in recs] == [("fused", "ddp_hook")]
    assert "Megatron-FSDP" in recs[0]["reason"]
    backends.reset()
    p1, p2 = (_ddp_weight(w.cpu(), torch.zeros(w.shape)) for w in (w1, w2))
    moe.moe_ffn(x.cpu(), probs.cpu(), idx.cpu(), p1, p2, backend="torch", accumulate_wgrad=True)
    recs = [r for r in backends.records() if r["op"] == "moe_ffn.weight_grad_accumulation"]
    assert len(recs) == 1 and "backend 'torch'" in recs[0]["reason"], recs


@needs_triton
@pytest.mark.skipif(not NO_CUDA, reason="CPU lane: the megatron_world fixture applies the CPU patches, "
                    "which would stay on for this process's GPU tests; on the GPU the fused "
                    "accumulation trains under DDP in test_gpu_fused_moe_trains_in_bf16")
@pytest.mark.parametrize("dist_opt,overlap", [(False, False), (True, True)],
                         ids=["ddp", "distributed_optimizer_overlap_grad_reduce"])
def test_megatron_ddp_takes_the_experts_grads_from_the_kernel(megatron_world, dist_opt, overlap,
                                                              monkeypatch):
    """The fused layer on the Triton experts under Megatron's DistributedDataParallel (fp32
    gradient buffers; also with the distributed optimizer's buffers and the overlapped grad
    reduce, whose hook needs a grad on every parameter), two steps of two and one micro-batches:
    with the fusion the experts' main_grad is written by the weight-gradient kernel (the hook
    finds ``grad_added_to_main_grad`` set and skips its add), without it by the hook; every
    parameter's main_grad agrees after each step. With the fusion each step's first micro-batch
    stores into the buffer ``zero_grad_buffer`` has just zeroed, the next one adds.

    ``zero_grad_buffer`` leaves the opted-in expert weights' slices as they were (NaN here, put in
    every buffer before each step) and zeroes the rest; the kernel's store overwrites them, and
    where the experts' gradient goes through autograd instead (the torch backend with the fusion
    asked for: Megatron's DDP hook adds it) the weight's post-accumulate hook zeroes the slice
    first. A step in which no gradient reaches them leaves zeros after the grad sync."""
    import contextlib

    from megatron.core.distributed import DistributedDataParallel

    from megatron_ext import compat
    from megatron_ext.config import MoEConfig
    from megatron_ext.modules.moe import FusedMoELayer
    from megatron_ext.ops.moe.autograd import STALE
    from tests.test_moe_layer import B, H, S, _tconfig

    got, modes = {}, _wgrad_modes(monkeypatch)
    lanes = {"fused": ("triton", True), "hook": ("triton", False), "torch": ("torch", True)}
    for lane, (backend, fuse) in lanes.items():
        tconfig = _tconfig()
        tconfig.moe = MoEConfig(backend=backend, gradient_accumulation_fusion=fuse)
        torch.manual_seed(0)
        layer = FusedMoELayer(tconfig)
        layer.set_layer_number(1)
        ddp = DistributedDataParallel(
            tconfig, compat.ddp_config(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                       use_distributed_optimizer=dist_opt), layer)
        experts = (layer.w1, layer.w2)

        def zero_grad_buffer_over_nan():
            for p in layer.parameters():
                p.main_grad.fill_(float("nan"))   # whatever the buffer holds from the last step
            ddp.zero_grad_buffer()

        g = _gen(21)
        for step, micro_batches in enumerate((2, 1)):
            zero_grad_buffer_over_nan()
            for p in experts:   # deferred where the fusion is on: the slice still holds NaN
                assert getattr(p, STALE, False) == fuse and p.main_grad.isnan().all().item() == fuse
            assert not layer.router_weight.main_grad.any()
            for i in range(micro_batches):   # the reduce waits for the step's last one
                with ddp.no_sync() if i < micro_batches - 1 else contextlib.nullcontext():
                    y, _ = ddp(torch.randn(S, B, H, generator=g))
                    y.backward(torch.randn(S, B, H, generator=g))
                added = lane == "fused"
                assert (layer.w1.grad_added_to_main_grad, layer.w2.grad_added_to_main_grad) == (added, added)
                assert layer.w1.grad is None and layer.w2.grad is None   # the hook let them go
                assert not getattr(layer.w1, STALE, False) and not getattr(layer.w2, STALE, False)
            if overlap:
                ddp.finish_grad_sync()
            got[lane, step] = {n: p.main_grad.clone() for n, p in layer.named_parameters()}
            assert got[lane, step]["w1"].abs().sum() > 0 and got[lane, step]["w2"].abs().sum() > 0
        if lane == "fused":
            # dW1, dW2 per micro-batch: stored, then added; the second step stores again
            assert modes == [False, False, True, True, False, False], modes
        if not overlap:
            # a step whose backward never reaches the experts: the grad sync zeroes the deferred
            # slices before it reduces them
            zero_grad_buffer_over_nan()
            ddp.finish_grad_sync()
            assert all(not p.main_grad.any() for p in layer.parameters())
    for lane in ("fused", "torch"):
        for step in (0, 1):
            for n in got[lane, step]:
                torch.testing.assert_close(got[lane, step][n], got["hook", step][n], rtol=1e-5,
                                           atol=1e-6, msg=f"{lane}, step {step}: {n}")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_a_captured_backward_adds_even_into_a_zeroed_buffer():
    """Under CUDA-graph capture the weight-gradient kernel adds, whatever the zeroed-buffer mark
    says: a replay runs for every micro-batch of a step, so a captured store would overwrite the
    earlier micro-batches' gradients. Two replays leave twice the gradient. A buffer left
    unwritten by ``zero_grad_buffer`` is refused under capture with a message naming the fix."""
    from megatron_ext.ops.moe.autograd import STALE, ZEROED, track_zeroed_main_grad

    x, probs, idx, w1, w2 = _gpu_inputs(512, 8, 2, 256, 128)
    gout = torch.randn_like(x)
    ps = [_ddp_weight(w, torch.zeros(w.shape, device="cuda")) for w in (w1, w2)]
    for p in ps:
        track_zeroed_main_grad(p)

    def step():
        triton_moe_ffn(x, probs, idx, *ps, "swiglu", accumulate_wgrad=True).backward(gout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()   # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    once = [p.main_grad.clone() for p in ps]
    graph = torch.cuda.CUDAGraph()
    for p in ps:
        p.main_grad.zero_()
        p.grad_added_to_main_grad = False
        setattr(p, ZEROED, True)
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for p, o in zip(ps, once):
        torch.testing.assert_close(p.main_grad, 2 * o, rtol=1e-5, atol=1e-5)
    # a buffer zero_grad_buffer left unwritten cannot be zeroed once per step by replays: refused
    for p in ps:
        p.grad_added_to_main_grad = False
        setattr(p, ZEROED, True)
        setattr(p, STALE, True)
    with pytest.raises(RuntimeError, match="cuda_graph_impl"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step()


# --------------------------------------------------------------------------------------------------
# GPU: bf16 at real sizes, compiled kernels, determinism
# --------------------------------------------------------------------------------------------------

def _gpu_inputs(T, E, k, H, Fd, activation="swiglu", skew=False, seed=0):
    torch.manual_seed(seed)
    dev = "cuda"
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    n1 = 2 * Fd if activation in ("swiglu", "geglu") else Fd
    w1 = (torch.randn(E, H, n1, device=dev) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, Fd, H, device=dev) * Fd ** -0.5).to(torch.bfloat16)
    logits = torch.randn(T, E, device=dev)
    vals, idx = logits.topk(k, dim=-1)
    probs = torch.softmax(vals, -1)
    if skew:  # a quarter of the tokens all on experts 0..k-1, one expert left empty
        idx[: T // 4] = torch.arange(k, device=dev)
        idx[idx == E - 1] = 0 if k == 1 else idx[idx == E - 1]
    return x, probs, idx, w1, w2


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,E,k,H,Fd,activation,skew", [
    (4096, 64, 6, 1024, 704, "swiglu", False),
    (3001, 128, 8, 512, 352, "swiglu", True),
    (2048, 16, 1, 768, 512, "gelu", True),
    (1000, 8, 2, 256, 128, "geglu", False),
])
def test_gpu_bf16_matches_reference(T, E, k, H, Fd, activation, skew):
    x, probs, idx, w1, w2 = _gpu_inputs(T, E, k, H, Fd, activation, skew)
    gout = torch.randn_like(x)
    got = _run(lambda *a: moe.moe_ffn(*a, activation=activation, backend="triton"),
               x, probs, idx, w1, w2, gout)
    # reference in fp32 on the same bf16 values: the bf16 kernels must sit within bf16 rounding
    ref = _run(lambda *a: moe.moe_ffn_reference(*a, activation),
               x.float(), probs, idx, w1.float(), w2.float(), gout.float())
    for what, g_, r_ in zip(("out", "dx", "dprobs", "dw1", "dw2"), got, ref):
        err = (g_.float() - r_).abs().max().item()
        scale = max(1.0, r_.abs().max().item())
        assert err <= 3e-2 * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"
        rel = ((g_.float() - r_).norm() / r_.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-2, f"{what}: relative L2 error {rel:.3g}"
    empty = torch.bincount(idx.flatten(), minlength=E) == 0
    assert bool(empty[E - 1]) == (skew and k == 1)
    # experts with no rows: exact zero weight gradients on either lane
    assert not got[3][empty].any() and not got[4][empty].any()
    if torch.cuda.get_device_capability() >= (9, 0):   # the H100 tiles take the grouped GEMM lane
        lanes = {r["observed"] for r in backends.records()
                 if r["op"] == "moe_ffn.triton.weight_grads"}
        assert lanes == {"grouped_mm"}, backends.records()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,E,k,H,Fd,buf_dtype", [(4096, 64, 6, 1024, 704, torch.float32),
                                                  (3001, 128, 8, 512, 352, torch.bfloat16)])
def test_gpu_bf16_weight_grads_accumulate_into_main_grad(T, E, k, H, Fd, buf_dtype):
    """The H100 tiles' accumulating weight-gradient kernel (bf16 operands, TMA): main_grad = the
    earlier sum + the fp32 reference gradient within bf16 rounding; the last expert gets no
    row, and its buffer stays as it was."""
    x, _, _, w1, w2 = _gpu_inputs(T, E, k, H, Fd, seed=6)
    logits = torch.randn(T, E, device="cuda")
    logits[:, E - 1] = float("-inf")
    vals, idx = logits.topk(k, dim=-1)
    probs = torch.softmax(vals, -1)
    gout = torch.randn_like(x)
    ref = _run(lambda *a: moe.moe_ffn_reference(*a, "swiglu"),
               x.float(), probs, idx, w1.float(), w2.float(), gout.float())
    olds = [torch.randn(w.shape, device="cuda").to(buf_dtype) for w in (w1, w2)]
    p1, p2 = (_ddp_weight(w, old) for w, old in zip((w1, w2), olds))
    moe.moe_ffn(x, probs, idx, p1, p2, backend="triton", accumulate_wgrad=True).backward(gout)
    empty = torch.bincount(idx.flatten(), minlength=E) == 0
    assert empty[E - 1]
    for what, p, old, r_ in (("dw1", p1, olds[0], ref[3]), ("dw2", p2, olds[1], ref[4])):
        assert p.grad_added_to_main_grad, what
        expect = old.float() + r_
        err = (p.main_grad.float() - expect).abs().max().item()
        assert err <= 3e-2 * max(1.0, expect.abs().max().item()), f"{what}: err {err:.3g}"
        rel = ((p.main_grad.float() - expect).norm() / expect.norm()).item()
        assert rel <= 1e-2, f"{what}: relative L2 error {rel:.3g}"
        assert torch.equal(p.main_grad[empty], old[empty]), what


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_compiled_small_cases_fp32(name):
    """The interpreter's edge cases, compiled with the GPU tiles (larger than these shapes)."""
    _compare(name, "swiglu", torch.float32, 1e-4, seed=1, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_bitwise_deterministic_and_batch_invariant():
    T, E, k, H, Fd = 8192, 64, 6, 1024, 704
    x, probs, idx, w1, w2 = _gpu_inputs(T, E, k, H, Fd, seed=3)
    gout = torch.randn_like(x)
    fn = lambda *a: triton_moe_ffn(*a)  # noqa: E731
    first = _run(fn, x, probs, idx, w1, w2, gout)
    second = _run(fn, x, probs, idx, w1, w2, gout)
    for what, a, b in zip(("out", "dx", "dprobs", "dw1", "dw2"), first, second):
        assert torch.equal(a, b), f"{what} differs between two identical runs"
    # another batch: every 5th token of this one plus 3000 new tokens, shuffled
    sub = torch.arange(0, T, 5, device="cuda")
    xn, pn, idn, _, _ = _gpu_inputs(3000, E, k, H, Fd, seed=4)
    perm = torch.randperm(sub.numel() + 3000, device="cuda")
    xb = torch.cat([x[sub], xn])[perm]
    pb, ib, gb = (torch.cat([t[sub], u])[perm]
                  for t, u in ((probs, pn), (idx, idn), (gout, torch.randn_like(xn))))
    other = _run(fn, xb, pb, ib, w1, w2, gb)
    pos = torch.argsort(perm)[: sub.numel()]           # where the shared tokens went
    for what, full, part in zip(("out", "dx", "dprobs"), first[:3], other[:3]):
        assert torch.equal(full[sub], part[pos]), f"{what} rows changed with the batch"
