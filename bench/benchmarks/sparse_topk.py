"""``sparse_topk_{512,1024,2048,4096}``: learned top-k key attention (DSA-style) vs k, and the lightning indexer's share.

Shape: b=1, S=32768, hq=16 query heads, hkv=1 kv head (MQA), d=128, bf16, causal, fwd + bwd;
k in {512, 1024, 2048, 4096} keys per query (one benchmark per k, so each table block has its own
anchor ratio), top-k only (no window, no sinks). Cases:

ours     ``topk``:      ``sparse_attention(..., topk_indices=idx, backend="triton")`` fwd + bwd (default
                        fast backward; the index-list preparation -- mask, sort, dedup -- is inside);
                        ``idx`` comes from the lightning indexer on random inputs (so roughly uniform
                        over each query's prefix: the gather pattern of an untrained indexer).
ours     ``indexer``:   ``indexer_topk`` (Triton scores + blockwise torch.topk), forward only
                        (selection has no backward); indexer of 8 heads x 64 dims. Its share of a
                        layer's sparse attention = indexer / (indexer + topk).
anchor   ``window``:    our window kernel at W = k (same number of attended pairs, contiguous K/V tiles
                        instead of gathered rows: the cost of the gather).
ref      ``sdpa``:      dense causal SDPA (flash/cuDNN), K/V expanded to 16 heads.

FLOPs: attention 3.5 x 4 * d * hq * (attended pairs) (FA convention, bwd = 2.5 x fwd) with pairs =
sum_t min(k, t + 1); indexer 2 * d_I * H_I * S(S+1)/2 (the ReLU-weighted scores). ``--cpu``: tiny
shapes on the torch reference (no timing meaning).
"""

from __future__ import annotations

import dataclasses

from bench.benchmarks.sparse_attention import Dims, _sdpa_setup, attended_pairs, fwd_bwd_flops
from bench.cases import Benchmark, Case
from bench.registry import register

@dataclasses.dataclass(frozen=True)
class IndexerDims:
    heads: int = 8
    dim: int = 64


def topk_pairs(s: int, k: int) -> int:
    """Attended (query, key) pairs with ``min(k, t + 1)`` keys per query ``t``."""
    full = min(k, s)
    return full * (full + 1) // 2 + (s - full) * k


def _bf16_inputs(d: Dims, device: str):
    import torch

    q, k, v = (torch.randn(d.b, d.s, h, d.d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (d.hq, d.hkv, d.hkv))
    return q, k, v, torch.randn_like(q)


def _indexer_inputs(d: Dims, ix: IndexerDims, device: str):
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q_idx = torch.randn(d.b, d.s, ix.heads, ix.dim, device=device, dtype=dtype)
    k_idx = torch.randn(d.b, d.s, ix.dim, device=device, dtype=dtype)
    w = torch.rand(d.b, d.s, ix.heads, device=device, dtype=dtype)
    return q_idx, k_idx, w


def _topk_setup(d: Dims, ix: IndexerDims, k: int, device: str):
    from megatron_ext.ops.sparse_attention import sparse_attention
    from megatron_ext.ops.sparse_attention.indexer import indexer_topk

    idx = indexer_topk(*_indexer_inputs(d, ix, device), k).expand(-1, -1, d.hkv, -1)
    q, kk, v, grad = _bf16_inputs(d, device)
    backend = "triton" if device == "cuda" else "auto"

    def step():
        for t in (q, kk, v):
            t.grad = None
        out = sparse_attention(q, kk, v, topk_indices=idx, backend=backend)
        out.backward(grad)

    return step


def _indexer_setup(d: Dims, ix: IndexerDims, k: int, device: str):
    from megatron_ext.ops.sparse_attention.indexer import indexer_topk

    inputs = _indexer_inputs(d, ix, device)
    return lambda: indexer_topk(*inputs, k)


def _window_setup(d: Dims, k: int, device: str):
    from megatron_ext.ops.sparse_attention import sparse_attention

    q, kk, v, grad = _bf16_inputs(d, device)
    backend = "triton" if device == "cuda" else "auto"

    def step():
        for t in (q, kk, v):
            t.grad = None
        out = sparse_attention(q, kk, v, window_size=k, backend=backend)
        out.backward(grad)

    return step


def _benchmark(name: str, k_full: int, k_small: int, small: bool, device: str) -> Benchmark:
    d = Dims(s=128, b=1, hq=4, hkv=1, d=32, window=0, sinks=0) if small else Dims(s=32768, window=0, sinks=0)
    ix = IndexerDims(heads=2, dim=16) if small else IndexerDims()
    k = k_small if small else k_full
    note = " (cpu: torch reference)" if device == "cpu" else ""
    idx_flops = 2.0 * ix.dim * ix.heads * d.b * d.s * (d.s + 1) / 2
    cases = [
        Case(name="topk", label=f"ours: triton top-k attention, k={k}{note}", role="ours",
             setup=lambda: _topk_setup(d, ix, k, device), flops=fwd_bwd_flops(d, topk_pairs(d.s, k))),
        Case(name="indexer", label=f"ours: indexer scores + top-k, k={k} (fwd){note}", role="ours",
             setup=lambda: _indexer_setup(d, ix, k, device), flops=idx_flops),
        Case(name="window", label=f"anchor: our window kernel, W={k}{note}", role="anchor",
             setup=lambda: _window_setup(d, k, device), flops=fwd_bwd_flops(d, attended_pairs(d.s, k, 0))),
        Case(name="sdpa", label="ref: dense causal SDPA", role="ref", setup=lambda: _sdpa_setup(d, device),
             flops=fwd_bwd_flops(d, attended_pairs(d.s, None, 0))),
    ]
    return Benchmark(
        name=name,
        description=("top-k key attention (DSA) fwd+bwd, the lightning indexer (scores + top-k, fwd) and "
                     "the window kernel at W=k; attention FLOPs = 3.5 x 4*d*hq*b x attended pairs; "
                     "indexer share = indexer / (indexer + topk)"),
        shape=(f"q[b={d.b}, s={d.s}, hq={d.hq}, d={d.d}], k/v hkv={d.hkv} bf16; k={k}; "
               f"indexer {ix.heads} heads x {ix.dim}; causal"),
        cases=cases)


@register
def sparse_topk_512(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_topk_512", 512, 8, small, device)


@register
def sparse_topk_1024(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_topk_1024", 1024, 16, small, device)


@register
def sparse_topk_2048(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_topk_2048", 2048, 32, small, device)


@register
def sparse_topk_4096(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_topk_4096", 4096, 64, small, device)
