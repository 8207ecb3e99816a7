"""Triton kernels: attention over gathered top-k keys (DSA-style token selection), fwd and bwd.

Semantics are those of :mod:`.reference` with ``topk_indices``: query ``t`` of kv group ``g``
attends the keys listed in ``topk_indices[b, t, g, :]`` (``-1`` and future entries ignored,
duplicates once), united with the causal window ``t - j < W`` and the token sinks ``j < n_sink``
when those are set; an optional per-head sink logit joins the softmax denominator (DeepSeek-V3.2
DSA, arXiv 2512.02556 sec. 2.1: attention over the selected set ``S_t``; sink logit as gpt-oss).

Union with the window: **two kernels merged through the log-sum-exp**, not one merged index list.
The window + sink part runs in the block-sparse window kernel (:mod:`.triton_window`, contiguous
K/V tiles, no gather), the top-k part here over the listed keys *minus* the window and sinks
(:func:`prepare_topk_indices` drops them, so every key is counted once). The forward of this kernel
starts its online softmax from the window kernel's ``(out_w, lse_w)`` as one virtual key of logit
``lse_w`` and value ``out_w`` (exactly how a sink logit enters with value 0), so it writes the final
``out`` and ``lse`` in one pass. The backward needs no merge: with the final ``lse`` and
``delta = rowsum(dO * O)`` each kernel's ``P = exp(S - lse)`` and ``dS = P (dP - delta)`` are the
exact entries of the joint softmax, so both backwards run independently and their gradients add.
Why not one deduplicated list of window + sinks + top-k keys: a window of 4096 would turn into 4096
gathered rows per query (no contiguous tiles, list building of ``S * (W + k)`` entries); the merge
reuses the tuned window kernel unchanged. Without a window, the (few) sink tokens are prepended to
the list instead.

Tiling (forward and dq/fused backward): one program per (query ``t``, kv group ``g``, head chunk),
the query heads of the group stacked as tile rows (``HB`` = group size rounded up to a power of two,
>= 16 for ``tl.dot``). Each step gathers ``BLOCK_N`` listed K/V rows once and feeds all heads of the
group (MQA: 16 heads share each gathered row). Rows of different queries cannot share a tile (their
key sets differ), so the arithmetic intensity is ``~group`` FLOP/byte: the kernel is bound by gather
bandwidth out of L2 (K/V of one sequence, ``2 * S * d * 2`` bytes = 16 MiB at S=32768, d=128, fit
in the H100's 50 MB L2), not by the tensor cores. Lists are sorted descending so gathers walk
memory monotonically and padding sits at the end (``row_len`` stops the loop early). The lists are
prepared by one Triton program per row (:func:`_prep_kernel`: mask, bitonic sort in registers,
neighbour dedup; no host sync), not by a global torch sort.

Backward, dk/dv (keys are gathered, so their gradient is a scatter):

* default (fast): the dq kernel also forms ``dK_c = dS^T Q`` and ``dV_c = P^T dO`` for its gathered
  rows (summed over the group's heads inside the tile product) and ``tl.atomic_add``s them into fp32
  buffers: one pass, run-to-run bit differences from the atomics' order. The atomics are
  ``relaxed`` (Triton's default ``acq_rel`` made the backward 3.8x slower on an H100: 44 vs 11.7 ms
  at S=32768, k=1024). They still cost ~8.7 of those 11.7 ms (dq alone: 3.0 ms): each selected pair
  adds ``2 * d`` fp32 values, i.e. 34 GB of L2 atomic traffic at k=1024. Walking each list from a
  rotated start (so concurrently running queries do not hit a much-chosen key together) was
  measured and did not help (+1 %).
* ``deterministic=True`` (or ``torch.are_deterministic_algorithms_enabled()``): no atomics. The
  (query, key) list is transposed on the device (a stable sort by key), and a key-major kernel owns
  one key and walks the queries that selected it in increasing ``t``, accumulating its dk/dv in
  registers (fp32, CUDA-core dot products: slower, bitwise reproducible).

Numerics: fp32 softmax state and accumulation; fp32 inputs use IEEE dots; under
``TRITON_INTERPRET=1`` bf16 operands are upcast before ``tl.dot`` (the interpreter's bf16 dot is
wrong), as in the window kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from megatron_ext.ops.sparse_attention import triton_window as _tw
from megatron_ext.ops.sparse_attention.triton_window import _dot

LOG2E = _tw.LOG2E
SUPPORTED_HEAD_DIMS = _tw.SUPPORTED_HEAD_DIMS


@dataclasses.dataclass(frozen=True)
class TopkTileConfig:
    """``block_n``: gathered keys per step (fwd / bwd); ``max_hb``: most stacked heads per program
    (a larger group is split over head chunks); ``det_block_q``: queries per step of the
    deterministic key-major kernel (its tile rows are ``det_block_q * HB``)."""

    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 2
    bwd_block_n: int = 32
    bwd_warps: int = 4
    bwd_stages: int = 2
    max_hb: int = 64
    det_block_q: int = 4
    det_warps: int = 4
    atomic_sem: str = "relaxed"

    def __post_init__(self):
        for name in ("fwd_block_n", "bwd_block_n", "max_hb"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"{name}={val!r}: tile sizes are powers of two >= 16 (tl.dot minimum); "
                                 f"use 16, 32, 64 or 128")
        if not isinstance(self.det_block_q, int) or self.det_block_q < 1 or self.det_block_q & (self.det_block_q - 1):
            raise ValueError(f"det_block_q={self.det_block_q!r}: queries per step; use a power of two >= 1")
        if self.atomic_sem not in ("relaxed", "acq_rel"):
            raise ValueError(f"atomic_sem={self.atomic_sem!r}: memory order of the dk/dv atomics; "
                             f"use 'relaxed' or 'acq_rel'")


# Picked on an H100 at S=32768, hq=16, hkv=1, d=128, k=1024 (bf16): forward 64/4 warps/2 stages
# (32 or 128 keys per step, 3-4 stages: 5-25 % slower); backward 16 keys/2 warps/3 stages, relaxed
# atomics (acq_rel atomics: 44 ms instead of 11.7 ms for the backward).
GPU_CONFIG = TopkTileConfig(fwd_block_n=64, fwd_warps=4, fwd_stages=2, bwd_block_n=16, bwd_warps=2,
                            bwd_stages=3)
# The interpreter runs every tile op in numpy: small tiles keep the CPU tests fast.
INTERPRETER_CONFIG = TopkTileConfig(16, 1, 1, 16, 1, 1, 16, 2, 1)


def default_config(dtype: torch.dtype, interpret: bool) -> TopkTileConfig:
    if interpret:
        return INTERPRETER_CONFIG
    if dtype == torch.float32:  # 4-byte operands: smaller gathered tiles
        return dataclasses.replace(GPU_CONFIG, fwd_block_n=32, bwd_block_n=16)
    return GPU_CONFIG


# --------------------------------------------------------------------------------------------------
# index list preparation (torch, once per forward; reused by the backward)
# --------------------------------------------------------------------------------------------------

def _prepare_torch(topk_indices: torch.Tensor, seqlen: int, window_size: Optional[int],
                   num_sink_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch form of :func:`prepare_topk_indices` (the spec of :func:`_prep_kernel`)."""
    idx = topk_indices.to(torch.int32)
    b, s, hkv, _ = idx.shape
    ns = min(int(num_sink_tokens), seqlen)
    if window_size is None and ns > 0:
        sinks = torch.arange(ns, device=idx.device, dtype=torch.int32).expand(b, s, hkv, ns)
        idx = torch.cat([sinks, idx], dim=-1)
    t = torch.arange(s, device=idx.device, dtype=torch.int32).view(1, s, 1, 1)
    drop = (idx < 0) | (idx > t)
    if window_size is not None:
        drop = drop | (t - idx < window_size) | (idx < ns)
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    idx = torch.sort(idx, dim=-1, descending=True).values
    row_len = (idx >= 0).sum(dim=-1, dtype=torch.int32)
    if idx.shape[-1] > 1:
        dup = idx[..., 1:] == idx[..., :-1]
        idx = torch.cat([idx[..., :1], idx[..., 1:].masked_fill(dup & (idx[..., 1:] >= 0), -1)], dim=-1)
    return idx.contiguous(), row_len.contiguous()


@triton.jit
def _prep_kernel(IDX, OUT, ROWLEN, seqlen, hkv, len_in, len_out, window, num_sink,
                 NS_PRE: tl.constexpr, HAS_WINDOW: tl.constexpr, LP: tl.constexpr):
    """One list row ``(b, t, g)``: drop, sort descending (bitonic, in registers), dedup. The dedup
    compares each entry with its left neighbour, read back from the stored row: Triton has no
    register shift, and the row is L1/L2-resident anyway."""
    row = tl.program_id(0).to(tl.int64)
    t = ((row // hkv) % seqlen).to(tl.int32)
    c = tl.arange(0, LP)
    src = c - NS_PRE
    j = tl.load(IDX + row * len_in + src, mask=(src >= 0) & (src < len_in), other=-1).to(tl.int32)
    if NS_PRE > 0:  # no window: the sink tokens are listed first (still causal: j <= t below)
        j = tl.where(c < NS_PRE, c, j)
    # values outside [-1, s) are dropped like padding: < 0 here, >= s is > t for every query
    drop = (j < 0) | (j > t)
    if HAS_WINDOW:
        drop = drop | (t - j < window) | (j < num_sink)
    j = tl.where(drop, -1, j)
    j = tl.sort(j, descending=True)
    base = OUT + row * len_out
    live = c < len_out
    tl.store(base + c, j, mask=live)
    tl.debug_barrier()  # every entry stored before any thread reads its neighbour
    prev = tl.load(base + c - 1, mask=live & (c > 0), other=-1)
    tl.debug_barrier()  # every neighbour read before the duplicates are overwritten
    tl.store(base + c, tl.full([LP], -1, tl.int32), mask=live & (j == prev) & (j >= 0))
    tl.store(ROWLEN + row, tl.sum((j >= 0).to(tl.int32), 0))


def prepare_topk_indices(topk_indices: torch.Tensor, seqlen: int, window_size: Optional[int],
                         num_sink_tokens: int, check_range: bool = False, use_kernel: Optional[bool] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(idx [b, s, hkv, L] int32, row_len [b, s, hkv] int32)`` for the top-k kernels.

    Drops (to -1) padding, future keys, and keys the window kernel already covers (``t - j < W`` or
    ``j < n_sink`` when a window is set); without a window the sink tokens ``0..n_sink-1`` are
    prepended. Sorted descending per row, duplicates set to -1, so valid entries are unique and
    ``idx[..., row_len:]`` is all padding. Values outside ``[-1, s)`` are dropped like padding;
    ``check_range=True`` raises on them instead (one device sync, like the reference: the autograd
    path does not check, so a training step has no host sync here).

    ``use_kernel`` (default: on CUDA or under the interpreter) runs :func:`_prep_kernel`, one
    program per row (one read + one write of the list, no global sort); else torch (sort + masks).
    """
    idx = topk_indices
    if check_range and idx.numel():
        lo, hi = (int(x) for x in torch.aminmax(idx))
        if lo < -1 or hi >= seqlen:
            raise ValueError(f"topk_indices={(lo, hi)!r}: (min, max) outside the key range; "
                             f"use values in [-1, {seqlen - 1}]")
    if use_kernel is None:
        use_kernel = idx.is_cuda or (idx.device.type == "cpu" and _tw.interpreted())
    if not use_kernel:
        return _prepare_torch(idx, seqlen, window_size, num_sink_tokens)
    b, s, hkv, len_in = idx.shape
    ns = min(int(num_sink_tokens), seqlen)
    ns_pre = ns if window_size is None else 0
    len_out = len_in + ns_pre
    idx = idx.contiguous()
    out = torch.empty((b, s, hkv, len_out), dtype=torch.int32, device=idx.device)
    row_len = torch.empty((b, s, hkv), dtype=torch.int32, device=idx.device)
    n_rows = b * s * hkv
    if n_rows:
        lp = triton.next_power_of_2(len_out)
        _prep_kernel[(n_rows,)](idx, out, row_len, s, hkv, len_in, len_out,
                                0 if window_size is None else int(window_size), ns,
                                NS_PRE=ns_pre, HAS_WINDOW=window_size is not None, LP=lp,
                                num_warps=1 if _tw.interpreted() else (8 if lp >= 4096 else 4))
    return out, row_len


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _program_heads(hkv, group, HB: tl.constexpr, HEAD_DIM: tl.constexpr):
    """What the program of grid ``(query t, head chunk, batch * KV group)`` works on: ``t``, ``b``
    (int64), the KV group ``g``, its query heads ``h [HB]`` (``row_ok``: inside the group) and the
    head-dim lanes ``d``."""
    t = tl.program_id(0)
    pid_bg = tl.program_id(2)
    b = (pid_bg // hkv).to(tl.int64)
    g = pid_bg % hkv
    hl = tl.program_id(1) * HB + tl.arange(0, HB)
    return t, b, g, g * group + hl, hl < group, tl.arange(0, HEAD_DIM)


@triton.jit
def _gather_kv(k_base, v_base, stride_ks, stride_vs, j, ok, d):
    """K and V rows ``[BLOCK_N, HEAD_DIM]`` of the listed keys ``j`` (padding reads as 0)."""
    jj = tl.where(ok, j, 0)
    k = tl.load(k_base + jj[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(v_base + jj[:, None] * stride_vs + d[None, :], mask=ok[:, None], other=0.0)
    return k, v


@triton.jit
def _topk_fwd_kernel(Q, K, V, IDX, ROWLEN, SINK, PO, PLSE, O, LSE,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     stride_pb, stride_ps, stride_ph,
                     seqlen, hq, hkv, group, list_len, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr,
                     HAS_SINK: tl.constexpr, HAS_PREV: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    t, b, g, h, row_ok, d = _program_heads(hkv, group, HB, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    if HAS_PREV:  # the window kernel's result enters as one key of logit lse_w and value out_w
        m_i = tl.load(PLSE + (b * hq + h) * seqlen + t, mask=row_ok, other=0.0) * 1.4426950408889634
        l_i = tl.full([HB], 1.0, tl.float32)
        acc = tl.load(PO + b * stride_pb + t * stride_ps + h[:, None] * stride_ph + d[None, :],
                      mask=row_ok[:, None], other=0.0).to(tl.float32)
    elif HAS_SINK:  # sink logit: a key of logit sink_h and value 0
        m_i = tl.load(SINK + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([HB], 1.0, tl.float32)
        acc = tl.zeros([HB, HEAD_DIM], tl.float32)
    else:
        m_i = tl.full([HB], float("-inf"), tl.float32)
        l_i = tl.zeros([HB], tl.float32)
        acc = tl.zeros([HB, HEAD_DIM], tl.float32)

    row = (b * seqlen + t) * hkv + g
    idx_base = IDX + row * list_len
    n_len = tl.load(ROWLEN + row)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    for c0 in range(0, n_len, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        j = tl.load(idx_base + c, mask=c < n_len, other=-1)
        ok = j >= 0
        k, v = _gather_kv(k_base, v_base, stride_ks, stride_vs, j, ok, d)
        qk = _dot(q, tl.trans(k), UPCAST, DOT_PREC) * qk_scale           # [HB, BLOCK_N], log2 units
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no nan
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no key and no sink outputs 0, lse -inf
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + t * stride_os + h[:, None] * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + (b * hq + h) * seqlen + t, lse, mask=row_ok)


@triton.jit
def _topk_bwd_kernel(Q, K, V, DO, LSE, DELTA, IDX, ROWLEN, DQ, DKA, DVA,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                     seqlen, hq, hkv, group, list_len, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr,
                     ATOMIC: tl.constexpr, ATOMIC_SEM: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """dq of one (query, group, head chunk); with ``ATOMIC`` also the gathered keys' dk/dv,
    atomically added to fp32 ``DKA/DVA [b, s, hkv, d]`` (contiguous)."""
    t, b, g, h, row_ok, d = _program_heads(hkv, group, HB, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + t * stride_dos + h[:, None] * stride_doh + d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + (b * hq + h) * seqlen + t, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + (b * hq + h) * seqlen + t, mask=row_ok, other=0.0)
    dq = tl.zeros([HB, HEAD_DIM], tl.float32)

    row = (b * seqlen + t) * hkv + g
    idx_base = IDX + row * list_len
    n_len = tl.load(ROWLEN + row)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    acc_base = (b * seqlen * hkv + g) * HEAD_DIM
    for c0 in range(0, n_len, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        j = tl.load(idx_base + c, mask=c < n_len, other=-1)
        ok = j >= 0
        k, v = _gather_kv(k_base, v_base, stride_ks, stride_vs, j, ok, d)
        qk = _dot(q, tl.trans(k), UPCAST, DOT_PREC) * qk_scale
        # mask after the exp: a keyless row has lse = -inf (exp would be inf, times 0 = nan)
        p = tl.where(ok[None, :], tl.math.exp2(qk - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, DOT_PREC)
        if ATOMIC:
            jj = tl.where(ok, j, 0).to(tl.int64)
            off = acc_base + jj[:, None] * (hkv * HEAD_DIM) + d[None, :]
            dv_c = _dot(tl.trans(p.to(do.dtype)), do, UPCAST, DOT_PREC)
            dk_c = _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, DOT_PREC) * sm_scale
            # relaxed: only the sum at the kernel's end matters (no ordering between adds)
            tl.atomic_add(DKA + off, dk_c, mask=ok[:, None], sem=ATOMIC_SEM)
            tl.atomic_add(DVA + off, dv_c, mask=ok[:, None], sem=ATOMIC_SEM)
    dq = dq * sm_scale
    # fp32 [b, s, hq, d] contiguous: the window kernel's dq is added on the host before the cast
    tl.store(DQ + ((b * seqlen + t) * hq + h[:, None]) * HEAD_DIM + d[None, :], dq, mask=row_ok[:, None])


@triton.jit
def _topk_dkdv_det_kernel(Q, K, V, DO, LSE, DELTA, TLIST, START, DKA, DVA,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                          seqlen, hq, hkv, group, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BQ: tl.constexpr, HB: tl.constexpr,
                          N_HC: tl.constexpr):
    """Key-major, deterministic: key ``j`` of (b, g) walks the queries ``TLIST[START[c]:START[c+1]]``
    (increasing ``t``; ``c = (b * hkv + g) * s + j``) that selected it; tile rows are (query, head)."""
    j = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // hkv).to(tl.int64)
    g = pid_bg % hkv
    code = pid_bg.to(tl.int64) * seqlen + j
    lo = tl.load(START + code)
    hi = tl.load(START + code + 1)
    d = tl.arange(0, HEAD_DIM)
    kj = tl.load(K + b * stride_kb + j * stride_ks + g * stride_kh + d).to(tl.float32)
    vj = tl.load(V + b * stride_vb + j * stride_vs + g * stride_vh + d).to(tl.float32)
    r = tl.arange(0, BQ * HB)
    dk = tl.zeros([HEAD_DIM], tl.float32)
    dv = tl.zeros([HEAD_DIM], tl.float32)
    for hc in range(N_HC):
        hl = hc * HB + r % HB
        h = g * group + hl
        head_ok = hl < group
        for e0 in range(lo, hi, BQ):
            e = e0 + r // HB
            ok = (e < hi) & head_ok
            t = tl.load(TLIST + e, mask=e < hi, other=0)
            q = tl.load(Q + b * stride_qb + t[:, None] * stride_qs + h[:, None] * stride_qh + d[None, :],
                        mask=ok[:, None], other=0.0).to(tl.float32)
            do = tl.load(DO + b * stride_dob + t[:, None] * stride_dos + h[:, None] * stride_doh + d[None, :],
                         mask=ok[:, None], other=0.0).to(tl.float32)
            lse2 = tl.load(LSE + (b * hq + h) * seqlen + t, mask=ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + (b * hq + h) * seqlen + t, mask=ok, other=0.0)
            qk = tl.sum(q * kj[None, :], 1) * qk_scale
            p = tl.where(ok, tl.math.exp2(qk - lse2), 0.0)
            dp = tl.sum(do * vj[None, :], 1)
            ds = p * (dp - delta)
            dv += tl.sum(p[:, None] * do, 0)
            dk += tl.sum(ds[:, None] * q, 0)
    off = ((b * seqlen + j) * hkv + g) * HEAD_DIM + d
    tl.store(DKA + off, dk * sm_scale)
    tl.store(DVA + off, dv)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

def _group_tiling(group: int, max_hb: int) -> Tuple[int, int]:
    """``(HB, N_HC)``: heads stacked per program (>= 16 for tl.dot) and head chunks per group."""
    hb = min(max(16, triton.next_power_of_2(group)), max_hb)
    return hb, triton.cdiv(group, hb)


def _flags(dtype: torch.dtype):
    return _tw._flags(dtype)


def topk_attention_fwd(q, k, v, idx, row_len, sink_logits=None, prev=None, softmax_scale=None,
                       config: Optional[TopkTileConfig] = None):
    """``out [b, s, hq, d]`` (q's dtype), ``lse [b, hq, s]`` fp32 over the prepared list ``idx``,
    optionally continuing a previous partial result ``prev = (out_w, lse_w)`` (then ``sink_logits``
    must already be inside it)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    _tw.check_launch(s, hq, d)
    cfg = config or default_config(q.dtype, _tw.interpreted())
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q, k, v = (_tw._last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty((b, s, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    has_prev = prev is not None
    has_sink = sink_logits is not None and not has_prev
    sink = sink_logits.detach().float().contiguous() if has_sink else lse
    if has_prev:
        po, plse = _tw._last_dim_contiguous(prev[0]), prev[1].contiguous()
    else:
        po, plse = out, lse  # dummy pointers, never read
    hb, n_hc = _group_tiling(group, cfg.max_hb)
    upcast, prec = _flags(q.dtype)
    _topk_fwd_kernel[(s, n_hc, b * hkv)](
        q, k, v, idx, row_len, sink, po, plse, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        po.stride(0), po.stride(1), po.stride(2),
        s, hq, hkv, group, idx.shape[-1], scale * LOG2E,
        HEAD_DIM=d, BLOCK_N=cfg.fwd_block_n, HB=hb, HAS_SINK=has_sink, HAS_PREV=has_prev,
        UPCAST=upcast, DOT_PREC=prec, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    return out, lse


def transpose_index_list(idx: torch.Tensor, seqlen: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tlist int32, start int64 [b * hkv * s + 1])``: for key ``j`` of (b, g), the queries that
    list it are ``tlist[start[c]:start[c + 1]]`` in increasing order, ``c = (b * hkv + g) * s + j``.
    A stable sort by key of the (query-major) list, so the order is reproducible."""
    b, s, hkv, L = idx.shape
    n_codes = b * hkv * s
    bg = (torch.arange(b, device=idx.device).view(b, 1, 1, 1) * hkv
          + torch.arange(hkv, device=idx.device).view(1, 1, hkv, 1))
    code = torch.where(idx >= 0, bg * s + idx.long(), torch.full_like(idx, n_codes, dtype=torch.long))
    code = code.flatten()
    order = torch.sort(code, stable=True).indices
    tpos = torch.arange(s, device=idx.device, dtype=torch.int32).view(1, s, 1, 1).expand(b, s, hkv, L)
    tlist = tpos.flatten()[order].contiguous()
    counts = torch.bincount(code, minlength=n_codes + 1)[:n_codes]
    start = torch.zeros(n_codes + 1, dtype=torch.long, device=idx.device)
    start[1:] = torch.cumsum(counts, 0)
    return tlist, start


def topk_attention_bwd(do, q, k, v, out, lse, idx, row_len, softmax_scale=None,
                       deterministic: bool = False, config: Optional[TopkTileConfig] = None):
    """``(dq, dk, dv, delta)`` of the top-k part, all fp32 (``delta [b, hq, s]``); ``out`` and
    ``lse`` are the FINAL ones (window part included) so the two backwards add up."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    cfg = config or default_config(q.dtype, _tw.interpreted())
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q, k, v, out, do = (_tw._last_dim_contiguous(t) for t in (q, k, v, out, do))
    upcast, prec = _flags(q.dtype)
    dev = q.device

    delta = torch.empty((b, hq, s), dtype=torch.float32, device=dev)
    block_s = 16 if _tw.interpreted() else 64
    _tw._bwd_delta_kernel[(triton.cdiv(s, block_s), b * hq)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), s, hq, HEAD_DIM=d, BLOCK_S=block_s)

    dq = torch.empty((b, s, hq, d), dtype=torch.float32, device=dev)
    dk = torch.zeros((b, s, hkv, d), dtype=torch.float32, device=dev)
    dv = torch.zeros((b, s, hkv, d), dtype=torch.float32, device=dev)
    hb, n_hc = _group_tiling(group, cfg.max_hb)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _topk_bwd_kernel[(s, n_hc, b * hkv)](
        q, k, v, do, lse, delta, idx, row_len, dq, dk, dv, *common,
        s, hq, hkv, group, idx.shape[-1], scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_N=cfg.bwd_block_n, HB=hb, ATOMIC=not deterministic,
        ATOMIC_SEM=cfg.atomic_sem, UPCAST=upcast,
        DOT_PREC=prec, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    if deterministic:
        tlist, start = transpose_index_list(idx, s)
        _topk_dkdv_det_kernel[(s, b * hkv)](
            q, k, v, do, lse, delta, tlist, start, dk, dv, *common,
            s, hq, hkv, group, scale * LOG2E, scale,
            HEAD_DIM=d, BQ=cfg.det_block_q, HB=hb, N_HC=n_hc, num_warps=cfg.det_warps)
    return dq, dk, dv, delta


# --------------------------------------------------------------------------------------------------
# autograd: window/sink kernel + top-k kernel, merged through the lse
# --------------------------------------------------------------------------------------------------

class SparseTopkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_logits, topk_indices, window_size, num_sink_tokens, softmax_scale,
                deterministic, config, window_config):
        s = q.shape[1]
        idx, row_len = prepare_topk_indices(topk_indices, s, window_size, num_sink_tokens)
        if window_size is not None:
            prev = _tw.window_attention_fwd(q, k, v, sink_logits, window_size, num_sink_tokens,
                                            softmax_scale, window_config)
            out, lse = topk_attention_fwd(q, k, v, idx, row_len, None, prev, softmax_scale, config)
        else:
            out, lse = topk_attention_fwd(q, k, v, idx, row_len, sink_logits, None, softmax_scale, config)
        ctx.save_for_backward(q, k, v, out, lse, idx, row_len, sink_logits)
        ctx.args = (window_size, num_sink_tokens, softmax_scale, deterministic, config, window_config)
        ctx.has_sink = sink_logits is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, idx, row_len, sink_logits = ctx.saved_tensors
        window_size, num_sink_tokens, softmax_scale, deterministic, config, window_config = ctx.args
        sink = sink_logits if ctx.has_sink else None
        dq, dk, dv, delta = topk_attention_bwd(dout, q, k, v, out, lse, idx, row_len, softmax_scale,
                                               deterministic, config)
        dsink = None
        if window_size is not None:
            dq_w, dk_w, dv_w, dsink = _tw.window_attention_bwd(
                dout, q, k, v, out, lse, sink, window_size, num_sink_tokens, softmax_scale, window_config)
            dq += dq_w
            dk += dk_w
            dv += dv_w
        elif sink is not None:
            # d sink_h = -sum_t exp(sink_h - lse_t) * delta_t  (the sink's softmax weight)
            p0 = torch.exp(sink.detach().float().view(1, -1, 1) - lse)
            dsink = (-(p0 * delta).sum(dim=(0, 2))).to(sink.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink,
                None, None, None, None, None, None, None)


def sparse_topk_attention(q, k, v, topk_indices, sink_logits=None, window_size=None, num_sink_tokens=0,
                          softmax_scale=None, deterministic: Optional[bool] = None,
                          config: Optional[TopkTileConfig] = None, window_config=None) -> torch.Tensor:
    """Differentiable Triton top-k (+ window + sinks + sink logit) attention, causal.

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return SparseTopkAttention.apply(q, k, v, sink_logits, topk_indices, window_size, num_sink_tokens,
                                     softmax_scale, bool(deterministic), config, window_config)
