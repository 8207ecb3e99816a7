"""LayerNorm / RMSNorm for Megatron layer specs, sequence-parallel aware on every lane.

Megatron's apex-less local norm refuses sequence parallel; this one marks its parameters
``sequence_parallel`` so ``finalize_model_grads`` all-reduces their gradients over TP, which is the
correct reduction when each TP rank sees a different slice of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Norm(torch.nn.Module):
    """``config.normalization`` in {"LayerNorm", "RMSNorm"} over the last dim of ``[s, b, h]``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        kind = getattr(config, "normalization", "LayerNorm")
        if kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={kind!r}: unsupported; use 'LayerNorm' or 'RMSNorm'")
        self.kind = kind
        self.eps = eps
        self.hidden_size = hidden_size
        zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.zero_centered_gamma = zero_centered
        device = None if getattr(config, "use_cpu_initialization", True) else torch.cuda.current_device()
        dtype = getattr(config, "params_dtype", torch.float32)
        init = torch.zeros if zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
                     if kind == "LayerNorm" else None)
        sp = bool(getattr(config, "sequence_parallel", False))
        for p in self.parameters():
            p.sequence_parallel = sp

    def effective_weight(self) -> torch.Tensor:
        """The scale the norm applies (``weight + 1`` with a zero-centred gamma)."""
        return self.weight + 1 if self.zero_centered_gamma else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if self.kind == "RMSNorm":
            return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)
