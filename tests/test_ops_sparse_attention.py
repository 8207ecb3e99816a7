"""Sparse MQA attention op: the reference pins the mask semantics against an independent per-query
loop (fp64) and SDPA; the Triton kernels (CPU interpreter here, real size on GPU) match the
reference in forward, lse and every gradient (q, k, v, sink logit); backend choice and errors."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import dataclasses  # noqa: E402
import os  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.backends import BackendUnavailable  # noqa: E402
from megatron_ext.ops.sparse_attention import (  # noqa: E402
    allowed_mask, sparse_attention, sparse_attention_reference)

from megatron_ext.ops.sparse_attention import triton_window  # noqa: E402

# The Triton tests run on the GPU when there is one (compiled), else in the CPU interpreter.
needs_triton = triton_mark("megatron_ext.ops.sparse_attention.triton_window")


def _qkv(b, s, hq, hkv, d, dtype=torch.float32, seed=0, grad=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
               for h in (hq, hkv, hkv))
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


# ------------------------------------------------------------------------------------------------
# reference: semantics
# ------------------------------------------------------------------------------------------------

def naive_attention(q, k, v, *, window_size=None, num_sink_tokens=0, sink_logits=None,
                    topk_indices=None, causal=True, softmax_scale=None):
    """Independent spec: one query at a time, the allowed set spelled out, fp64 python floats."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qd, kd, vd = (t.double() for t in (q, k, v))
    out = torch.zeros(b, s, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, s), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            g = h // group
            for i in range(s):
                listed = set(topk_indices[bi, i, g].tolist()) if topk_indices is not None else set()
                keys = []
                for j in range(s):
                    if causal and j > i:
                        continue
                    in_window = window_size is not None and i - j < window_size
                    is_sink = j < num_sink_tokens
                    if topk_indices is None:
                        ok = window_size is None or in_window or is_sink
                    else:
                        ok = j in listed or in_window or is_sink
                    if ok:
                        keys.append(j)
                logits = [scale * float(qd[bi, i, h] @ kd[bi, j, g]) for j in keys]
                everything = logits + ([float(sink_logits[h])] if sink_logits is not None else [])
                if not everything:
                    continue
                m = max(everything)
                den = sum(math.exp(x - m) for x in everything)
                for j, x in zip(keys, logits):
                    out[bi, i, h] += math.exp(x - m) / den * vd[bi, j, g]
                lse[bi, h, i] = m + math.log(den)
    return out, lse


def _topk(b, s, hkv, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, s, (b, s, hkv, k), generator=g, dtype=torch.int32)  # -1 pads, > i future
    return idx


NAIVE_CASES = [
    dict(window_size=None),
    dict(window_size=1),
    dict(window_size=1, num_sink_tokens=3),
    dict(window_size=4, num_sink_tokens=2, sink=True),
    dict(window_size=20, num_sink_tokens=0, sink=True),          # window larger than S
    dict(window_size=3, num_sink_tokens=1, topk=3),
    dict(window_size=None, num_sink_tokens=0, topk=2, sink=True),  # rows may have no key at all
    dict(window_size=3, num_sink_tokens=2, causal=False, softmax_scale=0.3),
]


@pytest.mark.parametrize("case", NAIVE_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_reference_matches_naive_loop(case):
    case = dict(case)
    b, s, hq, hkv, d = 2, 11, 4, 2, 8
    q, k, v = _qkv(b, s, hq, hkv, d, dtype=torch.float64, seed=3)
    sink = torch.randn(hq, dtype=torch.float64) if case.pop("sink", False) else None
    topk = _topk(b, s, hkv, case.pop("topk")) if "topk" in case else None
    out, lse = sparse_attention_reference(q, k, v, sink_logits=sink, topk_indices=topk,
                                          return_lse=True, **case)
    want_out, want_lse = naive_attention(q, k, v, sink_logits=sink, topk_indices=topk, **case)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)


def test_window_counts_the_query_itself():
    """window_size=W sees [i - W + 1, i] (FlashAttention (W-1, 0)); sinks add the first keys."""
    got = allowed_mask(6, window_size=2, num_sink_tokens=1).int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 0, 1, 1, 0, 0],
                         [1, 0, 0, 1, 1, 0],
                         [1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    assert torch.equal(got, want)
    assert torch.equal(allowed_mask(4, window_size=1).int(), torch.eye(4, dtype=torch.int32))


@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 2), (2, 2)])
def test_reference_dense_matches_sdpa(hq, hkv):
    q, k, v = _qkv(2, 19, hq, hkv, 16, seed=5)
    out = sparse_attention_reference(q, k, v, window_size=None)
    rep = hq // hkv
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
        v.transpose(1, 2).repeat_interleave(rep, 1), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # sinks are redundant without a window; a window >= S is dense
    torch.testing.assert_close(sparse_attention_reference(q, k, v, num_sink_tokens=3), out)
    torch.testing.assert_close(sparse_attention_reference(q, k, v, window_size=19), out)


def test_reference_sink_identity():
    """Megatron's oracle: out_sink = out_vanilla * sigmoid(lse_vanilla - sink)."""
    q, k, v = _qkv(1, 23, 4, 1, 16, dtype=torch.float64, seed=7)
    sink = torch.randn(4, dtype=torch.float64)
    plain, lse = sparse_attention_reference(q, k, v, window_size=5, num_sink_tokens=2, return_lse=True)
    with_sink, lse_sink = sparse_attention_reference(q, k, v, window_size=5, num_sink_tokens=2,
                                                     sink_logits=sink, return_lse=True)
    gate = torch.sigmoid(lse.double() - sink.view(1, 4, 1)).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(with_sink, plain * gate)
    torch.testing.assert_close(lse_sink.double(), torch.logaddexp(lse.double(), sink.view(1, 4, 1)))


def test_reference_gradcheck_with_sink():
    q, k, v = _qkv(1, 7, 2, 1, 4, dtype=torch.float64, seed=9, grad=True)
    sink = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, s: sparse_attention_reference(q, k, v, window_size=3, num_sink_tokens=1,  # noqa
                                                       sink_logits=s)
    assert torch.autograd.gradcheck(fn, (q, k, v, sink))


def test_reference_sink_gradient_formula():
    """d loss/d sink_h = -sum_t exp(sink_h - lse_t) * (dO_t . O_t), against autograd."""
    g = torch.Generator().manual_seed(3)
    q, k, v = _qkv(2, 13, 4, 2, 8, dtype=torch.float64, seed=2)
    sink = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_(True)
    out, lse = sparse_attention_reference(q, k, v, window_size=4, num_sink_tokens=1, sink_logits=sink,
                                          return_lse=True)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=g)
    out.backward(dout)
    delta = (dout * out).sum(-1).transpose(1, 2)  # [b, hq, s]
    want = -(torch.exp(sink.detach().view(1, 4, 1) - lse.double()) * delta.detach()).sum((0, 2))
    # lse is returned in fp32 (the op's contract): the formula side carries its rounding (~6e-8
    # relative per term through exp, summed over 26 terms of both signs), so fp32-level tolerance
    # relative to the gradient's scale, not fp64's default
    torch.testing.assert_close(sink.grad, want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_reference_row_without_keys_is_zero():
    q, k, v = _qkv(1, 6, 2, 1, 4, seed=4, grad=True)
    topk = torch.full((1, 6, 1, 2), -1, dtype=torch.int32)
    topk[0, 3, 0, 0] = 1  # only row 3 has a key; rows 0..2 and 4..5 have none
    topk[0, 4, 0, 0] = 5  # future key: ignored under causal
    out, lse = sparse_attention_reference(q, k, v, topk_indices=topk, return_lse=True)
    rows = [0, 1, 2, 4, 5]
    assert torch.all(out[0, rows] == 0) and torch.all(torch.isneginf(lse[0, :, rows]))
    torch.testing.assert_close(out[0, 3], v[0, 1].expand(2, 4))  # one key -> its value
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[0, rows] == 0)
    sink = torch.zeros(2)
    _, lse = sparse_attention_reference(q, k, v, topk_indices=topk, sink_logits=sink, return_lse=True)
    assert torch.all(lse[0, :, rows] == 0)


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) vs the reference
# ------------------------------------------------------------------------------------------------

def _triton_vs_reference(b, s, hq, hkv, d, window, sinks, with_sink, dtype=torch.float32, config=None,
                         backward=True, tol=1e-4, transpose_inputs=False, seed=0):
    from megatron_ext.ops.sparse_attention.autograd import sparse_window_attention

    q, k, v = _qkv(b, s, hq, hkv, d, dtype=dtype, seed=seed, device=DEVICE)
    if transpose_inputs:  # Megatron's [s, b, h, d] viewed as [b, s, h, d]: strided, not contiguous
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
        assert not q.is_contiguous()
    for t in (q, k, v):
        t.requires_grad_(True)
    sink = (torch.randn(hq, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE).requires_grad_(True)
            if with_sink else None)
    dout = torch.randn(b, s, hq, d, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE, dtype)
    leaves = [q, k, v] + ([sink] if with_sink else [])

    out = sparse_window_attention(q, k, v, sink, window, sinks, None, config)
    got = [out]
    if backward:
        got += list(torch.autograd.grad(out, leaves, dout))

    want_out = sparse_attention_reference(q, k, v, window_size=window, num_sink_tokens=sinks,
                                          sink_logits=sink)
    want = [want_out]
    if backward:
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        ref_out = sparse_attention_reference(*ref_leaves[:3], window_size=window, num_sink_tokens=sinks,
                                             sink_logits=ref_leaves[3] if with_sink else None)
        want = [ref_out] + list(torch.autograd.grad(ref_out, ref_leaves, dout.double()))
    names = ["out", "dq", "dk", "dv", "dsink"]
    for name, g, w in zip(names, got, want):
        assert g.dtype == (dtype if name != "dsink" else sink.dtype), name
        err = (g.double() - w.double()).abs().max().item()
        assert err <= tol * max(1.0, w.double().abs().max().item()), f"{name}: max abs err {err:.3g}"


TRITON_CASES = [
    # b, s, hq, hkv, d, window, sinks, learnable sink
    (1, 37, 4, 1, 16, 8, 3, True),     # MQA, odd S, window + token sinks + sink logit
    (2, 50, 4, 2, 32, 5, 0, False),    # GQA, no sinks
    (1, 50, 2, 2, 16, None, 0, True),  # MHA, dense causal
    (1, 37, 4, 1, 16, 1, 3, True),     # window 1: itself + sinks
    (1, 37, 4, 2, 16, 100, 3, False),  # window larger than S
    (1, 21, 6, 2, 16, 4, 2, True),     # group of 3: padded head rows
    (1, 70, 2, 1, 16, 45, 2, True),    # window edge, unmasked interior and diagonal all visited
]


@needs_triton
@pytest.mark.parametrize("b,s,hq,hkv,d,window,sinks,with_sink", TRITON_CASES)
def test_triton_fwd_bwd_matches_reference_fp32(b, s, hq, hkv, d, window, sinks, with_sink):
    _triton_vs_reference(b, s, hq, hkv, d, window, sinks, with_sink)


@needs_triton
def test_triton_head_dim_64():
    _triton_vs_reference(1, 40, 2, 1, 64, 12, 4, True)


@needs_triton
def test_triton_sink_gradient_split_over_chunks():
    """Sink keys' gradient from queries past their band is summed from several chunk programs."""
    cfg = dataclasses.replace(triton_window.INTERPRETER_CONFIG, dkdv_chunk=8)
    _triton_vs_reference(1, 50, 4, 1, 16, 7, 3, True, config=cfg)
    _triton_vs_reference(1, 50, 2, 1, 16, 6, 20, True, config=cfg)  # sinks span two key blocks


@needs_triton
@pytest.mark.parametrize("variant", [dict(), dict(dkdv_atomic=True), dict(fused_dq=True),
                                     dict(dkdv_atomic=True, fused_dq=True)])
@pytest.mark.parametrize("b,s,hq,hkv,d,window,sinks,with_sink", [
    (1, 37, 4, 1, 16, 8, 3, True),     # MQA: a key block's band spans several query chunks
    (1, 21, 6, 2, 16, 4, 2, True),     # group of 3 (padded head rows), two kv groups
    (1, 30, 2, 1, 16, None, 0, False),  # dense causal: chunks of the whole causal band
])
def test_triton_dkdv_chunked_and_atomic_variants(b, s, hq, hkv, d, window, sinks, with_sink, variant):
    """dk/dv from (key block, query chunk) programs: fixed-order fp32 partials (default) or fp32
    atomics; ``fused_dq`` takes dq from the dk/dv kernel's atomics instead of the dq kernel."""
    cfg = dataclasses.replace(triton_window.INTERPRETER_CONFIG, dkdv_chunk=8, **variant)
    assert cfg.deterministic == (not variant)
    _triton_vs_reference(b, s, hq, hkv, d, window, sinks, with_sink, config=cfg)


@needs_triton
@pytest.mark.parametrize("b,s,hq,hkv,d,window,sinks,variant", [
    (1, 50, 4, 1, 16, 7, 20, dict()),          # sink blocks span two key blocks, several chunks
    (1, 37, 4, 1, 16, 8, 3, dict(dkdv_atomic=True)),
    (2, 30, 6, 2, 16, None, 0, dict()),        # dense causal, two batches x two kv groups
])
def test_triton_dkdv_partials_need_no_zero_fill(monkeypatch, b, s, hq, hkv, d, window, sinks, variant):
    """The dk/dv partial buffers are allocated uninitialised and the reduce kernel reads only the
    slots some program wrote: with every ``torch.empty`` filled with NaN the gradients still match."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **kw):
        t = real_empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    cfg = dataclasses.replace(triton_window.INTERPRETER_CONFIG, dkdv_chunk=8, **variant)
    _triton_vs_reference(b, s, hq, hkv, d, window, sinks, True, config=cfg)


@needs_triton
def test_triton_heavy_first_program_order():
    """Reversed token order of the forward and dq programs (``heavy_first``) computes the same."""
    cfg = dataclasses.replace(triton_window.INTERPRETER_CONFIG, heavy_first=True)
    assert cfg.deterministic
    _triton_vs_reference(1, 37, 4, 1, 16, 8, 3, True, config=cfg)


def test_tile_config_rejects_bad_switches():
    with pytest.raises(ValueError, match="dkdv_chunk=0"):
        triton_window.TileConfig(dkdv_chunk=0)
    with pytest.raises(ValueError, match="fused_dq=1"):
        triton_window.TileConfig(fused_dq=1)
    with pytest.raises(ValueError, match="heavy_first=None"):
        triton_window.TileConfig(heavy_first=None)
    with pytest.raises(ValueError, match="tma='yes'"):
        triton_window.TileConfig(tma="yes")


@needs_triton
@pytest.mark.parametrize("b,s,hq,hkv,d,window,sinks,with_sink,variant,kw", [
    (1, 37, 4, 1, 16, 8, 3, True, dict(), {}),                 # MQA, odd S: boxes past the end
    (1, 21, 6, 2, 16, 4, 2, True, dict(), {}),                 # group of 3: padded head rows
    (1, 12, 32, 1, 16, 4, 1, True, dict(), {}),                # two head chunks per group
    (2, 19, 4, 2, 16, 6, 1, True, dict(), dict(transpose_inputs=True)),  # strided views
    (1, 37, 4, 1, 16, 8, 3, True, dict(dkdv_chunk=8, fused_dq=True), {}),
    (1, 40, 4, 1, 16, 8, 3, True, dict(), {}),                 # S % 4 == 0: lse/delta boxes too
    (1, 20, 6, 2, 16, 4, 2, True, dict(dkdv_chunk=8), {}),     # ... with padded head rows
    (1, 40, 4, 1, 16, 8, 3, True, dict(dkdv_chunk=8, dkdv_atomic=True), {}),
    (1, 45, 4, 1, 32, 9, 2, True, dict(), dict(dtype=torch.float16, tol=2e-2)),
])
def test_triton_tma_lane_matches_reference(b, s, hq, hkv, d, window, sinks, with_sink, variant, kw):
    """Q/dO/O and K/V tiles through TMA tensor descriptors (the interpreter emulates them): boxes
    past the sequence read zeros, padded head rows read the next group's heads and must not leak
    into dk/dv, and the dq kernel's delta feeds the dk/dv kernel."""
    cfg = dataclasses.replace(triton_window.INTERPRETER_CONFIG, tma=True, **variant)
    hb, bt, _ = triton_window._group_tiling(hq // hkv, cfg.fwd_block_m)
    q = torch.randn(b, s, hq, d, device=DEVICE)
    assert triton_window._descs(cfg, (q, [1, bt, hb, d]))[0]  # the lane is taken
    hb, bt, _ = triton_window._group_tiling(hq // hkv, cfg.dkdv_block_m)
    lse = torch.empty(b, hq, s, device=DEVICE)
    # the dk/dv kernel also reads lse and delta through boxes when their rows allow it
    assert triton_window._row_vec_descs(cfg, True, hb, bt, lse, lse)[0] == (s % 4 == 0 and bt % 4 == 0)
    _triton_vs_reference(b, s, hq, hkv, d, window, sinks, with_sink, config=cfg, **kw)


def test_default_tiles_without_tma(monkeypatch, request):
    """A GPU before sm_90 (no TMA) gets the pointer-load tiles; Hopper keeps the TMA lane."""
    from megatron_ext.ops import _tma

    cuda = torch.device("cuda", 0)
    request.addfinalizer(_tma._sm90_or_later.cache_clear)  # the capability is cached per process
    _tma._sm90_or_later.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    old = triton_window.default_config(128, torch.bfloat16, False, cuda)
    assert old == triton_window.POINTER_CONFIGS[128] and not old.tma
    _tma._sm90_or_later.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_window.default_config(128, torch.bfloat16, False, cuda) == triton_window.H100_CONFIGS[128]
    assert triton_window.H100_CONFIGS[128].tma
    assert not triton_window.default_config(128, torch.float32, False, cuda).tma  # fp32: pointer loads


@needs_triton
def test_triton_tma_lane_falls_back_to_pointer_loads(caplog):
    """A tensor no descriptor can describe (row not a multiple of 16 bytes) keeps the pointer loads
    for that launch, with the same results; the fallback is logged once and recorded (receipt)."""
    from megatron_ext import backends
    from megatron_ext.ops._tma import tensor_desc

    backends.reset()
    cfg = dataclasses.replace(triton_window.INTERPRETER_CONFIG, tma=True)
    odd = torch.randn(1, 8, 2, 6, device=DEVICE)       # 24-byte rows
    assert tensor_desc(odd, [1, 4, 2, 6], True) is None
    assert tensor_desc(odd[..., :4].contiguous(), [1, 4, 2, 4], True) is not None
    assert backends.records() == []  # nobody asked for TMA: nothing to record
    with caplog.at_level("WARNING", logger="megatron_ext.backends"):
        for _ in range(2):
            use, passed = triton_window._descs(cfg, (odd, [1, 4, 2, 6]))
            assert not use and passed[0] is odd
    [rec] = backends.records()
    assert (rec["op"], rec["requested"], rec["observed"], rec["count"]) == (
        triton_window.TMA_OP, "tma loads", "pointer loads", 2)
    assert "16-byte aligned" in rec["reason"] and "(1, 8, 2, 6)" in rec["reason"]
    assert sum("pointer loads" in r.getMessage() for r in caplog.records) == 1
    assert triton_window._descs(dataclasses.replace(cfg, tma=False),
                                (odd[..., :4].contiguous(), [1, 4, 2, 4]))[0] is False
    # lse/delta boxes need >= 16-byte rows: 2 tokens per box falls back, recorded the same way
    backends.reset()
    lse = torch.randn(1, 8, 16, device=DEVICE)
    assert triton_window._row_vec_descs(cfg, True, 8, 2, lse, lse) == (False, [lse, lse])
    assert "2 tokens" in backends.records()[0]["reason"]
    backends.reset()


@needs_triton
def test_triton_group_split_over_head_chunks():
    """hq/hkv = 32 > BLOCK_M = 16: the group's heads are split over two head chunks."""
    _triton_vs_reference(1, 12, 32, 1, 16, 4, 1, True, config=triton_window.INTERPRETER_CONFIG)


@needs_triton
def test_triton_strided_inputs():
    _triton_vs_reference(2, 19, 4, 2, 16, 6, 1, True, transpose_inputs=True)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_triton_half_forward(dtype, tol):
    _triton_vs_reference(1, 45, 4, 1, 32, 9, 2, True, dtype=dtype, backward=False, tol=tol)


@needs_triton
def test_triton_lse_and_sink_identity():
    window_attention_fwd = triton_window.window_attention_fwd
    q, k, v = _qkv(1, 29, 4, 2, 16, seed=11, device=DEVICE)
    sink = torch.randn(4, device=DEVICE)
    out_s, lse_s = window_attention_fwd(q, k, v, sink, 6, 2, None)
    out_p, lse_p = window_attention_fwd(q, k, v, None, 6, 2, None)
    _, want_lse = sparse_attention_reference(q, k, v, window_size=6, num_sink_tokens=2, sink_logits=sink,
                                             return_lse=True)
    torch.testing.assert_close(lse_s, want_lse, rtol=1e-5, atol=1e-5)
    gate = torch.sigmoid(lse_p - sink.view(1, 4, 1)).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(out_s, out_p * gate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_s, torch.logaddexp(lse_p, sink.view(1, 4, 1)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# public op: backend choice and argument errors
# ------------------------------------------------------------------------------------------------

@needs_triton
def test_auto_uses_triton():
    q, k, v = _qkv(1, 17, 2, 1, 16, seed=12, device=DEVICE)
    out = sparse_attention(q, k, v, window_size=4, num_sink_tokens=1)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, window_size=4, num_sink_tokens=1),
                               rtol=1e-5, atol=1e-5)
    assert backends.records()[0]["observed"] == "triton"


def test_auto_falls_back_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv(1, 9, 2, 1, 16)
    out = sparse_attention(q, k, v, window_size=3)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, window_size=3))
    rec = backends.records()[0]
    assert rec["observed"] == "torch"
    assert "TRITON_INTERPRET" in rec["reason"] or "triton is not installed" in rec["reason"]
    with pytest.raises(BackendUnavailable, match="backend='triton'"):
        sparse_attention(q, k, v, window_size=3, backend="triton")


@needs_triton
@pytest.mark.parametrize("kwargs,names", [
    (dict(causal=False), "causal=False"),
])
def test_triton_unsupported_cases(kwargs, names):  # top-k runs on Triton: tests/test_ops_sparse_topk.py
    q, k, v = _qkv(1, 9, 2, 1, 16)
    with pytest.raises(BackendUnavailable, match=names):
        sparse_attention(q, k, v, window_size=3, backend="triton", **kwargs)
    out = sparse_attention(q, k, v, window_size=3, backend="auto", **kwargs)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, window_size=3, **kwargs))
    assert names in backends.records()[-1]["reason"]


def test_triton_rejects_unsupported_head_dim():
    q, k, v = _qkv(1, 9, 2, 1, 24)
    with pytest.raises(BackendUnavailable, match="head_dim=24"):
        sparse_attention(q, k, v, window_size=3, backend="triton")


def test_torch_backend_is_the_reference():
    q, k, v = _qkv(1, 9, 4, 2, 8)
    torch.testing.assert_close(sparse_attention(q, k, v, window_size=2, backend="torch"),
                               sparse_attention_reference(q, k, v, window_size=2))
    assert backends.records()[0]["observed"] == "torch"


def _err(**over):
    q, k, v = _qkv(1, 8, 4, 2, 16)
    args = dict(q=q, k=k, v=v)
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return lambda: sparse_attention(q, k, v, **args)


BAD = [
    (dict(window_size=0), r"window_size=0: .*; use an int >= 1"),
    (dict(window_size=2.5), r"window_size=2.5: .*; use "),
    (dict(num_sink_tokens=-1), r"num_sink_tokens=-1: .*; use an int >= 0"),
    (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), r"hq/hkv=\(4, 3\): .*; use "),
    (dict(sink_logits=torch.zeros(3)), r"sink_logits.shape=\(3,\): .*; use \[4\]"),
    (dict(q=torch.randn(8, 4, 16)), r"q.shape=\(8, 4, 16\): must be 4-D; use "),
    (dict(q=torch.randn(1, 8, 4, 16, dtype=torch.float16)), r"k.dtype/v.dtype=.*; use one dtype"),
    (dict(q=torch.ones(1, 8, 4, 16, dtype=torch.int64)), r"q.dtype=torch.int64: unsupported; use "),
    (dict(k=torch.randn(1, 7, 2, 16)), r"v.shape=.*differs from k.shape"),
    (dict(topk_indices=torch.zeros(1, 8, 2, 2)), r"topk_indices.dtype=torch.float32: .*; use torch.int32"),
    (dict(topk_indices=torch.zeros(1, 8, 4, 2, dtype=torch.int32)), r"topk_indices.shape=\(1, 8, 4, 2\)"),
    (dict(softmax_scale=-1.0), r"softmax_scale=-1.0: .*; use a float > 0"),
    (dict(backend="cuda"), r"backend='cuda': unknown .*; use one of \['auto', 'triton', 'torch'\]"),
]


@pytest.mark.parametrize("over,match", BAD, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD])
def test_argument_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _err(**over)()


def test_topk_values_out_of_range():
    q, k, v = _qkv(1, 8, 4, 2, 16)
    topk = torch.full((1, 8, 2, 2), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_indices=\(8, 8\): .*; use values in \[-1, 7\]"):
        sparse_attention(q, k, v, topk_indices=topk)


def test_bench_counts_attended_pairs_of_the_mask():
    from bench.benchmarks.sparse_attention import attended_pairs

    for s, w, ns in ((50, 7, 3), (50, 1, 0), (50, 60, 4), (33, None, 2)):
        want = int(allowed_mask(s, window_size=w, num_sink_tokens=ns).sum())
        assert attended_pairs(s, w, ns) == want


def test_ops_do_not_import_megatron():
    code = ("import sys, megatron_ext.ops.sparse_attention as m; "
            "bad = [n for n in sys.modules if n == 'megatron' or n.startswith('megatron.')]; "
            "assert not bad, bad")
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------
# GPU: real sizes, bf16, the compiled kernels
# ------------------------------------------------------------------------------------------------

def _gpu_case(s, hq, hkv, d, window, sinks, dtype=torch.bfloat16, seed=0, config=None):
    from megatron_ext.ops.sparse_attention.autograd import sparse_window_attention

    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=dtype, requires_grad=True)
               for h in (hq, hkv, hkv))
    sink = torch.randn(hq, device="cuda", requires_grad=True)
    dout = torch.randn(1, s, hq, d, device="cuda", dtype=dtype)
    out = sparse_window_attention(q, k, v, sink, window, sinks, None, config)
    got = [out] + list(torch.autograd.grad(out, [q, k, v, sink], dout))
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v, sink)]
    ref = sparse_attention_reference(*leaves[:3], window_size=window, num_sink_tokens=sinks,
                                     sink_logits=leaves[3])
    want = [ref] + list(torch.autograd.grad(ref, leaves, dout.float()))
    return got, want


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("s,hq,hkv,d,window,sinks", [
    (2048, 16, 1, 128, 512, 4),
    (1999, 8, 2, 64, 300, 4),
    (2048, 16, 1, 128, None, 0),
    (1024, 4, 1, 128, 1, 4),
    (4096, 4, 1, 128, 256, 4),  # several query chunks per sink key block in dk/dv
])
def test_gpu_bf16_matches_reference(s, hq, hkv, d, window, sinks):
    got, want = _gpu_case(s, hq, hkv, d, window, sinks)
    for name, g, w in zip(["out", "dq", "dk", "dv", "dsink"], got, want):
        err = (g.float() - w).abs().max().item()
        scale = max(1.0, w.abs().max().item())
        # bf16 inputs to the tensor cores, P and dS rounded to bf16: ~1e-2 relative
        assert err <= 3e-2 * scale, f"{name}: max abs err {err:.3g} (scale {scale:.3g})"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("b,s,hq,hkv,d,window,sinks,with_sink", TRITON_CASES)
def test_gpu_compiled_small_cases(b, s, hq, hkv, d, window, sinks, with_sink, dtype, tol):
    """The interpreter's edge cases, compiled with the H100 tiles (which exceed these lengths)."""
    _triton_vs_reference(b, s, hq, hkv, d, window, sinks, with_sink, dtype=dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", [dict(dkdv_atomic=True), dict(fused_dq=True), dict(dkdv_chunk=256),
                                     dict(tma=False)])
def test_gpu_bf16_atomic_and_chunk_variants(variant):
    cfg = dataclasses.replace(triton_window.default_config(128, torch.bfloat16, False), **variant)
    for shape in [(2048, 16, 1, 128, 512, 4), (1999, 8, 2, 128, None, 0)]:
        got, want = _gpu_case(*shape, config=cfg)
        for name, g, w in zip(["out", "dq", "dk", "dv", "dsink"], got, want):
            err = (g.float() - w).abs().max().item()
            assert err <= 3e-2 * max(1.0, w.abs().max().item()), f"{variant} {shape} {name}: {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_backward_is_deterministic():
    from megatron_ext.ops.sparse_attention.autograd import sparse_window_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8192, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (16, 1, 1))
    sink = torch.randn(16, device="cuda", requires_grad=True)
    dout = torch.randn(1, 8192, 16, 128, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = sparse_window_attention(q, k, v, sink, 1024, 4, None)
        runs.append(torch.autograd.grad(out, [q, k, v, sink], dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
