"""Patches for Megatron's own pretrain entry (``megatron.training``, megatron-core >= 0.19)."""

from __future__ import annotations

from patches import patch


@patch("prebuilt_dataset_helpers", lane="any", min_version="0.19.0",
       reason="initialize_megatron runs `make` in megatron/core/datasets on rank 0 and exits when it "
              "fails; the wheel ships the built helpers_cpp extension but no Makefile, so every "
              "pip-installed pretrain run died there. Skip the build when the extension imports")
def _prebuilt_dataset_helpers():
    import functools
    import importlib

    import megatron.core.datasets.utils as du

    original = du.compile_helpers

    @functools.wraps(original)
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:  # a source checkout: build it as upstream does
            original()

    du.compile_helpers = compile_helpers


@patch("mtp_layers_from_the_spec", lane="any", min_version="0.19.0",
       reason="megatron.training builds the multi-token-prediction layers (--mtp-num-layers) from "
              "Megatron's default layer specs whatever --spec names, so under this project's specs "
              "the MTP layer ran Megatron's own attention and MoELayer (SequentialMLP without "
              "Transformer Engine) and, under mHC, a layer it could not feed. Build them from the "
              "spec's own layer (layer_specs.gpt.mtp_block_spec) when --spec is one of this project's")
def _mtp_layers_from_the_spec():
    import functools

    try:
        import megatron.training.models.gpt as gpt
    except ImportError:   # 0.19's megatron.training needs Python >= 3.12: no pretrain CLI to patch here
        return
    original = gpt.mtp_block_spec

    @functools.wraps(original)
    def mtp_block_spec(config, transformer_layer_spec, vp_stage=None):
        if not getattr(transformer_layer_spec, "megatron_ext", False):
            return original(config, transformer_layer_spec, vp_stage=vp_stage)
        from layer_specs.gpt import mtp_block_spec as ours

        return ours(getattr(config, "transformer", None) or config, vp_stage)

    gpt.mtp_block_spec = mtp_block_spec
