"""This project's knobs for Megatron's own pretrain CLI: a YAML file named by ``MEGATRON_EXT_CONFIG``.

Megatron's ``pretrain_gpt.py --spec layer_specs.pretrain <name>`` builds the TransformerConfig from
its own flags, which know nothing of mHC streams, sparse attention or the fused MoE. The specs read
those knobs from attributes of the config (``config.mhc``, ``config.sparse_attention``, ``config.gqla``,
``config.moe``), which ``megatron-ext train`` sets itself; under Megatron's CLI :func:`apply` sets
them from the YAML file::

    mhc:                 # MHCConfig
      num_streams: 4
    sparse_attention:    # SparseAttentionConfig
      pattern: W
      window_size: 512
    moe:                 # MoEConfig
      impl: fused

The file is named by the environment variable ``MEGATRON_EXT_CONFIG`` or, for drivers that pass
:func:`add_megatron_args` as Megatron's ``extra_args_provider``, by ``--megatron-ext-config``.
Each section maps onto one frozen dataclass of ``megatron_ext.config``; :func:`register` adds one.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, Optional

from megatron_ext.config import ConfigError

ENV = "MEGATRON_EXT_CONFIG"
FLAG = "--megatron-ext-config"

# section -> "module:Class" of the dataclass the specs read as ``config.<section>``
SECTIONS: Dict[str, str] = {
    "mhc": "megatron_ext.config:MHCConfig",
    "sparse_attention": "megatron_ext.config:SparseAttentionConfig",
    "gqla": "megatron_ext.config:GQLAConfig",
    "moe": "megatron_ext.config:MoEConfig",
}


def register(section: str, target: str) -> None:
    """Add a knob section (``target`` is ``"module:Class"`` of a dataclass)."""
    SECTIONS[section] = target


def _factory(section: str) -> Callable[..., Any]:
    module, _, name = SECTIONS[section].partition(":")
    return getattr(importlib.import_module(module), name)


def config_path(explicit: Optional[str] = None) -> Optional[str]:
    """The knob file: ``explicit``, else ``--megatron-ext-config`` of Megatron's parsed args, else the env."""
    if explicit:
        return explicit
    try:  # megatron.training exists from megatron-core 0.19 on; its args are set once pretrain parsed them
        from megatron.training.global_vars import _GLOBAL_ARGS

        path = getattr(_GLOBAL_ARGS, "megatron_ext_config", None)
        if path:
            return path
    except ImportError:
        pass
    return os.environ.get(ENV) or None


def load(path: str) -> Dict[str, Dict[str, Any]]:
    """The raw sections of a knob file, checked against SECTIONS and each dataclass's fields."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{ENV}={path!r}: cannot read the knob file ({e.strerror}); use a YAML file path") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{ENV}={path!r}: the knob file must be a mapping of sections; "
                          f"use sections {sorted(SECTIONS)}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{ENV}={path!r}: unknown section {section!r}; use one of {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}={values!r}: a knob section is a mapping of fields; "
                              f"use e.g. '{section}: {{field: value}}'")
        cls = _factory(section)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise ConfigError(f"{section}.{key}={values[key]!r}: unknown knob; use one of {sorted(names)}")
    return data


def dump(knobs: Dict[str, Dict[str, Any]], path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(knobs, f, sort_keys=True)


def _gqla_defaults(config: Any, values: Dict[str, Any]) -> Dict[str, Any]:
    """GQLA's dimensions default from the attention shape, as ``megatron-ext train`` derives them."""
    head_dim = config.hidden_size // config.num_attention_heads
    out = dict(num_query_groups=getattr(config, "num_query_groups", None) or config.num_attention_heads,
               kv_lora_rank=4 * head_dim, qk_head_dim=head_dim, qk_pos_emb_head_dim=head_dim // 2,
               v_head_dim=head_dim)
    out.update(values)
    return out


def knobs_for(config: Any, path: Optional[str] = None) -> Dict[str, Any]:
    """Section -> dataclass instance for this config: the config's own attribute when set (the
    ``megatron-ext train`` path), else the knob file's section, else None."""
    config = getattr(config, "transformer", None) or config  # Megatron 0.19's GPTModelConfig wraps it
    file_knobs = load(path) if (path := config_path(path)) else {}
    out: Dict[str, Any] = {}
    for section in SECTIONS:
        own = getattr(config, section, None)
        if own is not None:
            out[section] = own
        elif section in file_knobs:
            values = dict(file_knobs[section])
            if section == "gqla":
                values = _gqla_defaults(config, values)
            try:
                out[section] = _factory(section)(**values)
            except TypeError as e:
                raise ConfigError(f"{section}={values!r}: {e}; use the fields of {SECTIONS[section]}") from None
        else:
            out[section] = None
    if out.get("mhc") is not None:
        out["mhc"].validate(config.hidden_size)
    _validate_file_knobs(config, {k: out[k] for k in file_knobs if getattr(config, k, None) is None})
    return out


def _validate_file_knobs(config: Any, knobs: Dict[str, Any]) -> None:
    """The checks ``megatron-ext train`` runs on its own flags, for the sections the file supplied
    (at spec-build time, before any layer is built, so a bad knob is one line, not a traceback)."""
    if knobs.get("moe") is not None:
        knobs["moe"].validate(prefix="moe.")
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        return
    groups = getattr(config, "num_query_groups", None) or heads
    if knobs.get("sparse_attention") is not None:
        knobs["sparse_attention"].validate(heads, groups, config.hidden_size // heads,
                                           getattr(config, "context_parallel_size", 1) or 1)
        dropout = getattr(config, "attention_dropout", 0.0)
        if dropout:
            raise ConfigError(f"attention_dropout={dropout!r}: the sparse attention op has no dropout; "
                              "use --attention-dropout 0")
    if knobs.get("gqla") is not None:
        knobs["gqla"].validate(heads, getattr(config, "tensor_model_parallel_size", 1) or 1)


def apply(config: Any, path: Optional[str] = None) -> Any:
    """Set the knob attributes on the TransformerConfig under ``config`` (Megatron 0.19's
    GPTModelConfig proxies attribute reads to its ``transformer`` only for attributes that object
    has, so they must live there)."""
    target = getattr(config, "transformer", None) or config
    for section, value in knobs_for(config, path).items():
        setattr(target, section, value)
    if target.mhc is not None:
        # the pipeline-shape patch reads the stream count from the TransformerConfig
        target.mhc_num_streams = target.mhc.num_streams
    return config


def add_megatron_args(parser):
    """``extra_args_provider`` for megatron.training: adds ``--megatron-ext-config PATH``."""
    group = parser.add_argument_group(title="megatron-ext")
    group.add_argument(FLAG, dest="megatron_ext_config", default=None,
                       help=f"YAML file of megatron-ext knobs (default: ${ENV})")
    return parser
