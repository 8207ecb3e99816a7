"""The one place that knows which megatron-core is installed (0.16.1 on CPU/CI, 0.19.2 on GPU) and
whether Transformer Engine, apex and Triton are present. Modules ask this module for a capability,
never for a version number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import queue
from typing import Any, Dict, Iterator, Tuple

from packaging.version import Version

log = logging.getLogger("megatron_ext.compat")

SUPPORTED_MCORE = (Version("0.16.1"), Version("0.21"))  # [min, max)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE = _has("transformer_engine") and _has("transformer_engine.pytorch")
HAVE_APEX = _has("apex")
HAVE_TRITON = _has("triton")


def _eager_compile(model=None, **kwargs):
    """``torch.compile`` as it behaves with compilation switched off: the function itself."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_core():
    """Import megatron-core. Where torch.compile is switched off (``TORCH_COMPILE_DISABLE=1``: the
    CPU lane and the tests), its import-time ``torch.compile`` decorators (``megatron.core.jit``'s
    ``jit_fuser``, about 40 fused functions) are given the plain functions they would run anyway:
    otherwise each call imports TorchDynamo and Inductor first, 1.4 s of every process's start on
    a 2-core CPU, for code that then runs eagerly. torch.compile itself is put back afterwards."""
    import os
    import sys

    if "megatron.core" in sys.modules or os.environ.get("TORCH_COMPILE_DISABLE") != "1":
        import megatron.core

        return megatron.core
    import torch

    compile_fn = torch.compile
    torch.compile = _eager_compile
    try:
        import megatron.core
    finally:
        torch.compile = compile_fn
    log.debug("megatron-core imported with torch.compile off (TORCH_COMPILE_DISABLE=1): its fused "
              "functions run eagerly, as torch.compile would run them")
    return megatron.core


@functools.lru_cache(maxsize=None)
def mcore_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


def check_mcore_supported() -> None:
    v = mcore_version()
    lo, hi = SUPPORTED_MCORE
    if not lo <= v < hi:
        raise RuntimeError(
            f"megatron-core={v}: unsupported; use megatron-core>={lo},<{hi} "
            f"(0.16.1 is the newest that installs on Python 3.11; 0.19.2 is tested on GPU and on CPU)")


def has_megatron_training() -> bool:
    """0.19+ ships ``megatron.training`` (pretrain CLI with ``--spec``); 0.16.1 does not."""
    return _has("megatron.training")


def package_versions() -> Dict[str, str]:
    """Versions of every package the receipt reports (absent ones are omitted)."""
    from importlib import metadata

    out = {}
    for dist in ("torch", "megatron-core", "triton", "transformer-engine", "transformer_engine",
                 "apex", "numpy"):
        try:
            out[dist.replace("_", "-")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------------
# TransformerConfig across versions




def _known_fields(config_cls, fields: Dict[str, Any]):
    """Instantiate a megatron-core config dataclass with the fields this version has.

    Dropped fields are logged: they are knobs another version added, and none of them changes the
    numerics of the lanes we run.
    """
    known = {f.name for f in dataclasses.fields(config_cls)}
    dropped = sorted(k for k in fields if k not in known)
    if dropped:
        log.info("megatron-core %s has no %s field(s) %s; ignored",
                 mcore_version(), config_cls.__name__, ", ".join(dropped))
    return config_cls(**{k: v for k, v in fields.items() if k in known})


def mcore_score_functions() -> Tuple[str, ...]:
    """The router score functions this megatron-core's TransformerConfig names
    (``moe_router_score_function``'s Literal: softmax and sigmoid; sqrtsoftplus from 0.19)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    annotation = str({f.name: f.type for f in dataclasses.fields(TransformerConfig)}
                     .get("moe_router_score_function", ""))
    return tuple(fn for fn in ("softmax", "sigmoid", "sqrtsoftplus") if f"'{fn}'" in annotation)


def mcore_has_field(name: str) -> bool:
    """Whether this megatron-core's TransformerConfig has the field ``name``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return name in {f.name for f in dataclasses.fields(TransformerConfig)}


def mcore_has_quantile_balancing() -> bool:
    """Whether this megatron-core's router knows ``quantile_balancing`` (from 0.19)."""
    return mcore_has_field("moe_router_quantile_balancing_ema")


def make_transformer_config(config_cls=None, **fields: Any):
    """A TransformerConfig (or subclass such as MLATransformerConfig) valid on this version.

    A router score function this version does not know (``sqrtsoftplus`` before 0.19) is what
    only the fused MoE layer reads: the config is validated with ``sigmoid``, which Megatron checks
    the same way (the expert bias needs one of the two), and then holds the one asked for."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    score = fields.get("moe_router_score_function")
    stand_in = score == "sqrtsoftplus" and score not in mcore_score_functions()
    if stand_in:
        fields = {**fields, "moe_router_score_function": "sigmoid"}
    config = _known_fields(config_cls or TransformerConfig, fields)
    if stand_in:
        config.moe_router_score_function = score
    for name in _FUSED_LAYER_FIELDS:   # read by the fused layer on any version
        if name in fields:
            setattr(config, name, fields[name])
    return config


# router fields of a newer megatron-core that the fused MoE layer reads on an older one too
_FUSED_LAYER_FIELDS = ("moe_router_quantile_balancing_ema", "moe_router_force_biased")


def mla_transformer_config_class():
    """Megatron's ``MLATransformerConfig`` (the MLA dims and RoPE type live on the config class)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig


@functools.lru_cache(maxsize=None)
def mla_self_attention_class():
    """Megatron's ``MLASelfAttention``, built from exactly the submodules its spec names.

    0.19 resolves the Q/KV norm and up-projection slots itself (``_resolve_qk_norm_config``): with
    ``qk_layernorm`` and no q-LoRA it asks for a fused norm+linear q projection, which only Transformer
    Engine has, so the local spec (norm on the KV latent, plain q projection; 0.16.1's semantics)
    cannot be built. The subclass takes the spec's slots as given; 0.16.1 has no resolver."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if not hasattr(MLASelfAttention, "_resolve_qk_norm_config"):
        return MLASelfAttention

    class SpecMLASelfAttention(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):
            return {name: getattr(submodules, name) for name in
                    ("linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj", "q_layernorm", "kv_layernorm")}

    return SpecMLASelfAttention



# ------------------------------------------------------------------------------------------------
# Parallel state and RNG


# The torch process groups the last initialize_model_parallel created (see destroy_model_parallel).
_MODEL_PARALLEL_GROUPS: list = []


def _live_process_groups() -> list:
    from torch.distributed import distributed_c10d as c10d

    return list(c10d._world.pg_map)


def initialize_model_parallel(tp: int, pp: int, ep: int, cp: int = 1, vpp: int | None = None,
                              etp: int | None = None) -> None:
    """Megatron's process groups; ``etp``: expert tensor-parallel size (None: = tp)."""
    from megatron.core import parallel_state as ps

    before = set(_live_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    _MODEL_PARALLEL_GROUPS[:] = [g for g in _live_process_groups() if g not in before]


def seed_model_parallel(seed: int) -> None:
    """Megatron's model-parallel seeding; on the CPU lane the patched tracker makes it CPU-safe."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel(destroy_groups: bool = False) -> None:
    """Megatron's ``destroy_model_parallel``, which forgets its groups but leaves the torch process
    groups alive (23 a call on megatron-core 0.19.2, even at world size 1) until the default group
    is destroyed. A process that initialises many times (the tests' in-process layers) piles them
    up, and destroying hundreds at once took 5 ms each (up to 20 s in one call).
    ``destroy_groups``: destroy the gloo groups the last :func:`initialize_model_parallel` made
    now. Only where nothing built on them outlives this call: torch's DTensor keeps device meshes
    in caches that compare meshes by their ranks, so a later FSDP2 mesh over the same ranks can be
    handed the destroyed group. NCCL groups are never destroyed here (the caller may have to abort
    them after a failure: ``training.distributed.shutdown``)."""
    import torch
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    groups, _MODEL_PARALLEL_GROUPS[:] = list(_MODEL_PARALLEL_GROUPS), []
    if (not destroy_groups or not torch.distributed.is_initialized()
            or torch.distributed.get_backend() != "gloo"):
        return
    live = set(_live_process_groups())
    for g in groups:
        if g in live:
            torch.distributed.destroy_process_group(g)


def optimizer_config(**fields: Any):
    from megatron.core.optimizer import OptimizerConfig

    return _known_fields(OptimizerConfig, fields)


def ddp_config(**fields: Any):
    from megatron.core.distributed import DistributedDataParallelConfig

    return _known_fields(DistributedDataParallelConfig, fields)


def runtime_flags() -> Dict[str, Any]:
    return {
        "megatron_core": str(mcore_version()),
        "has_megatron_training": has_megatron_training(),
        "transformer_engine": HAVE_TE,
        "apex": HAVE_APEX,
        "triton": HAVE_TRITON,
    }



# ------------------------------------------------------------------------------------------------
# MoE (fused layer): process groups and Megatron's aux-loss tracker


def expert_parallel_groups():
    """(ep_group, ep_rank, ep_size, expert_dp_rank, dp_cp_group) for a layer built outside
    Megatron's MoELayer (0.16.1 passes it no process-group collection)."""
    from megatron.core import parallel_state as ps

    ep_group = ps.get_expert_model_parallel_group()
    edp_rank = ps.get_expert_data_parallel_rank()
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    return (ep_group, torch_dist_rank(ep_group), torch_dist_size(ep_group), edp_rank, dp_cp)


def torch_dist_rank(group) -> int:
    import torch

    return torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0


def torch_dist_size(group) -> int:
    import torch

    return torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1


def megatron_router_updates() -> frozenset:
    """What this megatron-core's ``finalize_model_grads`` does once per step to every module that
    carries a router's attributes: "expert_bias" (moves ``expert_bias`` from
    ``local_tokens_per_expert``) and, from 0.19, "quantile_balancing" (moves ``qb_beta`` from
    ``qb_beta_accum`` / ``qb_beta_count``). The fused MoE layer carries both names."""
    import importlib

    mod = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    out = set()
    if hasattr(mod, "_update_router_expert_bias"):
        out.add("expert_bias")
    if hasattr(mod, "_update_router_qb_beta"):
        out.add("quantile_balancing")
    return frozenset(out)


def clear_moe_aux_loss_tracker(drop: bool = False) -> None:
    """Reset Megatron's per-layer aux-loss tracker (0.16.1: a dict; 0.19: a metrics object).
    ``drop``: remove its entries instead of zeroing them. Each entry is sized by the layer count
    of the first model that logs into it, so a process that builds a model with more layers (an
    MTP layer adds slots) after another one must start it afresh."""
    from megatron.core.transformer.moe import moe_utils

    tracker = getattr(moe_utils, "get_moe_metrics_tracker", None)
    if tracker is None:
        if drop:
            moe_utils.get_moe_layer_wise_logging_tracker().clear()
        else:
            moe_utils.clear_aux_losses_tracker()
    elif drop:
        metrics = getattr(tracker(), "_metrics", None)
        if isinstance(metrics, dict):
            metrics.clear()
    else:
        tracker().clear()


def take_mtp_losses(drop: bool = False):
    """This rank's multi-token-prediction losses since the last call, one per MTP depth (each the
    sum over micro-batches of a micro-batch's mean token loss, not yet reduced over ranks), as a
    float64 copy on the tracker's device; None where nothing was recorded (a rank without
    the MTP layers, an evaluation-only forward). Zeroes Megatron's MTP tracker (0.16.1 keeps the
    losses under ``values``, 0.19 under ``loss_values`` beside prediction counts); ``drop`` empties
    it instead, as a run must whose MTP depth differs from an earlier run's in the same process
    (the tracker is a class attribute, sized by the first model that logs into it)."""
    import torch
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    values = tracker.get("loss_values", tracker.get("values"))
    out = None if values is None else values.detach().double().clone()
    if drop:
        tracker.clear()
    else:
        for key in ("loss_values", "values", "correct_values", "total_values"):
            if torch.is_tensor(tracker.get(key)):
                tracker[key].zero_()
    return out


def record_moe_aux_loss(name: str, value, layer_number: int, num_layers: int) -> None:
    """Log an aux loss (divided by its coefficient, as Megatron logs it) into Megatron's tracker."""
    from megatron.core.transformer.moe import moe_utils

    tracker = getattr(moe_utils, "get_moe_metrics_tracker", None)
    if tracker is not None:
        tracker().record(name=name, value=value, layer_number=layer_number, num_layers=num_layers,
                         reduce_group=None, avg_group=None, needs_dp_avg=True)
    else:
        moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers)


@contextlib.contextmanager
def in_process_save_results() -> Iterator[None]:
    """A synchronous ``dist_checkpointing.save`` hands its write results back through an in-process
    queue instead of the ``multiprocessing`` manager Megatron's file writer starts for them (both
    0.16.1 and 0.19.2 keep it in ``filesystem_async._results_queue``). That manager is a "spawn"
    server that has to import torch to unpickle the results: about 2 s on the first save of every
    process, while a synchronous save reads them back in the same process. Megatron's own queue is
    put back afterwards, so its asynchronous saves, which need the manager, keep it."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        fa = None
    if fa is None or not hasattr(fa, "_results_queue"):
        yield
        return
    previous = fa._results_queue
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = previous
