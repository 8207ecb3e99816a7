"""GQLA layer spec: the dense GPT layer with :class:`megatron_ext.modules.gqla.GQLAttention` in the
``self_attention`` slot (docs/gqla.md). ``attention_spec_for`` picks it when ``config.gqla`` is set,
so it composes with the MoE and mHC specs; ``gqla_block_spec`` is the ``--spec`` entry point.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from layer_specs.gpt import block_spec, dense_layer_spec, mlp_spec_for
from megatron_ext.modules.gqla import gqla_spec


def gqla_layer_spec(mlp: Optional[ModuleSpec] = None) -> ModuleSpec:
    return dense_layer_spec(mlp=mlp, attention=gqla_spec())


def gqla_block_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    if getattr(config, "gqla", None) is None:
        raise ValueError("config.gqla=None: the GQLA block spec needs a GQLAConfig; use --attention-type gqla")
    return block_spec(config, lambda n: gqla_layer_spec(mlp_spec_for(config, n)), vp_stage)
