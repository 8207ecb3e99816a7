"""Streaming decode for window + sink attention: a KV cache of O(num_sink_tokens + window_size).

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv
2309.17453) keeps the first few tokens (the sinks) and a rolling window of the most recent ones.
This cache holds exactly the keys the training-time pattern lets the newest query see::

    query i attends key j  iff  j <= i  and  (i - j < window_size  or  j < num_sink_tokens)

so decoding token by token gives the same output as the full-sequence forward at every position
(the paper re-indexes positions inside the cache; here keys are stored *after* RoPE at their absolute
positions, which is what the model saw in training, so nothing is re-rotated).

Layout: ``k, v [b, t, hkv, d]`` (the op's layout), query ``[b, hq, d]``. Storage: a sink buffer
``[b, num_sink_tokens, hkv, d]`` filled once, and a ring buffer ``[b, window_size, hkv, d]`` (two views of
one buffer, so attention reads them as one key set) where
position ``p`` lives in slot ``p % window_size``. A position below ``num_sink_tokens`` is written to
both; the ring copy is masked at attention time so no key counts twice. ``window_size=None`` (a dense
layer) keeps every key: that cache grows with the sequence.

Top-k layers (pattern letter ``T``, DSA's learned key selection) cannot stream: the indexer may
pick any past key, so :class:`IndexedKVCache` keeps every key/value plus the indexer's key of every
position (O(S) memory by nature), and :func:`decode_step_topk` attends over sinks + window + the
selected keys only (O(window + sinks + k) work per token).

No Megatron; torch, with the attention of :func:`decode_step` in the Triton split-KV kernel of
:mod:`.triton_decode` when the backend resolves to it. The module-level step (projections, RoPE, output projection) is
``megatron_ext.modules.sparse_mqa.SparseMQAttention.decode_step``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_ext import backends


def _fail(field: str, value, why: str, allowed: str) -> None:
    raise ValueError(f"{field}={value!r}: {why}; use {allowed}")


class StreamingKVCache:
    """Keys/values of one attention layer for streaming decode (all sequences of the batch advance
    together). ``length`` is the number of positions appended so far, i.e. the next position."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, window_size: Optional[int],
                 num_sink_tokens: int = 0, dtype: torch.dtype = torch.float32, device=None):
        for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "must be a positive int", "an int >= 1")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                        or window_size < 1):
            _fail("window_size", window_size, "the window counts the query itself, so it is >= 1",
                  "an int >= 1 or None (dense: the cache grows)")
        if isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
            _fail("num_sink_tokens", num_sink_tokens, "must be a non-negative int", "an int >= 0")
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.window_size, self.num_sink_tokens = window_size, num_sink_tokens
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        slots = window_size if window_size is not None else 0
        # Sinks and ring are two views of one buffer, so the attention reads one key set without
        # concatenating (a copy as large as the cache) every step.
        shape = (batch, num_sink_tokens + slots, num_kv_heads, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=self.device)
        self._v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.sink_k, self.ring_k = self._k[:, :num_sink_tokens], self._k[:, num_sink_tokens:]
        self.sink_v, self.ring_v = self._v[:, :num_sink_tokens], self._v[:, num_sink_tokens:]
        # Absolute position held by each ring slot (-1: empty); drives the masks, not the math.
        self.ring_pos = torch.full((slots,), -1, dtype=torch.long, device=self.device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """Store ``k, v [b, t, hkv, d]`` (RoPE already applied) for positions ``position .. +t-1``.

        Positions arrive in order: ``position`` must equal ``length``."""
        want = (self.batch, self.num_kv_heads, self.head_dim)
        if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != want or tuple(v.shape) != tuple(k.shape):
            _fail("k.shape/v.shape", (tuple(k.shape), tuple(v.shape)), "does not match the cache",
                  f"[{self.batch}, t, {self.num_kv_heads}, {self.head_dim}] for both")
        if position != self.length:
            _fail("position", position, f"the cache holds positions [0, {self.length})",
                  f"position={self.length} (tokens are appended in order)")
        t = k.shape[1]
        k, v = k.to(self.dtype), v.to(self.dtype)
        n_sink_new = max(0, min(self.num_sink_tokens, position + t) - position)
        if n_sink_new:
            self.sink_k[:, position:position + n_sink_new] = k[:, :n_sink_new]
            self.sink_v[:, position:position + n_sink_new] = v[:, :n_sink_new]
        if self.window_size is None:
            self.ring_k = torch.cat([self.ring_k, k], dim=1)
            self.ring_v = torch.cat([self.ring_v, v], dim=1)
            pos = torch.arange(position, position + t, device=self.device)
            self.ring_pos = torch.cat([self.ring_pos, pos])
        else:
            keep = min(t, self.window_size)  # older ones of a long chunk would be overwritten anyway
            pos = torch.arange(position + t - keep, position + t, device=self.device)
            slots = pos % self.window_size
            self.ring_k[:, slots] = k[:, t - keep:]
            self.ring_v[:, slots] = v[:, t - keep:]
            self.ring_pos[slots] = pos
        self.length += t

    def keys_values(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys, values [b, n, hkv, d]`` and ``valid [n]`` bool for the newest query
        (position ``length - 1``): the filled sinks, then the ring slots not already sinks."""
        n_sink = self.sink_k.shape[1]
        sink_valid = torch.arange(n_sink, device=self.device) < min(self.num_sink_tokens, self.length)
        ring_valid = self.ring_pos >= self.num_sink_tokens  # also False for empty slots (-1)
        if self.window_size is None:  # the ring grew by concatenation: no shared buffer
            keys = torch.cat([self.sink_k, self.ring_k], dim=1)
            values = torch.cat([self.sink_v, self.ring_v], dim=1)
        else:
            keys, values = self._k, self._v
        return keys, values, torch.cat([sink_valid, ring_valid])

    def key_positions(self) -> torch.Tensor:
        """Int ``[n]``: the absolute position of each key of :meth:`keys_values` (-1: not attended)."""
        n_sink = self.sink_k.shape[1]
        sink = torch.arange(n_sink, device=self.device)
        sink = torch.where(sink < min(self.num_sink_tokens, self.length), sink, -1)
        ring = torch.where(self.ring_pos >= self.num_sink_tokens, self.ring_pos, -1)
        return torch.cat([sink, ring])

    def nbytes(self) -> int:
        """Bytes of key/value storage (constant in the sequence length unless window_size is None)."""
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.ring_k, self.ring_v))


def _check_query(q: torch.Tensor, cache, sink_logits: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    """The newest query ``q [b, hq, d]`` against a non-empty cache -> ``(b, hq, d, hkv)``."""
    if q.dim() != 3:
        _fail("q.shape", tuple(q.shape), "one query token per sequence", "[b, hq, head_dim]")
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    if b != cache.batch or d != cache.head_dim or hq % hkv:
        _fail("q.shape", tuple(q.shape), f"does not fit the cache (b={cache.batch}, hkv={hkv}, d={cache.head_dim})",
              f"[{cache.batch}, a multiple of {hkv}, {cache.head_dim}]")
    if cache.length == 0:
        _fail("cache.length", 0, "the cache is empty", "append the query's own key and value first")
    if sink_logits is not None and tuple(sink_logits.shape) != (hq,):
        _fail("sink_logits.shape", tuple(sink_logits.shape), "one logit per query head", f"[{hq}]")
    return b, hq, d, hkv


def triton_decode_unusable_reason(q: torch.Tensor, *, auto: bool = False, head_dims=()) -> Optional[str]:
    """None if the Triton split-KV decode kernel (:mod:`.triton_decode`) can run on ``q``, else why
    not; ``auto=True`` is the probe of backend="auto" (CUDA only, never the CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from megatron_ext.ops.sparse_attention.triton_decode import unusable_reason

    return unusable_reason(q, auto=auto, head_dims=head_dims)


DECODE_BACKENDS = ("auto", "triton", "torch")


def decode_step(q: torch.Tensor, cache: StreamingKVCache, *, softmax_scale: Optional[float] = None,
                sink_logits: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Attention of the newest query ``q [b, hq, d]`` (RoPE applied, position ``cache.length - 1``,
    its own key already appended) over the cache -> ``[b, hq, d]`` in q's dtype.

    ``sink_logits [hq]``: the learnable per-head sink logit, a softmax term with a zero value vector.
    Query head ``h`` reads KV head ``h // (hq // hkv)``. ``backend``: "triton" = the split-KV
    kernel (:func:`.triton_decode.decode_attention`, the ring slots as keys with their positions),
    "torch" = the reference below, "auto" = Triton on CUDA when ``sink_logits`` is given, else torch
    (via ``backends.resolve``, the reason recorded).
    Torch math in fp32 (fp64 for fp64 inputs); without ``sink_logits`` and below fp64 it is one
    ``scaled_dot_product_attention`` call.
    """
    if backend not in DECODE_BACKENDS:
        _fail("backend", backend, "unknown decode backend", f"one of {list(DECODE_BACKENDS)}")
    b, hq, d, hkv = _check_query(q, cache, sink_logits)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    def triton_why_not():
        if backend == "auto" and sink_logits is None and q.dtype != torch.float64:
            # Measured (docs/benchmarks.md, sparse_decode_b16): a 4k-key ring is read in
            # microseconds, the step is launch-bound, and the one fused SDPA call beats the kernel's
            # two launches plus the position bookkeeping. The kernel pays off with sink logits.
            return "no sink_logits: the torch path is one fused SDPA call (launch-bound step)"
        return triton_decode_unusable_reason(q, auto=backend == "auto", head_dims=(d,))

    chosen = backends.resolve("sparse_attention.decode", backend, [
        ("triton", triton_why_not), ("torch", lambda: None)])
    if chosen == "triton":
        from megatron_ext.ops.sparse_attention.triton_decode import decode_attention

        keys, values, _ = cache.keys_values()
        return decode_attention(q, keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
                                key_positions=cache.key_positions(), query_position=cache.length - 1,
                                sink_logits=sink_logits, softmax_scale=scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values, valid = cache.keys_values()
    if sink_logits is None and q.dtype != torch.float64:
        # One fused kernel (fp32 softmax inside) instead of ~8 small ones: at batch 1 a decode step
        # is launch-bound. MQA/GQA: a group's query heads are query rows of their one KV head.
        qg = q.view(b, hkv, hq // hkv, d)
        out = F.scaled_dot_product_attention(qg, keys.permute(0, 2, 1, 3).to(q.dtype),
                                             values.permute(0, 2, 1, 3).to(q.dtype),
                                             attn_mask=valid.view(1, 1, 1, -1), scale=scale)
        return out.reshape(b, hq, d)
    qg = q.to(cdt).view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, keys.to(cdt)) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    if sink_logits is not None:
        sink = sink_logits.to(cdt).view(1, hkv, hq // hkv, 1).expand(b, -1, -1, -1)
        scores = torch.cat([scores, sink], dim=-1)  # the sink's value vector is zero: drop it below
    p = torch.softmax(scores, dim=-1)[..., :keys.shape[1]]
    out = torch.einsum("bhgn,bnhd->bhgd", p, values.to(cdt))
    return out.reshape(b, hq, d).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# top-k (pattern letter T) decode: a full cache plus the lightning indexer's keys
# --------------------------------------------------------------------------------------------------

class IndexedKVCache:
    """Cache of a top-k layer: EVERY past key/value (the indexer may pick any of them, so this cache
    grows with the sequence, like a dense layer's), plus the lightning indexer's key of every past
    position (``index_dim`` values per token, one shared index key: DSA eq. 1), which the new query
    scores to choose its top-k. Both are O(S) by nature: ``2 * hkv * d`` + ``index_dim`` values per
    token. Storage doubles its capacity when full, so appending is amortised O(1) per token.

    ``window_size`` / ``num_sink_tokens``: the keys every query attends on top of its top-k (the
    indexer's selection excludes them). Same ``append``/``length`` contract as
    :class:`StreamingKVCache`."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, index_dim: int,
                 window_size: Optional[int] = None, num_sink_tokens: int = 0,
                 dtype: torch.dtype = torch.float32, index_dtype: Optional[torch.dtype] = None,
                 device=None, capacity: int = 64):
        for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("index_dim", index_dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "must be a positive int", "an int >= 1")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                        or window_size < 1):
            _fail("window_size", window_size, "the window counts the query itself, so it is >= 1",
                  "an int >= 1 or None (top-k keys only)")
        if isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
            _fail("num_sink_tokens", num_sink_tokens, "must be a non-negative int", "an int >= 0")
        self.batch, self.num_kv_heads, self.head_dim, self.index_dim = batch, num_kv_heads, head_dim, index_dim
        self.window_size, self.num_sink_tokens = window_size, num_sink_tokens
        self.dtype = dtype
        self.index_dtype = index_dtype or dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._k = torch.zeros((batch, capacity, num_kv_heads, head_dim), dtype=dtype, device=self.device)
        self._v = torch.zeros_like(self._k)
        self._ik = torch.zeros((batch, capacity, index_dim), dtype=self.index_dtype, device=self.device)
        self.length = 0

    def _grow(self, need: int) -> None:
        cap = self._k.shape[1]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("_k", "_v", "_ik"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], cap, *old.shape[2:]))
            new[:, :self.length] = old[:, :self.length]
            setattr(self, name, new)

    def append(self, k: torch.Tensor, v: torch.Tensor, position: int,
               index_k: Optional[torch.Tensor] = None) -> None:
        """Store ``k, v [b, t, hkv, d]`` (RoPE applied) and the indexer keys ``index_k [b, t,
        index_dim]`` for positions ``position .. position + t - 1`` (``position == length``)."""
        want = (self.batch, self.num_kv_heads, self.head_dim)
        if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != want or tuple(v.shape) != tuple(k.shape):
            _fail("k.shape/v.shape", (tuple(k.shape), tuple(v.shape)), "does not match the cache",
                  f"[{self.batch}, t, {self.num_kv_heads}, {self.head_dim}] for both")
        t = k.shape[1]
        if index_k is None or tuple(index_k.shape) != (self.batch, t, self.index_dim):
            _fail("index_k.shape", None if index_k is None else tuple(index_k.shape),
                  "a top-k layer caches the indexer key of every position",
                  f"[{self.batch}, {t}, {self.index_dim}]")
        if position != self.length:
            _fail("position", position, f"the cache holds positions [0, {self.length})",
                  f"position={self.length} (tokens are appended in order)")
        self._grow(self.length + t)
        end = self.length + t
        self._k[:, self.length:end] = k.to(self.dtype)
        self._v[:, self.length:end] = v.to(self.dtype)
        self._ik[:, self.length:end] = index_k.to(self.index_dtype)
        self.length = end

    def keys(self) -> torch.Tensor:
        return self._k[:, :self.length]

    def values(self) -> torch.Tensor:
        return self._v[:, :self.length]

    def index_keys(self) -> torch.Tensor:
        """``[b, length, index_dim]``: the indexer key of every cached position."""
        return self._ik[:, :self.length]

    def nbytes(self) -> int:
        """Bytes held for the cached positions (main keys/values + indexer keys; grows with S)."""
        return sum(t.shape[0] * self.length * math.prod(t.shape[2:]) * t.element_size()
                   for t in (self._k, self._v, self._ik))


def decode_step_topk(q: torch.Tensor, cache: IndexedKVCache, topk_indices: torch.Tensor, *,
                     softmax_scale: Optional[float] = None,
                     sink_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the newest query ``q [b, hq, d]`` (position ``t = cache.length - 1``, its own
    key appended) over its sinks, its window and its top-k keys -> ``[b, hq, d]`` in q's dtype.

    ``topk_indices [b, hkv or 1, k]`` int: the indexer's choice for this query (entries ``-1`` or
    ``> t`` are ignored; entries the window or sinks already cover count once). The same key set
    as the training-time pattern (:func:`megatron_ext.ops.sparse_attention.sparse_attention` with
    ``topk_indices``), so decoding equals the full forward. Only ``sinks + window + k`` keys are
    gathered and read: the work per token is O(window + sinks + k), the memory O(S).
    """
    b, hq, d, hkv = _check_query(q, cache, sink_logits)
    if topk_indices.dim() != 3 or topk_indices.shape[0] != b or topk_indices.shape[1] not in (1, hkv):
        _fail("topk_indices.shape", tuple(topk_indices.shape), "one index list per sequence and KV head",
              f"[{b}, 1 or {hkv}, k]")
    t = cache.length - 1
    dev = q.device
    # The fixed part of the key set, shared by the batch: the sinks, then the window keys that are
    # not sinks (so none counts twice).
    n_sink = min(cache.num_sink_tokens, t + 1)
    lo = t + 1 if cache.window_size is None else max(n_sink, t + 1 - cache.window_size)
    fixed = torch.cat([torch.arange(n_sink, device=dev), torch.arange(lo, t + 1, device=dev)])
    sel = topk_indices.to(device=dev, dtype=torch.long).expand(b, hkv, -1)
    covered = sel < n_sink
    if cache.window_size is not None:
        covered = covered | (t - sel < cache.window_size)
    sel_ok = (sel >= 0) & (sel <= t) & ~covered
    # Duplicates inside the list would double a key's weight; the indexer never emits them, but a
    # caller-built list might, so only the first occurrence counts.
    if sel.shape[-1] > 1:
        same = (sel.unsqueeze(-1) == sel.unsqueeze(-2)) & sel_ok.unsqueeze(-2)
        sel_ok = sel_ok & ~torch.tril(same, diagonal=-1).any(-1)
    idx = torch.cat([fixed.view(1, 1, -1).expand(b, hkv, -1), torch.where(sel_ok, sel, 0)], dim=-1)
    valid = torch.cat([torch.ones(b, hkv, fixed.numel(), dtype=torch.bool, device=dev), sel_ok], dim=-1)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    hi = torch.arange(hkv, device=dev).view(1, hkv, 1)
    keys = cache.keys()[bi, idx, hi]                                    # [b, hkv, n, d]
    values = cache.values()[bi, idx, hi]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(cdt).view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, keys.to(cdt)) * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    if sink_logits is not None:
        sink = sink_logits.to(cdt).view(1, hkv, hq // hkv, 1).expand(b, -1, -1, -1)
        scores = torch.cat([scores, sink], dim=-1)
    p = torch.softmax(scores, dim=-1)[..., :idx.shape[-1]]
    out = torch.einsum("bhgn,bhnd->bhgd", p, values.to(cdt))
    return out.reshape(b, hq, d).to(q.dtype)
