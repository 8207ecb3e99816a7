"""``sparse_decode`` (batch 1) and ``sparse_decode_b16`` (batch 16): one decode step of one MQA
attention layer at context 128k, streaming window + sink cache vs a dense KV cache.

Shape: hq=16 query heads, hkv=1 kv head (MQA), d=128, bf16, context 131072 tokens; our layer keeps
window 4096 (counting the query itself) + 4 token sinks (StreamingLLM, arXiv 2309.17453). A timed
call is one token per sequence: write the new key/value into the cache, attend, return
``[b, hq, d]``. Tokens/s of the attention alone = ``b * 1000 / ms``.

ours     ``stream``: :class:`megatron_ext.ops.sparse_attention.decode.StreamingKVCache` ``append`` +
                     :func:`~megatron_ext.ops.sparse_attention.decode.decode_step` (backend "auto":
                     one SDPA call without sink logits) over the 4 + 4096 cached keys; the cache is filled to 128k first, so
                     the ring has wrapped many times. KV bytes per layer: ``2 * (4096 + 4) * d * 2``
                     per sequence (2.0 MiB), constant in the context.
anchor   ``dense``:  a dense MQA cache ``[b, 1, 131072, d]`` (k and v), the new token written in place
                     (the same slot every call, so the context stays 128k) and
                     ``F.scaled_dot_product_attention`` with the 16 query heads as 16 query rows of
                     the single KV head (exact for MQA; SDPA's flash / efficient kernels). KV bytes
                     per layer: ``2 * 131072 * d * 2`` per sequence (64 MiB).

Work per call: FLOPs ``4 * d * hq * b * keys`` (QK^T and PV), bytes = the KV bytes read
(``2 * keys * hkv * d * 2 * b``); both are memory-bound, so GB/s vs the copy ceiling is the figure
to read. ref cases: the same step forced through the Triton split-KV kernel, and with a learnable sink logit
per head (torch einsum + softmax vs the kernel, which folds the sink into its LSE combine).

``--cpu``: context 512, window 32, 2 sinks, hq=4, d=32 (no timing meaning).
:func:`kv_bytes_per_layer` gives the KV bytes table of docs/sparse_attention.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from bench.cases import Benchmark, Case
from bench.registry import register


@dataclasses.dataclass(frozen=True)
class DecodeDims:
    b: int = 1
    context: int = 131072
    hq: int = 16
    hkv: int = 1
    d: int = 128
    window: int = 4096
    sinks: int = 4


def small_dims(b: int) -> DecodeDims:
    return DecodeDims(b=b, context=512, hq=4, hkv=1, d=32, window=32, sinks=2)


def kv_bytes_per_layer(context: int, window: Optional[int], sinks: int = 0, hkv: int = 1, d: int = 128,
                       batch: int = 1, elem_bytes: int = 2) -> int:
    """Key + value bytes one layer holds at ``context`` tokens: ``sinks + window`` slots for the
    streaming cache (``window=None``: dense, every token)."""
    slots = context if window is None else sinks + window
    return 2 * slots * hkv * d * elem_bytes * batch


def _stream_setup(dm: DecodeDims, device: str, backend: str = "auto", sink: bool = False):
    import torch

    from megatron_ext.ops.sparse_attention.decode import StreamingKVCache, decode_step

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cache = StreamingKVCache(dm.b, dm.hkv, dm.d, dm.window, dm.sinks, dtype=dtype, device=device)
    chunk = 8192
    for p in range(0, dm.context - 1, chunk):  # fill to context - 1 in chunks: bounded temporaries
        t = min(chunk, dm.context - 1 - p)
        cache.append(torch.randn(dm.b, t, dm.hkv, dm.d, device=device, dtype=dtype),
                     torch.randn(dm.b, t, dm.hkv, dm.d, device=device, dtype=dtype), p)
    q = torch.randn(dm.b, dm.hq, dm.d, device=device, dtype=dtype)
    k1 = torch.randn(dm.b, 1, dm.hkv, dm.d, device=device, dtype=dtype)
    v1 = torch.randn_like(k1)

    sink_logits = torch.randn(dm.hq, device=device) if sink else None

    def step():
        cache.append(k1, v1, cache.length)
        return decode_step(q, cache, sink_logits=sink_logits, backend=backend)

    return step


def _dense_setup(dm: DecodeDims, device: str):
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k_cache = torch.randn(dm.b, dm.hkv, dm.context, dm.d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(dm.b, dm.hq, dm.d, device=device, dtype=dtype)
    k1 = torch.randn(dm.b, dm.hkv, 1, dm.d, device=device, dtype=dtype)
    v1 = torch.randn_like(k1)
    last = dm.context - 1
    group = dm.hq // dm.hkv

    def step():
        k_cache[:, :, last:last + 1] = k1
        v_cache[:, :, last:last + 1] = v1
        # MQA/GQA: the query heads of a group become query rows against their one KV head
        out = F.scaled_dot_product_attention(q.view(dm.b, dm.hkv, group, dm.d), k_cache, v_cache)
        return out.reshape(dm.b, dm.hq, dm.d)

    return step


def _benchmark(name: str, batch: int, small: bool, device: str) -> Benchmark:
    dm = small_dims(batch) if small else DecodeDims(b=batch)
    stream_keys = dm.sinks + dm.window
    elem = 2 if device == "cuda" else 4
    ours_kv = kv_bytes_per_layer(dm.context, dm.window, dm.sinks, dm.hkv, dm.d, dm.b, elem)
    dense_kv = kv_bytes_per_layer(dm.context, None, 0, dm.hkv, dm.d, dm.b, elem)
    note = " (cpu: fp32)" if device == "cpu" else ""
    cases = [
        Case(name="stream", label=f"ours: streaming cache decode_step, KV/layer {ours_kv / 2**20:.1f} MiB{note}", role="ours",
             setup=lambda: _stream_setup(dm, device), flops=4.0 * dm.d * dm.hq * dm.b * stream_keys,
             bytes=float(ours_kv), bound="memory"),
        Case(name="stream_triton", label="ref: streaming decode_step, Triton split-KV kernel", role="ref",
             setup=lambda: _stream_setup(dm, device, "triton" if device == "cuda" else "torch"),
             flops=4.0 * dm.d * dm.hq * dm.b * stream_keys, bytes=float(ours_kv), bound="memory"),
        Case(name="stream_sink_torch", label="ref: streaming + learnable sink logits, torch", role="ref",
             setup=lambda: _stream_setup(dm, device, "torch", sink=True),
             flops=4.0 * dm.d * dm.hq * dm.b * stream_keys, bytes=float(ours_kv), bound="memory"),
        Case(name="stream_sink_triton", label="ref: streaming + learnable sink logits, Triton", role="ref",
             setup=lambda: _stream_setup(dm, device, "triton" if device == "cuda" else "torch", sink=True),
             flops=4.0 * dm.d * dm.hq * dm.b * stream_keys, bytes=float(ours_kv), bound="memory"),
        Case(name="dense", label=f"anchor: dense MQA cache + SDPA, KV/layer {dense_kv / 2**20:.1f} MiB{note}",
             role="anchor", setup=lambda: _dense_setup(dm, device),
             flops=4.0 * dm.d * dm.hq * dm.b * dm.context, bytes=float(dense_kv), bound="memory"),
    ]
    return Benchmark(
        name=name,
        description=(f"one decode token per sequence of one attention layer at context {dm.context}: "
                     f"streaming window {dm.window} + {dm.sinks} sinks vs dense cache; tokens/s = "
                     f"{dm.b} * 1000 / ms; bytes = KV read per call (KV bytes per layer in the labels)"),
        shape=(f"q[b={dm.b}, hq={dm.hq}, d={dm.d}], kv hkv={dm.hkv}, context {dm.context}, "
               f"{'bf16' if device == 'cuda' else 'fp32'}"),
        cases=cases)


@register
def sparse_decode(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_decode", 1, small, device)


@register
def sparse_decode_b16(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_decode_b16", 16, small, device)
