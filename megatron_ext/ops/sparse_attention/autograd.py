"""autograd glue for the Triton window + sink kernels (:mod:`.triton_window`).

Saves ``q, k, v, out`` and the fp32 ``lse [b, hq, s]`` (recompute over storing: the backward
rebuilds P from ``lse`` instead of keeping any ``[s, s]`` tile). Triton is imported lazily so that
the op package imports without it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable


class SparseWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_logits, window_size: Optional[int], num_sink_tokens: int,
                softmax_scale: Optional[float], config=None):
        from megatron_ext.ops.sparse_attention import triton_window

        out, lse = triton_window.window_attention_fwd(q, k, v, sink_logits, window_size,
                                                      num_sink_tokens, softmax_scale, config)
        ctx.save_for_backward(q, k, v, out, lse, sink_logits)
        ctx.args = (window_size, num_sink_tokens, softmax_scale, config)
        ctx.has_sink = sink_logits is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        from megatron_ext.ops.sparse_attention import triton_window

        q, k, v, out, lse, sink_logits = ctx.saved_tensors
        window_size, num_sink_tokens, softmax_scale, config = ctx.args
        dq, dk, dv, dsink = triton_window.window_attention_bwd(
            dout, q, k, v, out, lse, sink_logits if ctx.has_sink else None, window_size,
            num_sink_tokens, softmax_scale, config)
        return dq, dk, dv, dsink, None, None, None, None


def sparse_window_attention(q, k, v, sink_logits=None, window_size=None, num_sink_tokens=0,
                            softmax_scale=None, config=None) -> torch.Tensor:
    """Differentiable Triton path (causal, no top-k). ``config``: a ``triton_window.TileConfig``."""
    return SparseWindowAttention.apply(q, k, v, sink_logits, window_size, num_sink_tokens,
                                       softmax_scale, config)
