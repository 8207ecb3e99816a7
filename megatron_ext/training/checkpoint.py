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
    subs = _sub_optimizers(optimizer)
    saved_subs = _saved_sub_optimizers(common["optimizer"])
    if len(subs) == len(saved_subs):
        # Non-sharded entries (scheduler, iteration, extra) come back from the common state file.
        state = _state(model, optimizer, is_loading=True)
        loaded = dist_checkpointing.load(state, str(path))
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    else:
        loaded = _load_regrouped(path, model, optimizer, subs, saved_subs)
    scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["iteration"]), dict(loaded["extra"])


# -- optimizer state between one optimizer and a chain of them ---------------------------------
# Megatron's get_megatron_optimizer returns one optimizer for a model without expert-parallel
# parameters and a ChainedOptimizer [dense, expert] for one with them (EP > 1, or expert TP != TP),
# which writes each part's state under a ``chained_<i>.`` prefix and its counters as a list. The
# state of every parameter is keyed by the parameter's checkpoint key either way, so a run that
# changes between the two (EP=2 -> EP=1, or a checkpoint of a fused MoE run written before its
# experts followed Megatron's expert-parallel rule) loads each part's tensors under the names
# the checkpoint holds them by, and its step counter and loss scale from the checkpoint.

def _sub_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def _saved_sub_optimizers(saved: Any) -> list:
    """The common (non-tensor) optimizer state of each part of a checkpoint's optimizer."""
    if isinstance(saved, dict) and saved and all(isinstance(k, int) for k in saved):  # a chain
        return [saved[k] for k in sorted(saved)]
    return [saved]


def _counters(tree: Any, found: Dict[str, list]) -> None:
    """Collect the step counters (``common_step``, a param group's ``step``) and the grad scaler."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "common_step":
                found["step"].append(float(v))
            elif k == "grad_scaler" and v is not None:
                found["grad_scaler"].append(v)
            elif k == "param_groups":
                found["step"].extend(float(g["step"]) for g in v if isinstance(g, dict) and "step" in g)
            else:
                _counters(v, found)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _counters(v, found)


def _set_counters(tree: Any, step: Optional[float], grad_scaler: Any) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "common_step" and step is not None:
                tree[k] = torch.as_tensor(step, dtype=v.dtype if torch.is_tensor(v) else torch.float32)
            elif k == "grad_scaler" and grad_scaler is not None:
                tree[k] = grad_scaler
            elif k == "param_groups" and step is not None:
                for g in v:
                    if isinstance(g, dict) and "step" in g:
                        g["step"] = type(g["step"])(step) if not torch.is_tensor(g["step"]) else \
                            torch.as_tensor(step, dtype=g["step"].dtype)
            else:
                _set_counters(v, step, grad_scaler)
    elif isinstance(tree, list):
        for v in tree:
            _set_counters(v, step, grad_scaler)


def _load_regrouped(path: Path, model, optimizer, subs: list, saved_subs: list) -> Dict[str, Any]:
    """Load ``path`` into ``optimizer`` (its parts ``subs``) when the checkpoint's optimizer was
    chained differently (``saved_subs``): each part's sharded entries are looked up by their own
    key or under one of the checkpoint's ``chained_<i>.`` prefixes; the parts' other entries
    (parameter groups, which Megatron matches by their options) stay this run's, with the
    checkpoint's step counter and grad scaler."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    # the checkpoint's tensor and object keys (an object's key carries its "/shard_..." suffix)
    names = {key.split("/")[0] for key in load_sharded_metadata(str(path))}
    prefixes = [""] if len(saved_subs) <= 1 else [f"chained_{i}." for i in range(len(saved_subs))]

    model_sd = model_state(model)
    parts = {}
    for idx, sub in enumerate(subs):
        sd = sub.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
        for entry in nested_values(sd):
            if not isinstance(entry, ShardedBase):
                continue
            found = [p + entry.key for p in prefixes if p + entry.key in names]
            if not found:
                from megatron_ext.config import ConfigError

                raise ConfigError(
                    f"{path}: holds no optimizer state for {entry.key!r} (looked under "
                    f"{[p + entry.key for p in prefixes]}); the checkpoint's optimizer covers other "
                    "parameters than this run's - resume with the model it was written with")
            entry.key = found[0]
        parts[idx] = sd
    loaded = dist_checkpointing.load({"model": model_sd, "regrouped_optimizer": parts}, str(path))
    model.load_state_dict(loaded["model"])

    counters: Dict[str, list] = {"step": [], "grad_scaler": []}
    _counters(saved_subs, counters)
    step = max(counters["step"]) if counters["step"] else None
    scaler = counters["grad_scaler"][0] if counters["grad_scaler"] else None
    states = []
    for idx, sub in enumerate(subs):
        # this part's own entries (its parameter groups), the checkpoint's counters, its tensors
        state = loaded["regrouped_optimizer"][idx]
        _fill_missing(state, parts[idx])  # the request keeps this part's plain entries
        _fill_missing(state, saved_subs[0], skip=("param_groups",))
        _set_counters(state, step, scaler)
        states.append(state)
    optimizer.load_state_dict(states[0] if len(subs) == 1 else states)
    logging.getLogger("megatron_ext.train").info(
        "%s: optimizer state written by %s, loaded into %s by parameter key", path,
        "one optimizer" if len(saved_subs) <= 1 else f"a chain of {len(saved_subs)} optimizers",
        "one optimizer" if len(subs) == 1 else f"a chain of {len(subs)} optimizers")
    return loaded


def _fill_missing(dst: Any, src: Any, skip: Tuple[str, ...] = ()) -> None:
    """Copy into ``dst`` the plain entries of ``src`` it lacks, through nested dicts and lists of
    equal length (sharded entries are left out; they came from the checkpoint)."""
    import copy

    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(dst, dict) and isinstance(src, dict):
        for k, v in src.items():
            if k in skip or isinstance(v, ShardedBase):
                continue
            if k not in dst:
                dst[k] = v.unwrap() if isinstance(v, LocalNonpersistentObject) else copy.deepcopy(v)
            else:
                _fill_missing(dst[k], v, skip)
    elif isinstance(dst, list) and isinstance(src, list) and len(dst) == len(src):
        for d, v in zip(dst, src):
            _fill_missing(d, v, skip)
