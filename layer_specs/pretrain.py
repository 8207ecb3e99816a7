"""Block specs for Megatron's own pretrain CLI: ``--spec layer_specs.pretrain gpt_block_spec|mhc_block_spec``.

Each applies this project's knob file (``layer_specs/knobs.py``: ``MEGATRON_EXT_CONFIG``) to the
config Megatron passes in, then builds the same block as ``layer_specs.gpt`` / ``layer_specs.mhc``.
"""

from __future__ import annotations

from typing import Optional

from layer_specs import knobs


def gpt_block_spec(config, vp_stage: Optional[int] = None):
    from layer_specs.gpt import gpt_block_spec as build

    knobs.apply(config)
    return build(getattr(config, "transformer", None) or config, vp_stage)


def mhc_block_spec(config, vp_stage: Optional[int] = None):
    from layer_specs.mhc import mhc_block_spec as build

    knobs.apply(config)
    return build(getattr(config, "transformer", None) or config, vp_stage)
