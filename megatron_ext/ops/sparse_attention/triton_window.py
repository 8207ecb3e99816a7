"""Triton kernels: causal sliding-window + token-sink + learnable-sink-logit attention, fwd and bwd.

The pattern (see :mod:`.reference`): query ``t`` attends key ``j`` iff ``j <= t`` and
(``t - j < W`` or ``j < num_sink``); a per-head sink logit joins every softmax denominator with a
zero value vector. Layout ``q [b, s, hq, d]``, ``k, v [b, s, hkv, d]`` (any strides, last dim
contiguous), ``lse, delta [b, hq, s]`` fp32 (natural log; ``lse`` includes the sink logit).

Tiling (FlashAttention-2 style online softmax with a stored log-sum-exp):

* **GQA/MQA stacking.** One program owns ``BT`` consecutive query tokens for ``HB`` query heads of
  ONE kv group, stacked along the tile's M dimension: tile row ``r`` is token ``t0 + r // HB``,
  head ``hc * HB + r % HB`` (heads fastest, which is also memory order in ``[b, s, hq, d]``, so a
  q tile is ``BT`` contiguous runs of ``HB * d`` elements). ``BLOCK_M = BT * HB``; ``HB`` is the
  group size rounded up to a power of two (padded head rows are masked), capped at ``BLOCK_M``
  (then the group is split over ``N_HC`` head chunks). Every K/V tile is loaded once per group and
  feeds all its query heads; in the dk/dv kernel the sum over the group's heads happens inside the
  tile product ``dS^T @ Q`` -- no atomics, no per-head dk/dv buffer.
* **Block skipping.** For query rows ``[t0, t0 + BT)`` only key blocks overlapping the causal band
  ``[t0 - W + 1, t0 + BT)`` and the sink blocks ``[0, num_sink)`` are visited, so the work is
  ``O(S * (W + num_sink))``, not ``O(S^2)``. The band is split into three ranges: a masked lower
  edge (window boundary), an unmasked interior, and a masked diagonal (causal boundary); sink-only
  blocks below the band are masked. Masks are ``j <= t & (t - j < W | j < num_sink)``.
* **Backward** (deterministic by default, no atomics): a dq kernel walks key blocks like the
  forward and, on its way, computes ``delta = rowsum(dO * O)`` of its rows (one extra O tile per
  program) and stores it for the dk/dv kernel, which runs after it; the dk/dv kernel's
  program is one (key block, query chunk) pair: it walks the chunk's query blocks that can see the
  key block (its causal-window band ``[n0, n0 + BN - 1 + W)`` cut to the chunk; for sink key blocks,
  every query of the chunk). Why chunks: in MQA, Q and dO are ``group`` times larger than K/V (128 MB
  at S=16384, hq=16, d=128), and a program that walked its whole band streamed them from HBM ~W/BN
  times; with the key-block slot as the fastest grid axis, the programs resident together read the
  same few chunks, which stay in L2. It also gives ``S/BN * S/chunk`` programs where the band walk
  had ``S/BN`` (32 programs for 132 SMs at a plain causal 4k). Each program writes its fp32
  partial into an uninitialised buffer; a reduce kernel reads only the slots that were written,
  sums them in a fixed order and writes dk/dv in the input dtype (``TileConfig.dkdv_atomic`` adds
  them with atomics instead; ``fused_dq`` computes dq in this kernel with atomics,
  FlashAttention-2 style -- both measured, neither faster enough to give up determinism, see
  docs/sparse_attention.md).
  ``d sink_h = -sum_t exp(sink_h - lse_t) * delta_t`` is an O(b * hq * s) torch reduction.

Roofline it aims at (H100 SXM, bf16): a forward program does ``4 * d * BLOCK_M * (W + BT)``
FLOPs and reads ``2 * d * (W + BT) * 2`` bytes of K/V, i.e. ~``BLOCK_M`` FLOP/byte from memory
hierarchy -- below the HBM ridge (~295 FLOP/byte), so it relies on L2: programs are launched with the
token-block index fastest, so neighbouring programs share almost the same K/V band (``2 * W * d * 2``
bytes = 2 MiB at W=4096, d=128, well inside the 50 MB L2). With K/V served from L2 the kernel is
tensor-core bound like FlashAttention-2: the target is FA2-class utilisation of the attended pairs
(~50-60 % of dense bf16 peak forward, lower backward), i.e. time proportional to ``S * W``.

Numerics: fp32 accumulation and softmax state for every input dtype; fp32 inputs use IEEE fp32
dot products (not TF32). Under ``TRITON_INTERPRET=1`` bf16 operands are upcast to fp32 before
``tl.dot`` (the interpreter's bf16 dot is wrong); on the GPU they go to the tensor cores as bf16.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...backends import built_for_interpreter, fallback
from .._tma import sm90_or_later, tensor_desc

LOG2E = 1.4426950408889634

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes. ``*_block_m`` counts tile ROWS (tokens x stacked heads), ``*_block_n`` keys.

    ``dkdv_chunk``: query tokens per dk/dv program (None: picked per shape by :func:`_dkdv_chunk`).
    ``dkdv_atomic``: dk/dv partials of the query chunks are added with fp32 atomics instead of being
    written apart and summed in a fixed order (less memory traffic; run-to-run bits may differ).
    ``fused_dq``: the dk/dv kernel also adds ``dS @ K`` into an fp32 dq with atomics
    (FlashAttention-2 style) and the separate dq kernel is skipped (not deterministic either).
    ``heavy_first``: forward and dq programs run in reverse token order, so the light programs of
    the first ``W`` tokens (fewer keys) come last and fill the final wave.
    ``tma``: the Q/dO/O row tiles, the K/V tiles of the key walks and (dk/dv, where their rows
    allow) the rows' lse and delta are loaded through TMA tensor descriptors (sm_90+; no address
    registers, zero fill past the ends); where a descriptor cannot be made (older GPU, misaligned
    view) the kernels load through pointers as without it.
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    dq_block_m: int = 128
    dq_block_n: int = 32
    dq_warps: int = 4
    dq_stages: int = 3
    dkdv_block_m: int = 32
    dkdv_block_n: int = 128
    dkdv_warps: int = 8
    dkdv_stages: int = 3
    dkdv_chunk: Optional[int] = None
    dkdv_atomic: bool = False
    fused_dq: bool = False
    heavy_first: bool = False
    tma: bool = False

    @property
    def deterministic(self) -> bool:
        return not (self.dkdv_atomic or self.fused_dq)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if f.name == "dkdv_chunk":
                if val is not None and (not isinstance(val, int) or val < 1):
                    raise ValueError(f"dkdv_chunk={val!r}: query tokens per dk/dv program; use an int >= 1 "
                                     f"or None")
                continue
            if f.name in ("dkdv_atomic", "fused_dq", "heavy_first", "tma"):
                if not isinstance(val, bool):
                    raise ValueError(f"{f.name}={val!r}: a switch; use True or False")
                continue
            if f.name.endswith(("_block_m", "_block_n")):
                if not isinstance(val, int) or val < 16 or val & (val - 1):
                    raise ValueError(f"{f.name}={val!r}: tile sizes are powers of two >= 16 (tl.dot "
                                     f"minimum); use 16, 32, 64 or 128")


# Per head-dim tiles for H100 (16-bit inputs): (block_m, block_n, warps, stages) for fwd, dq, dk/dv.
# Starting points from FA2 / the Triton fused-attention tutorial, then picked so that sm_90a ptxas
# reports no (or < 256 B of) register spills when compiled offline for MQA (group 16):
#   d=64:  fwd 255 regs / 0 B spill, dq 235 / 0, dkdv 235 / 0
#   d=128: fwd 201 / 0, dq 216 / 0, dkdv 255 / 208 B (BLOCK_N=128 spilled 1.9 KB)
#   d=256: fwd 255 / 12, dq 255 / 76, dkdv 238 / 0
# d=128 dk/dv re-picked from timed sweeps (scripts/tune_sparse_attention.py, H100, S=16384, MQA
# group 16, W=4096): 32x128 w8 s2 took the backward from 8.88 to 4.87 ms (fwd 1.11 ms unchanged);
# with the (key block x query chunk) dk/dv grid the backward was 4.40 ms at 32x128 and 3.87 ms at
# 64x128 w8 s2 (the larger M halves the loop trips; 64x64 w4 5.86, 16x128 5.81, 32x64 w4 4.06).
# Then fwd and dq timed too (same shape, dk/dv partials summed by the reduce kernel): fwd 64x64 w4
# s3 1.056 ms vs 1.084 at 128x64 w8 s3, reversed program order (heavy_first) 1.063; dq 128x64 w8 s3
# took the backward from 3.753 to 3.577 ms (128x32 w8 s3 before; 64x32 w4 s3 3.624, 128x64 w8 s2
# 3.646). Then TMA descriptor loads (``tma``; 2026-11-23, same shape): with them the smaller
# one-warpgroup tiles win, because two ~99 KB programs fit on an SM and overlap each other's
# softmax with their MMAs: per-kernel time dk/dv 2.281 -> 2.086 ms (64x64 w4 s2, was 64x128 w8
# s2), dq 1.149 -> 1.020 (64x64 w4 s3, now also computing delta), fwd 0.981 -> 0.951 (128x64 w8
# s3); fwd + bwd 4.451 -> 4.097 ms; with lse/delta also through TMA boxes in dk/dv, 3.69 ms (dk/dv
# 1.68). Table: docs/benchmarks.md. The other head dims are not timed
# yet (pointer loads, the older tiles).
H100_CONFIGS = {
    16: TileConfig(128, 64, 4, 3, 128, 32, 4, 3, 32, 128, 8, 3),
    32: TileConfig(128, 64, 4, 3, 128, 32, 4, 3, 32, 128, 8, 3),
    64: TileConfig(128, 64, 4, 3, 128, 32, 4, 3, 32, 128, 8, 3),
    128: TileConfig(128, 64, 8, 3, 64, 64, 4, 3, 64, 64, 4, 2, heavy_first=True, tma=True),
    256: TileConfig(64, 32, 8, 2, 64, 32, 8, 2, 32, 32, 8, 2),
}
# d=128 without TMA (GPUs before sm_90): the pointer-load tiles timed best before the TMA lane
# (with pointer loads the TMA tiles take 5.00 ms instead of 4.46 on the H100).
POINTER_CONFIGS = {128: TileConfig(64, 64, 4, 3, 128, 64, 8, 3, 64, 128, 8, 2, heavy_first=True)}
# The interpreter runs every tile op in numpy: small tiles keep the CPU tests fast.
INTERPRETER_CONFIG = TileConfig(16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1)


def default_config(head_dim: int, dtype: torch.dtype, interpret: bool,
                   device: Optional[torch.device] = None) -> TileConfig:
    """The tiles for a head dim and dtype; ``device``: a CUDA GPU before sm_90 (no TMA) gets the
    pointer-load tiles."""
    if interpret:
        return INTERPRETER_CONFIG
    cfg = H100_CONFIGS[head_dim]
    if cfg.tma and device is not None and device.type == "cuda" and not sm90_or_later(device):
        cfg = POINTER_CONFIGS.get(head_dim, dataclasses.replace(cfg, tma=False))
    if dtype == torch.float32:
        # 4-byte operands: halve the tiles to stay inside shared memory. fp32 is the exact
        # (IEEE-dot, no tensor cores) correctness path; it spills registers and is not tuned.
        cfg = dataclasses.replace(
            cfg, fwd_block_m=max(16, cfg.fwd_block_m // 2), fwd_block_n=max(16, cfg.fwd_block_n // 2),
            dq_block_m=max(16, cfg.dq_block_m // 2), dq_block_n=max(16, cfg.dq_block_n // 2),
            dkdv_block_m=max(16, cfg.dkdv_block_m // 2), dkdv_block_n=max(16, cfg.dkdv_block_n // 2),
            fwd_stages=2, dq_stages=2, dkdv_stages=2, tma=False)
    return cfg


# --------------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _allowed(t, n, window, num_sink):
    """``t [M, 1]`` or ``[1, M]`` query positions, ``n`` key positions broadcast against it.

    ``j < s`` needs no test: a real row has ``t < s`` and ``j <= t``; padded rows are never stored.
    """
    return (n <= t) & (((t - n) < window) | (n < num_sink))


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _load_kv(k_base, v_base, stride_ks, stride_vs, n, d, kv_ok):
    """K and V tiles ``[BLOCK_N, HEAD_DIM]`` of keys ``n`` (rows past the sequence read as 0)."""
    k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=kv_ok[:, None], other=0.0)
    v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=kv_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _kv_tile(k_base, v_base, KD, VD, b32, g, stride_ks, stride_vs, n0, seqlen,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """K and V tiles of keys ``[n0, n0 + BLOCK_N)`` of batch ``b32``, kv head ``g`` (zeros past the
    sequence): through the descriptors ``KD``/``VD`` (boxes ``[1, BLOCK_N, 1, d]``) if ``TMA``."""
    if TMA:
        k = KD.load([b32, n0, g, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = VD.load([b32, n0, g, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, stride_ks, stride_vs, n, tl.arange(0, HEAD_DIM), n < seqlen)
    return k, v


@triton.jit
def _row_tile(base, DESC, b32, t0, h0, t, hl, ok, stride_s, stride_h,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HB: tl.constexpr, TMA: tl.constexpr):
    """A stacked ``[BLOCK_M, d]`` row tile (row ``r``: token ``t0 + r // HB``, head ``h0 + r % HB``).
    Pointer path: ``base`` points at the batch's (and group's) first head, ``t``/``hl`` are the rows'
    tokens and heads relative to it, ``ok`` masks rows. ``TMA``: one ``[1, BT, HB, d]`` box of
    ``DESC`` at ``(b32, t0, h0)`` -- rows past the sequence or the heads read 0; rows of padded heads
    (``HB`` > group) read the next group's heads, which every kernel neutralises (lse = +inf, not
    stored)."""
    if TMA:
        x = DESC.load([b32, t0, h0, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        d = tl.arange(0, HEAD_DIM)
        x = tl.load(base + t[:, None] * stride_s + hl[:, None] * stride_h + d[None, :],
                    mask=ok[:, None], other=0.0)
    return x


@triton.jit
def _span(i: tl.constexpr, s0, e0, b1, b2, b3, b4):
    """Bounds of range ``i`` of a kernel's four block ranges, picked at compile time: range 0 is
    ``[s0, e0)``, ranges 1-3 are ``[b1, b2)``, ``[b2, b3)``, ``[b3, b4)``. Query tiles walk key
    blocks as (sinks, band head, whole blocks, band tail): ``_span(i, 0, sink_hi, lo, fl, fh, hi)``;
    key blocks walk query tiles as (band head, whole tiles, band tail, past the band):
    ``_span(i, lo, fl, fl, fh, hi, far_hi)``."""
    if i == 0:
        return s0, e0
    elif i == 1:
        return b1, b2
    elif i == 2:
        return b2, b3
    else:
        return b3, b4


@triton.jit
def _fwd_range(acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, g, stride_ks, stride_vs, t,
               blk_lo, blk_hi, seqlen, window, num_sink, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    for blk in range(blk_lo, blk_hi):
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(k_base, v_base, KD, VD, b32, g, stride_ks, stride_vs, blk * BLOCK_N, seqlen,
                        HEAD_DIM, BLOCK_N, TMA)
        qk = _dot(q, tl.trans(k), UPCAST, DOT_PREC) * qk_scale           # [M, N], log2 units
        if MASK:
            qk = tl.where(_allowed(t[:, None], n[None, :], window, num_sink), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:  # a row may have seen nothing yet: shift by 0 instead of -inf (no nan)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_block_ranges(t0, seqlen, window, num_sink, BT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block ranges for query rows ``[t0, t0 + BT)``: sink-only ``[0, sink_hi)``, then the band
    ``[lo, hi)`` split as masked ``[lo, fl)``, unmasked ``[fl, fh)``, masked ``[fh, hi)``."""
    lo = tl.maximum(t0 - window + 1, 0) // BLOCK_N
    hi = tl.cdiv(tl.minimum(t0 + BT, seqlen), BLOCK_N)
    sink_hi = tl.minimum(tl.cdiv(num_sink, BLOCK_N), lo)
    # unmasked iff every (row, key) pair is allowed: top row within the window of the block's
    # first key, block's last key <= first row.
    fl = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(t0 + BT - window, 0), BLOCK_N), lo), hi)
    fh = tl.minimum(tl.maximum((t0 + 1) // BLOCK_N, fl), hi)
    return sink_hi, lo, fl, fh, hi


@triton.jit
def _fwd_kernel(Q, K, V, SINK, O, LSE, QD, KD, VD,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                seqlen, hq, hkv, group, window, num_sink, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HB: tl.constexpr, HAS_SINK: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr, HEAVY_FIRST: tl.constexpr, TMA: tl.constexpr):
    BT: tl.constexpr = BLOCK_M // HB
    pid_t = tl.program_id(0)
    if HEAVY_FIRST:  # the first W tokens see fewer keys: run them last, to fill the last wave
        pid_t = tl.num_programs(0) - 1 - pid_t
    pid_hc = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b32 = pid_bg // hkv
    b = b32.to(tl.int64)
    g = pid_bg % hkv
    t0 = pid_t * BT
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // HB                      # query position of each tile row
    hl = pid_hc * HB + r % HB             # head inside the group
    h = g * group + hl                    # global query head
    row_ok = (t < seqlen) & (hl < group)
    d = tl.arange(0, HEAD_DIM)

    q = _row_tile(Q + b * stride_qb, QD, b32, t0, g * group + pid_hc * HB, t, h, row_ok, stride_qs,
                  stride_qh, HEAD_DIM, BLOCK_M, HB, TMA)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    if HAS_SINK:  # the sink is a first "key" with logit sink_h and a zero value: m = sink, l = 1
        m_i = tl.load(SINK + h, mask=hl < group, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    sink_hi, lo, fl, fh, hi = _key_block_ranges(t0, seqlen, window, num_sink, BT, BLOCK_N)
    for i in tl.static_range(4):   # sink blocks, band head, whole blocks (unmasked), band tail
        start, end = _span(i, 0, sink_hi, lo, fl, fh, hi)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, KD, VD, b32, g, stride_ks,
                                   stride_vs, t, start, end, seqlen, window, num_sink, qk_scale,
                                   HEAD_DIM, BLOCK_N, i != 2, UPCAST, DOT_PREC, TMA)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows can have l = 0; they are not stored
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + t[:, None] * stride_os + h[:, None] * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + (b * hq + h) * seqlen + t, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos,
                      stride_doh, seqlen, hq, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """``delta[b, h, t] = sum_d dO * O`` (fp32)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // hq).to(tl.int64)
    h = pid_bh % hq
    t = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = t < seqlen
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + t[:, None] * stride_os + d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + t[:, None] * stride_dos + d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen + t, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b32, g, stride_ks, stride_vs, t,
              blk_lo, blk_hi, seqlen, window, num_sink, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    for blk in range(blk_lo, blk_hi):
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(k_base, v_base, KD, VD, b32, g, stride_ks, stride_vs, blk * BLOCK_N, seqlen,
                        HEAD_DIM, BLOCK_N, TMA)
        qk = _dot(q, tl.trans(k), UPCAST, DOT_PREC) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASK:
            p = tl.where(_allowed(t[:, None], n[None, :], window, num_sink), p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, O, LSE, DELTA, DQ, QD, KD, VD, DOD, OD,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_ob, stride_os, stride_oh, stride_dqb, stride_dqs, stride_dqh,
                   seqlen, hq, hkv, group, window, num_sink, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HB: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                   HEAVY_FIRST: tl.constexpr, TMA: tl.constexpr):
    BT: tl.constexpr = BLOCK_M // HB
    pid_t = tl.program_id(0)
    if HEAVY_FIRST:
        pid_t = tl.num_programs(0) - 1 - pid_t
    pid_hc = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b32 = pid_bg // hkv
    b = b32.to(tl.int64)
    g = pid_bg % hkv
    t0 = pid_t * BT
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // HB
    hl = pid_hc * HB + r % HB
    h = g * group + hl
    row_ok = (t < seqlen) & (hl < group)
    d = tl.arange(0, HEAD_DIM)

    h0 = g * group + pid_hc * HB
    q = _row_tile(Q + b * stride_qb, QD, b32, t0, h0, t, h, row_ok, stride_qs, stride_qh,
                  HEAD_DIM, BLOCK_M, HB, TMA)
    do = _row_tile(DO + b * stride_dob, DOD, b32, t0, h0, t, h, row_ok, stride_dos, stride_doh,
                   HEAD_DIM, BLOCK_M, HB, TMA)
    # padded rows: lse = +inf makes p = 0 there
    lse2 = tl.load(LSE + (b * hq + h) * seqlen + t, mask=row_ok, other=float("inf")) * 1.4426950408889634
    # delta = rowsum(dO * O) of this program's rows, kept for the dk/dv kernel (runs after this one)
    o = _row_tile(O + b * stride_ob, OD, b32, t0, h0, t, h, row_ok, stride_os, stride_oh,
                  HEAD_DIM, BLOCK_M, HB, TMA)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * hq + h) * seqlen + t, delta, mask=row_ok)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    sink_hi, lo, fl, fh, hi = _key_block_ranges(t0, seqlen, window, num_sink, BT, BLOCK_N)
    for i in tl.static_range(4):   # the forward's four key ranges, whole blocks unmasked
        start, end = _span(i, 0, sink_hi, lo, fl, fh, hi)
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b32, g, stride_ks, stride_vs,
                       t, start, end, seqlen, window, num_sink, qk_scale, HEAD_DIM, BLOCK_N, i != 2,
                       UPCAST, DOT_PREC, TMA)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + t[:, None] * stride_dqs + h[:, None] * stride_dqh + d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, QD, DOD, LD, DD, b32, h_grp, lse_base, delta_base,
                dqa_base, stride_qs, stride_qh, stride_dos, stride_doh, stride_dqas, stride_dqah, n,
                hc, qb_lo, qb_hi, seqlen, group, window, num_sink, qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HB: tl.constexpr, MASK: tl.constexpr,
                FUSED_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr, TMA_LSE: tl.constexpr):
    """Accumulate one key block's dk/dv over query blocks ``[qb_lo, qb_hi)`` of head chunk ``hc``
    (tiles are transposed, ``[keys, rows]``, so no transpose of P or dS is needed). ``FUSED_DQ``:
    also add this key block's share of dq, ``dS @ K``, into the fp32 buffer at ``dqa_base``.
    ``TMA_LSE``: the rows' lse and delta come through the descriptors ``LD``/``DD``."""
    BT: tl.constexpr = BLOCK_M // HB
    r = tl.arange(0, BLOCK_M)
    hl = hc * HB + r % HB
    d = tl.arange(0, HEAD_DIM)
    for qb in range(qb_lo, qb_hi):
        t = qb * BT + r // HB
        ok = (t < seqlen) & (hl < group)
        q = _row_tile(q_base, QD, b32, qb * BT, h_grp + hc * HB, t, hl, ok, stride_qs, stride_qh,
                      HEAD_DIM, BLOCK_M, HB, TMA)
        do = _row_tile(do_base, DOD, b32, qb * BT, h_grp + hc * HB, t, hl, ok, stride_dos, stride_doh,
                       HEAD_DIM, BLOCK_M, HB, TMA)
        # lse and delta through TMA boxes where possible: pointer loads of them, once per trip,
        # stalled every trip (this kernel took 2.13 ms at S=16384 on an H100, 1.64 with them
        # replaced by constants)
        if TMA_LSE:
            lse = tl.where(ok, _row_vec(LD, b32, h_grp + hc * HB, qb * BT, HB, BT), float("inf"))
        else:
            lse = tl.load(lse_base + hl * seqlen + t, mask=ok, other=float("inf"))
        lse2 = lse * 1.4426950408889634
        qkT = _dot(k, tl.trans(q), UPCAST, DOT_PREC) * qk_scale          # [N, M]
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASK:
            pT = tl.where(_allowed(t[None, :], n[:, None], window, num_sink), pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, UPCAST, DOT_PREC)
        if TMA_LSE:
            delta = _row_vec(DD, b32, h_grp + hc * HB, qb * BT, HB, BT)
        else:
            delta = tl.load(delta_base + hl * seqlen + t, mask=ok, other=0.0)
        dpT = _dot(v, tl.trans(do), UPCAST, DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, UPCAST, DOT_PREC)
        if FUSED_DQ:  # FlashAttention-2 style: order of the fp32 adds varies run to run
            dq = _dot(tl.trans(dsT.to(k.dtype)), k, UPCAST, DOT_PREC) * sm_scale
            tl.atomic_add(dqa_base + t[:, None] * stride_dqas + hl[:, None] * stride_dqah + d[None, :],
                          dq, mask=ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _row_vec(DESC, b32, h0, t0, HB: tl.constexpr, BT: tl.constexpr):
    """The ``[HB * BT]`` per-row values (lse, delta) of a stacked row tile (row ``r``: token
    ``t0 + r // HB``, head ``h0 + r % HB``) from one ``[1, HB, BT]`` box of a ``[b, hq, s]``
    descriptor at ``(b32, h0, t0)``; boxes past the heads or the sequence read 0."""
    x = DESC.load([b32, h0, t0]).reshape(HB, BT)
    return tl.trans(x).reshape(HB * BT)


@triton.jit
def _query_band(n0, seqlen, window, BT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that can see key block ``[n0, n0 + BLOCK_N)`` through the causal window:
    ``[lo, hi)`` split as masked ``[lo, fl)``, unmasked ``[fl, fh)``, masked ``[fh, hi)``."""
    lo = n0 // BT
    hi = tl.cdiv(tl.minimum(n0 + BLOCK_N - 1 + window, seqlen), BT)
    fl = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1, BT), lo), hi)
    fh = tl.minimum(tl.maximum((n0 + window) // BT, fl), hi)
    return lo, fl, fh, hi


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DKP, DVP, DKS, DVS, DQA, QD, DOD, LD, DD,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                     stride_dqab, stride_dqas, stride_dqah,
                     seqlen, hq, hkv, group, window, num_sink, qk_scale, sm_scale,
                     n_sink_blk, sink_rows, s_pad, chunk_blocks, n_bg,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HB: tl.constexpr, N_HC: tl.constexpr, ATOMIC: tl.constexpr,
                     FUSED_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                     TMA: tl.constexpr, TMA_LSE: tl.constexpr):
    """Program ``(slot, qc, bg)``: key block ``kb`` x query chunk ``qc`` (query blocks
    ``[qc * chunk_blocks, (qc + 1) * chunk_blocks)``). Slots ``[0, n_sink_blk)`` are the sink key
    blocks (every later query sees them); slot ``n_sink_blk + i`` is the ``i``-th non-sink key block
    whose causal window reaches the chunk. Slot is the fastest grid axis, so the programs resident
    at one time all stream the same few query chunks of Q/dO (MQA: Q and dO are ``group`` times
    larger than K/V and would not stay in L2 if every program walked its own band).

    Output (fp32). Deterministic: non-sink block ``kb`` writes its partial ``p = qc - first
    chunk of kb`` to ``DKP/DVP [P, n_bg, s_pad, d]``; sink blocks write ``DKS/DVS [n_qc, n_bg,
    sink_rows, d]`` at ``qc``; the host sums the partials in a fixed order. ``ATOMIC``: every program
    adds into ``DKP/DVP [n_bg, s_pad, d]``."""
    BT: tl.constexpr = BLOCK_M // HB
    slot = tl.program_id(0)
    qc = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b32 = pid_bg // hkv
    b = b32.to(tl.int64)
    g = pid_bg % hkv
    n_qb = tl.cdiv(seqlen, BT)
    c_lo = qc * chunk_blocks
    c_hi = tl.minimum(c_lo + chunk_blocks, n_qb)
    t_hi = tl.minimum(c_hi * BT, seqlen)          # queries of the chunk: [c_lo * BT, t_hi)
    is_sink = slot < n_sink_blk
    if is_sink:
        kb = slot
    else:
        kb_lo = tl.maximum(c_lo * BT - window + 1, 0) // BLOCK_N
        kb = tl.maximum(kb_lo, n_sink_blk) + (slot - n_sink_blk)
    n0 = kb * BLOCK_N
    if n0 < t_hi:  # else no query of the chunk is at or after this key block (or slot unused)
        d = tl.arange(0, HEAD_DIM)
        q_base = Q + b * stride_qb + (g * group) * stride_qh
        do_base = DO + b * stride_dob + (g * group) * stride_doh
        dqa_base = DQA + b * stride_dqab + (g * group) * stride_dqah
        lse_base = LSE + (b * hq + g * group) * seqlen
        delta_base = DELTA + (b * hq + g * group) * seqlen
        k_base = K + b * stride_kb + g * stride_kh
        v_base = V + b * stride_vb + g * stride_vh
        n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = n < seqlen
        k, v = _load_kv(k_base, v_base, stride_ks, stride_vs, n, d, kv_ok)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        lo, fl, fh, hi = _query_band(n0, seqlen, window, BT, BLOCK_N)
        # the band's three ranges cut to the chunk, then (sink blocks only) the queries past the band
        lo_c = tl.maximum(lo, c_lo)
        fl_c = tl.minimum(tl.maximum(fl, lo_c), c_hi)
        fh_c = tl.minimum(tl.maximum(fh, fl_c), c_hi)
        hi_c = tl.minimum(tl.maximum(hi, fh_c), c_hi)
        far_hi = tl.where(is_sink, c_hi, hi_c)
        lo_c = tl.minimum(lo_c, c_hi)
        for hc in range(N_HC):
            # band head, whole tiles (unmasked), band tail, then the sink blocks' far queries
            for i in tl.static_range(4):
                start, end = _span(i, lo_c, fl_c, fl_c, fh_c, hi_c, far_hi)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, QD, DOD, LD, DD, b32, g * group,
                                     lse_base, delta_base, dqa_base, stride_qs, stride_qh, stride_dos,
                                     stride_doh, stride_dqas, stride_dqah, n, hc, start, end, seqlen,
                                     group, window, num_sink, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, HB,
                                     i != 1, FUSED_DQ, UPCAST, DOT_PREC, TMA, TMA_LSE)
        dk = dk * sm_scale
        if ATOMIC:
            off = (pid_bg.to(tl.int64) * s_pad + n[:, None]) * HEAD_DIM + d[None, :]
            tl.atomic_add(DKP + off, dk, sem="relaxed")
            tl.atomic_add(DVP + off, dv, sem="relaxed")
        elif is_sink:
            off = ((qc.to(tl.int64) * n_bg + pid_bg) * sink_rows + n[:, None]) * HEAD_DIM + d[None, :]
            tl.store(DKS + off, dk)
            tl.store(DVS + off, dv)
        else:
            part = (qc - (n0 // BT) // chunk_blocks).to(tl.int64)
            off = ((part * n_bg + pid_bg) * s_pad + n[:, None]) * HEAD_DIM + d[None, :]
            tl.store(DKP + off, dk)
            tl.store(DVP + off, dv)


@triton.jit
def _bwd_dkdv_reduce_kernel(DKP, DVP, DKS, DVS, DK, DV,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            seqlen, hkv, window, s_pad, n_bg, n_part, n_qc, chunk_tok, n_sink_blk,
                            sink_rows, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_R: tl.constexpr, ATOMIC: tl.constexpr):
    """dk/dv rows ``[r0, r0 + BLOCK_R)`` of one (batch, kv group): the fp32 partials of the dk/dv
    kernel summed in a fixed order (partial 0, 1, ...), cast and written to ``[b, s, hkv, d]``.

    Only the partials some program wrote are read (so the host allocates them uninitialised): key
    block ``kb``'s partial ``p`` is query chunk ``qc = kb * BLOCK_N // chunk_tok + p``, which has a
    program iff ``qc < n_qc`` and its first key block ``max(qc * chunk_tok - W + 1, 0) // BLOCK_N``
    is at most ``kb`` (the same rule the dk/dv grid uses). A sink key block has one partial per
    chunk from its own onwards. ``ATOMIC``: one buffer ``[n_bg, s_pad, d]`` holds the sum already."""
    pid_r = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // hkv).to(tl.int64)
    g = pid_bg % hkv
    r0 = pid_r * BLOCK_R
    n = r0 + tl.arange(0, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    kb = r0 // BLOCK_N
    first = (kb * BLOCK_N) // chunk_tok
    dk = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    if ATOMIC:
        off = (pid_bg.to(tl.int64) * s_pad + n[:, None]) * HEAD_DIM + d[None, :]
        dk = tl.load(DKP + off)
        dv = tl.load(DVP + off)
    elif kb < n_sink_blk:
        for qc in range(first, n_qc):
            off = ((qc * n_bg + pid_bg.to(tl.int64)) * sink_rows + n[:, None]) * HEAD_DIM + d[None, :]
            dk += tl.load(DKS + off)
            dv += tl.load(DVS + off)
    else:
        for p in range(0, n_part):
            qc = first + p + tl.zeros([BLOCK_R, 1], tl.int32)  # a tile: the interpreter's mask
            ok = (qc < n_qc) & (tl.maximum(qc * chunk_tok - window + 1, 0) // BLOCK_N <= kb)
            off = ((p * n_bg + pid_bg.to(tl.int64)) * s_pad + n[:, None]) * HEAD_DIM + d[None, :]
            dk += tl.load(DKP + off, mask=ok, other=0.0)
            dv += tl.load(DVP + off, mask=ok, other=0.0)
    row_ok = (n < seqlen)[:, None]
    tl.store(DK + b * stride_kb + g * stride_kh + n[:, None] * stride_ks + d[None, :],
             dk.to(DK.dtype.element_ty), mask=row_ok)
    tl.store(DV + b * stride_vb + g * stride_vh + n[:, None] * stride_vs + d[None, :],
             dv.to(DV.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

def interpreted() -> bool:
    """True when these kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return built_for_interpreter(_fwd_kernel)


def _group_tiling(group: int, block_m: int) -> Tuple[int, int, int]:
    """``(HB, BT, N_HC)``: heads stacked per tile, tokens per tile, head chunks per group."""
    hb = min(triton.next_power_of_2(group), block_m)
    return hb, block_m // hb, triton.cdiv(group, hb)


def _flags(dtype: torch.dtype):
    upcast = interpreted() and dtype == torch.bfloat16
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"  # "tf32" is a no-op for 16-bit
    return upcast, prec


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


TMA_OP = "sparse_attention window kernels"


def _descs(cfg: TileConfig, *pairs):
    """``(use_tma, descriptors)`` for ``(tensor, box)`` pairs: TMA only if the config asks for it and
    every tensor can take a descriptor (a tensor that cannot is recorded as a fallback to pointer
    loads); otherwise the tensors themselves stand in (unused)."""
    if cfg.tma:
        descs = [tensor_desc(t, box, interpreted(), op=TMA_OP) for t, box in pairs]
        if all(x is not None for x in descs):
            return True, descs
    return False, [t for t, _ in pairs]


def _row_vec_descs(cfg: TileConfig, tma: bool, hb: int, bt: int, *vecs):
    """``(use_tma, descriptors)`` for per-row fp32 ``[b, hq, s]`` tensors (lse, delta) read as
    ``[1, hb, bt]`` boxes: only with the TMA lane, ``bt`` a multiple of 4 (TMA rows are >= 16 bytes)
    and ``s % 4 == 0`` (16-byte strides); otherwise pointer loads."""
    if tma and bt % 4 == 0:
        return _descs(cfg, *[(x, [1, hb, bt]) for x in vecs])
    if tma:
        fallback(TMA_OP, "tma loads", "pointer loads",
                 f"lse/delta boxes of {bt} tokens (a multiple of 4 is needed)")
    return False, list(vecs)


def check_launch(s: int, hq: int, d: int) -> None:
    """What every attention kernel of this package needs of ``q [b, s, hq, d]``: a tiled head dim
    and int32-safe per-batch offsets."""
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={d!r}: no Triton tile for it; use one of {list(SUPPORTED_HEAD_DIMS)}")
    if s * hq * d >= 2 ** 31:
        raise ValueError(f"s*hq*d={s * hq * d}: per-batch offsets are int32 in these kernels; "
                         f"use s * hq * head_dim < 2**31 (split the batch or the sequence)")


def _pattern(s: int, window_size: Optional[int], num_sink_tokens: int) -> Tuple[int, int]:
    """Window clamped to ``s`` (``None`` = dense causal), sinks clamped to ``s``."""
    w = s if window_size is None else min(int(window_size), s)
    return max(w, 1), min(int(num_sink_tokens), s)


def window_attention_fwd(q, k, v, sink_logits, window_size, num_sink_tokens, softmax_scale,
                         config: Optional[TileConfig] = None):
    """``out [b, s, hq, d]`` (q's dtype), ``lse [b, hq, s]`` fp32 (natural log, sink included)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    check_launch(s, hq, d)
    cfg = config or default_config(d, q.dtype, interpreted(), q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    w, ns = _pattern(s, window_size, num_sink_tokens)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty((b, s, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    has_sink = sink_logits is not None
    sink = sink_logits.detach().float().contiguous() if has_sink else lse  # dummy pointer if absent
    hb, bt, n_hc = _group_tiling(group, cfg.fwd_block_m)
    upcast, prec = _flags(q.dtype)
    bn = cfg.fwd_block_n
    tma, descs = _descs(cfg, (q, [1, bt, hb, d]), (k, [1, bn, 1, d]), (v, [1, bn, 1, d]))
    grid = (triton.cdiv(s, bt), n_hc, b * hkv)
    _fwd_kernel[grid](
        q, k, v, sink, out, lse, *descs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        s, hq, hkv, group, w, ns, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, HB=hb, HAS_SINK=has_sink,
        UPCAST=upcast, DOT_PREC=prec, HEAVY_FIRST=cfg.heavy_first, TMA=tma, num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages)
    return out, lse


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dkdv_programs(s: int, w: int, n_sink_blk: int, bn: int, chunk: int) -> int:
    """Non-empty (key block, query chunk) programs of the dk/dv grid for one (batch, kv group)."""
    total = 0
    for t0 in range(0, s, chunk):
        t1 = min(t0 + chunk, s)
        kb_lo = max(max(t0 - w + 1, 0) // bn, n_sink_blk)
        total += max(triton.cdiv(t1, bn) - kb_lo, 0) + min(n_sink_blk, triton.cdiv(t1, bn))
    return total


def _dkdv_chunk(s: int, w: int, n_sink_blk: int, bn: int, bt: int, n_bg: int, n_sm: int) -> int:
    """Query tokens per dk/dv program: 1024 (a chunk's Q/dO rows stay in L2 while the ~(W + chunk) /
    BLOCK_N key blocks that need them run), halved while there are fewer than ~2 programs per SM
    (short sequences: a plain causal 4k has only S / BLOCK_N key blocks)."""
    chunk = 1024
    while chunk > max(256, 2 * bt) and n_bg * _dkdv_programs(s, w, n_sink_blk, bn, chunk) < 2 * n_sm:
        chunk //= 2
    return chunk


def window_attention_bwd(do, q, k, v, out, lse, sink_logits, window_size, num_sink_tokens,
                         softmax_scale, config: Optional[TileConfig] = None):
    """``(dq, dk, dv, dsink)``; deterministic (no atomics) unless the config asks for atomics.
    ``dsink`` is None without a sink."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    cfg = config or default_config(d, q.dtype, interpreted(), q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    w, ns = _pattern(s, window_size, num_sink_tokens)
    q, k, v, out, do = (_last_dim_contiguous(t) for t in (q, k, v, out, do))
    upcast, prec = _flags(q.dtype)
    dev = q.device
    n_bg = b * hkv

    delta = torch.empty((b, hq, s), dtype=torch.float32, device=dev)
    if cfg.fused_dq:  # no dq kernel to compute delta = rowsum(dO * O) on its way
        block_s = 16 if interpreted() else 64
        _bwd_delta_kernel[(triton.cdiv(s, block_s), b * hq)](
            out, do, delta, out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2), s, hq, HEAD_DIM=d, BLOCK_S=block_s)
        dqa = torch.zeros((b, s, hq, d), dtype=torch.float32, device=dev)
    else:
        dqa = delta  # dummy pointer, never written
        dq = torch.empty((b, s, hq, d), dtype=q.dtype, device=dev)
        hb, bt, n_hc = _group_tiling(group, cfg.dq_block_m)
        bn = cfg.dq_block_n
        tma, descs = _descs(cfg, (q, [1, bt, hb, d]), (k, [1, bn, 1, d]), (v, [1, bn, 1, d]),
                            (do, [1, bt, hb, d]), (out, [1, bt, hb, d]))
        _bwd_dq_kernel[(triton.cdiv(s, bt), n_hc, n_bg)](
            q, k, v, do, out, lse, delta, dq, *descs,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            out.stride(0), out.stride(1), out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            s, hq, hkv, group, w, ns, scale * LOG2E, scale,
            HEAD_DIM=d, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, HB=hb, UPCAST=upcast,
            DOT_PREC=prec, HEAVY_FIRST=cfg.heavy_first, TMA=tma, num_warps=cfg.dq_warps,
            num_stages=cfg.dq_stages)

    bn = cfg.dkdv_block_n
    hb, bt, n_hc = _group_tiling(group, cfg.dkdv_block_m)
    n_kb = triton.cdiv(s, bn)
    s_pad = n_kb * bn
    n_sink_blk = triton.cdiv(ns, bn) if w < s else 0  # w >= s: the band already covers every query
    chunk = cfg.dkdv_chunk or _dkdv_chunk(s, w, n_sink_blk, bn, bt, n_bg, _num_sms(dev))
    chunk_blocks = triton.cdiv(chunk, bt)
    n_qc = triton.cdiv(triton.cdiv(s, bt), chunk_blocks)
    chunk_tok = chunk_blocks * bt
    n_slots = n_sink_blk + triton.cdiv(chunk_tok + w - 1, bn) + 2
    sink_rows = n_sink_blk * bn
    f32 = dict(dtype=torch.float32, device=dev)
    if cfg.dkdv_atomic:
        n_part = 1
        dkp = torch.zeros((n_bg, s_pad, d), **f32)
        dvp = torch.zeros_like(dkp)
        dks = dvs = delta  # dummy pointers, never written
    else:
        # partial slots a key block's band can span: its query tokens [n0, n0 + bn - 1 + w).
        # Uninitialised: the reduce kernel reads only the slots that a program wrote.
        n_part = min(n_qc, triton.cdiv(bn + w + bt, chunk_tok) + 1)
        dkp = torch.empty((n_part, n_bg, s_pad, d), **f32)
        dvp = torch.empty_like(dkp)
        if n_sink_blk:
            dks = torch.empty((n_qc, n_bg, sink_rows, d), **f32)
            dvs = torch.empty_like(dks)
        else:
            dks = dvs = delta
    tma, descs = _descs(cfg, (q, [1, bt, hb, d]), (do, [1, bt, hb, d]))
    tma_lse, lse_descs = _row_vec_descs(cfg, tma, hb, bt, lse, delta)
    _bwd_dkdv_kernel[(n_slots, n_qc, n_bg)](
        q, k, v, do, lse, delta, dkp, dvp, dks, dvs, dqa, *descs, *lse_descs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dqa.stride(0) if cfg.fused_dq else 0, dqa.stride(1) if cfg.fused_dq else 0,
        dqa.stride(2) if cfg.fused_dq else 0,
        s, hq, hkv, group, w, ns, scale * LOG2E, scale,
        n_sink_blk, sink_rows, s_pad, chunk_blocks, n_bg,
        HEAD_DIM=d, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=bn, HB=hb, N_HC=n_hc, ATOMIC=cfg.dkdv_atomic,
        FUSED_DQ=cfg.fused_dq, UPCAST=upcast, DOT_PREC=prec, TMA=tma, TMA_LSE=tma_lse,
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages)
    dk = torch.empty((b, s, hkv, d), dtype=k.dtype, device=dev)
    dv = torch.empty((b, s, hkv, d), dtype=v.dtype, device=dev)
    block_r = min(bn, 32)
    _bwd_dkdv_reduce_kernel[(s_pad // block_r, n_bg)](
        dkp, dvp, dks, dvs, dk, dv, dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        s, hkv, w, s_pad, n_bg, n_part, n_qc, chunk_tok, n_sink_blk, sink_rows,
        HEAD_DIM=d, BLOCK_N=bn, BLOCK_R=block_r, ATOMIC=cfg.dkdv_atomic, num_warps=4)
    if cfg.fused_dq:
        dq = dqa.to(q.dtype)

    dsink = None
    if sink_logits is not None:
        # d sink_h = -sum_t exp(sink_h - lse_t) * delta_t  (p0 = the sink's softmax weight)
        p0 = torch.exp(sink_logits.detach().float().view(1, hq, 1) - lse)
        dsink = (-(p0 * delta).sum(dim=(0, 2))).to(sink_logits.dtype)
    return dq, dk, dv, dsink
