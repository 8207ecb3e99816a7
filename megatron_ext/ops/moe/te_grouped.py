"""Transformer Engine's grouped GEMM as a ``moe_ffn`` backend (``backend="te"``).

The pipeline is the grouped_mm backend's (permute -> grouped GEMM -> activation -> grouped GEMM ->
weighted unpermute) with both grouped GEMMs, and their data and weight gradients, on Transformer
Engine's multi-stream cuBLAS grouped GEMM (``transformer_engine.pytorch.cpp_extensions.
general_grouped_gemm``, the call under TE's ``GroupedLinear`` and Megatron's ``TEGroupedMLP``).
TE is optional: nothing here imports it at module import time, and :func:`unavailable` says why
the lane cannot run.

TE takes the group sizes as a host list (``m_splits``), so this lane reads the expert counts on
the host once per call (one synchronisation, as Megatron's TE path does); the Triton and
grouped_mm lanes have none.

TE's convention, one GEMM per group ``i`` (read from its ``GroupedLinear``: forward layout "TN",
data gradient "NN", weight gradient "NT"): ``out_i = op_b(B_i) @ op_a(A_i)`` where the layout's
first letter transposes A and its second B. Our weights are ``[E, in, out]`` (the transpose of
TE's ``[out, in]``), so:

=================  ======  ===================  ===================  ==================
GEMM               layout  A                    B                    out
=================  ======  ===================  ===================  ==================
forward            "NN"    ``w[e]`` [in, out]   ``x_e`` [m, in]      ``x_e @ w[e]``
data gradient      "TN"    ``w[e]``             ``g_e`` [m, out]     ``g_e @ w[e]^T``
weight gradient    "NT"    ``g_e``              ``x_e``              ``x_e^T @ g_e``
=================  ======  ===================  ===================  ==================

TE hands raw pointers to cuBLAS, so every operand passed is contiguous (views of contiguous
tensors along dim 0). An empty group (an expert with no rows) gets a zero block from TE.

The signature of ``general_grouped_gemm`` changed across TE releases: 2.1-2.9 take a
``workspaces`` list after ``out_dtype``; 2.10 takes none; 2.11 and later take
``quantization_params`` (one quantizer or None per GEMM) before ``out_dtype``. The adapter reads
the signature and passes the keywords that release has.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_ext.ops.moe.reference import permuted_ffn

Tensor = torch.Tensor

_NEEDED = ("out_dtype", "layout", "m_splits", "grad", "single_output")


class TEUnavailable(RuntimeError):
    """TE is missing, or its grouped GEMM has a signature this adapter does not know."""


@functools.lru_cache(maxsize=None)
def _grouped_gemm() -> Callable:
    """``call(A, B, out, layout, m_splits, grad, single_output)`` bound to the installed TE."""
    if importlib.util.find_spec("transformer_engine") is None:
        raise TEUnavailable("transformer_engine is not installed")
    try:
        ext = importlib.import_module("transformer_engine.pytorch.cpp_extensions")
    except Exception as exc:  # a broken TE install fails in many ways (missing .so, ABI)
        raise TEUnavailable(f"import transformer_engine.pytorch.cpp_extensions failed: "
                            f"{type(exc).__name__}: {exc}") from None
    fn = getattr(ext, "general_grouped_gemm", None)
    if fn is None:
        raise TEUnavailable("this transformer_engine has no general_grouped_gemm (TE >= 2.1 does)")
    params = inspect.signature(fn).parameters
    missing = [p for p in _NEEDED if p not in params]
    if missing:
        raise TEUnavailable(f"transformer_engine's general_grouped_gemm lacks {missing}: a "
                            f"signature this adapter does not know (it knows TE 2.1-2.18)")
    workspaces: Optional[Callable[[], List[Tensor]]] = None
    if "workspaces" in params:
        base = importlib.import_module("transformer_engine.pytorch.module.base")
        workspaces = getattr(base, "get_multi_stream_cublas_workspace", None)
        if workspaces is None:
            raise TEUnavailable("general_grouped_gemm takes workspaces but transformer_engine."
                                "pytorch.module.base has no get_multi_stream_cublas_workspace")
    quantizers = "quantization_params" in params

    def call(A: Sequence[Tensor], B: Sequence[Tensor], out: Sequence[Tensor], layout: str,
             m_splits: List[int], grad: bool, single_output: bool) -> None:
        kwargs: Dict[str, object] = dict(out_dtype=out[0].dtype, layout=layout,
                                         m_splits=m_splits, grad=grad,
                                         single_output=single_output)
        if workspaces is not None:
            kwargs["workspaces"] = workspaces()
        if quantizers:
            kwargs["quantization_params"] = [None] * len(A)
        fn(list(A), list(B), list(out), **kwargs)

    return call


def unavailable() -> Optional[str]:
    """None when TE's grouped GEMM can be called here, else why not."""
    try:
        _grouped_gemm()
    except TEUnavailable as exc:
        return str(exc)
    return None


class _TEGroupedLinear(torch.autograd.Function):
    """``y[rows of group e] = x[rows of group e] @ w[e]`` for ``x [N, K]`` with rows grouped by
    expert (``m_splits`` rows each, in expert order) and ``w [E, K, M]``; TE for all three GEMMs."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, m_splits: List[int]) -> Tensor:
        gemm = _grouped_gemm()
        x = x.contiguous()
        w = w.contiguous()
        y = x.new_empty(x.shape[0], w.shape[2])
        gemm(w.unbind(0), x.split(m_splits), [y], "NN", m_splits, False, True)
        ctx.save_for_backward(x, w)
        ctx.m_splits = m_splits
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        gemm = _grouped_gemm()
        x, w = ctx.saved_tensors
        m_splits = ctx.m_splits
        dy = dy.contiguous()
        dys = dy.split(m_splits)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = x.new_empty(x.shape)
            gemm(w.unbind(0), dys, [dx], "TN", m_splits, True, True)
        if ctx.needs_input_grad[1]:
            dw = w.new_empty(w.shape)
            gemm(dys, x.split(m_splits), dw.unbind(0), "NT", m_splits, True, False)
        return dx, dw, None


def te_grouped_linear(x: Tensor, w: Tensor, m_splits: List[int]) -> Tensor:
    """Differentiable grouped ``x_e @ w[e]`` on TE (see :class:`_TEGroupedLinear`)."""
    if sum(m_splits) != x.shape[0] or len(m_splits) != w.shape[0]:
        raise ValueError(f"m_splits (sum {sum(m_splits)}, {len(m_splits)} groups) must cover "
                         f"x's {x.shape[0]} rows with one group per expert of w {tuple(w.shape)}")
    return _TEGroupedLinear.apply(x, w, m_splits)


def te_moe_ffn(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
               activation: str, recompute_activation: bool = False) -> Tensor:
    """``moe_ffn`` on TE's grouped GEMM (shapes as ``moe_ffn``; arguments checked there)."""
    def grouped(tokens_per_expert: Tensor):
        m_splits = tokens_per_expert.tolist()   # TE's API: group sizes on the host
        return lambda rows, w: te_grouped_linear(rows, w, m_splits)

    return permuted_ffn(x, probs, indices, w1, w2, activation, grouped, recompute_activation)
