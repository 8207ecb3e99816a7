"""Block specs for Megatron's own pretrain CLI: ``--spec layer_specs.pretrain gpt_block_spec|mhc_block_spec``.

Each applies this project's knob file (``layer_specs/knobs.py``: ``MEGATRON_EXT_CONFIG``) to the
config Megatron passes in, then builds the same block as ``layer_specs.gpt`` / ``layer_specs.mhc``.
``layer_specs.mhc mhc_block_spec`` reads the knob file itself, so the two mHC names are the same
block; ``layer_specs.gpt gpt_block_spec`` does not read it (the dense baseline).
"""

from __future__ import annotations

from typing import Optional

from layer_specs import knobs


def gpt_block_spec(config, vp_stage: Optional[int] = None):
    from layer_specs.gpt import gpt_block_spec as build

    knobs.apply(config)
    # Megatron 0.19's GPTModelConfig wraps the TransformerConfig the layers read
    return build(getattr(config, "transformer", None) or config, vp_stage)


def mhc_block_spec(config, vp_stage: Optional[int] = None):
    from layer_specs.mhc import mhc_block_spec as build

    return build(config, vp_stage)
