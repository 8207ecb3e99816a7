"""Single-rank torch.distributed + Megatron parallel state for layer benchmarks (TP=PP=EP=1)."""

from __future__ import annotations

import socket

_SEEDED = False
_OWN_GROUP = False  # True when ensure_model_parallel created the process group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model_parallel(cpu: bool, seed: int = 1234) -> None:
    """Idempotent: applies the lane's patches (``"cpu"`` on CPU), inits a world-size-1 process group
    (gloo on CPU, nccl on GPU; ``tcp://127.0.0.1`` on a free port) unless one exists, initialises
    Megatron model parallel (1, 1, 1) and seeds Megatron's model-parallel RNG once."""
    global _SEEDED, _OWN_GROUP
    import torch
    import torch.distributed as dist

    from megatron_ext import compat
    from patches import apply_patches

    # "gpu" selects only the lane-"any" patches (upstream bugs hit without Transformer Engine).
    apply_patches("cpu" if cpu else "cuda")
    if not dist.is_initialized():
        if not cpu:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo" if cpu else "nccl",
                                init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
        _OWN_GROUP = True
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        compat.initialize_model_parallel(1, 1, 1)
    if not _SEEDED:
        compat.seed_model_parallel(seed)
        _SEEDED = True


def shutdown() -> None:
    """Undo :func:`ensure_model_parallel` if it created the process group (no-op otherwise)."""
    global _SEEDED, _OWN_GROUP
    if not _OWN_GROUP:
        return
    import torch.distributed as dist

    from megatron_ext.compat import destroy_model_parallel

    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = _SEEDED = False
