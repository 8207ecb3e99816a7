"""Process group set-up from torchrun's environment, or a single local process."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    lane: str  # "cuda" or "cpu"
    backend: str


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def pick_lane(device: str) -> str:
    """``device`` is "auto" | "cpu" | "cuda"; raises ValueError when CUDA is asked for but absent."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is visible; use device='cpu' or 'auto'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(lane: str) -> DistEnv:
    """Join torchrun's group if its variables are set, else start a world of one on loopback."""
    rank = int(os.environ.get("RANK", "0"))
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = env_local_world_size()
    if lane == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=10),
            **({"device_id": device} if lane == "cuda" else {}))
    return DistEnv(rank, world, local_rank, local_world, device, lane, backend)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(abort: bool = False) -> None:
    """Destroy the process group. ``abort`` (this rank failed): abort NCCL communicators instead,
    since a graceful destroy waits for collectives the other ranks may never join."""
    if not torch.distributed.is_initialized():
        return
    if abort and torch.distributed.get_backend() == "nccl":
        from torch.distributed import distributed_c10d as c10d

        abort_fn = getattr(c10d, "_abort_process_group", None)
        if abort_fn is not None:
            abort_fn()
            return
    torch.distributed.destroy_process_group()
