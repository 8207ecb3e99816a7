"""Megatron distributed checkpoints: ``<root>/iter_NNNNNNN`` plus a tracker file naming the newest.

A save writes into ``iter_NNNNNNN.partial`` and is renamed once every rank has finished, and the
tracker is replaced atomically after that, so a job killed mid-save leaves the previous checkpoint
as the one ``--resume`` loads.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_ext import compat
from megatron_ext.observability.files import write_text_atomic
from megatron_ext.training.distributed import barrier

TRACKER = "latest_checkpointed_iteration.txt"
WEIGHTS_ONLY = "weights_only"  # common-state key of a checkpoint without optimizer state


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: Path) -> Optional[int]:
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"checkpoint tracker={str(tracker)!r}: holds {text!r}, not an iteration; "
                         "delete it or point --run-dir at a folder with a valid checkpoint")
    return int(text)


# How Megatron's distributed optimizer lays out its shards in a checkpoint: "fully_reshardable"
# writes each parameter's Adam states and fp32 master in the parameter's own (global) shape, so the
# checkpoint loads at any TP/PP/EP/DP layout, with or without the distributed optimizer (Megatron's
# --dist-ckpt-optim-fully-reshardable). Other optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def model_state(model) -> Dict[str, Any]:
    """The model's sharded state dict with the metadata Megatron's training passes: the
    data-parallel group, which megatron-core 0.16.1's GPTModel reads unguarded where the last
    pipeline stage keeps a copy of the word embeddings for its MTP layers (PP > 1)."""
    from megatron.core import parallel_state as ps

    return model.sharded_state_dict(metadata={"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)})


def _state(model, optimizer, is_loading: bool) -> Dict[str, Any]:
    model_sd = model_state(model)
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                         metadata=OPTIMIZER_METADATA)}


def _write(root: Path, iteration: int, state: Dict[str, Any]) -> Path:
    """Collective: ``state`` into ``iter_N.partial``, renamed to ``iter_N`` only once every rank has
    written, then the tracker (atomically): a killed job never leaves a half checkpoint behind."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    barrier()
    with compat.in_process_save_results():
        dist_checkpointing.save(state, str(partial))
    barrier()
    if _is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_text_atomic(root / TRACKER, str(iteration))
    barrier()
    return final


def save(root: Path, iteration: int, model, optimizer, scheduler, extra: Dict[str, Any]) -> Path:
    """Collective: every rank calls it. ``model`` is the unwrapped GPTModel chunk."""
    state = _state(model, optimizer, is_loading=False)
    state.update(scheduler=scheduler.state_dict(), iteration=iteration, extra=extra)
    return _write(root, iteration, state)


def save_weights_only(root: Path, iteration: int, model, extra: Dict[str, Any]) -> Path:
    """A checkpoint of the model weights alone (as written by ``megatron-ext convert``): ``load``
    restores the weights and leaves the optimizer and LR schedule fresh, like Megatron's
    ``--finetune``. Same folder layout, tracker and atomic rename as :func:`save`."""
    return _write(root, iteration, {"model": model_state(model), "iteration": iteration,
                                    "extra": extra, WEIGHTS_ONLY: True})


# ``extra`` key naming the optimizer layout a checkpoint's optimizer state was written in: Megatron's
# distributed optimizer stores its fp32 masters as ``param``, the other optimizers as ``fp32_param``
DISTRIBUTED_OPTIMIZER = "distributed_optimizer"


def load(root: Path, model, optimizer, scheduler,
         distributed_optimizer: bool = False) -> Optional[Tuple[int, Dict[str, Any]]]:
    """Load the newest checkpoint under ``root`` in place; None when there is none. A weights-only
    checkpoint (:func:`save_weights_only`) restores the model and leaves optimizer and scheduler fresh.
    ``distributed_optimizer``: whether this run uses Megatron's distributed optimizer, whose optimizer
    state a checkpoint written without it cannot fill (and the reverse)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if common.get(WEIGHTS_ONLY):
        loaded = dist_checkpointing.load({"model": model_state(model)}, str(path))
        model.load_state_dict(loaded["model"])
        logging.getLogger("megatron_ext.train").info(
            "%s holds weights only: the optimizer and the LR schedule start fresh", path)
        return int(common["iteration"]), dict(common["extra"])
    saved = bool(common.get("extra", {}).get(DISTRIBUTED_OPTIMIZER, False))
    if saved != distributed_optimizer:
        from megatron_ext.config import ConfigError

        flag = "--use-distributed-optimizer"
        raise ConfigError(
            f"use_distributed_optimizer={distributed_optimizer}: {path} holds optimizer state written "
            f"{'with' if saved else 'without'} {flag}, whose layout this run's optimizer cannot load; "
            f"resume {'with' if saved else 'without'} {flag}")
    # Non-sharded entries (scheduler, iteration, extra) come back from the common state file.
    state = _state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["iteration"]), dict(loaded["extra"])
