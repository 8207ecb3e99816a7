"""Megatron modules (own parameters; TP/SP/EP aware) used by the layer specs."""
