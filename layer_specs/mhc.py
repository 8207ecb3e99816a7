"""mHC block spec: every layer an :class:`MHCTransformerLayer`, the final norm collapsing the streams.

``--spec layer_specs.mhc mhc_block_spec``. The mHC knobs come from ``config.mhc`` (an
``MHCConfig``; defaults: 4 streams, 20 Sinkhorn iterations, dynamic mappings), or under Megatron's
own pretrain CLI from the knob file (``layer_specs/knobs.py``). Attention and MLP
(dense or MoE) are the ones of the dense spec, so mHC composes with the other specs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from layer_specs.gpt import attention_spec_for, block_spec, dense_layer_spec, mlp_spec_for
from megatron_ext.config import MHCConfig
from megatron_ext import backends
from megatron_ext.modules.mhc import MHCFinalNorm, MHCFoldedNorm, MHCTransformerLayer, no_residual_bda


def mhc_layer_spec(mhc: MHCConfig, qk_layernorm: bool = False, mlp: ModuleSpec | None = None,
                   attention: ModuleSpec | None = None, normalization: str = "LayerNorm") -> ModuleSpec:
    """One mHC layer. ``normalization``: the model's (``config.normalization``; Megatron's default
    is LayerNorm); with RMSNorm and ``mhc.fold_norm`` the sublayers' input norms are folded into
    the sites (:class:`MHCFoldedNorm`)."""
    base = dense_layer_spec(qk_layernorm, mlp, attention)
    fold = mhc.folds_norm(normalization)
    norms = dict(input_layernorm=MHCFoldedNorm, pre_mlp_layernorm=MHCFoldedNorm) if fold else {}
    backends.note("mhc_norm_fold", "on" if mhc.fold_norm else "off", "on" if fold else "off",
                  "input RMSNorms fused into the sites' pre mix" if fold else
                  ("mhc fold_norm is off" if not mhc.fold_norm else
                   f"normalization={normalization!r}: only an RMSNorm folds"))
    submodules = dataclasses.replace(base.submodules, self_attn_bda=no_residual_bda,
                                     mlp_bda=no_residual_bda, **norms)
    return ModuleSpec(module=MHCTransformerLayer, params={"mhc": mhc}, submodules=submodules)


def mhc_block_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """``config.mhc`` when the config carries it (``megatron-ext train``), else the ``mhc`` section of
    the knob file (``MEGATRON_EXT_CONFIG``, Megatron's own pretrain CLI), else the defaults. The
    knob file's other sections (attention, MoE) reach the config the same way."""
    from layer_specs import knobs

    knobs.apply(config)
    # Megatron 0.19's GPTModelConfig wraps the TransformerConfig the layers (and the pipeline shape patch) read
    config = getattr(config, "transformer", None) or config
    mhc = config.mhc or MHCConfig()
    mhc.validate(config.hidden_size)
    # Pipeline p2p buffers are sized from the config; the shape patch reads this to carry n*C.
    config.mhc_num_streams = mhc.num_streams
    norm = getattr(config, "normalization", "LayerNorm")
    return block_spec(config, lambda n: mhc_layer_spec(mhc, mlp=mlp_spec_for(config, n),
                                                       attention=attention_spec_for(config, n), normalization=norm),
                      vp_stage, final_norm=MHCFinalNorm)
