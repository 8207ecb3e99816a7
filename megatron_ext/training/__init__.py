"""The training job behind ``megatron-ext train``: Megatron-Core model, DDP, optimizer, schedules,
Megatron data pipeline and distributed checkpoints, on CPU (gloo) or GPU (NCCL)."""
