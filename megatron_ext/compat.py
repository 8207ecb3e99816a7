"""The one place that knows which megatron-core is installed (0.16.1 on CPU/CI, 0.19.2 on GPU) and
whether Transformer Engine, apex and Triton are present. Modules ask this module for a capability,
never for a version number.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from typing import Any, Dict, List, Tuple

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
            f"(0.16.1 is the newest for Python 3.11, 0.19.2 is tested on GPU)")


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


def transformer_config_fields() -> set:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


def make_transformer_config(config_cls=None, **fields: Any):
    """Build a TransformerConfig (or subclass), dropping fields this megatron-core lacks.

    Dropped fields are logged once: they are knobs a newer version added (e.g. on 0.16.1) and
    their absence never changes numerics of the lanes we run.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    config_cls = config_cls or TransformerConfig
    known = {f.name for f in dataclasses.fields(config_cls)}
    dropped = sorted(k for k in fields if k not in known)
    if dropped:
        log.info("megatron-core %s has no TransformerConfig field(s) %s; ignored",
                 mcore_version(), ", ".join(dropped))
    return config_cls(**{k: v for k, v in fields.items() if k in known})


# ------------------------------------------------------------------------------------------------
# Specs: 0.16.1 uses ModuleSpec everywhere; 0.19.2 uses functools.partial for MLP/MoE slots.


def get_submodules(spec: Any) -> Any:
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def layer_forward_kwargs() -> Tuple[str, ...]:
    """Constructor kwargs that newer TransformerLayer versions pass and 0.16.1 does not know."""
    return ("is_mtp_layer", "add_layer_offset", "pp_layer_offset", "name")


# ------------------------------------------------------------------------------------------------
# Parallel state and RNG


def initialize_model_parallel(tp: int, pp: int, ep: int, cp: int = 1, vpp: int | None = None) -> None:
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
    )


def seed_model_parallel(seed: int) -> None:
    """Megatron's model-parallel seeding; on the CPU lane the patched tracker makes it CPU-safe."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def optimizer_config(**fields: Any):
    from megatron.core.optimizer import OptimizerConfig

    known = {f.name for f in dataclasses.fields(OptimizerConfig)}
    return OptimizerConfig(**{k: v for k, v in fields.items() if k in known})


def ddp_config(**fields: Any):
    from megatron.core.distributed import DistributedDataParallelConfig

    known = {f.name for f in dataclasses.fields(DistributedDataParallelConfig)}
    return DistributedDataParallelConfig(**{k: v for k, v in fields.items() if k in known})


def runtime_flags() -> Dict[str, Any]:
    return {
        "megatron_core": str(mcore_version()),
        "has_megatron_training": has_megatron_training(),
        "transformer_engine": HAVE_TE,
        "apex": HAVE_APEX,
        "triton": HAVE_TRITON,
    }


def unknown_kwargs(kwargs: Dict[str, Any], allowed: List[str]) -> List[str]:
    return [k for k in kwargs if k not in allowed]
