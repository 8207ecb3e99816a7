"""Triton split-KV decode attention (flash-decoding): one query token per sequence, many query heads
per KV head, keys in two parts, values optionally the keys themselves.

The op (spec: :func:`decode_attention_reference`)::

    score[b, h, j] = scale * (q[b, h] . k[b, g, j]  +  q_rope[b, h] . k_rope[b, g, j])   g = h // (hq/hkv)
    out[b, h]      = sum_j softmax_j(score[b, h, :] restricted to allowed j  (+ sink_logits[h])) v[b, g, j]

``v=None`` means the values are the keys' first part ``k`` (MLA-style absorbed decode: keys =
``[latent | k_rope]``, values = ``latent``), read from HBM once for both products. Key ``j`` sits at
position ``key_positions[j]`` (default ``j``; ``-1`` = empty slot) and is allowed iff
``0 <= pos <= query_position`` and (no window, or ``query_position - pos < window_size``, or
``pos < num_sink_tokens``). ``sink_logits [hq]``: a learnable per-head logit in the denominator with
a zero value vector (not scaled).

Tiling. Program ``(b, kv head, head chunk, split)`` stacks the query heads of one KV head as the
``M`` rows of ``tl.dot`` (``BLOCK_M = next_pow2(group)`` >= 16, padded rows masked), so each
``[BLOCK_N, d]`` key tile is loaded once for all of them, and walks its split's keys with an online
softmax (fp32 state, exp2 domain). The key is two tiles (``k`` of width ``D1``, ``k_rope`` of width
``D2``), each padded to a power of two >= 16 with masks, so head dims like 512 + 64 (MLA) or
128 + 64 (GQLA's GQA path) need no copy or concatenation; the rope key may be shared by all KV
heads (stride 0). Each split writes its normalised partial output (fp32) and log2-sum-exp; a small
combine kernel merges the splits (and the sink logit) by their LSE.

Roofline it aims at (H100, bf16): a decode step reads every cached key once and does
``2 * group * (D1 + D2 + Dv)`` FLOPs per key for the group, i.e. ``group * (D1 + D2 + Dv) /
(D1 + D2 + Dv_read)`` FLOP/byte: ~1-60 FLOP/B here, far below the ~295 FLOP/B ridge, so the target
is HBM bandwidth. The split count fills the resident program slots once (a batch of 64 sequences x
1 KV head is only 64 programs), and the partials are ~1-3% of the cache bytes.

Numerics: fp32 softmax state and accumulators; fp32 inputs use IEEE dot products. Under
``TRITON_INTERPRET=1`` bf16 operands are upcast before ``tl.dot`` (the interpreter's bf16 dot is
wrong) and small tiles keep the CPU tests fast. No backward: decode runs under ``no_grad``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_ext import backends

LOG2E = 1.4426950408889634
_SPLIT_GRANULE = 256  # split lengths are multiples of this, hence of every BLOCK_N below
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 1024


def _fail(field: str, value, why: str, allowed: str) -> None:
    raise ValueError(f"{field}={value!r}: {why}; use {allowed}")


# --------------------------------------------------------------------------------------------------
# reference (the spec)
# --------------------------------------------------------------------------------------------------

def allowed_keys(L: int, key_positions: Optional[torch.Tensor], query_position: int,
                 window_size: Optional[int], num_sink_tokens: int, device) -> torch.Tensor:
    """Bool ``[L]``: which keys the query at ``query_position`` attends."""
    pos = torch.arange(L, device=device) if key_positions is None else key_positions.to(device).long()
    ok = (pos >= 0) & (pos <= query_position)
    if window_size is not None:
        ok &= (query_position - pos < window_size) | (pos < num_sink_tokens)
    return ok


def decode_attention_reference(q, k, v=None, *, q_rope=None, k_rope=None, key_positions=None,
                               query_position=None, window_size=None, num_sink_tokens=0,
                               sink_logits=None, softmax_scale=None) -> torch.Tensor:
    """Torch spec of :func:`decode_attention` (same arguments); math in fp32 (fp64 for fp64)."""
    b, hq, d1 = q.shape
    hkv, L = k.shape[1], k.shape[2]
    d2 = 0 if q_rope is None else q_rope.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d1 + d2)
    qpos = L - 1 if query_position is None else query_position
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(cdt).view(b, hkv, hq // hkv, d1)
    scores = torch.einsum("bgmd,bgnd->bgmn", qg, k.to(cdt))
    if q_rope is not None:
        qr = q_rope.to(cdt).view(b, hkv, hq // hkv, d2)
        scores = scores + torch.einsum("bgmd,bgnd->bgmn", qr, k_rope.to(cdt).expand(b, hkv, L, d2))
    scores = scores * scale
    ok = allowed_keys(L, key_positions, qpos, window_size, num_sink_tokens, q.device)
    scores = scores.masked_fill(~ok, float("-inf"))
    if sink_logits is not None:
        sink = sink_logits.to(cdt).view(1, hkv, hq // hkv, 1).expand(b, -1, -1, -1)
        scores = torch.cat([scores, sink], dim=-1)
    p = torch.softmax(scores, dim=-1)[..., :L]
    vals = k if v is None else v
    out = torch.einsum("bgmn,bgnd->bgmd", p, vals.to(cdt))
    return out.reshape(b, hq, vals.shape[-1]).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _split_kernel(
        Q1, Q2, K1, K2, V, KPOS, OP, LSEP,
        s_q1b, s_q1h, s_q2b, s_q2h,
        s_k1b, s_k1h, s_k1n, s_k2b, s_k2h, s_k2n, s_vb, s_vh, s_vn,
        hkv, group, n_hc, L, split_len, n_splits, d1, d2, dv,
        qpos, window, n_sink, scale_log2,
        D1P: tl.constexpr, D2P: tl.constexpr, DVP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_K2: tl.constexpr, V_IS_K1: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    hc = pid % n_hc
    kh = (pid // n_hc) % hkv
    bi = (pid // (n_hc * hkv)).to(tl.int64)  # int64: a cache of several GiB overflows int32 offsets
    kh64 = kh.to(tl.int64)

    rows = hc * BLOCK_M + tl.arange(0, BLOCK_M)        # head index inside the group
    m_ok = rows < group
    heads = kh * group + rows
    o1 = tl.arange(0, D1P)
    q1 = tl.load(Q1 + bi * s_q1b + heads[:, None] * s_q1h + o1[None, :],
                 mask=m_ok[:, None] & (o1[None, :] < d1), other=0.0)
    if UPCAST:
        q1 = q1.to(tl.float32)
    k1_base = K1 + bi * s_k1b + kh64 * s_k1h
    if HAS_K2:
        o2 = tl.arange(0, D2P)
        q2 = tl.load(Q2 + bi * s_q2b + heads[:, None] * s_q2h + o2[None, :],
                     mask=m_ok[:, None] & (o2[None, :] < d2), other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
        k2_base = K2 + bi * s_k2b + kh64 * s_k2h
    if not V_IS_K1:
        ov = tl.arange(0, DVP)
        v_base = V + bi * s_vb + kh64 * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)
    start = sid * split_len
    end = tl.minimum(start + split_len, L)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k1 = tl.load(k1_base + offs_n[:, None] * s_k1n + o1[None, :],
                     mask=n_ok[:, None] & (o1[None, :] < d1), other=0.0)
        if UPCAST:
            k1 = k1.to(tl.float32)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        if HAS_K2:
            k2 = tl.load(k2_base + offs_n[:, None] * s_k2n + o2[None, :],
                         mask=n_ok[:, None] & (o2[None, :] < d2), other=0.0)
            if UPCAST:
                k2 = k2.to(tl.float32)
            s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PREC)
        if HAS_KPOS:
            kp = tl.load(KPOS + offs_n, mask=n_ok, other=-1)
            ok = n_ok & (kp >= 0) & (kp <= qpos)
        else:
            kp = offs_n
            ok = n_ok & (offs_n <= qpos)
        if HAS_WINDOW:
            ok = ok & ((qpos - kp < window) | (kp < n_sink))
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row so far stays 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_K1:
            vt = k1
        else:
            vt = tl.load(v_base + offs_n[:, None] * s_vn + ov[None, :],
                         mask=n_ok[:, None] & (ov[None, :] < dv), other=0.0)
            if UPCAST:
                vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # partials are [b * hq, n_splits, DVP] fp32 and [b * hq, n_splits]
    row = bi * (hkv * group) + heads
    od = tl.arange(0, DVP)
    tl.store(OP + (row[:, None] * n_splits + sid) * DVP + od[None, :], out, mask=m_ok[:, None])
    tl.store(LSEP + row * n_splits + sid, lse, mask=m_ok)


@triton.jit
def _combine_kernel(OP, LSEP, SINK, OUT, s_ob, s_oh, hq, n_splits, dv,
                    SP: tl.constexpr, DVP: tl.constexpr, HAS_SINK: tl.constexpr):
    row = tl.program_id(0)
    b = row // hq
    h = row % hq
    offs_s = tl.arange(0, SP)
    s_ok = offs_s < n_splits
    lse = tl.load(LSEP + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    if HAS_SINK:
        sink = tl.load(SINK + h).to(tl.float32) * 1.4426950408889634
        mx = tl.maximum(mx, sink)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    denom = tl.sum(w, 0)
    if HAS_SINK:
        denom += tl.exp2(sink - mx)
    od = tl.arange(0, DVP)
    part = tl.load(OP + (row * n_splits + offs_s[:, None]) * DVP + od[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(OUT + b.to(tl.int64) * s_ob + h * s_oh + od, out.to(OUT.dtype.element_ty), mask=od < dv)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

def interpreted() -> bool:
    """True when these kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return backends.built_for_interpreter(_split_kernel)


def unusable_reason(q: torch.Tensor, *, auto: bool = False, head_dims=()) -> Optional[str]:
    """None if :func:`decode_attention` can run on ``q``'s device and dtype, else why not.

    ``auto=True`` (a backend="auto" probe) accepts only CUDA: the CPU interpreter is a test lane,
    taken only when the Triton backend is requested by name."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.dtype not in _DTYPES:
        return f"dtype={q.dtype}: the decode kernel takes float16, bfloat16 or float32"
    for d in head_dims:
        if d > MAX_HEAD_DIM:
            return f"head_dim={d}: the decode kernel holds a key tile of at most {MAX_HEAD_DIM} columns"
    if q.device.type == "cuda":
        return None
    if q.device.type != "cpu":
        return f"device={q.device.type!r}: the decode kernel runs on CUDA (or the CPU interpreter)"
    if auto:
        return "CPU tensors: the Triton interpreter is taken only with backend='triton'"
    if not backends.triton_interpret_env():
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton CPU interpreter)"
    if not interpreted():
        return ("CPU tensors: the decode kernel was built for the GPU because TRITON_INTERPRET=1 was "
                "set only after triton_decode was imported")
    return None


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d)) if d else 16


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _smem_bytes(block_n: int, width: int, esize: int, stages: int) -> int:
    return block_n * width * esize * stages


def default_num_splits(programs: int, L: int, device: torch.device, smem_per_program: int = 0) -> int:
    """Splits per (sequence, KV head, head chunk): as many as fill the resident program slots ONCE
    (SMs x programs per SM, by shared memory), never a second, partial wave; each split at least
    ``_SPLIT_GRANULE`` keys. Measured on the H100 (docs/gqla.md): absorb at b=64 runs 1 program
    per SM (221 KB of K tiles), so 2 splits (128 programs) beat 5 (2.68 vs 2.37 TB/s at 8k); the
    GQA tile (41 KB) fits ~4 per SM, so b=64 x G=4 takes 2 splits and G=8 one."""
    per_sm = max(1, min(4, (220 * 1024) // max(smem_per_program, 1)))
    want = (_num_sms(device) * per_sm) // max(programs, 1)
    return max(1, min(want, triton.cdiv(L, _SPLIT_GRANULE)))


def _tile_config(d1p: int, d2p: int, dvp: int, block_m: int, dtype: torch.dtype, v_is_k1: bool):
    """``(BLOCK_N, num_warps, num_stages)``, picked from the H100 sweep of
    ``scripts/tune_triton_decode.py``: 4 warps win everywhere (8 warps lose 30-50%: fewer loads
    in flight per byte of tile); the wide latent tile (576 bf16 columns, values shared) wants 64
    keys x 3 stages (221 KB of shared memory, one program per SM), the GQA tile 32 keys x 2 stages."""
    if interpreted():
        return 16, 1, 1
    width = d1p + d2p + (0 if v_is_k1 else dvp)
    esize = 4 if dtype == torch.float32 else 2
    for block_n, stages in ((64, 3), (32, 3), (32, 2), (16, 2)) if width * esize >= 1024 else ((32, 2), (16, 2)):
        if _smem_bytes(block_n, width, esize, stages) <= 224 * 1024:
            return block_n, 4, stages
    return 16, 4, 1


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None, *,
                     q_rope: Optional[torch.Tensor] = None, k_rope: Optional[torch.Tensor] = None,
                     key_positions: Optional[torch.Tensor] = None, query_position: Optional[int] = None,
                     window_size: Optional[int] = None, num_sink_tokens: int = 0,
                     sink_logits: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                     num_splits: Optional[int] = None, config=None) -> torch.Tensor:
    """Split-KV decode attention -> ``[b, hq, dv]`` in q's dtype.

    ``q [b, hq, d1]``, ``k [b, hkv, L, d1]``, ``v [b, hkv, L, dv]`` or None (values = ``k``);
    ``q_rope [b, hq, d2]`` with ``k_rope [b, hkv or 1, L, d2]`` (the second key part; one shared by
    all KV heads when its dim 1 is 1). Any strides with a contiguous last dim. ``key_positions [L]``
    int (``-1`` = empty slot), ``query_position`` (default ``L - 1``), ``window_size`` /
    ``num_sink_tokens`` / ``sink_logits [hq]`` / ``softmax_scale`` (default ``1/sqrt(d1 + d2)``) as
    in the module docstring. ``num_splits``: key splits per program (default: fill the SMs);
    ``config``: ``(BLOCK_N, num_warps, num_stages)`` override for tuning.
    """
    if q.dim() != 3 or k.dim() != 4:
        _fail("q.shape/k.shape", (tuple(q.shape), tuple(k.shape)), "one query token per sequence",
              "q [b, hq, d], k [b, hkv, L, d]")
    b, hq, d1 = q.shape
    hkv, L = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d1 or hq % hkv or L < 1:
        _fail("k.shape", tuple(k.shape), f"does not fit q.shape={tuple(q.shape)}",
              f"[{b}, a divisor of {hq}, L >= 1, {d1}]")
    if v is not None and (v.dim() != 4 or tuple(v.shape[:3]) != (b, hkv, L)):
        _fail("v.shape", tuple(v.shape), "does not fit k", f"[{b}, {hkv}, {L}, dv] or None (values = k)")
    if (q_rope is None) != (k_rope is None):
        _fail("q_rope/k_rope", (q_rope is None, k_rope is None), "the second key part needs both", "both or neither")
    d2 = 0
    if q_rope is not None:
        d2 = q_rope.shape[-1]
        if tuple(q_rope.shape) != (b, hq, d2) or k_rope.dim() != 4 or k_rope.shape[0] != b \
                or k_rope.shape[1] not in (1, hkv) or tuple(k_rope.shape[2:]) != (L, d2):
            _fail("q_rope.shape/k_rope.shape", (tuple(q_rope.shape), tuple(k_rope.shape)), "do not fit q, k",
                  f"q_rope [{b}, {hq}, d2], k_rope [{b}, 1 or {hkv}, {L}, d2]")
    for name, t in (("k", k), ("v", v), ("q_rope", q_rope), ("k_rope", k_rope)):
        if t is not None and t.dtype != q.dtype:
            _fail(f"{name}.dtype", t.dtype, f"differs from q.dtype={q.dtype}", "one dtype for q, k, v")
    dv = d1 if v is None else v.shape[-1]
    why = unusable_reason(q, head_dims=(d1, d2, dv))
    if why is not None:
        raise ValueError(f"backend='triton' for decode_attention: {why}; use the torch reference")
    qpos = L - 1 if query_position is None else int(query_position)
    if window_size is not None and (isinstance(window_size, bool) or int(window_size) < 1):
        _fail("window_size", window_size, "the window counts the query itself", "an int >= 1 or None")
    if key_positions is not None and tuple(key_positions.shape) != (L,):
        _fail("key_positions.shape", tuple(key_positions.shape), "one position per key", f"[{L}]")
    if sink_logits is not None and tuple(sink_logits.shape) != (hq,):
        _fail("sink_logits.shape", tuple(sink_logits.shape), "one logit per query head", f"[{hq}]")

    last = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    q, k, v, q_rope, k_rope = (last(t) for t in (q, k, v, q_rope, k_rope))
    group = hq // hkv
    d1p, d2p = _pad(d1), _pad(d2)
    dvp = d1p if v is None else _pad(dv)
    cap = 64 if max(d1p, dvp) <= 256 else 32  # the [BLOCK_M, DVP] fp32 accumulator lives in registers
    block_m = min(max(16, triton.next_power_of_2(group)), cap)
    n_hc = triton.cdiv(group, block_m)
    programs = b * hkv * n_hc
    block_n, warps, stages = config or _tile_config(d1p, d2p, dvp, block_m, q.dtype, v is None)
    width = d1p + d2p + (0 if v is None else dvp)
    esize = q.element_size()
    splits = num_splits or default_num_splits(programs, L, q.device, _smem_bytes(block_n, width, esize, stages))
    split_len = triton.cdiv(triton.cdiv(L, splits), _SPLIT_GRANULE) * _SPLIT_GRANULE
    splits = triton.cdiv(L, split_len)
    if _SPLIT_GRANULE % block_n:
        _fail("config", config, f"BLOCK_N must divide the split granule {_SPLIT_GRANULE}", "a power of two <= 256")
    upcast = interpreted() and q.dtype == torch.bfloat16
    prec = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"  # "tf32" is a no-op for 16-bit

    dev = q.device
    part = torch.empty((b * hq, splits, dvp), dtype=torch.float32, device=dev)
    lse = torch.empty((b * hq, splits), dtype=torch.float32, device=dev)
    out = torch.empty((b, hq, dv), dtype=q.dtype, device=dev)
    kpos = key_positions.to(device=dev, dtype=torch.int32).contiguous() if key_positions is not None else lse
    q2, k2 = (q_rope, k_rope) if d2 else (q, k)  # dummies when there is no second part
    k2h = 0 if (d2 and k_rope.shape[1] == 1) else k2.stride(1)
    vv = k if v is None else v
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d1 + d2)
    _split_kernel[(programs, splits)](
        q, q2, k, k2, vv, kpos, part, lse,
        q.stride(0), q.stride(1), q2.stride(0), q2.stride(1),
        k.stride(0), k.stride(1), k.stride(2), k2.stride(0), k2h, k2.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2),
        hkv, group, n_hc, L, split_len, splits, d1, d2, dv,
        qpos, int(window_size or 0), int(num_sink_tokens), scale * LOG2E,
        D1P=d1p, D2P=d2p, DVP=dvp, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_K2=d2 > 0, V_IS_K1=v is None, HAS_KPOS=key_positions is not None,
        HAS_WINDOW=window_size is not None, UPCAST=upcast, DOT_PREC=prec,
        num_warps=warps, num_stages=stages)
    has_sink = sink_logits is not None
    sink = sink_logits.detach().to(device=dev, dtype=torch.float32).contiguous() if has_sink else lse
    _combine_kernel[(b * hq,)](
        part, lse, sink, out, out.stride(0), out.stride(1), hq, splits, dv,
        SP=max(2, triton.next_power_of_2(splits)), DVP=dvp, HAS_SINK=has_sink,
        num_warps=1 if interpreted() else 4)
    return out
