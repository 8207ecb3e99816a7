"""Dense GPT block spec: the base that attention / MoE / mHC specs swap parts of.

Built from Megatron's local tensor-parallel linears, this project's SDPA core attention and its
sequence-parallel-aware norm, so it runs unchanged on CPU (gloo) and GPU, with or without
Transformer Engine and apex.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_ext.modules.core_attention import SDPACoreAttention
from megatron_ext.modules.norm import Norm


def self_attention_spec(qk_layernorm: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=Norm if qk_layernorm else IdentityOp,
            k_layernorm=Norm if qk_layernorm else IdentityOp,
        ),
    )


def dense_mlp_spec() -> ModuleSpec:
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def stock_moe_spec() -> ModuleSpec:
    """Megatron's MoELayer with per-expert MLPs (SequentialMLP) and its SharedExpertMLP (built when
    ``moe_shared_expert_intermediate_size`` is set): the baseline the fused MoE replaces."""
    expert = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=expert),
                                 shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=expert)),
    )


def dense_layer_spec(qk_layernorm: bool = False, mlp: ModuleSpec | None = None,
                     attention: ModuleSpec | None = None) -> ModuleSpec:
    """One pre-norm transformer layer: norm -> attention -> +res -> norm -> MLP -> +res."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=attention or self_attention_spec(qk_layernorm),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp or dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config, layer_spec, vp_stage: Optional[int] = None,
               final_norm=Norm) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus the final norm. ``layer_spec`` is one ModuleSpec for
    every layer, or a function of the global 1-based layer number (per-layer patterns)."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    if isinstance(layer_spec, ModuleSpec):
        specs = [layer_spec] * n
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        specs = [layer_spec(offset + i + 1) for i in range(n)]
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
    block.megatron_ext = True   # built here: the pretrain driver builds MTP layers from this project's specs too
    return block


def mtp_block_spec(config, vp_stage: Optional[int] = None):
    """Megatron's ``mtp_block_spec`` (``--mtp-num-layers``; DeepSeek-V3's multi-token prediction)
    for this project's blocks: Megatron's MTP module (the embedding and hidden-state norms, their
    projection, its final norm) around this project's layer as the last decoder layer has it (its
    attention, and its MLP or fused MoE layer), with a plain residual under mHC: the MTP layer
    takes the one ``[s, b, h]`` stream its projection makes. The module's norms are this
    project's norm, as in the decoder (Megatron's local torch norm refuses its own default
    ``persist_layer_norm``, so without Transformer Engine its MTP did not build). None where this
    pipeline stage builds no MTP layer (as Megatron's)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend

    class _Backend(LocalSpecProvider):
        def layer_norm(self, *args, **kwargs) -> type:
            return Norm

    if not getattr(config, "mtp_num_layers", None):
        return None
    n = config.num_layers
    layer = dense_layer_spec(mlp=mlp_spec_for(config, n), attention=attention_spec_for(config, n))
    return get_gpt_mtp_block_spec_for_backend(config, layer, backend=_Backend(), vp_stage=vp_stage)


def attention_spec_for(config, layer_number: int = 1) -> ModuleSpec:
    """The attention this config asks for at global layer ``layer_number`` (1-based; each feature
    spec adds its branch here): Megatron's SelfAttention with SDPA by default."""
    if getattr(config, "sparse_attention", None) is not None:
        from layer_specs.sparse_mqa import sparse_mqa_attention_spec

        return sparse_mqa_attention_spec(config, layer_number)
    if getattr(config, "gqla", None) is not None:
        from megatron_ext.modules.gqla import gqla_spec

        return gqla_spec()
    if getattr(config, "multi_latent_attention", False):
        from megatron_ext.modules.mla import mla_spec

        return mla_spec(config)
    return self_attention_spec(getattr(config, "qk_layernorm", False))


def moe_layer_pattern_for(config) -> list:
    """One entry per layer of the model (1 = MoE, 0 = dense MLP) from Megatron's
    ``config.moe_layer_freq``; all zeros without experts. Recorded once in the receipt."""
    from megatron_ext import backends
    from megatron_ext.config import moe_layer_pattern

    if not getattr(config, "num_moe_experts", None):
        return [0] * config.num_layers
    freq = getattr(config, "moe_layer_freq", 1)
    pattern = moe_layer_pattern(freq, config.num_layers)
    backends.note("moe_layer_pattern", str(freq), "".join(map(str, pattern)),
                  "Megatron's moe_layer_freq: 1 = MoE layer, 0 = dense MLP (ffn_hidden_size)")
    return pattern


def mlp_spec_for(config, layer_number: Optional[int] = None) -> ModuleSpec:
    """The MLP of global layer ``layer_number`` (1-based): with ``num_moe_experts`` and that layer an
    MoE layer in ``moe_layer_freq`` (every layer by default), the fused MoE layer
    (``layer_specs.moe``), or Megatron's stock MoELayer when ``config.moe.impl == "megatron"``; else
    the dense MLP. ``layer_number=None``: the MoE MLP whenever the model has experts."""
    if not getattr(config, "num_moe_experts", None):
        return dense_mlp_spec()
    if layer_number is not None and not moe_layer_pattern_for(config)[layer_number - 1]:
        return dense_mlp_spec()
    moe = getattr(config, "moe", None)
    if moe is not None and moe.impl == "megatron":
        return stock_moe_spec()
    from layer_specs.moe import fused_moe_spec

    return fused_moe_spec(config)


def gpt_block_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """``--spec layer_specs.gpt gpt_block_spec``: the baseline block, dense or (with
    ``num_moe_experts``) MoE in the layers ``moe_layer_freq`` names (every layer by default)."""
    return block_spec(config, lambda n: dense_layer_spec(mlp=mlp_spec_for(config, n),
                                                         attention=attention_spec_for(config, n)), vp_stage)
