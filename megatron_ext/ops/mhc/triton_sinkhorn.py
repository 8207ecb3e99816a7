"""Sinkhorn-Knopp on 4x4 tiles in registers: the jit helpers the fused mHC kernels call, and a
standalone batched kernel pair for ``sinkhorn(logits [..., 4, 4])``.

Tiling: a program owns BLOCK_T matrices as one ``[BLOCK_T, 4, 4]`` fp32 register tile; row and
column sums are in-register reductions over axis 2 / axis 1, so an iteration touches no memory.
The op is compute-only: 64 B in + 64 B out per matrix, ~20 x 2 x 48 flops forward.

Backward differentiates through the unrolled iterations. The states entering each round are not
kept from the forward (that would hold 1.3 KB per matrix between forward and backward); the
backward re-runs the forward once into a per-call scratch buffer and walks the rounds back from
it: 2 x num_iters normalisations per matrix. (Recomputing each state from the logits instead, the
first version, cost num_iters^2 / 2 = 210 rounds and made the mHC backward's mappings kernel
compute-bound.)
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_ext.ops.mhc._triton_util import tuned


@triton.jit
def sinkhorn_tile(logits, num_iters, eps):
    """``logits [BT, 4, 4]`` fp32 -> doubly stochastic ``[BT, 4, 4]`` (the reference, in registers)."""
    m = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    for _ in range(num_iters):
        m = m / tl.maximum(tl.sum(m, axis=2), eps)[:, :, None]
        m = m / tl.maximum(tl.sum(m, axis=1), eps)[:, None, :]
    return m


@triton.jit
def sinkhorn_tile_vjp(logits, grad, num_iters, eps, scratch_ptr, offs, mask):
    """d loss / d logits for ``grad = d loss / d sinkhorn_tile(logits)``; both ``[BT, 4, 4]`` fp32.

    The forward is re-run once, parking the state entering each round in ``scratch`` (``offs``:
    each matrix's ``[num_iters, 16]`` fp32 slot, as ``[BT, 4, 4]`` offsets of its round-0 block),
    then the rounds are walked back reading it: 2 x num_iters rounds instead of the
    num_iters^2 / 2 of recomputing each state from the logits. The slot is written and read by the
    same program moments apart, so it lives in L1/L2 (16 x 4 x 20 = 1.3 KB per matrix).

    Normalisation ``y = m / max(s, eps)`` (s = the row or column sum) has the adjoint
    ``dm = (dy - [s >= eps] * sum(dy * y)) / max(s, eps)``, the sum along the normalised axis.
    """
    m0 = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    m = m0
    for k in range(num_iters):
        tl.store(scratch_ptr + offs + k * 16, m, mask=mask)
        m = m / tl.maximum(tl.sum(m, axis=2), eps)[:, :, None]
        m = m / tl.maximum(tl.sum(m, axis=1), eps)[:, None, :]
    # each thread reads back what it wrote (same offsets, same layout); the barrier keeps that
    # true whatever layout the compiler picks for the loads
    tl.debug_barrier()
    g = grad
    for kk in range(num_iters):
        k = num_iters - 1 - kk
        m = tl.load(scratch_ptr + offs + k * 16, mask=mask, other=1.0)
        rs = tl.sum(m, axis=2)
        rsc = tl.maximum(rs, eps)
        y = m / rsc[:, :, None]
        cs = tl.sum(y, axis=1)
        csc = tl.maximum(cs, eps)
        yz = y / csc[:, None, :]
        gc = tl.sum(g * yz, axis=1)
        gc = tl.where(cs >= eps, gc, 0.0)
        g = (g - gc[:, None, :]) / csc[:, None, :]
        gr = tl.sum(g * y, axis=2)
        gr = tl.where(rs >= eps, gr, 0.0)
        g = (g - gr[:, :, None]) / rsc[:, :, None]
    return g * m0


_CONFIGS = [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt, w in ((32, 4), (64, 4), (128, 8))]


@tuned(_CONFIGS, key=["B"], pin=lambda key: 1)  # per token: the tiling sets no sum order
@triton.jit
def _sinkhorn_fwd_kernel(l_ptr, out_ptr, B, num_iters, eps, BLOCK_T: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i4 = tl.arange(0, 4)
    offs = offs_t[:, None, None] * 16 + i4[None, :, None] * 4 + i4[None, None, :]
    mask = (offs_t < B)[:, None, None]
    logits = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, sinkhorn_tile(logits, num_iters, eps), mask=mask)


@tuned(_CONFIGS, key=["B"], pin=lambda key: 1)  # per token: the tiling sets no sum order
@triton.jit
def _sinkhorn_bwd_kernel(l_ptr, g_ptr, dl_ptr, scratch_ptr, B, num_iters, eps,
                         BLOCK_T: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i4 = tl.arange(0, 4)
    o44 = i4[None, :, None] * 4 + i4[None, None, :]
    offs = offs_t[:, None, None] * 16 + o44
    mask = (offs_t < B)[:, None, None]
    logits = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    slot = offs_t.to(tl.int64)[:, None, None] * num_iters * 16 + o44
    tl.store(dl_ptr + offs, sinkhorn_tile_vjp(logits, g, num_iters, eps, scratch_ptr, slot, mask),
             mask=mask)


def sinkhorn_fwd(logits, num_iters: int, eps: float):
    """``logits [B, 4, 4]`` contiguous -> fp32 ``[B, 4, 4]``."""
    import torch

    out = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    B = logits.shape[0]
    if B:
        _sinkhorn_fwd_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_T"]),)](
            logits, out, B, num_iters, eps)
    return out


def sinkhorn_bwd(logits, grad, num_iters: int, eps: float):
    """fp32 ``d logits [B, 4, 4]`` for ``grad [B, 4, 4]`` (both contiguous)."""
    import torch

    dl = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    B = logits.shape[0]
    if B:
        scratch = torch.empty(B, num_iters, 16, device=logits.device, dtype=torch.float32)
        _sinkhorn_bwd_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_T"]),)](
            logits, grad, dl, scratch, B, num_iters, eps)
    return dl
