"""MoE expert FFN, torch reference (the spec of ``moe_ffn``), and the permute/unpermute pair.

``out[t] = sum_j probs[t, j] * FFN_{indices[t, j]}(x[t])`` (Switch Transformer eq. 2; Megatron's
MoELayer: route -> permute -> experts -> weighted unpermute). Expert FFN, Megatron's
gated-linear-unit order: ``a = x @ w1[e]``; gated: ``a = [gate | up]`` along the last dim,
``h = act(gate) * up``; plain: ``h = act(a)``; ``y = h @ w2[e]``.

Shapes: x [T, H], probs [T, k] (float), indices [T, k] (int), w1 [E, H, 2F] (gated) or
[E, H, F], w2 [E, F, H] -> [T, H] in x's dtype (the weighted sum accumulates in fp32).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _squared_relu(a: Tensor) -> Tensor:
    return torch.relu(a).square()


# gelu is the exact (erf) form, Megatron's default ``F.gelu``
GATED_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}
PLAIN_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "squared_relu": _squared_relu}
ACTIVATIONS = tuple(GATED_ACTIVATIONS) + tuple(PLAIN_ACTIVATIONS)


def expert_activation(a: Tensor, activation: str) -> Tensor:
    """[n, 2F] -> [n, F] for gated activations ([gate | up] halves), [n, F] -> [n, F] else."""
    if activation in GATED_ACTIVATIONS:
        gate, up = a.chunk(2, dim=-1)
        return GATED_ACTIVATIONS[activation](gate) * up
    if activation in PLAIN_ACTIVATIONS:
        return PLAIN_ACTIVATIONS[activation](a)
    raise ValueError(f"activation={activation!r}: unknown expert activation; use one of "
                     f"{list(ACTIVATIONS)}")


def expert_ffn(rows: Tensor, w1: Tensor, w2: Tensor, activation: str,
               recompute_activation: bool = False,
               gemm: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> Tensor:
    """``act(rows @ w1) @ w2`` with ``gemm``; ``recompute_activation``: the activation's output
    is not kept for backward but rebuilt there from ``rows @ w1`` (:mod:`.recompute`)."""
    a = gemm(rows, w1)
    if not recompute_activation:
        return gemm(expert_activation(a, activation), w2)
    from megatron_ext.ops.moe.recompute import recomputed_activation

    h, state = recomputed_activation(a, activation)
    return state.release(gemm(h, w2))


def moe_ffn_reference(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                      activation: str = "swiglu", recompute_activation: bool = False) -> Tensor:
    """Loop over experts; each gathers its (token, choice) pairs, runs its FFN, scatters
    ``prob * y`` back with an fp32 accumulate. Shapes in the module docstring."""
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for e in range(w1.shape[0]):
        tok, choice = (indices == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = expert_ffn(x[tok], w1[e], w2[e], activation, recompute_activation)
        out = out.index_add(0, tok, y.to(out.dtype) * probs[tok, choice, None].to(out.dtype))
    return out.to(x.dtype)


def permute(x: Tensor, indices: Tensor, num_experts: int, kept: Optional[Tensor] = None
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Group the (token, choice) pairs by expert.

    x [T, H], indices [T, k], kept [T, k] bool (None = all) -> x_sorted [N, H] (N = T*k, or the
    number of kept pairs), sort_order [N] int64 (flat pair index ``t*k + j`` of each row, a
    *stable* sort by expert, so rows of one expert stay in token order: deterministic),
    tokens_per_expert [E] int64 (the group sizes, in expert order).
    """
    k = indices.shape[1]
    flat_e = indices.reshape(-1)
    pairs = torch.arange(flat_e.numel(), device=indices.device)
    if kept is not None:
        pairs = pairs[kept.reshape(-1)]
    sort_order = pairs[torch.sort(flat_e[pairs], stable=True).indices]
    tokens_per_expert = torch.bincount(flat_e[pairs], minlength=num_experts)
    return x[sort_order // k], sort_order, tokens_per_expert


def unpermute(y_sorted: Tensor, sort_order: Tensor, probs: Tensor, num_tokens: int) -> Tensor:
    """Weighted scatter back: ``out[t] = sum over rows r of pair (t, j): probs[t, j] * y[r]``.

    y_sorted [N, H], sort_order [N] (from :func:`permute`), probs [T, k] -> [T, H] in y's dtype,
    accumulated in fp32 (a bf16 sum over k choices loses ~3 bits, torchtitan PR #4751).
    """
    k = probs.shape[1]
    acc = torch.promote_types(y_sorted.dtype, torch.float32)
    w = probs.reshape(-1)[sort_order].to(acc)
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=acc, device=y_sorted.device)
    out = out.index_add(0, sort_order // k, y_sorted.to(acc) * w[:, None])
    return out.to(y_sorted.dtype)


def permuted_ffn(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                 activation: str, grouped: Callable[[Tensor], Callable[[Tensor, Tensor], Tensor]],
                 recompute_activation: bool = False) -> Tensor:
    """The expert FFN as permute -> grouped GEMM -> activation -> grouped GEMM -> weighted
    unpermute, the pipeline of the grouped-GEMM backends: ``grouped(tokens_per_expert)`` returns
    ``gemm(rows, w)``, the per-expert ``rows_e @ w[e]`` over rows grouped by expert."""
    x_sorted, order, tokens_per_expert = permute(x, indices, w1.shape[0])
    y = expert_ffn(x_sorted, w1, w2, activation, recompute_activation, grouped(tokens_per_expert))
    return unpermute(y, order, probs, x.shape[0])
