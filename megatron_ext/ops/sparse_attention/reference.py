"""Sparse (sliding-window + sink + top-k) MQA/GQA attention: the torch reference, i.e. the spec.

Layout: ``q [b, s, hq, d]``, ``k, v [b, s, hkv, d]`` with ``hq % hkv == 0``; query head ``h`` reads
kv head ``h // (hq // hkv)`` (Megatron's ``num_query_groups`` grouping). Output ``[b, s, hq, d]``.

Which keys query ``i`` may attend (``j`` a key position)::

    causal_ok(i, j) = j <= i                        (only if causal)
    window(i, j)    = window_size is not None and i - j < window_size
    sink(i, j)      = j < num_sink_tokens           (StreamingLLM token sinks)
    no top-k:  allowed = causal_ok and (window_size is None or window or sink)
    top-k:     allowed = causal_ok and (j in topk_indices[b, i, g, :] or window or sink)

``window_size`` counts keys *including* the query's own position: ``window_size=1`` sees only itself,
``window_size=W`` sees ``[i - W + 1, i]``. This is FlashAttention's ``window_size=(W - 1, 0)`` and
cuDNN's ``(i - W, i]`` (see the anchors note on window off-by-one bugs). With ``causal=False`` the
window bounds only the past (``i - j < W`` holds for every future key).

``topk_indices [b, s, hkv, k]`` (int32/int64): entries ``-1`` are padding, entries ``> i`` are
ignored when causal, duplicates count once. Values must lie in ``[-1, s)``.

Learnable sink logit (gpt-oss / DeepSeek-V4 / Megatron ``softmax_type='learnable'``): ``sink_logits
[hq]`` joins every row's softmax denominator with a zero value vector::

    p_ij = exp(s_ij) / (exp(sink_h) + sum_{k allowed} exp(s_ik)),   s_ij = scale * q_i . k_j
    lse_i = log(exp(sink_h) + sum_{k allowed} exp(s_ik))

so ``out_sink = out_vanilla * sigmoid(lse_vanilla - sink)`` and
``d loss / d sink_h = -sum_t exp(sink_h - lse_t) * (dO_t . O_t)``.

A row with no allowed key outputs exactly 0 and has ``lse = -inf`` (``lse = sink`` with a sink
logit); its gradients are 0. That happens only with ``topk_indices``, ``window_size=None``,
``num_sink_tokens=0`` and a row whose entries are all padding (or future keys when causal): any
window contains the query itself, and any token sink contains key 0.

All math runs in fp32 (fp64 if the inputs are fp64); the output has the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(field: str, value, why: str, allowed: str) -> None:
    raise ValueError(f"{field}={value!r}: {why}; use {allowed}")


def check_args(q, k, v, *, window_size=None, num_sink_tokens=0, sink_logits=None,
               topk_indices=None, causal=True, softmax_scale=None) -> None:
    """Validate everything that does not need to read tensor values (no device sync)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(name, type(t).__name__, "not a tensor", "a torch.Tensor [b, s, heads, d]")
        if t.dim() != 4:
            _fail(f"{name}.shape", tuple(t.shape), "must be 4-D", "[b, s, heads, head_dim]")
        if t.dtype not in DTYPES:
            _fail(f"{name}.dtype", t.dtype, "unsupported", "float16, bfloat16, float32 or float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail("k.dtype/v.dtype", (k.dtype, v.dtype), f"must equal q.dtype={q.dtype}", "one dtype for q, k, v")
    if k.device != q.device or v.device != q.device:
        _fail("k.device/v.device", (str(k.device), str(v.device)), f"must equal q.device={q.device}",
              "tensors on one device")
    if tuple(k.shape) != tuple(v.shape):
        _fail("v.shape", tuple(v.shape), f"differs from k.shape={tuple(k.shape)}", "k and v of one shape")
    b, s, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        _fail("k.shape", tuple(k.shape), f"does not match q.shape={tuple(q.shape)} in b, s or d",
              f"[{b}, {s}, hkv, {d}]")
    hkv = k.shape[2]
    if hkv < 1 or hq % hkv != 0:
        _fail("hq/hkv", (hq, hkv), "query heads must be a multiple of kv heads",
              "hkv dividing hq (MQA: hkv=1)")
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, int):
            _fail("window_size", window_size, "must be an int or None", "an int >= 1 or None (dense)")
        if window_size < 1:
            _fail("window_size", window_size, "the window counts the query itself, so it is >= 1",
                  "an int >= 1 (1 = only itself) or None (dense)")
    if isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
        _fail("num_sink_tokens", num_sink_tokens, "must be a non-negative int", "an int >= 0")
    if not isinstance(causal, bool):
        _fail("causal", causal, "must be a bool", "True or False")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
                or not math.isfinite(softmax_scale) or softmax_scale <= 0:
            _fail("softmax_scale", softmax_scale, "must be a positive finite float",
                  "a float > 0 or None (1/sqrt(head_dim))")
    if sink_logits is not None:
        if not isinstance(sink_logits, torch.Tensor) or not sink_logits.is_floating_point():
            got = sink_logits.dtype if isinstance(sink_logits, torch.Tensor) else type(sink_logits).__name__
            _fail("sink_logits", got, "must be a floating-point tensor", f"a float tensor of shape [{hq}]")
        if tuple(sink_logits.shape) != (hq,):
            _fail("sink_logits.shape", tuple(sink_logits.shape), "one logit per query head",
                  f"[{hq}] (hq)")
        if sink_logits.device != q.device:
            _fail("sink_logits.device", str(sink_logits.device), f"must equal q.device={q.device}",
                  "tensors on one device")
    if topk_indices is not None:
        if not isinstance(topk_indices, torch.Tensor) or topk_indices.dtype not in (torch.int32, torch.int64):
            _fail("topk_indices.dtype", getattr(topk_indices, "dtype", type(topk_indices).__name__),
                  "must be an integer index tensor", "torch.int32 (or int64)")
        if (topk_indices.dim() != 4 or tuple(topk_indices.shape[:3]) != (b, s, hkv)
                or topk_indices.shape[3] < 1):
            _fail("topk_indices.shape", tuple(topk_indices.shape), "one index list per (b, query, kv head)",
                  f"[{b}, {s}, {hkv}, k] with k >= 1")
        if topk_indices.device != q.device:
            _fail("topk_indices.device", str(topk_indices.device), f"must equal q.device={q.device}",
                  "tensors on one device")


def allowed_mask(s: int, *, window_size: Optional[int] = None, num_sink_tokens: int = 0,
                 topk_indices: Optional[torch.Tensor] = None, causal: bool = True,
                 device=None) -> torch.Tensor:
    """Boolean ``[s, s]`` (no top-k) or ``[b, hkv, s, s]`` (top-k) mask, True = query i attends key j."""
    i = torch.arange(s, device=device).view(s, 1)
    j = torch.arange(s, device=device).view(1, s)
    extra = j < num_sink_tokens
    if window_size is not None:
        extra = extra | (i - j < window_size)
    if topk_indices is None:
        pattern = extra if window_size is not None else torch.ones(s, s, dtype=torch.bool, device=device)
    else:
        idx = topk_indices.long()
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= s:
            _fail("topk_indices", (lo, hi), "(min, max) outside the key range", f"values in [-1, {s - 1}]")
        b, _, hkv, _ = idx.shape
        hit = torch.zeros(b, s, hkv, s + 1, dtype=torch.bool, device=device)
        hit.scatter_(3, torch.where(idx < 0, s, idx), True)  # -1 -> dummy column s, dropped below
        pattern = hit[..., :s].permute(0, 2, 1, 3) | extra  # [b, hkv, s, s]
    if causal:
        pattern = pattern & (j <= i)
    return pattern


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               window_size: Optional[int] = None, num_sink_tokens: int = 0,
                               sink_logits: Optional[torch.Tensor] = None,
                               topk_indices: Optional[torch.Tensor] = None, causal: bool = True,
                               softmax_scale: Optional[float] = None, return_lse: bool = False
                               ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Materialises the ``[b, hq, s, s]`` scores; differentiable in q, k, v and sink_logits.

    Returns ``out [b, s, hq, d]`` in q's dtype, and with ``return_lse`` also ``lse [b, hq, s]`` fp32
    (natural log, sink included; ``-inf`` for a row with nothing to attend and no sink).
    """
    check_args(q, k, v, window_size=window_size, num_sink_tokens=num_sink_tokens,
               sink_logits=sink_logits, topk_indices=topk_indices, causal=causal,
               softmax_scale=softmax_scale)
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    qf = q.to(cdt).transpose(1, 2)                                        # [b, hq, s, d]
    kf = k.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)        # [b, hq, s, d]
    vf = v.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale               # [b, hq, s, s]

    mask = allowed_mask(s, window_size=window_size, num_sink_tokens=num_sink_tokens,
                        topk_indices=topk_indices, causal=causal, device=q.device)
    if mask.dim() == 4:
        mask = mask.repeat_interleave(group, dim=1)                       # [b, hq, s, s]
    scores = scores.masked_fill(~mask, float("-inf"))

    row_max = scores.amax(dim=-1, keepdim=True)                           # [b, hq, s, 1]
    if sink_logits is not None:
        sink = sink_logits.to(cdt).view(1, hq, 1, 1)
        row_max = torch.maximum(row_max, sink)
    # A row with nothing allowed (and no sink) has max -inf: shift by 0 so exp gives 0, not nan.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)                                       # 0 where masked
    denom = e.sum(dim=-1, keepdim=True)
    if sink_logits is not None:
        denom = denom + torch.exp(sink - row_max)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    p = e / safe
    out = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)                 # [b, s, hq, d]
    if not return_lse:
        return out
    lse = (row_max + torch.log(denom)).squeeze(-1).to(torch.float32)     # log(0) = -inf
    return out, lse
