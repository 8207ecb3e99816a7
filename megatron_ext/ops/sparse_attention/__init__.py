"""Sparse MQA/GQA attention: sliding window + token sinks + learnable sink logit + learned top-k keys.

Public op :func:`sparse_attention`; semantics (the spec) in :mod:`.reference`; Triton kernels for
the causal window + sink pattern in :mod:`.triton_window`, glued by :mod:`.autograd`, and for the
gathered top-k keys (united with window/sinks through an lse merge) in :mod:`.triton_topk`; the
lightning indexer that picks the keys and its KL loss in :mod:`.indexer`. The backend
is picked by :func:`megatron_ext.backends.resolve` ("auto" prefers Triton, falls back to the torch
reference with the reason recorded).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from megatron_ext import backends
from megatron_ext.ops.sparse_attention.reference import (
    allowed_mask, check_args, sparse_attention_reference)

__all__ = ["sparse_attention", "sparse_attention_reference", "allowed_mask", "triton_unusable_reason"]

OP = "sparse_attention"
BACKENDS = ("auto", "triton", "torch")
_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def triton_unusable_reason(q: torch.Tensor, *, topk_indices=None, causal: bool = True) -> Optional[str]:
    """None if the Triton kernels can run this call, else why not (names the offending value)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if causal is not True:
        return f"causal={causal!r}: the Triton kernels are causal only"
    d = q.shape[-1]
    if d not in _TRITON_HEAD_DIMS:
        return f"head_dim={d!r}: no Triton tile for it (supported: {list(_TRITON_HEAD_DIMS)})"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype={q.dtype}: the Triton kernels take float16, bfloat16 or float32"
    if q.device.type == "cpu":
        if not backends.triton_interpret_env():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton CPU interpreter)"
        from megatron_ext.ops.sparse_attention import triton_window

        if not triton_window.interpreted():
            return ("CPU tensors: the kernels were built for the GPU because TRITON_INTERPRET=1 was "
                    "set only after triton_window was imported")
    elif q.device.type != "cuda":
        return f"device={q.device.type!r}: the Triton kernels run on CUDA (or the CPU interpreter)"
    return None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     window_size: Optional[int] = None, num_sink_tokens: int = 0,
                     sink_logits: Optional[torch.Tensor] = None,
                     topk_indices: Optional[torch.Tensor] = None, causal: bool = True,
                     softmax_scale: Optional[float] = None, backend: str = "auto",
                     check_topk_range: bool = True) -> torch.Tensor:
    """Sparse attention ``q [b, s, hq, d]``, ``k, v [b, s, hkv, d]`` -> ``[b, s, hq, d]``.

    Query ``i`` attends key ``j`` iff ``j <= i`` (if causal) and (``window_size`` is None, or
    ``i - j < window_size``, or ``j < num_sink_tokens``, or ``j`` is listed in
    ``topk_indices[b, i, g]``; with ``topk_indices`` given, ``window_size=None`` contributes no
    keys). ``window_size`` counts the query itself (1 = only itself). ``sink_logits [hq]`` is a
    learnable per-head logit in the softmax denominator with a zero value vector. Differentiable in
    q, k, v and sink_logits. ``backend``: "auto" | "triton" | "torch". See :mod:`.reference`.

    ``check_topk_range`` (default on) raises on ``topk_indices`` values outside ``[-1, s)`` on every
    backend; it costs one host sync, so callers whose indices come from their own top-k (the
    indexer) turn it off, and the Triton path then drops such values like padding.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: unknown backend for {OP}; use one of {list(BACKENDS)}")
    check_args(q, k, v, window_size=window_size, num_sink_tokens=num_sink_tokens,
               sink_logits=sink_logits, topk_indices=topk_indices, causal=causal,
               softmax_scale=softmax_scale)
    if topk_indices is not None and check_topk_range and topk_indices.numel():
        lo, hi = (int(x) for x in torch.aminmax(topk_indices))
        s = q.shape[1]
        if lo < -1 or hi >= s:
            raise ValueError(f"topk_indices={(lo, hi)!r}: (min, max) outside the key range; "
                             f"use values in [-1, {s - 1}]")
    chosen = backends.resolve(OP, backend, [
        ("triton", lambda: triton_unusable_reason(q, topk_indices=topk_indices, causal=causal)),
        ("torch", lambda: None),
    ])
    if chosen == "triton" and topk_indices is not None:
        from megatron_ext.ops.sparse_attention.triton_topk import sparse_topk_attention

        # deterministic backward (no atomics) when torch.use_deterministic_algorithms(True) is on
        return sparse_topk_attention(q, k, v, topk_indices, sink_logits, window_size, num_sink_tokens,
                                     softmax_scale)
    if chosen == "triton":
        from megatron_ext.ops.sparse_attention.autograd import sparse_window_attention

        return sparse_window_attention(q, k, v, sink_logits, window_size, num_sink_tokens, softmax_scale)
    return sparse_attention_reference(q, k, v, window_size=window_size, num_sink_tokens=num_sink_tokens,
                                      sink_logits=sink_logits, topk_indices=topk_indices, causal=causal,
                                      softmax_scale=softmax_scale)
