"""Megatron layer specs of megatron-ext: what ``--spec layer_specs.<module> <name>`` names.

Each builder takes the TransformerConfig (and optionally ``vp_stage``) and returns a
``TransformerBlockSubmodules`` for the current pipeline stage, which ``GPTModel`` accepts as its
``transformer_layer_spec`` on megatron-core 0.16.1 and 0.19.2 alike.
"""
