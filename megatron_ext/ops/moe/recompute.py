"""The expert activation recomputed in backward instead of kept (Megatron's ``moe_act`` recompute).

An expert FFN ``y = act(a) @ w2`` with ``a = x @ w1`` keeps, under plain autograd, ``a`` for the
activation's backward and ``h = act(a)`` for the second GEMM's weight gradient: ``[n, F]`` more
per routed row. :func:`recomputed_activation` keeps only ``a``:

- forward: ``h = act(a)`` without recording the activation's graph; the caller runs its GEMM on
  ``h`` and hands the result to :meth:`RecomputedActivation.release`, which frees ``h``'s storage
  (the GEMM's autograd node still holds the tensor object, now empty);
- backward: a hook on that GEMM's node runs before it and writes ``act(a)`` back into ``h``'s
  storage (a storage-level copy: the tensor's version counter does not move, so autograd's
  saved-tensor check passes); the activation's own backward then reuses the graph built there.

The Triton ``moe_ffn`` kernels already work this way (they save the pre-activation only and
rebuild ``h`` in the backward's row pass), so this serves the torch reference and the grouped-GEMM
lanes (torch ``grouped_mm``, Transformer Engine).
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Tuple, Union

import torch

from megatron_ext.ops.moe.reference import expert_activation

Tensor = torch.Tensor


class RecomputedActivation:
    """One activation whose output is dropped after its consumer ran (see the module doc).
    ``fn``: an expert activation's name, or any function of ``a`` whose output its consumer
    saves (e.g. the activation followed by the zero padding of a chunked GEMM)."""

    def __init__(self, fn: Union[str, Callable[[Tensor], Tensor]]):
        self.fn = (lambda a: expert_activation(a, fn)) if isinstance(fn, str) else fn
        # the activation's autograd node (weakly: it holds this object) and h's storage (not h,
        # whose node is that one). ``a`` is read from the node's saved tensors, so saved-tensor
        # hooks (activation offloading, checkpointing) see it like any other saved activation.
        self.node = None
        self.storage = None
        self.nbytes = 0
        self.graph: Optional[Tuple[Tensor, Tensor]] = None  # (a leaf, act(a)) built by the refill

    def _build(self) -> Tuple[Tensor, Tensor]:
        (a,) = self.node().saved_tensors
        with torch.enable_grad():
            a = a.detach().requires_grad_()
            return a, self.fn(a)

    def release(self, consumer: Tensor) -> Tensor:
        """Free ``h`` once ``consumer`` (the GEMM's output on ``h``) is computed; it is refilled
        before the consumer's backward node runs. Returns ``consumer``. Without a graph (no grad)
        nothing is freed."""
        if self.storage is None or consumer.grad_fn is None:
            return consumer
        self.nbytes = self.storage.nbytes()
        self.storage.resize_(0)
        consumer.grad_fn.register_prehook(self._refill)
        return consumer

    def _refill(self, _grad_outputs):
        if self.storage.nbytes() == self.nbytes:
            return None   # already back (a second backward through a retained graph)
        self.graph = self._build()
        h = self.graph[1].detach()
        self.storage.resize_(self.nbytes)
        # a fresh tensor over the storage (its own version counter) receives the values
        torch.empty(0, dtype=h.dtype, device=h.device).set_(self.storage, 0, h.shape).copy_(h)
        return None


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, state: RecomputedActivation) -> Tensor:
        ctx.save_for_backward(a)
        ctx.state = state
        h = state.fn(a).contiguous()
        state.node, state.storage = weakref.ref(ctx), h.untyped_storage()
        return h

    @staticmethod
    def backward(ctx, g: Tensor):
        state = ctx.state
        a_leaf, h = state.graph if state.graph is not None else state._build()
        state.graph = None
        (da,) = torch.autograd.grad(h, a_leaf, g)
        return da, None


def recomputed_activation(a: Tensor, fn: Union[str, Callable[[Tensor], Tensor]]
                          ) -> Tuple[Tensor, RecomputedActivation]:
    """``(fn(a), state)``: run the GEMM on the first, then ``state.release(its output)``."""
    state = RecomputedActivation(fn)
    if not (torch.is_grad_enabled() and a.requires_grad):
        return state.fn(a), state
    return _Activation.apply(a, state), state
