"""Weight conversions between attention variants (docs/gqla.md): TransGQLA, GQA -> GQLA."""

from megatron_ext.convert.transgqla import (ConversionReport, convert_gqa_to_gqla, logit_change,
                                            split_fused_qkv)

__all__ = ["ConversionReport", "convert_gqa_to_gqla", "logit_change", "split_fused_qkv"]
