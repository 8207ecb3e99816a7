"""Dense core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Fills Megatron's ``core_attention`` slot. Unlike Megatron's local ``DotProductAttention`` it needs
no preallocated CUDA buffer, handles GQA/MQA without materialising repeated K/V, and picks the
flash / memory-efficient / cuDNN kernel on GPU. The sparse-attention issue replaces it for sparse
layers; this stays the dense lane.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ext import backends


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int = 1, attn_mask_type=AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type=None, pg_collection=None,
                 **_unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(f"context_parallel_size={config.context_parallel_size}: the SDPA core "
                             "attention has no context parallelism; use 1")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        backends.note("core_attention", "auto", "torch_sdpa", "dense layer spec")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np*hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by SDPACoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        causal = mask_type == AttnMaskType.causal and attention_bias is None
        mask = None
        if not causal:
            if attention_mask is not None:
                mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
            if attention_bias is not None:
                mask = attention_bias if mask is None else attention_bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
