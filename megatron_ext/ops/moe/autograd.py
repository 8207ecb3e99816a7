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


_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def main_grad_target(w):
    """``(buffer, None)`` where weight ``w`` follows Megatron DDP's gradient-buffer protocol (a
    persistent ``main_grad`` of w's shape that its backward hook adds ``w.grad`` into unless
    ``grad_added_to_main_grad`` is set), so the weight-gradient kernel can add into the buffer
    itself; else ``(None, why)`` (``why`` None where there is no such buffer at all, e.g. plain
    autograd or torch FSDP2). Megatron-FSDP's buffers (``get_main_grad``, allocated by its hook)
    are left to that hook."""
    mg = getattr(w, "main_grad", None)
    if mg is None or not hasattr(w, "grad_added_to_main_grad"):
        return None, None
    if hasattr(w, "get_main_grad"):
        return None, "Megatron-FSDP allocates main_grad in its own hook"
    if tuple(mg.shape) != tuple(w.shape) or mg.device != w.device or not mg.is_contiguous() \
            or mg.dtype not in _GRAD_DTYPES:
        return None, (f"main_grad {tuple(mg.shape)} {mg.dtype} on {mg.device} (contiguous: "
                      f"{mg.is_contiguous()}) is not a contiguous fp32/16-bit buffer of the "
                      f"weight's shape {tuple(w.shape)} on {w.device}")
    return mg, None


# Set on a weight by :func:`track_zeroed_main_grad`; True from Megatron DDP's
# ``zero_grad_buffer`` (the ``ddp_expert_grad_zeroing`` patch) until something writes the
# weight's ``main_grad``.
ZEROED = "_mx_main_grad_zeroed"
# Set with ZEROED where that ``zero_grad_buffer`` left the weight's slice of the buffer as it was
# (the same patch defers its zeroing): ``main_grad`` is zero by the buffer protocol but still
# holds the last step's values in memory, until the fused kernel stores over all of it or
# :func:`settle_main_grad` zeroes it.
STALE = "_mx_main_grad_stale"


def settle_main_grad(w) -> None:
    """Zero ``w.main_grad`` now where ``zero_grad_buffer`` deferred it (:data:`STALE`): before
    anything other than the fused kernel's store reads or adds into it (the kernel's add, the DDP
    hook's add, the data-parallel reduce)."""
    if not getattr(w, STALE, False):
        return
    if w.main_grad.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the expert weight's main_grad was left unzeroed by DistributedDataParallel."
            "zero_grad_buffer (deferred to the step's first fused weight-gradient store), and this "
            "backward is being captured into a CUDA graph, whose replays cannot zero it once per "
            "step. The deferral happens only where the model config says no graphs "
            "(cuda_graph_impl='none'); set cuda_graph_impl to the implementation in use ('local' "
            "or 'transformer_engine'), or pass --no-moe-gradient-accumulation-fusion")
    w.main_grad.zero_()
    setattr(w, STALE, False)


def track_zeroed_main_grad(w) -> None:
    """Opt weight ``w`` in to the zeroed-buffer mark: Megatron's ``zero_grad_buffer`` sets it (the
    patch, which may also leave the weight's buffer slice for the kernel to overwrite), the fused
    weight-gradient kernel clears it when it stores the step's first gradient, and a gradient that
    reaches ``main_grad`` any other way (the DDP hook's add, which runs whenever
    ``grad_added_to_main_grad`` is clear) clears it through a post-accumulate hook, which first
    zeroes a deferred buffer. That hook runs inside autograd's AccumulateGrad, before the DDP
    hook Megatron registers on the accumulator node."""
    setattr(w, ZEROED, False)
    setattr(w, STALE, False)

    def hook(p):
        if not getattr(p, "grad_added_to_main_grad", True):
            settle_main_grad(p)
            setattr(p, ZEROED, False)

    w.register_post_accumulate_grad_hook(hook)


def main_grad_zeroed(w) -> bool:
    """True where ``w``'s ``main_grad`` is known to hold zeros: Megatron's DDP zeroed it at this
    step's start (and cleared ``grad_added_to_main_grad`` with it) and nothing has written it
    since. Never while a CUDA graph is captured: the replays would store over the gradients of
    the step's later micro-batches."""
    if not getattr(w, ZEROED, False) or getattr(w, "grad_added_to_main_grad", True):
        return False
    return not (w.is_cuda and torch.cuda.is_current_stream_capturing())


def _placeholder_grad(w):
    """What Megatron's fused-wgrad linears hand autograd once the gradient is in ``main_grad``:
    an unread tensor of w's shape (zeros where ``zero_out_wgrad`` asks the hook to add it), with
    ``grad_added_to_main_grad`` set so the DDP hook does not add it."""
    w.grad_added_to_main_grad = True
    if hasattr(w, ZEROED):
        # the kernel has written every element (stored, or added after settle_main_grad)
        setattr(w, ZEROED, False)
        setattr(w, STALE, False)
    make = torch.zeros if getattr(w, "zero_out_wgrad", False) else torch.empty
    return make(w.shape, dtype=w.dtype, device=w.device)


class TritonMoEFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, indices, w1, w2, activation: str, config=None,
                accumulate_wgrad: bool = False):
        from megatron_ext.ops.moe import triton_moe

        out, a, routing, xs = triton_moe.moe_ffn_fwd(x, probs, indices, w1, w2, activation,
                                                     config)
        # the pregather lane keeps x's rows in sorted order for dW1 instead of x
        ctx.sorted_x = xs is not None
        ctx.save_for_backward(xs if xs is not None else x, w1, w2, a)
        ctx.routing = routing
        ctx.args = (activation, config, probs.dtype, accumulate_wgrad)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        from megatron_ext import backends
        from megatron_ext.ops.moe import triton_moe

        xin, w1, w2, a = ctx.saved_tensors
        activation, config, probs_dtype, accumulate_wgrad = ctx.args
        need = ctx.needs_input_grad
        x, xs = (None, xin) if ctx.sorted_x else (xin, None)
        into = [None, None]
        zeroed = [False, False]
        if accumulate_wgrad:
            for i, (w, wanted) in enumerate(((w1, need[3]), (w2, need[4]))):
                buf, why = main_grad_target(w) if wanted else (None, None)
                into[i] = buf
                zeroed[i] = buf is not None and main_grad_zeroed(w)
                if buf is not None and not zeroed[i]:
                    settle_main_grad(w)   # the kernel adds: a deferred buffer is zeroed first
                if why is not None:
                    backends.fallback("moe_ffn.weight_grad_accumulation", "fused", "ddp_hook",
                                      f"w{i + 1}: {why}; the gradient goes to autograd and the "
                                      f"hook adds it")
        dx, dprobs, dw1, dw2 = triton_moe.moe_ffn_bwd(
            dout, x, w1, w2, a, ctx.routing, activation,
            needs=(need[0], need[1], need[3], need[4]), config=config, x_sorted=xs,
            accumulate_into=tuple(into), zeroed=tuple(zeroed))
        if into[0] is not None:
            dw1 = _placeholder_grad(w1)
        if into[1] is not None:
            dw2 = _placeholder_grad(w2)
        if dprobs is not None:
            dprobs = dprobs.to(probs_dtype)
        return dx, dprobs, None, dw1, dw2, None, None, None


def triton_moe_ffn(x, probs, indices, w1, w2, activation: str = "swiglu",
                   config=None, accumulate_wgrad: bool = False) -> torch.Tensor:
    """Differentiable Triton path; ``config``: a ``triton_moe.TileConfig`` (None = default);
    ``accumulate_wgrad``: add the weight gradients into ``w.main_grad`` in the kernel where the
    weight carries Megatron DDP's gradient buffer (:func:`main_grad_target`)."""
    return TritonMoEFFN.apply(x, probs, indices, w1, w2, activation, config, accumulate_wgrad)
