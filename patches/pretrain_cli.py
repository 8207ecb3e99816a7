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
