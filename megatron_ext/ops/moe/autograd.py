"""autograd glue for the Triton ``moe_ffn`` kernels (:mod:`.triton_moe`).

Saves ``x`` (or, with ``TileConfig.pregather``, its rows in sorted order), ``w1, w2`` and the
pre-activation ``a [T*k, N1]`` in sorted-row order (not ``h``, not the per-pair output rows:
backward recomputes ``h`` from ``a`` and gets ``dprobs`` as ``<g, h>`` with ``g = dout @ W2^T``),
plus the routing metadata (sort order, tile tables; small int tensors kept
on ``ctx``). Triton is imported lazily so the op package imports without it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class TritonMoEFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, indices, w1, w2, activation: str, config=None):
        from megatron_ext.ops.moe import triton_moe

        out, a, routing, xs = triton_moe.moe_ffn_fwd(x, probs, indices, w1, w2, activation,
                                                     config)
        # the pregather lane keeps x's rows in sorted order for dW1 instead of x
        ctx.sorted_x = xs is not None
        ctx.save_for_backward(xs if xs is not None else x, w1, w2, a)
        ctx.routing = routing
        ctx.args = (activation, config, probs.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        from megatron_ext.ops.moe import triton_moe

        xin, w1, w2, a = ctx.saved_tensors
        activation, config, probs_dtype = ctx.args
        need = ctx.needs_input_grad
        x, xs = (None, xin) if ctx.sorted_x else (xin, None)
        dx, dprobs, dw1, dw2 = triton_moe.moe_ffn_bwd(
            dout, x, w1, w2, a, ctx.routing, activation,
            needs=(need[0], need[1], need[3], need[4]), config=config, x_sorted=xs)
        if dprobs is not None:
            dprobs = dprobs.to(probs_dtype)
        return dx, dprobs, None, dw1, dw2, None, None


def triton_moe_ffn(x, probs, indices, w1, w2, activation: str = "swiglu",
                   config=None) -> torch.Tensor:
    """Differentiable Triton path; ``config``: a ``triton_moe.TileConfig`` (None = default)."""
    return TritonMoEFFN.apply(x, probs, indices, w1, w2, activation, config)
