"""``sparse_attention_{4k,16k,32k,64k}``: causal sliding-window + token-sink MQA attention, fwd + bwd, bf16.

Shape: b=1, hq=16 query heads, hkv=1 kv head (MQA), d=128, window 4096 (counting the query itself),
4 token sinks, S = 4096 / 16384 / 32768 / 65536 (one benchmark per S so each table block has its own
anchor ratio).

ours   = ``megatron_ext.ops.sparse_attention.sparse_attention(..., backend="triton")`` (no learnable
         sink logit, so both sides compute the same function);
anchor = FlexAttention (``torch.compile(flex_attention)``, compiled once per process, compiled
         even under TORCH_COMPILE_DISABLE=1) with a ``create_block_mask`` block mask
         ``causal & (window | sink)`` and ``enable_gqa=True``;
ref    = dense causal SDPA (flash/cuDNN kernels), K/V repeated to 16 heads in the timed call.

FLOPs: 4 * d * hq * b * (attended pairs) forward (QK^T and PV), x 3.5 for fwd + bwd (the
FlashAttention convention: backward = 2.5 x forward). Each case counts its own attended pairs:
the window + sink pattern for ours/anchor, the full causal triangle for the dense ref.

``--cpu`` (``small=True``): tiny shapes; ours runs through backend="auto", which on the CPU falls
back to the torch reference (recorded in the backend records); the FlexAttention anchor is skipped
(it compiles Triton kernels for CUDA), so those tables have no ratio.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from bench.cases import Benchmark, Case
from bench.registry import register

_FLEX = None  # torch.compile(flex_attention), built once per process


@dataclasses.dataclass(frozen=True)
class Dims:
    s: int
    b: int = 1
    hq: int = 16
    hkv: int = 1
    d: int = 128
    window: int = 4096
    sinks: int = 4


def small_dims(s: int) -> Dims:
    return Dims(s=s, b=1, hq=4, hkv=1, d=32, window=32, sinks=2)


def attended_pairs(s: int, window: Optional[int], sinks: int) -> int:
    """Number of (query, key) pairs with ``j <= i and (i - j < window or j < sinks)``."""
    if window is None or window >= s:
        return s * (s + 1) // 2
    total = 0
    for i in range(s):
        in_window = min(i + 1, window)
        total += in_window + max(0, min(sinks, i + 1 - in_window))
    return total


def fwd_bwd_flops(d: Dims, pairs: int) -> float:
    return 3.5 * 4.0 * d.d * d.hq * d.b * pairs


def _inputs(d: Dims, device: str, heads_first: bool):
    import torch

    def make(h):
        shape = (d.b, h, d.s, d.d) if heads_first else (d.b, d.s, h, d.d)
        return torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = make(d.hq), make(d.hkv), make(d.hkv)
    grad = torch.randn_like(q, requires_grad=False)
    return q, k, v, grad


def _zero(*ts):
    for t in ts:
        t.grad = None


def _ours_setup(d: Dims, device: str):
    from megatron_ext.ops.sparse_attention import sparse_attention

    q, k, v, grad = _inputs(d, device, heads_first=False)
    backend = "triton" if device == "cuda" else "auto"

    def step():
        _zero(q, k, v)
        out = sparse_attention(q, k, v, window_size=d.window, num_sink_tokens=d.sinks, backend=backend)
        out.backward(grad)

    return step


def _flex_setup(d: Dims, device: str):
    global _FLEX
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention)
    window, sinks = d.window, d.sinks

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=d.s, KV_LEN=d.s, device=device)
    q, k, v, grad = _inputs(d, device, heads_first=True)

    def step():
        _zero(q, k, v)
        # scripts/gpu_check.sh runs under TORCH_COMPILE_DISABLE=1; eager flex_attention would
        # materialise [b, hq, s, s] scores (no anchor at all at 32k), so compile is forced here.
        with torch._dynamo.config.patch(disable=False):
            out = _FLEX(q, k, v, block_mask=block_mask, enable_gqa=True)
        out.backward(grad)

    return step


def _sdpa_setup(d: Dims, device: str):
    import torch.nn.functional as F

    q, k, v, grad = _inputs(d, device, heads_first=True)
    group = d.hq // d.hkv

    def expand(t):  # [b, hkv, s, d] -> [b, hq, s, d]; keeps SDPA on its flash/cuDNN kernels
        return t[:, :, None].expand(d.b, d.hkv, group, d.s, d.d).reshape(d.b, d.hq, d.s, d.d)

    def step():
        _zero(q, k, v)
        out = F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)
        out.backward(grad)

    return step


def _benchmark(name: str, s_full: int, s_small: int, small: bool, device: str) -> Benchmark:
    d = small_dims(s_small) if small else Dims(s=s_full)
    sparse = fwd_bwd_flops(d, attended_pairs(d.s, d.window, d.sinks))
    dense = fwd_bwd_flops(d, attended_pairs(d.s, None, 0))
    cpu = device == "cpu"
    cases = [Case(name="ours", label="ours: triton window+sink" + (" (cpu: torch reference)" if cpu else ""),
                  role="ours", setup=lambda: _ours_setup(d, device), flops=sparse)]
    if not cpu:
        cases.append(Case(name="flex", label="anchor: FlexAttention (torch.compile, block mask)",
                          role="anchor", setup=lambda: _flex_setup(d, device), flops=sparse))
    cases.append(Case(name="sdpa", label="ref: dense causal SDPA", role="ref",
                      setup=lambda: _sdpa_setup(d, device), flops=dense))
    note = "; FlexAttention skipped on CPU" if cpu else ""
    return Benchmark(
        name=name,
        description=("causal sliding-window + token-sink MQA attention fwd+bwd; FLOPs = 3.5 x 4*d*hq*b "
                     "x attended pairs (FA convention, bwd = 2.5 x fwd), per case's own mask" + note),
        shape=(f"q[b={d.b}, s={d.s}, hq={d.hq}, d={d.d}], k/v hkv={d.hkv} bf16; window {d.window}, "
               f"{d.sinks} sinks, causal, fwd+bwd"),
        cases=cases)


@register
def sparse_attention_4k(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_attention_4k", 4096, 64, small, device)


@register
def sparse_attention_16k(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_attention_16k", 16384, 96, small, device)


@register
def sparse_attention_32k(small: bool = False, device: str = "cuda") -> Benchmark:
    return _benchmark("sparse_attention_32k", 32768, 128, small, device)


@register
def sparse_attention_64k(small: bool = False, device: str = "cuda") -> Benchmark:
    """The linear-in-S row of the issue: dense causal SDPA is 4x the 32k cost here, ours 2x."""
    return _benchmark("sparse_attention_64k", 65536, 160, small, device)
