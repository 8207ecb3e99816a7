"""Expert-sorted rows <-> tokens for the (token, choice) pairs, with fixed-order sums both ways.

A routing with ``k`` choices per token has ``T*k`` pairs, pair ``p = t*k + j``. ``order [T*k]``
lists the pairs grouped by expert (sorted row ``r`` holds pair ``order[r]``) and ``inv`` is its
inverse (``inv[order[r]] = r``). Two differentiable ops move data between the two layouts:

- :func:`gather_rows`: ``rows[r] = x[order[r] // k]`` (one copy of each token row per choice).
  Backward: ``dx[t] = sum_j d_rows[inv[t*k + j]]``, j ascending, in fp32.
- :func:`combine_rows`: ``out[t] = sum_j y[inv[t*k + j]]``, j ascending, in fp32 -> fp32 ``[T, H]``
  (fp64 rows: in fp64).
  Backward: ``dy[r] = dout[order[r] // k]`` in ``y``'s dtype.

Both sums are a fixed order of fp32 adds (no atomics): deterministic, and a token's result does
not depend on the other tokens of the batch. They replace "materialise fp32 pair rows, then sum"
(a zero-filled ``[T*k, H]`` fp32 buffer, an index copy, k casts) and the atomic index-add that
autograd uses for a row gather's backward. On CUDA the sum is one Triton pass (``_combine_kernel``
reading the rows through ``inv``); elsewhere a torch loop with the same order (same bits).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from megatron_ext import backends

Tensor = torch.Tensor


def _triton_combine_probe(y: Tensor) -> Optional[str]:
    if y.device.type != "cuda":
        return f"device={y.device.type}: the Triton combine runs on CUDA tensors"
    if y.dtype == torch.float64:
        return "dtype=float64: summed in fp64 by torch (the kernel accumulates in fp32)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from megatron_ext.ops.moe import triton_moe

    if triton_moe.interpreted():
        return "TRITON_INTERPRET=1: the kernels were built for the CPU interpreter"
    return None


def sum_pairs(y: Tensor, inv: Tensor, k: int) -> Tensor:
    """``out[t] = sum_{j<k} y[inv[t*k + j]]`` as fp32 ``[T, H]`` (fp64 for fp64 rows), j
    ascending (no autograd)."""
    n, width = y.shape
    T = inv.numel() // k
    name = backends.resolve("moe.combine_pairs", "auto",
                            [("triton", lambda: _triton_combine_probe(y)), ("torch", lambda: None)])
    if name == "triton" and n:
        from megatron_ext.ops.moe import triton_moe

        out = torch.empty(T, width, dtype=torch.float32, device=y.device)
        triton_moe.launch_combine(y.contiguous(), out, k, triton_moe.default_config(y.dtype),
                                  rows=inv.to(torch.int32).contiguous())
        return out
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    g = y.index_select(0, inv.long()).view(T, k, width)
    acc = torch.zeros(T, width, dtype=acc_dtype, device=y.device)
    for j in range(k):   # 0 + y0 + y1 + ...: the kernel's order, so the same bits
        acc = acc + g[:, j].to(acc_dtype)
    return acc


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, d_rows: Tensor):
        (inv,) = ctx.saved_tensors
        return sum_pairs(d_rows, inv, ctx.k).to(d_rows.dtype), None, None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(order)
        ctx.k, ctx.dtype = k, y.dtype
        return sum_pairs(y, inv, k)

    @staticmethod
    def backward(ctx, dout: Tensor):
        (order,) = ctx.saved_tensors
        tok = torch.div(order, ctx.k, rounding_mode="floor")
        return dout.to(ctx.dtype).index_select(0, tok), None, None, None


def gather_rows(x: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
    """``x [T, H]`` -> ``rows [T*k, H]``, ``rows[r] = x[order[r] // k]`` (see the module doc)."""
    return _GatherRows.apply(x, order, inv, k)


def combine_rows(y: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
    """``y [T*k, H]`` in sorted-row order -> fp32 ``[T, H]`` (see the module doc)."""
    return _CombineRows.apply(y, order, inv, k)


def inverse_order(order: Tensor) -> Tensor:
    """``inv`` with ``inv[order[r]] = r``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv
