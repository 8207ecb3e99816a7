"""Analytic FLOP counts (matmuls only; 1 multiply-add = 2 FLOPs)."""

from __future__ import annotations

from typing import Optional


def matmul_flops(m: int, n: int, k: int) -> float:
    """``[m, k] @ [k, n]``."""
    return 2.0 * m * n * k


def attention_core_fwd_flops(s: int, b: int, heads: int, head_dim: int, causal: bool = True) -> float:
    """QK^T and PV for ``q, k, v [b, heads, s, head_dim]``; causal halves both (s^2 / 2 pairs)."""
    full = 2 * matmul_flops(s, s, head_dim) * b * heads
    return full / 2 if causal else full


def layer_fwd_flops(s: int, b: int, hidden: int, heads: int, ffn: int,
                    kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                    causal: bool = True, gated: bool = False) -> float:
    """One transformer layer forward on ``x [s, b, hidden]``: linear_qkv, attention core, linear_proj,
    linear_fc1 (x2 with a gated linear unit), linear_fc2. Norms, softmax, activations not counted."""
    d = head_dim or hidden // heads
    kv = kv_heads or heads
    tokens = s * b
    qkv = matmul_flops(tokens, (heads + 2 * kv) * d, hidden)
    proj = matmul_flops(tokens, hidden, heads * d)
    fc1 = matmul_flops(tokens, ffn * (2 if gated else 1), hidden)
    fc2 = matmul_flops(tokens, hidden, ffn)
    return qkv + attention_core_fwd_flops(s, b, heads, d, causal) + proj + fc1 + fc2


def layer_fwd_bwd_flops(*args, **kwargs) -> float:
    """Forward + backward = 3 x forward (backward computes grads of inputs and of weights)."""
    return 3.0 * layer_fwd_flops(*args, **kwargs)
