"""Run configuration: embedded presets + Megatron-style overrides, validated once, before any work.

Every check raises :class:`ConfigError` with ``field=value: why; use allowed`` so the CLI can print
one line and exit non-zero before a process group, a model or a run folder exists.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional


class ConfigError(ValueError):
    """Bad user input, found at config time."""


def _err(field: str, value: Any, why: str, allowed: str) -> ConfigError:
    return ConfigError(f"{field}={value!r}: {why}; use {allowed}")


@dataclasses.dataclass(frozen=True)
class MHCConfig:
    """mHC stream mixer (DeepSeek, arXiv 2512.24880): ``num_streams`` residual streams of width
    ``hidden_size`` each, mixed around every sublayer with Sinkhorn-projected weights."""

    num_streams: int = 4
    sinkhorn_iters: int = 20
    mode: str = "dynamic"  # dynamic: per-token mappings; static: learned per layer
    backend: str = "auto"  # auto | triton | torch
    alpha_init: float = 0.01
    eps: float = 1e-6

    def validate(self, hidden_size: int) -> None:
        if not isinstance(self.num_streams, int) or self.num_streams < 1:
            raise _err("mhc_num_streams", self.num_streams, "must be a positive integer",
                       "an integer >= 1 (4 is the fused lane)")
        if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise _err("mhc_sinkhorn_iters", self.sinkhorn_iters, "Sinkhorn needs at least one iteration",
                       "an integer >= 1 (20 in the paper)")
        if self.mode not in ("dynamic", "static"):
            raise _err("mhc_mode", self.mode, "unknown mode", "'dynamic' or 'static'")
        if self.backend not in ("auto", "triton", "torch"):
            raise _err("mhc_backend", self.backend, "unknown backend", "'auto', 'triton' or 'torch'")
        if self.backend == "triton" and self.num_streams != 4:
            raise _err("mhc_backend", self.backend,
                       f"the fused Triton lane is for num_streams=4, not {self.num_streams}",
                       "mhc_backend='auto' or 'torch', or mhc_num_streams=4")
        if self.alpha_init <= 0:
            raise _err("mhc_alpha_init", self.alpha_init, "must be positive", "a small value such as 0.01")
        if hidden_size < 1:
            raise _err("hidden_size", hidden_size, "must be positive", "the per-stream width C")


@dataclasses.dataclass
class TrainConfig:
    # model (Megatron names)
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # default 4*h (or 8/3*h rounded for SwiGLU)
    seq_length: int = 128
    normalization: str = "RMSNorm"
    swiglu: bool = True
    position_embedding_type: str = "rope"
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    num_experts: Optional[int] = None  # MoE in every layer when set
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default: ffn_hidden_size
    moe_aux_loss_coeff: float = 0.0
    # mHC stream mixers: off unless mhc_num_streams is set; hidden_size is the width of one stream
    mhc_num_streams: Optional[int] = None
    mhc_sinkhorn_iters: int = 20
    mhc_mode: str = "dynamic"
    mhc_backend: str = "auto"
    # optimisation
    micro_batch_size: int = 8
    global_batch_size: int = 16
    train_iters: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 30
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    seed: int = 1234
    bf16: Optional[bool] = None  # default: on for CUDA, off on CPU
    # activation recompute (Megatron's): full layers, uniform chunks of recompute_num_layers
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    # parallel lanes
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # data
    data_path: Optional[str] = None  # None: the corpus shipped in the package
    data_cache_dir: Optional[str] = None  # default: <runs_root>/.data-cache
    # run folder, checkpoints, logging
    preset: str = "tiny"
    run_dir: Optional[str] = None  # default: <runs_root>/<preset>-<timestamp>
    runs_root: str = "runs"
    save_interval: int = 100
    resume: bool = False
    eval_interval: int = 100
    eval_iters: int = 4
    log_interval: int = 25
    progress: str = "auto"  # auto | bar | log
    device: str = "auto"  # auto | cpu | cuda
    exit_after_iters: Optional[int] = None  # stop early (simulates a killed job in tests)


PRESETS: Dict[str, Dict[str, Any]] = {
    # The default: a few hundred steps of a byte-level GPT on the shipped corpus; ~1-2 min on 2 CPU cores.
    "tiny": {},
    # For the unit tests: seconds on CPU.
    "test": dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                 micro_batch_size=4, global_batch_size=8, train_iters=20, lr_warmup_iters=2,
                 save_interval=10, eval_interval=10, eval_iters=2, log_interval=5),
    # A GPU-sized run: 25M parameters, 64k tokens per step. 200 steps is ~12 passes over the
    # 1.1 MB corpus, where validation loss bottoms out; longer runs overfit it.
    "small": dict(num_layers=8, hidden_size=512, num_attention_heads=8, seq_length=1024,
                  micro_batch_size=16, global_batch_size=64, train_iters=200, lr=1.5e-3,
                  min_lr=1.5e-4, lr_warmup_iters=20, save_interval=100, eval_interval=50,
                  log_interval=20),
}

_CHOICES = {
    "normalization": ("LayerNorm", "RMSNorm"),
    "position_embedding_type": ("rope", "learned_absolute"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "progress": ("auto", "bar", "log"),
    "device": ("auto", "cpu", "cuda"),
    "recompute_granularity": (None, "full", "selective"),
    "recompute_method": ("uniform", "block"),
}


def from_preset(preset: str = "tiny", **overrides: Any) -> TrainConfig:
    if preset not in PRESETS:
        raise _err("preset", preset, "unknown preset", f"one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in overrides:
        if key not in fields:
            raise _err("option", key, "unknown option", "megatron-ext train --help for the list")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def mhc_config(cfg: TrainConfig) -> Optional[MHCConfig]:
    if cfg.mhc_num_streams is None:
        return None
    return MHCConfig(num_streams=cfg.mhc_num_streams, sinkhorn_iters=cfg.mhc_sinkhorn_iters,
                     mode=cfg.mhc_mode, backend=cfg.mhc_backend)


def ffn_hidden_size(cfg: TrainConfig) -> int:
    if cfg.ffn_hidden_size is not None:
        return cfg.ffn_hidden_size
    if cfg.swiglu:  # keep the parameter count of a 4h GELU MLP, rounded to 64
        return int((8 * cfg.hidden_size / 3 + 63) // 64 * 64)
    return 4 * cfg.hidden_size


def validate(cfg: TrainConfig, world_size: int, gpus_per_node: Optional[int] = None,
             lane: str = "cpu") -> int:
    """Check every field; return the data-parallel size. Raises ConfigError on the first problem."""
    for name, allowed in _CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise _err(name, getattr(cfg, name), "not a valid choice", f"one of {list(allowed)}")
    positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "global_batch_size", "train_iters", "save_interval", "eval_interval", "log_interval",
                "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "expert_model_parallel_size", "make_vocab_size_divisible_by",
                "recompute_num_layers")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise _err(name, value, "must be a positive integer", "an integer >= 1")
    for name in ("eval_iters", "lr_warmup_iters"):
        if getattr(cfg, name) < 0:
            raise _err(name, getattr(cfg, name), "must not be negative", "an integer >= 0")
    if cfg.lr <= 0:
        raise _err("lr", cfg.lr, "must be positive", "a learning rate > 0")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise _err("min_lr", cfg.min_lr, f"must lie in [0, lr={cfg.lr}]", "a value <= lr")
    if cfg.lr_warmup_iters >= cfg.train_iters and cfg.train_iters > 1:
        raise _err("lr_warmup_iters", cfg.lr_warmup_iters,
                   f"must be smaller than train_iters={cfg.train_iters}", "fewer warm-up iterations")
    if cfg.clip_grad < 0:
        raise _err("clip_grad", cfg.clip_grad, "must not be negative", "0 (off) or a norm > 0")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise _err("hidden_size", cfg.hidden_size,
                   f"not divisible by num_attention_heads={cfg.num_attention_heads}",
                   "a multiple of the head count")
    groups = cfg.num_query_groups or cfg.num_attention_heads
    if groups < 1 or cfg.num_attention_heads % groups:
        raise _err("num_query_groups", cfg.num_query_groups,
                   f"must divide num_attention_heads={cfg.num_attention_heads}", "a divisor of the head count")
    mhc = mhc_config(cfg)
    if mhc is not None:
        mhc.validate(cfg.hidden_size)
    if cfg.bf16 and lane == "cpu":
        raise _err("bf16", True, "the CPU lane trains in fp32", "--no-bf16, or run on a GPU")
    if cfg.exit_after_iters is not None and cfg.exit_after_iters < 1:
        raise _err("exit_after_iters", cfg.exit_after_iters, "must be positive", "an integer >= 1")

    tp, pp, cp, ep = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                      cfg.context_parallel_size, cfg.expert_model_parallel_size)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise _err("world_size", world_size,
                   f"not divisible by tensor*pipeline*context parallel = {tp}*{pp}*{cp} = {model_parallel}",
                   f"a world size that is a multiple of {model_parallel}, or smaller lanes")
    dp = world_size // model_parallel
    if ep > 1 and not cfg.num_experts:
        raise _err("expert_model_parallel_size", ep, "expert parallelism needs an MoE model",
                   "--num-experts N (a multiple of the EP size), or expert_model_parallel_size 1")
    if cfg.num_experts is not None:
        if cfg.num_experts < 1 or cfg.num_experts % ep:
            raise _err("num_experts", cfg.num_experts,
                       f"must be a positive multiple of expert_model_parallel_size={ep}",
                       f"a multiple of {ep}")
        if not 1 <= cfg.moe_router_topk <= cfg.num_experts:
            raise _err("moe_router_topk", cfg.moe_router_topk,
                       f"must lie in [1, num_experts={cfg.num_experts}]", "1 <= k <= num_experts")
        if tp > 1 and not cfg.sequence_parallel:
            raise _err("sequence_parallel", False, "MoE with tensor parallelism needs sequence parallel",
                       "--sequence-parallel")
    if world_size % (ep * pp):
        raise _err("expert_model_parallel_size", ep,
                   f"expert*pipeline parallel = {ep * pp} does not divide world_size={world_size}",
                   "a divisor of world_size / pipeline_model_parallel_size")
    if gpus_per_node is not None and tp > gpus_per_node:
        raise _err("tensor_model_parallel_size", tp,
                   f"larger than the {gpus_per_node} devices of one node", f"at most {gpus_per_node}")
    if cfg.num_attention_heads % tp:
        raise _err("tensor_model_parallel_size", tp,
                   f"does not divide num_attention_heads={cfg.num_attention_heads}", "a divisor of the head count")
    if groups % tp:
        raise _err("tensor_model_parallel_size", tp,
                   f"does not divide num_query_groups={groups}", "a divisor of the KV group count")
    if ffn_hidden_size(cfg) % tp:
        raise _err("tensor_model_parallel_size", tp,
                   f"does not divide ffn_hidden_size={ffn_hidden_size(cfg)}", "a divisor of the MLP width")
    if cfg.num_layers % pp:
        raise _err("pipeline_model_parallel_size", pp,
                   f"does not divide num_layers={cfg.num_layers}", "a divisor of the layer count")
    if cfg.sequence_parallel and tp == 1:
        raise _err("sequence_parallel", True, "needs tensor_model_parallel_size > 1",
                   "--tensor-model-parallel-size 2 (or more), or drop --sequence-parallel")
    if cfg.sequence_parallel and cfg.seq_length % tp:
        raise _err("seq_length", cfg.seq_length,
                   f"not divisible by tensor_model_parallel_size={tp} under sequence parallel",
                   f"a multiple of {tp}")
    if cp > 1:
        raise _err("context_parallel_size", cp, "context parallelism is not supported yet", "1")
    step = cfg.micro_batch_size * dp
    if cfg.global_batch_size % step:
        raise _err("global_batch_size", cfg.global_batch_size,
                   f"not divisible by micro_batch_size*data_parallel_size = "
                   f"{cfg.micro_batch_size}*{dp} = {step}", f"a multiple of {step}")
    if cfg.resume and cfg.run_dir is not None and not os.path.isdir(cfg.run_dir):
        raise _err("run_dir", cfg.run_dir, "--resume needs an existing run folder",
                   "the folder of an earlier run, or omit --run-dir to resume the newest run")
    if cfg.data_path is not None:
        from megatron_ext.data import DataError, validate_data_path

        try:
            validate_data_path(cfg.data_path)
        except DataError as e:
            raise ConfigError(str(e)) from None
    return dp
