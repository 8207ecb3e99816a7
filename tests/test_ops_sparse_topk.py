"""Top-k sparse attention: the Triton kernels (CPU interpreter here, compiled on GPU) against the
torch reference in fp64, forward and every gradient (q, k, v, sink logit), alone and united with
the window / token sinks; the index-list preparation and transpose; fast (atomic) vs deterministic
backward; routing of the public op."""

from tests.kernel_lane import DEVICE, NO_CUDA, clean_backend_records, triton_mark  # noqa: F401  (first: sets the lane)

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_ext import backends  # noqa: E402
from megatron_ext.ops.sparse_attention import (  # noqa: E402
    sparse_attention, sparse_attention_reference, triton_topk)

needs_triton = triton_mark("megatron_ext.ops.sparse_attention.triton_window")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(b, s, hq, hkv, d, K, dtype, seed, with_sink, dup=False):
    g = _gen(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype).requires_grad_(True)
               for h in (hq, hkv, hkv))
    idx = torch.randint(-1, s, (b, s, hkv, K), generator=g, dtype=torch.int32)  # -1 pads, > t future
    if dup:  # repeated entries must count once
        idx[..., 1] = idx[..., 0]
    sink = torch.randn(hq, generator=g).to(DEVICE).requires_grad_(True) if with_sink else None
    dout = torch.randn(b, s, hq, d, generator=g).to(DEVICE, dtype)
    return q, k, v, idx.to(DEVICE), sink, dout


def _check(b, s, hq, hkv, d, K, window, sinks, with_sink, deterministic, dtype=torch.float32,
           tol=1e-4, dup=False, seed=0, config=None):
    q, k, v, idx, sink, dout = _inputs(b, s, hq, hkv, d, K, dtype, seed, with_sink, dup)
    leaves = [q, k, v] + ([sink] if with_sink else [])
    out = triton_topk.sparse_topk_attention(q, k, v, idx, sink, window, sinks, None,
                                            deterministic=deterministic, config=config)
    got = [out] + list(torch.autograd.grad(out, leaves, dout))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = sparse_attention_reference(*ref_leaves[:3], window_size=window, num_sink_tokens=sinks,
                                     sink_logits=ref_leaves[3] if with_sink else None, topk_indices=idx)
    want = [ref] + list(torch.autograd.grad(ref, ref_leaves, dout.double()))
    for name, gt, w in zip(["out", "dq", "dk", "dv", "dsink"], got, want):
        assert gt.dtype == (dtype if name != "dsink" else sink.dtype), name
        err = (gt.double() - w).abs().max().item()
        assert err <= tol * max(1.0, w.abs().max().item()), f"{name}: max abs err {err:.3g}"
    return got


CASES = [
    # b, s, hq, hkv, d, K, window, sinks, sink logit, deterministic
    (1, 21, 4, 1, 16, 5, None, 0, False, False),   # top-k only, MQA, rows without any key
    (1, 23, 4, 2, 16, 6, 4, 2, True, True),        # united with window + sinks, GQA 4/2, det. bwd
    (2, 19, 4, 1, 32, 30, None, 3, True, False),   # k > visible keys, sinks without a window
    (1, 18, 4, 2, 16, 4, 3, 0, False, True),       # window, no sinks, det. bwd
]


@needs_triton
@pytest.mark.parametrize("b,s,hq,hkv,d,K,window,sinks,with_sink,det", CASES)
def test_triton_topk_matches_fp64_reference(b, s, hq, hkv, d, K, window, sinks, with_sink, det):
    _check(b, s, hq, hkv, d, K, window, sinks, with_sink, det)


@needs_triton
def test_triton_topk_duplicates_count_once_fp16():
    _check(1, 17, 4, 1, 16, 6, 2, 1, True, False, dtype=torch.float16, tol=3e-3, dup=True)


@needs_triton
def test_group_split_over_head_chunks():
    """hq/hkv = 32 > max_hb = 16 (interpreter tiles): two head chunks per group, both backwards."""
    cfg = triton_topk.INTERPRETER_CONFIG
    for det in (False, True):
        _check(1, 6, 32, 1, 16, 3, 2, 1, True, det, config=cfg)


def test_prepare_drops_window_sinks_future_padding_and_duplicates():
    s = 7
    full = torch.full((1, s, 1, 5), -1, dtype=torch.int32)
    full[0, 4, 0] = torch.tensor([5, 5, -1, 0, 3])   # t=4: 5 future, 0 sink, 3 in window(2)
    full[0, 6, 0] = torch.tensor([1, 6, 2, 2, 0])    # t=6: 6 in window, 0 sink -> {2, 1}
    got, row_len = triton_topk.prepare_topk_indices(full, s, window_size=2, num_sink_tokens=1)
    assert got[0, 4, 0].tolist()[:row_len[0, 4, 0]] == []
    assert got[0, 6, 0].tolist()[:row_len[0, 6, 0]] == [2, -1, 1]  # sorted desc, duplicate -> -1
    assert row_len[0, 6, 0] == 3 and torch.all(got[0, 6, 0, 3:] == -1)
    # without a window the sink tokens are prepended (and still causal)
    got, row_len = triton_topk.prepare_topk_indices(full, s, window_size=None, num_sink_tokens=2)
    assert set(got[0, 6, 0, :row_len[0, 6, 0]].tolist()) - {-1} == {0, 1, 2, 6}
    assert set(got[0, 0, 0, :row_len[0, 0, 0]].tolist()) - {-1} == {0}
    with pytest.raises(ValueError, match=r"topk_indices=\(-1, 7\): .*; use values in \[-1, 6\]"):
        triton_topk.prepare_topk_indices(torch.full((1, s, 1, 2), 7, dtype=torch.int32).index_fill_(
            3, torch.tensor([0]), -1), s, None, 0, check_range=True)


@needs_triton
@pytest.mark.parametrize("window,sinks", [(None, 0), (None, 3), (4, 2), (1, 0)])
def test_prepare_kernel_matches_torch(window, sinks):
    """The one-program-per-row Triton list preparation (bitonic sort + neighbour dedup) against the
    torch form, on random lists with padding, future keys, duplicates and out-of-range values."""
    g = _gen(11)
    b, s, hkv, K = 2, 29, 2, 9
    idx = torch.randint(-3, s + 4, (b, s, hkv, K), generator=g, dtype=torch.int32)
    idx[..., 2] = idx[..., 5]  # duplicates
    want, want_len = triton_topk._prepare_torch(idx.clamp(-1, s), s, window, sinks)  # spec: dropped
    got, got_len = triton_topk.prepare_topk_indices(idx.to(DEVICE), s, window, sinks, use_kernel=True)
    assert torch.equal(got.cpu(), want) and torch.equal(got_len.cpu(), want_len)
    assert got.dtype == torch.int32 and got.shape[-1] == K + (sinks if window is None else 0)


def test_transpose_index_list():
    g = _gen(3)
    b, s, hkv, K = 2, 11, 2, 4
    idx, _ = triton_topk.prepare_topk_indices(
        torch.randint(-1, s, (b, s, hkv, K), generator=g, dtype=torch.int32), s, None, 0)
    tlist, start = triton_topk.transpose_index_list(idx, s)
    for bi in range(b):
        for gi in range(hkv):
            for j in range(s):
                c = (bi * hkv + gi) * s + j
                want = [t for t in range(s) if j in idx[bi, t, gi].tolist()]
                assert tlist[start[c]:start[c + 1]].tolist() == want


@needs_triton
def test_public_op_routes_topk_to_triton():
    q, k, v, idx, sink, _ = _inputs(1, 13, 2, 1, 16, 3, torch.float32, 5, True)
    out = sparse_attention(q, k, v, window_size=3, num_sink_tokens=1, sink_logits=sink, topk_indices=idx)
    want = sparse_attention_reference(q, k, v, window_size=3, num_sink_tokens=1, sink_logits=sink,
                                      topk_indices=idx)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert backends.records()[0]["observed"] == "triton"


# ------------------------------------------------------------------------------------------------
# GPU: bf16 at realistic shapes, determinism
# ------------------------------------------------------------------------------------------------

def _gpu_topk(s, hkv, K, seed=0):
    """Clustered + random picks, like a trained indexer's (not uniform over the prefix)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.arange(s, device="cuda").view(1, s, 1, 1)
    rnd = (torch.rand((1, s, hkv, K), generator=g, device="cuda") * (t + 1)).long()
    return rnd.clamp_max(s - 1).to(torch.int32)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("s,hq,hkv,d,K,window,sinks,with_sink", [
    (4096, 16, 1, 128, 512, 256, 4, True),
    (2048, 16, 1, 128, 1024, None, 0, False),
    (1999, 8, 2, 64, 256, 128, 4, True),
])
@pytest.mark.parametrize("det", [False, True])
def test_gpu_bf16_topk_matches_reference(s, hq, hkv, d, K, window, sinks, with_sink, det):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    sink = torch.randn(hq, device="cuda", requires_grad=True) if with_sink else None
    idx = _gpu_topk(s, hkv, K)
    dout = torch.randn(1, s, hq, d, device="cuda", dtype=torch.bfloat16)
    leaves = [q, k, v] + ([sink] if with_sink else [])
    out = triton_topk.sparse_topk_attention(q, k, v, idx, sink, window, sinks, deterministic=det)
    got = [out] + list(torch.autograd.grad(out, leaves, dout))
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = sparse_attention_reference(*ref_leaves[:3], window_size=window, num_sink_tokens=sinks,
                                     sink_logits=ref_leaves[3] if with_sink else None, topk_indices=idx)
    want = [ref] + list(torch.autograd.grad(ref, ref_leaves, dout.float()))
    for name, gt, w in zip(["out", "dq", "dk", "dv", "dsink"], got, want):
        err = (gt.float() - w).abs().max().item()
        scale = max(1.0, w.abs().max().item())
        assert err <= 3e-2 * scale, f"{name}: max abs err {err:.3g} (scale {scale:.3g})"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("b,s,hq,hkv,d,K,window,sinks,with_sink,det", CASES)
def test_gpu_compiled_small_cases(b, s, hq, hkv, d, K, window, sinks, with_sink, det, dtype, tol):
    _check(b, s, hq, hkv, d, K, window, sinks, with_sink, det, dtype=dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    torch.manual_seed(0)
    s, K = 8192, 1024
    q, k, v = (torch.randn(1, s, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (16, 1, 1))
    sink = torch.randn(16, device="cuda", requires_grad=True)
    idx = _gpu_topk(s, 1, K, seed=1)
    dout = torch.randn(1, s, 16, 128, device="cuda", dtype=torch.bfloat16)
    runs = []
    for det in (True, True, False):
        out = triton_topk.sparse_topk_attention(q, k, v, idx, sink, 512, 4, deterministic=det)
        runs.append(torch.autograd.grad(out, [q, k, v, sink], dout))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):  # atomic order differs only in rounding
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
