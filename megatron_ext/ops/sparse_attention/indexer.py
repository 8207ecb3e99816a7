"""Lightning indexer ops (DeepSeek-V3.2 DSA, arXiv 2512.02556 sec. 2.1): scores, top-k, KL loss.

Index score of query ``t`` for key ``s`` (eq. 1 of the DSA paper)::

    I[t, s] = sum_h  w[t, h] * ReLU(q_idx[t, h] . k_idx[s])        (causal: -inf for s > t)

with ``q_idx [b, s, hi, di]`` (few heads, small dim), one shared key ``k_idx [b, s, di]`` (MQA) and
per-query head weights ``w [b, s, hi]``; any scale factors are folded into ``w`` by the caller.

* :func:`indexer_scores` -- the ``[b, s, s]`` fp32 score matrix (torch reference, or a Triton kernel
  that visits only causal key blocks). O(S^2) memory: for long sequences use :func:`indexer_topk`.
* :func:`select_topk` -- top-k key positions per query, ``[b, s, 1, k]`` int32, -1 padded where
  fewer than ``k`` keys are visible; optionally excluding keys the window / sink tokens already
  cover (so the whole top-k budget goes to keys the window cannot see).
* :func:`indexer_topk` -- scores + top-k processed in query blocks, so memory is
  ``b * block_q * s * 4`` bytes instead of ``b * s * s * 4`` (4 GiB at S = 32768).
* :func:`indexer_kl_loss` -- the indexer's training objective (DSA eq. 3 / 4)::

      p_main[t, :] = L1-normalise( sum_{h} softmax_h(scale * q[t, h] . k[:, g(h)])  over the set )
      p_index[t, :] = softmax(I[t, :]) over the set
      loss = mean_t KL(p_main[t] || p_index[t])

  over all causal keys (dense warm-up stage) or over the selected keys ``topk_indices[b, t, 0, :]``
  (sparse stage). ``q`` and ``k`` of the main attention are DETACHED: the loss trains only the
  indexer. Computed in query blocks under activation checkpointing, so memory stays
  ``O(block_q * (s or k))`` forward and backward.

No Megatron import (ops layer); ``tp_group`` (a torch.distributed group) sums the target over the
query heads held by other tensor-parallel ranks, as Megatron's DSA does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_ext import backends

BACKENDS = ("auto", "triton", "torch")
OP_SCORES = "indexer_scores"


def _fail(field: str, value, why: str, allowed: str) -> None:
    raise ValueError(f"{field}={value!r}: {why}; use {allowed}")


def check_indexer_args(q_idx, k_idx, weights) -> None:
    if q_idx.dim() != 4:
        _fail("q_idx.shape", tuple(q_idx.shape), "must be 4-D", "[b, s, index_heads, index_head_dim]")
    b, s, hi, di = q_idx.shape
    if tuple(k_idx.shape) != (b, s, di):
        _fail("k_idx.shape", tuple(k_idx.shape), f"does not match q_idx.shape={tuple(q_idx.shape)}",
              f"[{b}, {s}, {di}] (one shared index key per token)")
    if tuple(weights.shape) != (b, s, hi):
        _fail("weights.shape", tuple(weights.shape), "one weight per (token, index head)", f"[{b}, {s}, {hi}]")
    for name, t in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
        if not t.is_floating_point():
            _fail(f"{name}.dtype", t.dtype, "must be floating point", "float16, bfloat16, float32 or float64")
        if t.device != q_idx.device:
            _fail(f"{name}.device", str(t.device), f"must equal q_idx.device={q_idx.device}", "one device")


# --------------------------------------------------------------------------------------------------
# scores: torch reference
# --------------------------------------------------------------------------------------------------

def indexer_scores_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor,
                             causal: bool = True, query_offset: int = 0) -> torch.Tensor:
    """``[b, sq, sk]`` fp32 (fp64 for fp64 inputs); differentiable. ``q_idx``/``weights`` may be a
    block of queries starting at position ``query_offset`` (for the causal mask)."""
    cdt = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bthd,bsd->bths", q_idx.to(cdt), k_idx.to(cdt))     # [b, sq, hi, sk]
    scores = (torch.relu(logits) * weights.to(cdt).unsqueeze(-1)).sum(dim=2)   # [b, sq, sk]
    if causal:
        sq, sk = scores.shape[1], scores.shape[2]
        t = torch.arange(query_offset, query_offset + sq, device=scores.device).view(sq, 1)
        j = torch.arange(sk, device=scores.device).view(1, sk)
        scores = scores.masked_fill(j > t, float("-inf"))
    return scores


# --------------------------------------------------------------------------------------------------
# scores: Triton
# --------------------------------------------------------------------------------------------------

try:  # the ops import without Triton; the kernels exist only with it
    import triton
    import triton.language as tl

    from megatron_ext.ops.sparse_attention.triton_window import _dot
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _scores_kernel(Q, K, W, OUT, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                       stride_wb, stride_ws, stride_ob, stride_os, t0, n_rows, seqlen, n_heads,
                       window, num_sink, HAS_WINDOW: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """Rows ``[t0 + m0, t0 + m0 + BM)`` x keys ``[n0, n0 + BN)``; blocks wholly above the
        diagonal only store -inf (the output is not pre-filled: that would be one more full write
        of the scores). The K tile is loaded once and reused by every index head; the ReLU sits
        between the heads, so they cannot fold into one dot product."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        m = pid_m * BM + tl.arange(0, BM)          # row inside the block
        t = t0 + m                                 # query position
        n = pid_n * BN + tl.arange(0, BN)          # key position
        row_ok = m < n_rows
        key_ok = n < seqlen
        if pid_n * BN > t0 + pid_m * BM + BM - 1:
            tl.store(OUT + b * stride_ob + m[:, None] * stride_os + n[None, :],
                     tl.full([BM, BN], float("-inf"), tl.float32), mask=row_ok[:, None] & key_ok[None, :])
        else:
            d = tl.arange(0, DI)
            k = tl.load(K + b * stride_kb + n[:, None] * stride_ks + d[None, :], mask=key_ok[:, None],
                        other=0.0)
            acc = tl.zeros([BM, BN], tl.float32)
            for h in range(n_heads):
                q = tl.load(Q + b * stride_qb + m[:, None] * stride_qs + h * stride_qh + d[None, :],
                            mask=row_ok[:, None], other=0.0)
                w = tl.load(W + b * stride_wb + m * stride_ws + h, mask=row_ok, other=0.0).to(tl.float32)
                qk = _dot(q, tl.trans(k), UPCAST, DOT_PREC)
                acc += w[:, None] * tl.maximum(qk, 0.0)
            keep = n[None, :] <= t[:, None]
            if HAS_WINDOW:  # keys the window / sinks already cover leave the top-k budget
                keep = keep & (t[:, None] - n[None, :] >= window) & (n[None, :] >= num_sink)
            acc = tl.where(keep, acc, float("-inf"))
            tl.store(OUT + b * stride_ob + m[:, None] * stride_os + n[None, :], acc,
                     mask=row_ok[:, None] & key_ok[None, :])


# (BM, BN, num_warps, num_stages) of the scores kernel on the GPU
SCORES_TILE = (64, 64, 4, 2)


def _triton_unusable_reason(q_idx: torch.Tensor, causal: bool) -> Optional[str]:
    from megatron_ext.ops.sparse_attention import triton_unusable_reason

    why = triton_unusable_reason(q_idx, causal=causal)
    if why is not None:
        return why.replace("head_dim=", "index_head_dim=")
    di = q_idx.shape[-1]
    if di < 16 or di & (di - 1):
        return f"index_head_dim={di!r}: the Triton kernel takes a power of two >= 16"
    if q_idx.dtype == torch.float64:
        return "dtype=torch.float64: the Triton kernel takes float16, bfloat16 or float32"
    return None


def _scores_triton_block(q_blk, k_idx, w_blk, t0: int, window_size: Optional[int] = None,
                         num_sink_tokens: int = 0) -> torch.Tensor:
    """Scores of a query block; with ``window_size`` / ``num_sink_tokens`` the keys they cover are
    already -inf (what :func:`_exclude_window` does, without another pass over the block)."""
    from megatron_ext.ops.sparse_attention import triton_window as tw

    b, nq, hi, di = q_blk.shape
    s = k_idx.shape[1]
    q_blk, k_idx, w_blk = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_blk, k_idx, w_blk))
    k_idx = k_idx.to(q_blk.dtype)
    out = torch.empty((b, nq, s), dtype=torch.float32, device=q_blk.device)
    interp = tw.interpreted()
    bm, bn, warps, stages = (16, 16, 1, 1) if interp else SCORES_TILE
    upcast, prec = tw._flags(q_blk.dtype)
    _scores_kernel[(triton.cdiv(nq, bm), triton.cdiv(s, bn), b)](
        q_blk, k_idx, w_blk, out, q_blk.stride(0), q_blk.stride(1), q_blk.stride(2),
        k_idx.stride(0), k_idx.stride(1), w_blk.stride(0), w_blk.stride(1), out.stride(0), out.stride(1),
        t0, nq, s, hi, 0 if window_size is None else int(window_size), int(num_sink_tokens),
        HAS_WINDOW=window_size is not None or num_sink_tokens > 0, DI=di, BM=bm, BN=bn,
        UPCAST=upcast, DOT_PREC=prec,
        num_warps=warps, num_stages=stages)
    return out


def _pick_backend(q_idx, causal: bool, backend: str) -> str:
    if backend not in BACKENDS:
        _fail("backend", backend, f"unknown backend for {OP_SCORES}", f"one of {list(BACKENDS)}")
    return backends.resolve(OP_SCORES, backend, [
        ("triton", lambda: _triton_unusable_reason(q_idx, causal)),
        ("torch", lambda: None),
    ])


def _scores_block(q_blk, k_idx, w_blk, t0: int, chosen: str, causal: bool = True) -> torch.Tensor:
    if chosen == "triton":
        return _scores_triton_block(q_blk, k_idx, w_blk, t0)
    return indexer_scores_reference(q_blk, k_idx, w_blk, causal=causal, query_offset=t0)


def indexer_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, *,
                   causal: bool = True, backend: str = "auto") -> torch.Tensor:
    """``I [b, s, s]`` fp32, ``-inf`` above the diagonal when causal. Not differentiable on the
    Triton path (selection needs no gradient; the KL loss recomputes what it needs in torch)."""
    check_indexer_args(q_idx, k_idx, weights)
    chosen = _pick_backend(q_idx, causal, backend)
    with torch.no_grad() if chosen == "triton" else _nullcontext():
        return _scores_block(q_idx, k_idx, weights, 0, chosen, causal)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------
# top-k selection
# --------------------------------------------------------------------------------------------------

def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        _fail("topk", k, "keys selected per query", "an int >= 1")


def _exclude_window(scores: torch.Tensor, query_offset: int, window_size: Optional[int],
                    num_sink_tokens: int) -> torch.Tensor:
    if window_size is None and num_sink_tokens <= 0:
        return scores
    sq, sk = scores.shape[-2], scores.shape[-1]
    t = torch.arange(query_offset, query_offset + sq, device=scores.device).view(sq, 1)
    j = torch.arange(sk, device=scores.device).view(1, sk)
    covered = j < num_sink_tokens
    if window_size is not None:
        covered = covered | (t - j < window_size)
    return scores.masked_fill(covered, float("-inf"))


def select_topk(scores: torch.Tensor, k: int, *, window_size: Optional[int] = None,
                num_sink_tokens: int = 0, query_offset: int = 0, sorted: bool = True) -> torch.Tensor:
    """``[b, sq, 1, k]`` int32: the ``k`` highest-scoring keys per query (ties in any order), ``-1``
    where fewer than ``k`` keys have a finite score (causally visible and not excluded). With
    ``window_size`` / ``num_sink_tokens`` the keys those already cover are excluded first.
    ``scores [b, sq, sk]``: -inf marks invisible keys (as :func:`indexer_scores` writes them).
    ``sorted=False``: the ``k`` keys in no particular order (cheaper: no sort of the selection; the
    attention kernels sort their lists themselves), ``-1`` entries anywhere in the row."""
    _check_k(k)
    if scores.dim() != 3:
        _fail("scores.shape", tuple(scores.shape), "must be 3-D", "[b, s_query, s_key]")
    scores = _exclude_window(scores, query_offset, window_size, num_sink_tokens)
    return _topk_rows(scores, k, sorted)


def _topk_rows(scores: torch.Tensor, k: int, sorted: bool = True) -> torch.Tensor:
    b, sq, sk = scores.shape
    kk = min(k, sk)
    val, idx = torch.topk(scores, kk, dim=-1, sorted=sorted)
    idx = idx.to(torch.int32).masked_fill(val == float("-inf"), -1)
    if kk < k:
        idx = F.pad(idx, (0, k - kk), value=-1)
    return idx.unsqueeze(2)


def indexer_topk(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, k: int, *,
                 window_size: Optional[int] = None, num_sink_tokens: int = 0,
                 block_q: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """:func:`select_topk` of :func:`indexer_scores`, in blocks of ``block_q`` queries (default:
    at most ~256 MiB of fp32 scores per block). Returns ``[b, s, 1, k]`` int32; no gradient. On the
    Triton path the selection of a row is in no particular order (``sorted=False``; the attention
    kernels sort their lists), on the torch path by decreasing score."""
    check_indexer_args(q_idx, k_idx, weights)
    _check_k(k)
    b, s, _, _ = q_idx.shape
    if block_q is None:
        block_q = max(64, min(s, (64 << 20) // max(1, b * s)))
    if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < 1:
        _fail("block_q", block_q, "queries per block", "an int >= 1")
    chosen = _pick_backend(q_idx, True, backend)
    out = torch.empty((b, s, 1, k), dtype=torch.int32, device=q_idx.device)
    with torch.no_grad():
        for t0 in range(0, s, block_q):
            t1 = min(s, t0 + block_q)
            # keys past the block's last query are invisible to all of its rows: score only [0, t1)
            if chosen == "triton":  # window/sink keys masked inside the kernel
                scores = _scores_triton_block(q_idx[:, t0:t1], k_idx[:, :t1], weights[:, t0:t1], t0,
                                              window_size, num_sink_tokens)
                out[:, t0:t1] = _topk_rows(scores, k, sorted=False)
            else:
                scores = _scores_block(q_idx[:, t0:t1], k_idx[:, :t1], weights[:, t0:t1], t0, chosen)
                out[:, t0:t1] = select_topk(scores, k, window_size=window_size,
                                            num_sink_tokens=num_sink_tokens, query_offset=t0)
    return out


# --------------------------------------------------------------------------------------------------
# KL loss
# --------------------------------------------------------------------------------------------------

def _kl_rows(target: torch.Tensor, log_pred: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sum_j target * (log target - log_pred)`` over ``valid`` entries (0 * log 0 = 0)."""
    terms = torch.xlogy(target, target) - target * log_pred.masked_fill(~valid, 0.0)
    return terms.masked_fill(~valid, 0.0).sum(-1)


def _masked_log_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = x.masked_fill(~valid, float("-inf"))
    m = x.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = torch.log(torch.exp(x - m).sum(-1, keepdim=True).clamp_min(1e-30)) + m
    return (x - lse).masked_fill(~valid, 0.0)


def _target(logits: torch.Tensor, valid_h: torch.Tensor, tp_group) -> torch.Tensor:
    """``logits [b, c, hq, n]`` -> head-summed per-head softmax, L1-normalised, ``[b, c, n]``."""
    p = torch.exp(_masked_log_softmax(logits, valid_h)).masked_fill(~valid_h, 0.0).sum(2)
    if tp_group is not None:
        torch.distributed.all_reduce(p, group=tp_group)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def _kl_block_dense(q, k, q_idx, k_idx, w, t0: int, scale: float, group: int, tp_group):
    b, c, hq, _ = q.shape
    t1 = t0 + c
    kk = k[:, :t1].repeat_interleave(group, dim=2)                              # [b, t1, hq, d]
    logits = torch.einsum("bthd,bshd->bths", q, kk) * scale                     # [b, c, hq, t1]
    t = torch.arange(t0, t1, device=q.device).view(c, 1)
    valid = (torch.arange(t1, device=q.device).view(1, t1) <= t).expand(b, c, t1)
    with torch.no_grad():
        target = _target(logits, valid.unsqueeze(2).expand_as(logits), tp_group)
    scores = indexer_scores_reference(q_idx, k_idx[:, :t1], w, causal=False)       # [b, c, t1]
    return _kl_rows(target, _masked_log_softmax(scores, valid), valid), valid.any(-1)


def _kl_block_sparse(q, k, q_idx, k_idx, w, idx, t0: int, scale: float, group: int, tp_group):
    b, c, hq, d = q.shape
    t = torch.arange(t0, t0 + c, device=q.device).view(1, c, 1)
    valid = (idx >= 0) & (idx <= t)                                              # [b, c, K]
    safe = torch.where(valid, idx, torch.zeros_like(idx)).long()
    bi = torch.arange(b, device=q.device).view(b, 1, 1)
    kg = k[bi, safe]                                                             # [b, c, K, hkv, d]
    kg = kg.repeat_interleave(group, dim=3)                                      # [b, c, K, hq, d]
    logits = torch.einsum("bchd,bckhd->bchk", q, kg) * scale                    # [b, c, hq, K]
    with torch.no_grad():
        target = _target(logits, valid.unsqueeze(2).expand_as(logits), tp_group)
    kig = k_idx[bi, safe]                                                        # [b, c, K, di]
    cdt = q.dtype  # fp32, or fp64 for fp64 inputs
    rel = torch.relu(torch.einsum("bchd,bckd->bchk", q_idx.to(cdt), kig.to(cdt)))
    scores = (rel * w.to(cdt).unsqueeze(-1)).sum(2)                              # [b, c, K]
    return _kl_rows(target, _masked_log_softmax(scores, valid), valid), valid.any(-1)


def indexer_kl_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                    weights: torch.Tensor, topk_indices: Optional[torch.Tensor] = None, *,
                    softmax_scale: Optional[float] = None, block_q: int = 256,
                    tp_group=None) -> torch.Tensor:
    """Mean over query rows (with >= 1 key in the set) of ``KL(p_main || p_index)``, fp32 scalar.

    ``q [b, s, hq, d]``, ``k [b, s, hkv, d]``: the main attention's query/key (after RoPE), used
    DETACHED. ``q_idx, k_idx, weights``: the indexer's (gradients flow to them only).
    ``topk_indices [b, s, *, K]`` (entry ``[..., 0, :]`` is used; -1 / future entries ignored;
    assumed duplicate-free, as :func:`select_topk` returns them): the set is the selected keys
    (sparse stage); ``None``: all causal keys (dense warm-up stage). ``tp_group``: sum the target
    over the query heads of every tensor-parallel rank before normalising.
    """
    check_indexer_args(q_idx, k_idx, weights)
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != q_idx.shape[:2] or k.shape[:2] != q.shape[:2]:
        _fail("q.shape/k.shape", (tuple(q.shape), tuple(k.shape)), "main attention q/k do not match "
              f"the indexer's [b, s]={tuple(q_idx.shape[:2])}", "q [b, s, hq, d], k [b, s, hkv, d]")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        _fail("hq/hkv", (hq, hkv), "query heads must be a multiple of kv heads", "hkv dividing hq")
    if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < 1:
        _fail("block_q", block_q, "queries per block", "an int >= 1")
    b, s = q.shape[:2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qd, kd = q.detach().to(cdt), k.detach().to(cdt)
    group = hq // hkv
    sparse = topk_indices is not None
    if sparse:
        if topk_indices.dim() != 4 or tuple(topk_indices.shape[:2]) != (b, s):
            _fail("topk_indices.shape", tuple(topk_indices.shape), "one index list per query",
                  f"[{b}, {s}, hkv or 1, k]")
        idx_all = topk_indices[:, :, 0]
    total = torch.zeros((), dtype=cdt, device=q.device)
    rows = torch.zeros((), dtype=cdt, device=q.device)
    for t0 in range(0, s, block_q):
        t1 = min(s, t0 + block_q)
        if sparse:
            fn = lambda qi, ki, w, qb, idx, t0=t0: _kl_block_sparse(  # noqa: E731
                qb, kd, qi, ki, w, idx, t0, scale, group, tp_group)
            args = (q_idx[:, t0:t1], k_idx, weights[:, t0:t1], qd[:, t0:t1], idx_all[:, t0:t1])
        else:
            fn = lambda qi, ki, w, qb, t0=t0: _kl_block_dense(  # noqa: E731
                qb, kd, qi, ki, w, t0, scale, group, tp_group)
            args = (q_idx[:, t0:t1], k_idx, weights[:, t0:t1], qd[:, t0:t1])
        if torch.is_grad_enabled() and any(a.requires_grad for a in args[:3]):
            kl, has = checkpoint(fn, *args, use_reentrant=False)  # recompute per block: bounded memory
        else:
            kl, has = fn(*args)
        total = total + kl.sum()
        rows = rows + has.sum()
    return (total / rows.clamp_min(1)).to(torch.float32 if cdt == torch.float32 else cdt)
