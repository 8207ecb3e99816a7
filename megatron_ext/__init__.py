"""megatron-ext: sparse MQA / GQLA attention, fused MoE and mHC stream mixers for Megatron-Core."""

__version__ = "0.1.0"
