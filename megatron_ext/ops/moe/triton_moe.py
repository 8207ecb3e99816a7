"""Triton kernels for ``moe_ffn``: route -> sort -> grouped GEMM (fused gather) -> weighted combine.

Math (see :mod:`.reference`, Switch Transformer eq. 2 with Megatron's gated-linear-unit order):
``out[t] = sum_j p[t, j] * (act(x[t] @ W1[e_tj]) @ W2[e_tj])``, ``e_tj = indices[t, j]``; gated
activations split ``a = x @ W1[e]`` as ``[gate | up]`` and use ``h = act(gate) * up``.

Pipeline (no host synchronisation: every size the kernels need is read on the device):

1. **Routing metadata** (:func:`routing_metadata`, 3 + 1 small Triton launches): a stable
   counting sort of the ``N = T*k`` (token, choice) pairs by expert, so rows of one expert stay
   in token order: per-block expert histograms (one-hot sums), one program scanning them into
   ``bounds[e]`` (first sorted row of expert ``e``) and per-(block, expert) row offsets, and a
   scatter of each pair to offset + its rank among the block's pairs of the same expert
   (``order``, ``token``, ``prob`` written at the sorted row). A per-``BLOCK_M`` tile table
   ``[3, max_tiles]`` holds (expert, first row, end row) of every M tile; ``max_tiles =
   cdiv(N, BLOCK_M) + E`` is a static upper bound (each expert adds at most one partial tile),
   and the number of real tiles lives in a device scalar that the persistent kernels read as
   their loop bound. (The torch version, sort + searchsorted + ~20 small ops, took 0.66 ms at
   T=8192, E=64, k=6 on an H100, mostly launch overhead.)
2. **GEMM 1** (``_up_kernel``, persistent over (M tile, N tile) work items of all experts): the A
   tile is GATHERED from ``x`` by the sorted rows' token ids (fused permute, no ``x_sorted``), or
   with ``TileConfig.pregather`` read through TMA from ``x_sorted`` (rows copied into sorted order
   once by ``_gather_rows_kernel`` and kept for dW1 in place of ``x``); for
   gated activations one program owns the gate columns ``[n0, n0+BN)`` AND the matching up columns
   ``[F+n0, F+n0+BN)`` (two accumulators), so the epilogue writes ``h = act(gate) * up`` directly.
   It also writes the pre-activation ``a`` (what backward needs); ``h`` is not kept for backward:
   backward recomputes it from ``a`` (same fp32 formula on the same rounded ``a``: bit-identical),
   which saves ``N*F`` elements of activation memory.
3. **GEMM 2** (``_down_kernel``): ``y = h @ W2[e]`` with ``p`` applied in the epilogue; each row is
   STORED at its pair position ``t*k + j`` (scatter of whole rows, no atomics), then
   ``_combine_kernel`` sums the ``k`` rows of each token in the fixed order ``j = 0..k-1`` in fp32
   (k = 1, e.g. the expert-parallel layer's received rows: the rows are the output, no combine).
4. **Backward**: ``g = dout[token] @ W2[e]^T`` is a plain grouped GEMM (``_down_kernel`` with a
   gathered A operand and unscattered rows: wide F tiles, W2 read K-major through TMA), written
   as ``g [N, F]`` rows; a memory-bound row pass (``_act_bwd_kernel``) recomputes ``h`` from
   ``a`` (same fp32 formula on the same rounded ``a``: bit-identical), writes
   ``da = act'(a) * p * g``, ``p * h`` (dW2's operand) and ``dprobs = rowsum(g * h)``
   (``dp = <dout, y> = <g, h>``, so ``y`` is never stored) straight to its pair slot.
   (``TileConfig.split_dh=False``: the older single ``_dh_kernel`` with that work in the GEMM
   epilogue, whose registers limit it to narrow F tiles.) ``_down_kernel`` again for ``dx`` rows
   (``da @ W1[e]^T``, scattered to pair order, combined over k). ``_wgrad_kernel``:
   ``dW1[e] = x_e^T @ da_e`` and ``dW2[e] = (p * h)_e^T @ dout_e``, one program per output tile
   looping over the expert's jagged rows in order (gathering ``x``/``dout`` rows by token on the
   fly): no atomics, no split-K. On CUDA bf16 sm >= 90 the H100 tiles instead gather ``x`` and
   ``dout`` rows once and run torch's grouped GEMM (CUTLASS, jagged K, fixed order) for both
   (``TileConfig.wgrad_grouped_mm``: 25 % faster than the kernel at the benchmark shape); the
   kernel is the fallback and the backend record says which ran.

Determinism: no atomics anywhere; every reduction has a fixed order. A token's output row (and its
``dx`` row) depends only on its own ``x``, ``probs``, ``indices`` and the weights: GEMM rows are
independent of their neighbours in an M tile, the tile shapes do not depend on ``T``, and the
combine sums the k rows in choice order. So results are bitwise identical across runs and across
batch compositions (the same token in another batch gives the same bits). Weight gradients are
bitwise identical across runs (they depend on the batch by definition).

Roofline (H100 SXM, bf16, T=8192, H=2048, F=1408, E=64, k=6): expert math 2.55 TFLOP fwd+bwd
(6 GEMMs of ``2*N*H*F'`` FLOPs, see ``bench/benchmarks/moe.py``) = 3.3 ms at ~770 TFLOP/s. The
GEMMs are compute bound (per expert ~768 rows x 2048 x 2816: ~600 FLOP/byte of HBM traffic with
weights read once per M-tile wave); the memory-bound rest (a/h/y rows, ~3 GB fwd+bwd) is about
1 ms at 3 TB/s, part of which overlaps the GEMMs. Work items are ordered M-tile-major, so the
programs running at once cover a few M tiles of one expert: the gathered A rows and the expert's
weight panel are served from L2.

Numerics: fp32 accumulation for every input dtype; fp32 inputs use IEEE fp32 dots. Under
``TRITON_INTERPRET=1`` bf16 operands are upcast before ``tl.dot`` (the interpreter's bf16 dot is
wrong); on the GPU they go to the tensor cores as bf16.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...backends import built_for_interpreter, fallback
from .._tma import tensor_desc

Tensor = torch.Tensor

# activation codes of the kernels; gated ones apply the code to the gate half
ACT_CODES = {"swiglu": (True, 0), "geglu": (True, 1), "silu": (False, 0), "gelu": (False, 1),
             "relu": (False, 2), "squared_relu": (False, 3)}


@dataclasses.dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    # persistent kernels: resident programs per SM (0 = TileConfig.programs_per_sm); 2 lets one
    # program's memory-bound epilogue overlap the other's main loop when registers and shared
    # memory allow two
    programs_per_sm: int = 0
    # weight (non-gathered) operand through a TMA tensor descriptor (sm >= 90; the launcher falls
    # back to pointer loads where the layout or the device does not allow it)
    tma: bool = False
    # persistent GEMMs: fuse the tile loop and the K loop into one software-pipelined loop
    # (``tl.range(flatten=True)``), so loads run ahead across output-tile boundaries
    flatten: bool = False
    # row (A) operand through a TMA descriptor where its rows are contiguous sorted rows (down:
    # h; dx: da; up and d(h) when TileConfig.pregather gives them sorted x / dout rows); a
    # gathered A operand always takes pointer loads
    a_tma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v!r}: tile sizes are powers of two >= 16 (tl.dot "
                                 f"minimum); use 16, 32, 64, 128 or 256")
        if not isinstance(self.programs_per_sm, int) or not 0 <= self.programs_per_sm <= 8:
            raise ValueError(f"programs_per_sm={self.programs_per_sm!r}: resident programs per "
                             f"SM; use 0 (the TileConfig's) or 1..8")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles per kernel. ``up``: x -> a, h (gated: ``block_n`` gate AND ``block_n`` up columns);
    ``down``: h -> y rows; ``dh``: dout -> g (split) or da (+ dprobs partials, fused);
    ``dx``: da -> dx rows;
    ``wgrad``: dW1 and dW2 (``block_k`` = rows per step of the jagged reduction);
    ``wgrad_accum``: the same kernel adding into a gradient buffer (None: the ``wgrad`` tile)."""

    up: GemmTile
    down: GemmTile
    dh: GemmTile
    dx: GemmTile
    wgrad: GemmTile
    wgrad_accum: Optional[GemmTile] = None
    combine_t: int = 16
    combine_h: int = 256
    # row gather of the pregather lane (rows x cols per program step)
    gather_r: int = 16
    gather_c: int = 512
    programs_per_sm: int = 1
    # backward d(h): True = plain grouped GEMM (``dh`` tile, wide along F) writing g rows, then a
    # memory-bound row pass (act_rows x act_cols tiles) for the activation backward and dprobs;
    # False = one kernel with that work in the GEMM epilogue (narrow F tiles: the epilogue's
    # registers limit BLOCK_N)
    split_dh: bool = True
    act_rows: int = 32
    act_cols: int = 128
    act_warps: int = 4
    # weight gradients through torch's grouped GEMM (CUTLASS; CUDA, bf16, sm >= 90) on rows
    # gathered once, instead of ``_wgrad_kernel``; where it cannot run, the kernel runs and the
    # backend record says why
    wgrad_grouped_mm: bool = False
    # gather x (forward) and dout (backward) rows into sorted order once (``gather_rows``), so
    # the up and d(h) GEMMs read contiguous rows (through TMA with ``a_tma``) and the weight
    # gradients reuse them; costs one ``[T*k, H]`` buffer (x's is saved for backward, as
    # Megatron's permute-based dispatchers keep their permuted tokens)
    pregather: bool = False

    def __post_init__(self):
        for name in ("act_rows", "act_cols", "gather_r", "gather_c"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v!r}: row-pass tile sizes are powers of two; use "
                                 f"16, 32, 64, 128 or 256")
        if self.act_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"act_warps={self.act_warps!r}: warps of the row pass; use 1, 2, "
                             f"4, 8 or 16")

    @property
    def row_tiles(self) -> Tuple[int, ...]:
        return tuple(sorted({self.up.block_m, self.down.block_m, self.dh.block_m,
                             self.dx.block_m}))


# H100 (16-bit inputs), picked by scripts/tune_moe.py at T=8192, H=2048, F=1408, E=64, top-6
# (one kernel varied at a time, do_bench medians; TFLOP/s of that kernel's GEMM; tile = BMxBN kBK
# warps w, stages s, "tma" = weight operand through a TMA descriptor, "2/SM" = 2 programs per SM):
#   up    128x128(x2) k64 w8 s3: 467   +tma: 474   +tma s4: 479   128x64 2/SM tma: 441
#         pregathered x_sorted (gather 0.113 ms apart) + A through TMA: 1.173 -> 1.046 ms (picked;
#         the weight gradients then reuse x_sorted: dW1 + dW2 1.774 -> 1.624 ms); + s3 1.206,
#         + flatten 1.39-1.41 (incl. the gather); row-operand TMA elsewhere lost: down 0.494 ->
#         0.502-0.518, dx 0.915 -> 0.959-0.963, dh on dout_sorted 0.828 -> 0.931-0.945
#   gather (rows x cols) 16x512: 0.120 ms   8x1024: 0.123   32x256: 0.113   32x512: 0.119
#         64x128: 0.104   128x64: 0.105   64x64: 0.108   128x128: 0.100 (picked)   256x64: 0.112
#         (torch index_select: 0.131)
#   combine (tokens x cols) 16x256: 0.103 ms   8x512: 0.102   4x1024: 0.097   8x1024: 0.124
#         16x512: 0.091 (picked)   32x256: 0.091   64x128: 0.091   64x64: 0.111   128x128: 0.094
#   down  128x256 k64 w8 s3: 503   +tma: 536 (picked)   +tma s4: 522   128x128 2/SM tma: 498
#   dh    fused (one kernel, activation backward in the epilogue): 128x64 k64 w8 s4: 224
#         +tma: 230   128x64 s3 2/SM: 184 (tma 186)   128x128 tma s4: 220   64x128 w4 2/SM: 209
#         split (plain GEMM to g, then the row pass; ms of both, row pass 32x128 w4 0.35 ms):
#         128x256 k64 w8 s3 tma: 0.846 (picked; GEMM alone 526)   s4: 0.855   128x128 w8 s4
#         tma: 0.919   w4: 0.931   vs fused 128x64 tma 1.232 ms
#   act   (row pass rows x cols, warps) 32x128 w4: 0.348 ms, 2383 GB/s   16x256 w4: 0.361
#         32x256 w8: 0.365   64x64 w4: 0.394   16x128 w2: 0.350   8x256 w2: 0.358   16x64 w1:
#         0.391   16x64 w2: 0.322, 2582 GB/s (picked)   8x64 w1: 0.322   32x64 w4: 0.322
#         16x32 w1: 0.429
#   dx    128x256 k64 w8 s3: 504   +tma: 573   +tma s4: 580 (picked)   128x128 2/SM tma: 492
#   wgrad (dW1 + dW2) 128x128 k64 w8 s4: 364   +tma: 389   128x128 k32 w4 s4 tma: 398 (picked)
#         128x128 k128 s3 tma: 289   128x256 s3 tma: 378   64x128 w4 tma: 336
#         128x256 k32 w8 s4 tma: 274   256x128 k32 w8 s4 tma: 247
#         torch._grouped_mm (CUTLASS) after one row gather per operand: 1.616 ms vs 2.145 for
#         this kernel (picked: ``wgrad_grouped_mm``; the kernel stays the fallback). A persistent
#         variant of this kernel with every row step of a program's tiles in one flat loop (the
#         item switch and the store as branches in the loop) ran 106-243 TFLOP/s: the branch
#         with the bounds loads stops the software pipeline; not kept. On the pregather lane
#         (both operands in sorted rows) A now comes through TMA and B masked: 1.71-1.78 ms for
#         dW1 + dW2 with the picked tile (2026-11-24), still behind the grouped GEMM's 1.58.
#   wgrad_accum (the kernel adding into a gradient buffer, Megatron DDP's main_grad: the
#         buffer's read-modify-write in the epilogue; dW1 + dW2 ms with an fp32 / bf16 buffer,
#         2026-11-24): 128x128 k64 w4 s3 tma: 2.58-2.63 / 2.00 (picked)   k32 w4 s4: 2.65 / 2.00
#         k64 w4 s4: 3.05   k64 w8 s3: 3.21 / 2.02   k64 w8 s4: 2.97 / 2.50   k32 w8 s4: 3.46
#         128x256 k64 w8 s3: 3.04 / 2.05   256x128 k64 w8 s3: 2.87 / 2.09   64x128 k64 w4:
#         2.93-3.09 / 2.56   128x64 k64 w4 s3: 3.03; the old tile loaded before the K loop and
#         held across it: slower with every tile (2.92-3.72); consecutive programs cycling over
#         2 / 4 / 8 experts (to mix the programs' phases): 2.63 / 2.98 / 3.76 (L2 reuse lost); dW1
#         and dW2 on two streams: 2.58; the old tile prefetched into L2 before the K loop (PTX
#         prefetch.global.L2 per 128-byte line, 2026-11-25): 2.96 / 1.99-2.09 against 2.59-2.60 /
#         2.07-2.28 without, and 2.96-3.48 / 2.06-2.26 at k32 s4, w8, 128x256 and 256x128 (the
#         early requests cost more than they hid). The unfused way, the grouped GEMM's
#         bf16 dW (1.59) then the DDP hook's add (fp32 buffer 2.25, bf16 1.09): 3.65 / 2.54.
#   flatten (``tl.range(flatten=True)``: tile loop and K loop as one pipelined loop) on the
#         persistent GEMMs: down 0.543 -> 0.497 ms (s4), dx 0.997 -> 0.952 (s4), dh GEMM + row
#         pass 0.855 -> 0.837 (picked); up 1.107 -> 1.279 (not picked: its two accumulators)
# Triton's automatic warp specialization (``tl.range(warp_specialize=True)``, Triton 3.6, both
# operands through TMA): with 8 warps the loop is not specialized (up 1.152 vs 1.172 ms incl. the
# gather, down 0.527 vs 0.50: noise); with 4 warps up ran out of shared memory at s4 and every
# other variant (up, down, dx, dh at s3/s4, 128x128 and 128x256) hung in compile or run (75 s
# limit). Not kept.
# Two programs per SM lost everywhere (the persistent programs then share the SM's shared memory
# and registers without hiding the epilogue), so one program per SM. TMA helps most where the
# weight tile is K-major (dx: W1^T, +15 %) or the operand is the wgrad's contiguous side (+7 %).
# The split d(h) wins (1.23 -> 0.85 ms) because its plain GEMM runs 128x256 tiles like the other
# GEMMs (the fused epilogue's registers capped it at 64 columns, so the gathered dout panel was
# re-read 22 times); the row pass it adds runs near HBM bandwidth.
# Tile shapes never depend on T (batch invariance, see above).
H100_CONFIG = TileConfig(
    up=GemmTile(128, 128, 64, 8, 4, tma=True, a_tma=True),
    down=GemmTile(128, 256, 64, 8, 4, tma=True, flatten=True),
    dh=GemmTile(128, 256, 64, 8, 3, tma=True, flatten=True),
    dx=GemmTile(128, 256, 64, 8, 4, tma=True, flatten=True),
    wgrad=GemmTile(128, 128, 32, 4, 4, tma=True),
    wgrad_accum=GemmTile(128, 128, 64, 4, 3, tma=True),
    wgrad_grouped_mm=True,
    pregather=True,
    gather_r=128,
    gather_c=128,
    combine_t=16,
    combine_h=512,
    act_rows=16,
    act_cols=64,
    act_warps=2,
)
# 4-byte operands: half the tiles to stay in shared memory; fp32 is the exact correctness path.
FP32_CONFIG = TileConfig(
    up=GemmTile(64, 32, 32, 4, 2), down=GemmTile(64, 64, 32, 4, 2), dh=GemmTile(64, 64, 32, 4, 2),
    dx=GemmTile(64, 64, 32, 4, 2), wgrad=GemmTile(64, 64, 32, 4, 2),
)
# The interpreter runs every tile op in numpy: small tiles keep the CPU tests fast; 2 programs so
# the persistent loop runs several work items per program.
INTERPRETER_CONFIG = TileConfig(
    up=GemmTile(16, 16, 16, 1, 1), down=GemmTile(16, 16, 16, 1, 1), dh=GemmTile(16, 16, 16, 1, 1),
    dx=GemmTile(16, 16, 16, 1, 1), wgrad=GemmTile(16, 16, 16, 1, 1), combine_t=16, combine_h=16,
    act_rows=16, act_cols=16, act_warps=1, gather_r=16, gather_c=16,
)


def interpreted() -> bool:
    """True when these kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return built_for_interpreter(_up_kernel)


def default_config(dtype: torch.dtype) -> TileConfig:
    if interpreted():
        return INTERPRETER_CONFIG
    return FP32_CONFIG if dtype == torch.float32 else H100_CONFIG


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_grid(work_bound: int, device: torch.device, cfg: TileConfig,
                     tile: Optional[GemmTile] = None) -> Tuple[int]:
    if interpreted() or device.type != "cuda":
        return (max(1, min(work_bound, 2)),)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    per_sm = (tile.programs_per_sm if tile is not None else 0) or cfg.programs_per_sm
    return (max(1, min(work_bound, _num_sms(idx) * per_sm)),)


TMA_OP = "moe grouped GEMMs"


def _tma_desc(t: Tensor, rows: int, block: Tuple[int, int], want: bool):
    """2-D TMA descriptor over ``t`` viewed as ``[rows, t.shape[-1]]`` (experts stacked along the
    rows), or None where TMA cannot be used (not asked for, not contiguous, misaligned, or a GPU
    before sm_90); the kernels then load through pointers. Rows past an expert's end read the next
    expert's rows: the kernels use TMA only where those rows meet masked or zero values."""
    if not want:
        return None
    if not t.is_contiguous():
        fallback(TMA_OP, "tma loads", "pointer loads", f"strides {tuple(t.stride())} not contiguous")
        return None
    return tensor_desc(t.view(rows, t.shape[-1]), block, interpreted(), op=TMA_OP)


def _flags(dtype: torch.dtype) -> Tuple[bool, str]:
    upcast = interpreted() and dtype == torch.bfloat16
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"  # "tf32" is a no-op for 16-bit
    return upcast, prec


# --------------------------------------------------------------------------------------------------
# routing metadata (Triton counting sort on the device, no host sync)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Routing:
    """Sorted-row view of the (token, choice) pairs. ``order[r]`` = pair id ``t*k + j`` of sorted
    row ``r``; ``token[r] = order[r] // k``; ``prob[r]`` fp32; ``bounds [E+1]`` row offsets;
    ``tables[block_m] = (table [3, max_tiles] int32, n_tiles [1] int32, max_tiles)``."""

    num_tokens: int
    topk: int
    num_experts: int
    order: Tensor
    token: Tensor
    prob: Tensor
    bounds: Tensor
    tables: Dict[int, Tuple[Tensor, Tensor, int]]

    @property
    def rows(self) -> int:
        return self.order.numel()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _route_block(num_experts: int) -> Tuple[int, int]:
    """(pairs per program, padded expert count) of the histogram / scatter kernels: the one-hot
    ``[BLOCK, E_PAD]`` tile stays at 16K elements (registers of one program)."""
    e_pad = max(16, _pow2(num_experts))
    return max(16, 16384 // e_pad), e_pad


@triton.jit
def _route_hist_kernel(IDX, HIST, n, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """``HIST[b, e]`` = pairs of block ``b`` routed to expert ``e`` (ids outside ``[0, E_PAD)``
    match no column: they land in no expert)."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(IDX + i, mask=i < n, other=-1)
    ex = tl.arange(0, E_PAD)
    hit = (e[:, None] == ex[None, :]).to(tl.int32)
    tl.store(HIST + b * E_PAD + ex, tl.sum(hit, 0))


@triton.jit
def _route_scan_kernel(HIST, OFFS, BOUNDS, n_blocks, num_experts,
                       CHUNK: tl.constexpr, E_PAD: tl.constexpr, E_BND: tl.constexpr):
    """One program: ``BOUNDS[e]`` = first sorted row of expert ``e`` (``BOUNDS[E]`` = routed rows)
    and ``OFFS[b, e]`` = first sorted row of block ``b``'s pairs of expert ``e`` (blocks in pair
    order: the counting sort is stable)."""
    ex = tl.arange(0, E_PAD)
    cnt = tl.zeros([E_PAD], tl.int32)
    for b0 in range(0, n_blocks, CHUNK):
        rb = b0 + tl.arange(0, CHUNK)
        hb = tl.load(HIST + rb[:, None] * E_PAD + ex[None, :], mask=(rb < n_blocks)[:, None],
                     other=0)
        cnt += tl.sum(hb, 0)
    run = tl.cumsum(cnt, 0) - cnt
    # bounds need E + 1 slots (E_PAD may equal E) and a register vector cannot be widened, so
    # the histogram is summed once more at width E_BND > E: the exclusive scan at e = E is N
    eb = tl.arange(0, E_BND)
    cnt_b = tl.zeros([E_BND], tl.int32)
    for b0 in range(0, n_blocks, CHUNK):
        rb = b0 + tl.arange(0, CHUNK)
        hb = tl.load(HIST + rb[:, None] * E_PAD + eb[None, :],
                     mask=(rb < n_blocks)[:, None] & (eb < E_PAD)[None, :], other=0)
        cnt_b += tl.sum(hb, 0)
    tl.store(BOUNDS + eb, tl.cumsum(cnt_b, 0) - cnt_b, mask=eb <= num_experts)
    for b0 in range(0, n_blocks, CHUNK):
        rb = b0 + tl.arange(0, CHUNK)
        ok = (rb < n_blocks)[:, None]
        hb = tl.load(HIST + rb[:, None] * E_PAD + ex[None, :], mask=ok, other=0)
        tl.store(OFFS + rb[:, None] * E_PAD + ex[None, :],
                 tl.cumsum(hb, 0) - hb + run[None, :], mask=ok)
        run += tl.sum(hb, 0)


@triton.jit
def _route_scatter_kernel(IDX, PROBS, OFFS, ORDER, TOKEN, PROB, n, topk,
                          BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """Sorted row of pair ``i`` = its block's first row of its expert + the pairs of the same
    expert before it in the block (stable); writes ``order``, ``token``, ``prob`` there."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    e = tl.load(IDX + i, mask=ok, other=-1)
    ex = tl.arange(0, E_PAD)
    hit = (e[:, None] == ex[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hit, 0) * hit, 1) - 1
    base = tl.load(OFFS + b * E_PAD + ex)
    pos = tl.sum(hit * base[None, :], 1) + rank
    ok = ok & (rank >= 0)          # an id outside [0, E) has no row (undefined output)
    tl.store(ORDER + pos, i, mask=ok)
    tl.store(TOKEN + pos, i // topk, mask=ok)
    tl.store(PROB + pos, tl.load(PROBS + i, mask=ok, other=0.0).to(tl.float32), mask=ok)


@triton.jit
def _route_tiles_kernel(BOUNDS, TABLE, NTILES, num_experts, max_tiles,
                        BM: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """Tile table ``[3, max_tiles]`` = (expert, first row, end row) of every ``BM``-row tile,
    experts in order, ``CHUNK`` tiles per program (each program redoes the E-wide tile scan);
    ``NTILES`` = real tiles; padding tiles are ``(E-1, 0, 0)`` (empty)."""
    ex = tl.arange(0, E_PAD)
    valid = ex < num_experts
    lo = tl.load(BOUNDS + ex, mask=valid, other=0)
    hi = tl.load(BOUNDS + ex + 1, mask=valid, other=0)
    tiles = (hi - lo + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    tile_first = tile_end - tiles
    if tl.program_id(0) == 0:
        tl.store(NTILES, tl.sum(tiles, 0))
    t = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    # expert of tile t = experts whose tiles all end at or before t (tile_end is monotone)
    e = tl.sum(((tile_end[None, :] <= t[:, None]) & valid[None, :]).to(tl.int32), 1)
    real = e < num_experts
    sel = ex[None, :] == e[:, None]
    first = tl.sum(tl.where(sel, tile_first[None, :], 0), 1)
    row0 = tl.sum(tl.where(sel, lo[None, :], 0), 1) + (t - first) * BM
    row_end = tl.sum(tl.where(sel, hi[None, :], 0), 1)
    in_tab = t < max_tiles
    tl.store(TABLE + t, tl.minimum(e, num_experts - 1), mask=in_tab)
    tl.store(TABLE + max_tiles + t, tl.where(real, row0, 0), mask=in_tab)
    tl.store(TABLE + 2 * max_tiles + t, tl.where(real, row_end, 0), mask=in_tab)


def routing_metadata(indices: Tensor, probs: Tensor, num_experts: int,
                     row_tiles: Tuple[int, ...]) -> Routing:
    """Stable counting sort of the ``T*k`` pairs by expert + tile tables, in 3 + len(row_tiles)
    small launches (no host sync; fixed order: deterministic)."""
    T, k = indices.shape
    n = T * k
    dev = indices.device
    flat = indices.reshape(-1).contiguous()
    pflat = probs.reshape(-1).contiguous()
    block, e_pad = _route_block(num_experts)
    n_blocks = max(1, triton.cdiv(n, block))
    hist = torch.empty((n_blocks, e_pad), dtype=torch.int32, device=dev)
    offs = torch.empty_like(hist)
    bounds = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    order = torch.empty(n, dtype=torch.int32, device=dev)
    # zeros: rows past the routed ones (pairs with an id outside [0, E)) hold valid token ids
    # (0, or an id in [E, E_PAD)'s own token) for the row gathers of the pregather lane
    token = torch.zeros(n, dtype=torch.int32, device=dev)
    prob = torch.empty(n, dtype=torch.float32, device=dev)
    _route_hist_kernel[(n_blocks,)](flat, hist, n, BLOCK=block, E_PAD=e_pad)
    # [CHUNK, E_PAD] tiles of 4K elements in the scan and the tile table: 16K spilled registers
    # (the scan took 16 us)
    chunk = max(16, 4096 // e_pad)
    _route_scan_kernel[(1,)](hist, offs, bounds, n_blocks, num_experts, CHUNK=chunk, E_PAD=e_pad,
                             E_BND=_pow2(num_experts + 1))
    _route_scatter_kernel[(n_blocks,)](flat, pflat, offs, order, token, prob, n, k,
                                       BLOCK=block, E_PAD=e_pad)
    tables = {}
    for bm in row_tiles:
        max_tiles = triton.cdiv(n, bm) + num_experts
        table = torch.empty((3, max_tiles), dtype=torch.int32, device=dev)
        n_tiles = torch.empty(1, dtype=torch.int32, device=dev)
        _route_tiles_kernel[(triton.cdiv(max_tiles, chunk),)](
            bounds, table, n_tiles, num_experts, max_tiles, BM=bm, CHUNK=chunk, E_PAD=e_pad)
        tables[bm] = (table, n_tiles, max_tiles)
    return Routing(T, k, num_experts, order, token, prob, bounds, tables)


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """fp32 in/out: 0 silu, 1 gelu (exact erf form, Megatron's F.gelu), 2 relu, 3 squared relu."""
    if ACT == 0:
        return z * tl.sigmoid(z)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return tl.maximum(z, 0.0)
    else:
        r = tl.maximum(z, 0.0)
        return r * r


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        return tl.where(z > 0.0, 1.0, 0.0)
    else:
        return 2.0 * tl.maximum(z, 0.0)


@triton.jit
def _tile(TABLE, max_tiles, mt):
    e = tl.load(TABLE + mt)
    row0 = tl.load(TABLE + max_tiles + mt)
    row_end = tl.load(TABLE + 2 * max_tiles + mt)
    return e, row0, row_end


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _up_kernel(X, X_DESC, W1, W1_DESC, A, HOUT, TOKEN, TABLE, NTILES, max_tiles, n_hidden, ffn,
               stride_x, stride_we, stride_wk, stride_wn, stride_a, stride_h,
               GATED: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GATHER_A: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FLATTEN: tl.constexpr):
    """Persistent: work item ``w`` = (M tile ``w // n_tn``, F tile ``w % n_tn``). Writes
    ``a [N, (2)F]`` and ``h [N, F]`` (sorted row order). A rows are ``X[token[r]]`` (GATHER_A)
    or ``X[r]`` (X already in sorted order); ``A_TMA`` (sorted X only): ``[BM, BK]`` boxes of
    X, rows past the tile's expert read the next expert's rows (their outputs are not stored).
    ``B_TMA``: W1 tiles through the descriptor over ``W1 [E*H, N1]`` (needs EVEN_K so K tiles
    stay inside one expert; gate columns past F read up columns, which only feed masked output
    columns)."""
    n_tn = tl.cdiv(ffn, BLOCK_N)
    total = tl.load(NTILES) * n_tn
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    for w in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
        e, row0, row_end = _tile(TABLE, max_tiles, w // n_tn)
        rows = row0 + rm
        row_ok = rows < row_end
        if GATHER_A:
            tok = tl.load(TOKEN + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            tok = rows.to(tl.int64)
        cols = (w % n_tn) * BLOCK_N + rn
        col_ok = cols < ffn
        x_ptr = X + tok[:, None] * stride_x + rk[None, :]
        w_ptr = W1 + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + cols[None, :] * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_hidden, BLOCK_K):
            if A_TMA:
                xa = X_DESC.load([row0, k0])
                if B_TMA:
                    wg = W1_DESC.load([e * n_hidden + k0, (w % n_tn) * BLOCK_N])
                else:
                    k_ok = (k0 + rk) < n_hidden
                    wg = tl.load(w_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            elif B_TMA:
                xa = tl.load(x_ptr, mask=row_ok[:, None], other=0.0)
                wg = W1_DESC.load([e * n_hidden + k0, (w % n_tn) * BLOCK_N])
            elif EVEN_K:
                xa = tl.load(x_ptr, mask=row_ok[:, None], other=0.0)
                wg = tl.load(w_ptr, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + rk) < n_hidden
                xa = tl.load(x_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wg = tl.load(w_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_g = _dot(xa, wg, acc_g, UPCAST, DOT_PREC)
            if GATED:
                if B_TMA:
                    wu = W1_DESC.load([e * n_hidden + k0, ffn + (w % n_tn) * BLOCK_N])
                elif A_TMA:
                    wu = tl.load(w_ptr + ffn * stride_wn, mask=k_ok[:, None] & col_ok[None, :],
                                 other=0.0)
                elif EVEN_K:
                    wu = tl.load(w_ptr + ffn * stride_wn, mask=col_ok[None, :], other=0.0)
                else:
                    wu = tl.load(w_ptr + ffn * stride_wn, mask=k_ok[:, None] & col_ok[None, :],
                                 other=0.0)
                acc_u = _dot(xa, wu, acc_u, UPCAST, DOT_PREC)
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K * stride_wk
        ok = row_ok[:, None] & col_ok[None, :]
        a_ptr = A + rows.to(tl.int64)[:, None] * stride_a + cols[None, :]
        gate = acc_g.to(A.dtype.element_ty)
        tl.store(a_ptr, gate, mask=ok)
        # h from the ROUNDED a: backward recomputes it from the stored a bit for bit
        h = _act(gate.to(tl.float32), ACT)
        if GATED:
            up = acc_u.to(A.dtype.element_ty)
            tl.store(a_ptr + ffn, up, mask=ok)
            h = h * up.to(tl.float32)
        tl.store(HOUT + rows.to(tl.int64)[:, None] * stride_h + cols[None, :],
                 h.to(HOUT.dtype.element_ty), mask=ok)


@triton.jit
def _down_kernel(A, A_DESC, B, B_DESC, C, A_ROWS, C_ROWS, PROB, TABLE, NTILES, max_tiles, n_out,
                 n_in, stride_a, stride_be, stride_bk, stride_bn, stride_c,
                 SCALE: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr,
                 EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 A_TMA: tl.constexpr, B_TMA: tl.constexpr, B_TRANS: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                 FLATTEN: tl.constexpr):
    """Persistent: ``C[c(r)] = (p[r] *) A[a(r)] @ B[e(r)]`` over sorted rows ``r``, with
    ``a(r) = A_ROWS[r]`` if GATHER_A else ``r`` and ``c(r) = C_ROWS[r]`` if SCATTER_C else ``r``;
    B is ``[E, n_in, n_out]`` with any strides (``W2``; ``W1`` transposed for dx; ``W2``
    transposed for the backward ``g = dout @ W2^T``). ``A_TMA`` (not GATHER_A): A tiles are
    ``[BM, BK]`` boxes of A from the tile's first row (rows past the expert's end read the next
    expert's rows, whose outputs are masked; K past ``n_in`` reads zeros). ``B_TMA``: B tiles
    through a descriptor over the weight stacked ``[E*n_in, n_out]`` (``B_TRANS``: over
    ``[E*n_out, n_in]``, tiles loaded ``[BN, BK]`` and transposed; K-major, the layout the
    tensor cores read directly)."""
    n_tn = tl.cdiv(n_out, BLOCK_N)
    total = tl.load(NTILES) * n_tn
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    for w in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
        e, row0, row_end = _tile(TABLE, max_tiles, w // n_tn)
        rows = row0 + rm
        row_ok = rows < row_end
        cols = (w % n_tn) * BLOCK_N + rn
        col_ok = cols < n_out
        if GATHER_A:
            src = tl.load(A_ROWS + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        a_ptr = A + src[:, None] * stride_a + rk[None, :]
        b_ptr = B + e.to(tl.int64) * stride_be + rk[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            k_ok = (k0 + rk) < n_in
            if A_TMA:
                a = A_DESC.load([row0, k0])
            elif EVEN_K:
                a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if B_TMA:
                if B_TRANS:
                    b = B_DESC.load([e * n_out + (w % n_tn) * BLOCK_N, k0]).T
                else:
                    b = B_DESC.load([e * n_in + k0, (w % n_tn) * BLOCK_N])
            elif EVEN_K:
                b = tl.load(b_ptr, mask=col_ok[None, :], other=0.0)
            else:
                b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST, DOT_PREC)
            a_ptr += BLOCK_K
            b_ptr += BLOCK_K * stride_bk
        if SCALE:
            acc = acc * tl.load(PROB + rows, mask=row_ok, other=0.0)[:, None]
        if SCATTER_C:
            dst = tl.load(C_ROWS + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            dst = rows.to(tl.int64)
        tl.store(C + dst[:, None] * stride_c + cols[None, :], acc.to(C.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _act_bwd_tile(g, p, a_ptr, da_ptr, h_ptr, ok, ffn, GATED: tl.constexpr, ACT: tl.constexpr):
    """One tile of the activation's backward, given ``g = dout @ W2^T`` (fp32) and the routing
    weights ``p`` ``[rows, 1]``: recomputes ``h = act(gate) (* up)`` from ``a``, stores
    ``da = act'(a) * p * g`` (gated: d gate at ``a_ptr``'s columns, d up ``ffn`` further) and
    ``p * h`` (dW2's operand) at ``h_ptr``; returns ``h`` in fp32, rounded like the stored copy."""
    gate = tl.load(a_ptr, mask=ok, other=0.0).to(tl.float32)
    s = _act(gate, ACT)
    dh = g * p
    if GATED:
        up = tl.load(a_ptr + ffn, mask=ok, other=0.0).to(tl.float32)
        h = (s * up).to(h_ptr.dtype.element_ty)
        tl.store(da_ptr, (dh * up * _act_grad(gate, ACT)).to(da_ptr.dtype.element_ty), mask=ok)
        tl.store(da_ptr + ffn, (dh * s).to(da_ptr.dtype.element_ty), mask=ok)
    else:
        h = s.to(h_ptr.dtype.element_ty)
        tl.store(da_ptr, (dh * _act_grad(gate, ACT)).to(da_ptr.dtype.element_ty), mask=ok)
    tl.store(h_ptr, (h.to(tl.float32) * p).to(h_ptr.dtype.element_ty), mask=ok)
    return h.to(tl.float32)


@triton.jit
def _dh_kernel(DOUT, W2, W2_DESC, A, DA, HOUT, DPP, TOKEN, PROB, TABLE, NTILES, max_tiles,
               n_hidden, ffn, n_rows, stride_d, stride_we, stride_wf, stride_wh, stride_a, stride_h,
               GATED: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               B_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Persistent: ``g = dout[token[r]] @ W2[e]^T`` for F tile ``n``; epilogue (with ``h``
    recomputed from ``a``): ``DPP[n, r] = sum_f g*h`` (dprobs partial), ``da = act'(a) * p * g``
    (gated: d gate and d up), and ``p * h`` for dW2 (the prob folded into the A operand there,
    so dW2's inner loop is a plain GEMM). ``B_TMA``: W2 tiles ``[BN, BK]`` through a descriptor
    over ``W2 [E*F, H]`` (K-major); rows past F of the last F tile belong to the next expert and
    give finite garbage in columns that are masked (stores) or meet ``h = 0`` (dprobs)."""
    n_tn = tl.cdiv(ffn, BLOCK_N)
    total = tl.load(NTILES) * n_tn
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    for w in range(tl.program_id(0), total, tl.num_programs(0)):
        e, row0, row_end = _tile(TABLE, max_tiles, w // n_tn)
        nt = w % n_tn
        rows = row0 + rm
        row_ok = rows < row_end
        tok = tl.load(TOKEN + rows, mask=row_ok, other=0).to(tl.int64)
        cols = nt * BLOCK_N + rn
        col_ok = cols < ffn
        d_ptr = DOUT + tok[:, None] * stride_d + rk[None, :]
        w_ptr = W2 + e.to(tl.int64) * stride_we + rk[:, None] * stride_wh + cols[None, :] * stride_wf
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_hidden, BLOCK_K):
            if EVEN_K:
                d = tl.load(d_ptr, mask=row_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + rk) < n_hidden
                d = tl.load(d_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if B_TMA:
                wt = W2_DESC.load([e * ffn + nt * BLOCK_N, k0]).T
            elif EVEN_K:
                wt = tl.load(w_ptr, mask=col_ok[None, :], other=0.0)
            else:
                wt = tl.load(w_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            g = _dot(d, wt, g, UPCAST, DOT_PREC)
            d_ptr += BLOCK_K
            w_ptr += BLOCK_K * stride_wh
        ok = row_ok[:, None] & col_ok[None, :]
        a_ptr = A + rows.to(tl.int64)[:, None] * stride_a + cols[None, :]
        da_ptr = DA + rows.to(tl.int64)[:, None] * stride_a + cols[None, :]
        p = tl.load(PROB + rows, mask=row_ok, other=0.0)[:, None]
        h = _act_bwd_tile(g, p, a_ptr, da_ptr, HOUT + rows.to(tl.int64)[:, None] * stride_h + cols[None, :],
                          ok, ffn, GATED, ACT)
        tl.store(DPP + nt.to(tl.int64) * n_rows + rows, tl.sum(g * h, 1), mask=row_ok)


@triton.jit
def _act_bwd_kernel(G, A, DA, HOUT, DPROBS, ORDER, PROB, BOUNDS_END, ffn, stride_g, stride_a,
                    stride_h, GATED: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Row pass after the plain grouped GEMM ``g = dout[token[r]] @ W2[e]^T`` (``G [N, F]``): with
    ``h`` recomputed from ``a``, writes ``da = act'(a) * p * g`` (gated: d gate and d up),
    ``p * h`` (dW2's operand) and ``dprobs[order[r]] = sum_f g*h`` (F chunks in order: fixed
    order per row). Rows at or past ``BOUNDS_END`` (pairs with an expert id outside ``[0, E)``)
    have no sorted slot and are skipped."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < tl.load(BOUNDS_END)
    r64 = rows.to(tl.int64)
    p = tl.load(PROB + rows, mask=row_ok, other=0.0)[:, None]
    dp = tl.zeros([BLOCK_R], tl.float32)
    for f0 in range(0, ffn, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        ok = row_ok[:, None] & (cols < ffn)[None, :]
        g = tl.load(G + r64[:, None] * stride_g + cols[None, :], mask=ok, other=0.0)
        g = g.to(tl.float32)
        a_ptr = A + r64[:, None] * stride_a + cols[None, :]
        da_ptr = DA + r64[:, None] * stride_a + cols[None, :]
        h = _act_bwd_tile(g, p, a_ptr, da_ptr, HOUT + r64[:, None] * stride_h + cols[None, :],
                          ok, ffn, GATED, ACT)
        dp += tl.sum(g * h, 1)
    dst = tl.load(ORDER + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(DPROBS + dst, dp, mask=row_ok)


@triton.jit
def _wgrad_kernel(A, B, A_DESC, B_DESC, C, A_IDX, B_IDX, BOUNDS, m_dim, n_dim, stride_a, stride_b,
                  stride_ce, stride_cm, stride_cn,
                  GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  A_TMA: tl.constexpr, B_TMA: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ACCUM: tl.constexpr):
    """``C[e] = A_e^T @ B_e`` over expert ``e``'s sorted rows ``[bounds[e], bounds[e+1])`` in row
    order (one program per output tile: deterministic, no split-K); ``ACCUM``: ``C[e] += ...``
    instead (the fp32 sum plus C's old value, rounded once to C's dtype; an expert with no rows
    leaves its block untouched). ``A_e`` rows are ``A[A_IDX[r]]`` if GATHER_A else ``A[r]``;
    likewise B. ``A_TMA`` / ``B_TMA`` (at most one of the two, for a non-gathered operand): its
    ``[BK, BM|BN]`` row block comes through a descriptor unmasked; rows past the expert's end meet
    the partner's zero-masked rows, so they add exact zeros."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_tn = tl.cdiv(n_dim, BLOCK_N)
    m = (pid // n_tn) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid % n_tn) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < m_dim
    n_ok = n < n_dim
    start = tl.load(BOUNDS + e)
    end = tl.load(BOUNDS + e + 1)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_K):
        r = r0 + rk
        r_ok = r < end
        if GATHER_A:
            ra = tl.load(A_IDX + r, mask=r_ok, other=0).to(tl.int64)
        else:
            ra = r.to(tl.int64)
        if GATHER_B:
            rb = tl.load(B_IDX + r, mask=r_ok, other=0).to(tl.int64)
        else:
            rb = r.to(tl.int64)
        if A_TMA:
            a_t = A_DESC.load([r0, (pid // n_tn) * BLOCK_M]).T
        else:
            a_t = tl.load(A + ra[None, :] * stride_a + m[:, None],
                          mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if B_TMA:
            b = B_DESC.load([r0, (pid % n_tn) * BLOCK_N])
        else:
            b = tl.load(B + rb[:, None] * stride_b + n[None, :],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a_t, b, acc, UPCAST, DOT_PREC)
    c_ptr = C + e.to(tl.int64) * stride_ce + m[:, None] * stride_cm + n[None, :] * stride_cn
    c_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUM:
        if end > start:
            acc += tl.load(c_ptr, mask=c_ok, other=0.0).to(tl.float32)
            tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=c_ok)
    else:
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=c_ok)


@triton.jit
def _combine_kernel(Y, OUT, ROWS, n_tok, width, topk, stride_y, stride_o,
                    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """``OUT[t] = sum_{j < k} Y[t*k + j]`` in fp32, j ascending (fixed order: deterministic);
    ``HAS_ROWS``: ``Y[ROWS[t*k + j]]`` (pairs read through a permutation)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < n_tok
    ok = t_ok[:, None] & (c < width)[None, :]
    t64 = t.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for j in range(0, topk):
        if HAS_ROWS:
            r = tl.load(ROWS + t64 * topk + j, mask=t_ok, other=0).to(tl.int64)
        else:
            r = t64 * topk + j
        acc += tl.load(Y + r[:, None] * stride_y + c[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + t64[:, None] * stride_o + c[None, :], acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gather_rows_kernel(SRC, IDX, DST, n_rows, width, stride_s, stride_d,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``DST[r] = SRC[IDX[r]]`` for ``BLOCK_R`` rows per program, ``BLOCK_C`` columns a step."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    src = tl.load(IDX + r, mask=r_ok, other=0).to(tl.int64)
    s_ptr = SRC + src[:, None] * stride_s
    d_ptr = DST + r.to(tl.int64)[:, None] * stride_d
    for c0 in range(0, width, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (c < width)[None, :]
        tl.store(d_ptr + c[None, :], tl.load(s_ptr + c[None, :], mask=ok), mask=ok)


# --------------------------------------------------------------------------------------------------
# launchers (each takes preallocated outputs, so the benchmark can time the GEMMs alone)
# --------------------------------------------------------------------------------------------------

def launch_up(x, w1, a, h, r: Routing, activation: str, cfg: TileConfig,
              sorted_rows: bool = False) -> None:
    """``a, h`` of the sorted rows from ``x [T, H]`` (rows gathered by token) or, with
    ``sorted_rows``, from ``x [N, H]`` already in sorted order (A through TMA if ``cfg.up.a_tma``)."""
    gated, act = ACT_CODES[activation]
    t = cfg.up
    table, n_tiles, max_tiles = r.tables[t.block_m]
    ffn = h.shape[1]
    n_hidden = x.shape[1]
    upcast, prec = _flags(x.dtype)
    even_k = n_hidden % t.block_k == 0
    desc = _tma_desc(w1, w1.shape[0] * n_hidden, (t.block_k, t.block_n), t.tma and even_k)
    x_desc = _tma_desc(x, x.shape[0], (t.block_m, t.block_k), t.a_tma and sorted_rows)
    grid = _persistent_grid(max_tiles * triton.cdiv(ffn, t.block_n), x.device, cfg, t)
    _up_kernel[grid](
        x, x_desc if x_desc is not None else x, w1, desc if desc is not None else w1, a, h,
        r.token, table, n_tiles, max_tiles, n_hidden, ffn, x.stride(0), w1.stride(0),
        w1.stride(1), w1.stride(2), a.stride(0), h.stride(0), GATED=gated, ACT=act,
        EVEN_K=even_k, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        GATHER_A=not sorted_rows, A_TMA=x_desc is not None, B_TMA=desc is not None,
        UPCAST=upcast, DOT_PREC=prec, FLATTEN=t.flatten, num_warps=t.warps, num_stages=t.stages)


def launch_down(src, b, dst, r: Routing, b_strides, n_in: int, n_out: int, scale: bool,
                tile: GemmTile, cfg: TileConfig, gather: bool = False,
                scatter: bool = True) -> None:
    """``dst[order[r]] = (p *) src[r] @ B[e]`` (``gather``: ``src[token[r]]``; ``scatter=False``:
    ``dst[r]``); ``b_strides`` = (expert, in, out) strides of B (``b`` is the stored weight:
    ``[E, n_in, n_out]``, or ``[E, n_out, n_in]`` read transposed when its ``in`` stride is 1)."""
    table, n_tiles, max_tiles = r.tables[tile.block_m]
    upcast, prec = _flags(src.dtype)
    even_k = n_in % tile.block_k == 0
    trans = b_strides[1] == 1 and b_strides[2] != 1
    if trans:   # tiles [BN, BK] of b [E*n_out, n_in]; K tails past n_in are zero-filled
        desc = _tma_desc(b, b.shape[0] * n_out, (tile.block_n, tile.block_k),
                         tile.tma and tuple(b.shape[1:]) == (n_out, n_in))
    else:       # tiles [BK, BN] of b [E*n_in, n_out]: K tiles must not cross experts
        desc = _tma_desc(b, b.shape[0] * n_in, (tile.block_k, tile.block_n),
                         tile.tma and even_k and tuple(b.shape[1:]) == (n_in, n_out))
    a_desc = _tma_desc(src, src.shape[0], (tile.block_m, tile.block_k), tile.a_tma and not gather)
    grid = _persistent_grid(max_tiles * triton.cdiv(n_out, tile.block_n), src.device, cfg, tile)
    _down_kernel[grid](
        src, a_desc if a_desc is not None else src, b, desc if desc is not None else b, dst,
        r.token, r.order, r.prob, table, n_tiles, max_tiles, n_out, n_in, src.stride(0),
        b_strides[0], b_strides[1], b_strides[2], dst.stride(0), SCALE=scale, GATHER_A=gather,
        SCATTER_C=scatter, EVEN_K=even_k, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, A_TMA=a_desc is not None, B_TMA=desc is not None, B_TRANS=trans,
        UPCAST=upcast, DOT_PREC=prec,
        FLATTEN=tile.flatten, num_warps=tile.warps, num_stages=tile.stages)


def launch_dh(dout, w2, a, da, h, dpp, r: Routing, activation: str, cfg: TileConfig) -> None:
    gated, act = ACT_CODES[activation]
    t = cfg.dh
    table, n_tiles, max_tiles = r.tables[t.block_m]
    ffn = h.shape[1]
    n_hidden = dout.shape[1]
    upcast, prec = _flags(dout.dtype)
    desc = _tma_desc(w2, w2.shape[0] * ffn, (t.block_n, t.block_k), t.tma)
    grid = _persistent_grid(max_tiles * triton.cdiv(ffn, t.block_n), dout.device, cfg, t)
    _dh_kernel[grid](
        dout, w2, desc if desc is not None else w2, a, da, h, dpp, r.token, r.prob, table,
        n_tiles, max_tiles, n_hidden, ffn, r.rows, dout.stride(0), w2.stride(0), w2.stride(1),
        w2.stride(2), a.stride(0), h.stride(0), GATED=gated, ACT=act,
        EVEN_K=n_hidden % t.block_k == 0, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, B_TMA=desc is not None, UPCAST=upcast, DOT_PREC=prec,
        num_warps=t.warps, num_stages=t.stages)


def launch_dh_gemm(dout, w2, g, r: Routing, cfg: TileConfig, sorted_rows: bool = False) -> None:
    """``g[r] = dout[token[r]] @ W2[e]^T`` (split backward, first half; ``sorted_rows``: ``dout``
    is already ``[N, H]`` in sorted order): the plain grouped GEMM with ``W2 [E, F, H]`` read as
    ``[E, in=H, out=F]`` (K-major: the TMA path of dx)."""
    ffn, n_hidden = w2.shape[1], w2.shape[2]
    launch_down(dout, w2, g, r, (w2.stride(0), w2.stride(2), w2.stride(1)), n_hidden, ffn, False,
                cfg.dh, cfg, gather=not sorted_rows, scatter=False)


def launch_act_bwd(g, a, da, hp, dprobs, r: Routing, activation: str, cfg: TileConfig) -> None:
    """Split backward, second half: ``da``, ``p * h`` and ``dprobs`` (pair order, fp32) from
    ``g`` and the saved ``a`` (see ``_act_bwd_kernel``)."""
    gated, act = ACT_CODES[activation]
    ffn = hp.shape[1]
    grid = (max(1, triton.cdiv(r.rows, cfg.act_rows)),)
    _act_bwd_kernel[grid](g, a, da, hp, dprobs, r.order, r.prob, r.bounds[r.num_experts:], ffn,
                          g.stride(0), a.stride(0), hp.stride(0), GATED=gated, ACT=act,
                          BLOCK_R=cfg.act_rows, BLOCK_F=cfg.act_cols,
                          num_warps=cfg.act_warps)


def launch_wgrad(a_src, b_src, out, r: Routing, a_idx: Optional[Tensor], b_idx: Optional[Tensor],
                 cfg: TileConfig, accumulate: bool = False) -> None:
    """``out[e] = a_src[rows_e]^T @ b_src[rows_e]`` (rows gathered through the index if given);
    ``accumulate``: ``out[e] +=`` that (fp32 sum, one rounding to ``out``'s dtype)."""
    t = (cfg.wgrad_accum or cfg.wgrad) if accumulate else cfg.wgrad
    E, m_dim, n_dim = out.shape
    upcast, prec = _flags(a_src.dtype)
    # TMA for one contiguous operand whose partner is loaded through masked pointers: its unmasked
    # rows past the expert then meet the partner's zero rows (the gathered one where one is
    # gathered, else B)
    a_desc = _tma_desc(a_src, a_src.shape[0], (t.block_k, t.block_m),
                       t.tma and a_idx is None)
    b_desc = _tma_desc(b_src, b_src.shape[0], (t.block_k, t.block_n),
                       t.tma and b_idx is None and a_desc is None and a_idx is not None)
    grid = (triton.cdiv(m_dim, t.block_m) * triton.cdiv(n_dim, t.block_n), E)
    _wgrad_kernel[grid](
        a_src, b_src, a_desc if a_desc is not None else a_src,
        b_desc if b_desc is not None else b_src, out, a_idx if a_idx is not None else r.token,
        b_idx if b_idx is not None else r.token, r.bounds, m_dim, n_dim,
        a_src.stride(0), b_src.stride(0), out.stride(0), out.stride(1), out.stride(2),
        GATHER_A=a_idx is not None, GATHER_B=b_idx is not None,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, A_TMA=a_desc is not None,
        B_TMA=b_desc is not None, UPCAST=upcast, DOT_PREC=prec, ACCUM=accumulate,
        num_warps=t.warps, num_stages=t.stages)


def gather_rows(src: Tensor, r: Routing, cfg: TileConfig, out: Optional[Tensor] = None) -> Tensor:
    """``src[token[r]]`` for every sorted row ``r``: ``[N, width]`` (the pregather lane's x and
    dout rows). Rows past the routed ones (pairs with an id outside ``[0, E)``) copy some valid
    row: the token table there holds 0 or that pair's token, never garbage."""
    n, width = r.rows, src.shape[1]
    if out is None:
        out = torch.empty((n, width), dtype=src.dtype, device=src.device)
    _gather_rows_kernel[(max(1, triton.cdiv(n, cfg.gather_r)),)](
        src, r.token, out, n, width, src.stride(0), out.stride(0), BLOCK_R=cfg.gather_r,
        BLOCK_C=cfg.gather_c)
    return out


def launch_combine(y_pairs, out, topk: int, cfg: TileConfig,
                   rows: Optional[Tensor] = None) -> None:
    """``out[t] = sum_j y_pairs[t*k + j]`` (``rows``: ``y_pairs[rows[t*k + j]]``), fp32 sums."""
    T, width = out.shape
    grid = (triton.cdiv(T, cfg.combine_t), triton.cdiv(width, cfg.combine_h))
    _combine_kernel[grid](y_pairs, out, y_pairs if rows is None else rows, T, width, topk,
                          y_pairs.stride(0), out.stride(0), HAS_ROWS=rows is not None,
                          BLOCK_T=cfg.combine_t, BLOCK_H=cfg.combine_h)


# --------------------------------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------------------------------

def _contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def moe_ffn_fwd(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                activation: str, config: Optional[TileConfig] = None
                ) -> Tuple[Tensor, Tensor, Routing, Optional[Tensor]]:
    """``(out [T, H], a [N, N1], routing, x_sorted [N, H] or None)``: ``a`` and (with
    ``TileConfig.pregather``) ``x_sorted`` are what backward needs."""
    cfg = config or default_config(x.dtype)
    x, w1, w2 = _contig(x), _contig(w1), _contig(w2)
    T, H = x.shape
    E, _, n1 = w1.shape
    ffn = w2.shape[1]
    k = indices.shape[1]
    r = routing_metadata(indices, probs, E, cfg.row_tiles)
    n = r.rows
    a = torch.empty((n, n1), dtype=x.dtype, device=x.device)
    h = torch.empty((n, ffn), dtype=x.dtype, device=x.device)
    xs = gather_rows(x, r, cfg) if cfg.pregather else None
    launch_up(xs if xs is not None else x, w1, a, h, r, activation, cfg, sorted_rows=xs is not None)
    y = torch.empty((n, H), dtype=x.dtype, device=x.device)   # pair order t*k + j
    launch_down(h, w2, y, r, (w2.stride(0), w2.stride(1), w2.stride(2)), ffn, H, True,
                cfg.down, cfg)
    if k == 1:   # pair order is token order: the rows are the output (a combine would copy them)
        return y, a, r, xs
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    launch_combine(y, out, k, cfg)
    return out, a, r, xs


def moe_ffn_bwd(dout: Tensor, x: Optional[Tensor], w1: Tensor, w2: Tensor, a: Tensor, r: Routing,
                activation: str, needs=(True, True, True, True),
                config: Optional[TileConfig] = None, x_sorted: Optional[Tensor] = None,
                accumulate_into: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
                zeroed: Tuple[bool, bool] = (False, False)):
    """``(dx, dprobs [T, k] fp32, dw1, dw2)``; None where ``needs`` says the grad is not wanted.
    ``x`` (token order) or ``x_sorted`` (what the forward's pregather kept) feeds dW1.
    ``accumulate_into``: per weight a buffer its gradient is added into instead (see
    :func:`weight_grads`); that grad is returned as None. ``zeroed``: per weight, its buffer is
    known to hold zeros, so the gradient is stored into it (same values, no read)."""
    cfg = config or default_config(w1.dtype)
    dout = _contig(dout).to(w1.dtype)
    w1, w2 = _contig(w1), _contig(w2)
    T, H = r.num_tokens, w1.shape[1]
    dt, dev = w1.dtype, dout.device
    ffn = w2.shape[1]
    n = r.rows
    need_x, need_p, need_w1, need_w2 = needs
    da = torch.empty_like(a)
    hp = torch.empty((n, ffn), dtype=dt, device=dev)       # p * h
    # dout in sorted rows: read by the split d(h) GEMM and dW2 (the fused d(h) gathers its own)
    ds = gather_rows(dout, r, cfg) if cfg.pregather and (cfg.split_dh or need_w2) else None
    dp_pairs = dpp = None
    if cfg.split_dh:   # plain GEMM to g, then one row pass (see launch_act_bwd)
        g = torch.empty((n, ffn), dtype=dt, device=dev)
        launch_dh_gemm(ds if ds is not None else dout, w2, g, r, cfg, sorted_rows=ds is not None)
        dp_pairs = torch.empty(n, dtype=torch.float32, device=dev)
        launch_act_bwd(g, a, da, hp, dp_pairs, r, activation, cfg)
        del g
    else:              # one kernel, activation backward in the GEMM epilogue
        n_ft = triton.cdiv(ffn, cfg.dh.block_n)
        dpp = torch.empty((n_ft, n), dtype=torch.float32, device=dev)
        launch_dh(dout, w2, a, da, hp, dpp, r, activation, cfg)

    dx = dprobs = None
    if need_x:
        dx_pairs = torch.empty((n, H), dtype=dt, device=dev)
        # B = W1[e]^T viewed as [E, n1, H]: (expert, in=n1, out=H) strides of w1 [E, H, n1]
        launch_down(da, w1, dx_pairs, r, (w1.stride(0), w1.stride(2), w1.stride(1)),
                    w1.shape[2], H, False, cfg.dx, cfg)
        if r.topk == 1:   # as in forward: the pair rows are the token rows
            dx = dx_pairs
        else:
            dx = torch.empty((T, H), dtype=dt, device=dev)
            launch_combine(dx_pairs, dx, r.topk, cfg)
    if need_p:
        if dp_pairs is None:
            dp_pairs = torch.empty(n, dtype=torch.float32, device=dev)
            dp_pairs[r.order.long()] = dpp.sum(0)  # fixed-order sum over F tiles; unique targets
        dprobs = dp_pairs.view(T, r.topk)
    dw1, dw2 = weight_grads(x, da, hp, dout, w1, w2, r, cfg, (need_w1, need_w2),
                            x_sorted=x_sorted, dout_sorted=ds, accumulate_into=accumulate_into,
                            zeroed=zeroed)
    return dx, dprobs, dw1, dw2


def weight_grads(x: Optional[Tensor], da: Tensor, hp: Tensor, dout: Tensor, w1: Tensor,
                 w2: Tensor, r: Routing, cfg: TileConfig, needs=(True, True),
                 x_sorted: Optional[Tensor] = None, dout_sorted: Optional[Tensor] = None,
                 accumulate_into: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
                 zeroed: Tuple[bool, bool] = (False, False)
                 ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(dW1, dW2)``: ``dW1[e] = x_e^T @ da_e`` and ``dW2[e] = (p h)_e^T @ dout_e`` over expert
    ``e``'s sorted rows (``x``/``dout`` rows gathered by token, or taken from ``x_sorted`` /
    ``dout_sorted`` where the caller has them in sorted order); None where ``needs`` says so.
    ``accumulate_into``: a buffer of the weight's shape (fp32 or 16-bit, contiguous) per weight,
    or None; a given buffer gets the gradient added in the kernel's epilogue (``_wgrad_kernel``
    with ``ACCUM``: the fp32 sum and the old value rounded once) and that grad is returned as
    None. ``zeroed[i]``: buffer ``i`` holds zeros (Megatron's DDP zeroed it at the step's start and
    nothing has written it since), so the kernel stores the gradient there without reading it:
    the same values as adding to zero, one read of the buffer less."""
    def dw1_kernel(out: Tensor, accumulate: bool = False) -> None:
        if x_sorted is not None:
            launch_wgrad(x_sorted, da, out, r, None, None, cfg, accumulate)
        else:
            launch_wgrad(x, da, out, r, r.token, None, cfg, accumulate)

    def dw2_kernel(out: Tensor, accumulate: bool = False) -> None:
        if dout_sorted is not None:
            launch_wgrad(hp, dout_sorted, out, r, None, None, cfg, accumulate)
        else:
            launch_wgrad(hp, dout, out, r, None, r.token, cfg, accumulate)

    acc1, acc2 = accumulate_into
    if acc1 is not None and needs[0]:
        dw1_kernel(acc1, accumulate=not zeroed[0])
    if acc2 is not None and needs[1]:
        dw2_kernel(acc2, accumulate=not zeroed[1])
    need_w1, need_w2 = needs[0] and acc1 is None, needs[1] and acc2 is None
    dw1 = dw2 = None
    if (need_w1 or need_w2) and _wgrad_lane(x_sorted if x is None else x, w1, w2, cfg) == \
            "grouped_mm":
        from megatron_ext.ops.moe import _grouped_mm_fn

        gmm, offs = _grouped_mm_fn(), r.bounds[1:]
        # a group with no rows gets a zero block (K = 0); the sums run in a fixed order
        if need_w1:
            xs = x_sorted if x_sorted is not None else gather_rows(x, r, cfg)
            dw1 = gmm(xs.t(), da, offs=offs, out_dtype=w1.dtype)
        if need_w2:
            ds = dout_sorted if dout_sorted is not None else gather_rows(dout, r, cfg)
            dw2 = gmm(hp.t(), ds, offs=offs, out_dtype=w2.dtype)
        return dw1, dw2
    if need_w1:
        dw1 = torch.empty(w1.shape, dtype=w1.dtype, device=da.device)
        dw1_kernel(dw1)
    if need_w2:
        dw2 = torch.empty(w2.shape, dtype=w2.dtype, device=da.device)
        dw2_kernel(dw2)
    return dw1, dw2


def _wgrad_lane(x: Tensor, w1: Tensor, w2: Tensor, cfg: TileConfig) -> str:
    """"grouped_mm" where the config asks for it and torch's grouped GEMM runs here, else
    "triton" (``_wgrad_kernel``; the record carries the grouped GEMM's reason)."""
    if not cfg.wgrad_grouped_mm:
        return "triton"
    from megatron_ext import backends
    from megatron_ext.ops.moe import _grouped_mm_probe

    return backends.resolve("moe_ffn.triton.weight_grads", "auto",
                            [("grouped_mm", _grouped_mm_probe(x, w1, w2)),
                             ("triton", lambda: None)])
