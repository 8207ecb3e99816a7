"""Megatron's multi-latent attention (DeepSeek-V2, arXiv 2405.04434, eq. 9-19) as a local-spec
``self_attention`` for ``megatron-ext train --attention-type mla`` (docs/gqla.md, MLA -> GQLA).

The layer is Megatron's own ``MLASelfAttention``; this module only names its submodules so that it
builds without Transformer Engine on both megatron-core versions: Megatron's tensor-parallel linears,
this project's sequence-parallel-aware norm on the latents, and this project's SDPA core attention,
because Megatron's local ``DotProductAttention`` takes no ``k_channels``/``v_channels`` (MLA's
query/key head is ``qk_head_dim + qk_pos_emb_head_dim`` wide, its value head ``v_head_dim``).
The MLA dims ride on the ``MLATransformerConfig`` (:class:`megatron_ext.config.MLAConfig`).
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext import compat
from megatron_ext.modules.core_attention import SDPACoreAttention
from megatron_ext.modules.norm import Norm


def mla_spec(config) -> ModuleSpec:
    """``MLASelfAttention`` with the local submodules. ``config.qk_layernorm`` puts a norm on the KV
    latent and, with q-LoRA, on the query latent (Megatron's local-spec meaning of the flag)."""
    if not getattr(config, "multi_latent_attention", False):
        raise ValueError("multi_latent_attention=False: the MLA spec needs an MLATransformerConfig; "
                         "use --attention-type mla")
    norms = bool(getattr(config, "qk_layernorm", False))
    q_lora = getattr(config, "q_lora_rank", None) is not None
    return ModuleSpec(
        module=compat.mla_self_attention_class(),
        params={"attn_mask_type": AttnMaskType.causal},
        # keywords only: 0.19 declares linear_proj and the norm slots without defaults
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear,
            # without q-LoRA there is no query latent to normalise (0.19 rejects a norm there)
            q_layernorm=Norm if norms and q_lora else IdentityOp,
            kv_layernorm=Norm if norms else IdentityOp,
        ),
    )
