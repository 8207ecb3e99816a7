"""Weight conversions between attention variants (docs/gqla.md): TransGQLA (GQA -> GQLA) and
MLA -> GQLA; ``megatron-ext convert`` runs them over a run folder's checkpoint."""

from megatron_ext.convert.mla import MLAConversionReport, convert_mla_model_to_gqla, convert_mla_to_gqla
from megatron_ext.convert.transgqla import (ConversionReport, convert_gqa_to_gqla, logit_change,
                                            split_fused_qkv)

__all__ = ["ConversionReport", "MLAConversionReport", "convert_gqa_to_gqla", "convert_mla_model_to_gqla",
           "convert_mla_to_gqla", "logit_change", "split_fused_qkv"]
