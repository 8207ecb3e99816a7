"""Batch-invariant row GEMM for the MoE layer's deterministic mode: ``a [n, K] @ w [K, N]``.

A library GEMM picks its kernel (tile shape, split-K) from the problem size, so a row's bits can
change with how many rows come with it. This kernel has one fixed tiling: every output row is the
fp32 sum over its own row of ``a`` and ``w`` in the same K order whatever ``n`` is, so a token's
result is bitwise the same in any batch, and equal runs give equal bits (no atomics). 16-bit
operands go to the tensor cores; fp32 operands use IEEE fp32 dots (the router's fp32 logits).

Backward: ``da = g @ w^T`` through the same kernel (rows again batch-invariant); ``dw = a^T @ g``
through torch (a sum over the batch, which depends on the batch by definition; run-to-run
deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ext.backends import built_for_interpreter

Tensor = torch.Tensor

# one tiling for every shape (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the interpreter's is small
_GPU_TILE = (64, 64, 64, 4, 3)
_INTERPRETER_TILE = (16, 16, 16, 1, 1)


@triton.jit
def _rows_mm_kernel(a_ptr, w_ptr, out_ptr, M, N, K, s_am, s_ak, s_wk, s_wn, s_om, s_on,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    # int64 row offsets: n * K can pass 2**31 elements (the EP lane's expert rows at a wide hidden size)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * s_wk + rn[None, :] * s_wn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def interpreted() -> bool:
    """True when the kernel was built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return built_for_interpreter(_rows_mm_kernel)


def _launch(a: Tensor, w: Tensor) -> Tensor:
    n, k = a.shape
    out = torch.empty(n, w.shape[1], dtype=a.dtype, device=a.device)
    if n == 0 or out.shape[1] == 0:
        return out.zero_()
    bm, bn, bk, warps, stages = _INTERPRETER_TILE if interpreted() else _GPU_TILE
    grid = (triton.cdiv(n, bm), triton.cdiv(out.shape[1], bn))
    _rows_mm_kernel[grid](a, w, out, n, out.shape[1], k, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
                          out.stride(0), out.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                          PRECISION="ieee" if a.dtype == torch.float32 else None,
                          num_warps=warps, num_stages=stages)
    return out


class _InvariantMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(a, w)
        return _launch(a, w)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, w = ctx.saved_tensors
        g = g.contiguous()
        da = _launch(g, w.t()) if ctx.needs_input_grad[0] else None
        dw = (a.t() @ g) if ctx.needs_input_grad[1] else None
        return da, dw


def invariant_mm(a: Tensor, w: Tensor) -> Tensor:
    """``a [n, K] @ w [K, N]`` (one dtype), each row's bits independent of ``n``; differentiable."""
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[0]:
        raise ValueError(f"invariant_mm: a {tuple(a.shape)} @ w {tuple(w.shape)}: need [n, K] @ [K, N]")
    if a.dtype != w.dtype or a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"invariant_mm: dtypes {a.dtype} and {w.dtype}: need one of float32, bfloat16, "
                         "float16 for both")
    return _InvariantMM.apply(a, w)


def usable(a: Tensor) -> bool:
    """Where the kernel runs: CUDA tensors on a GPU build, CPU tensors under the interpreter."""
    return a.is_cuda != interpreted()
