"""Sparse MQA spec: ``SparseMQAttention`` as ``self_attention``, its pattern letter per layer.

``config.sparse_attention`` (a ``SparseAttentionConfig``) holds the knobs; its ``pattern`` string
gives one letter per layer, repeated cyclically over the global 1-based layer numbers: ``D`` dense
causal, ``W`` window + sinks, ``T`` top-k (+ window/sinks). ``layer_specs.gpt.attention_spec_for``
returns :func:`sparse_mqa_attention_spec` when ``config.sparse_attention`` is set, so the dense,
MoE and mHC block specs all pick it up; :func:`sparse_mqa_block_spec` is the ``--spec`` entry.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.modules.norm import Norm
from megatron_ext.modules.sparse_mqa import SparseCoreAttention, SparseMQAttention


def layer_letters(config, num_layers: Optional[int] = None) -> str:
    """The pattern letter of every layer 1..num_layers (default: config.num_layers), e.g. 'WDWD'."""
    sparse = config.sparse_attention
    return "".join(sparse.letter(n) for n in range(1, (num_layers or config.num_layers) + 1))


def sparse_mqa_attention_spec(config, layer_number: int) -> ModuleSpec:
    qk_norm = getattr(config, "qk_layernorm", False)
    return ModuleSpec(
        module=SparseMQAttention,
        params={"attn_mask_type": AttnMaskType.causal,
                "letter": config.sparse_attention.letter(layer_number)},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SparseCoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=Norm if qk_norm else IdentityOp,
            k_layernorm=Norm if qk_norm else IdentityOp,
        ),
    )


def sparse_mqa_block_spec(config, vp_stage: Optional[int] = None):
    """``--spec layer_specs.sparse_mqa sparse_mqa_block_spec``: the GPT block (dense MLP or MoE) with
    sparse MQA attention (``config.sparse_attention`` must be set)."""
    from layer_specs.gpt import gpt_block_spec

    if getattr(config, "sparse_attention", None) is None:
        raise ValueError("config.sparse_attention=None: this spec needs the sparse attention knobs; "
                         "use config.sparse_attention = SparseAttentionConfig(...)")
    return gpt_block_spec(config, vp_stage)
