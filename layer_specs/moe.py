"""Fused MoE specs: :class:`FusedMoELayer` as a TransformerLayer's ``mlp``.

``fused_moe_spec(config)`` is what ``layer_specs.gpt.mlp_spec_for`` returns when
``num_moe_experts`` is set (and ``config.moe.impl`` is not ``"megatron"``), so the dense, mHC and
sparse-attention blocks all get the fused layer. ``--spec layer_specs.moe moe_block_spec``
builds the plain pre-norm block with the fused MoE in the layers Megatron's ``moe_layer_freq``
names (every layer by default; the others get the dense MLP).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from layer_specs.gpt import (attention_spec_for, block_spec, dense_layer_spec, dense_mlp_spec,
                             moe_layer_pattern_for)
from megatron_ext.modules.moe import FusedMoELayer


def fused_moe_spec(config=None) -> ModuleSpec:
    return ModuleSpec(module=FusedMoELayer)


def moe_block_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    if not getattr(config, "num_moe_experts", None):
        raise ValueError("num_moe_experts=None: the MoE block spec needs experts; use --num-experts N")
    moe = fused_moe_spec(config)
    pattern = moe_layer_pattern_for(config)
    return block_spec(config, lambda n: dense_layer_spec(mlp=moe if pattern[n - 1] else dense_mlp_spec(),
                                                         attention=attention_spec_for(config, n)), vp_stage)
