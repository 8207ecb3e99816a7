"""Run configuration: embedded presets + Megatron-style overrides, validated once, before any work.

Every check raises :class:`ConfigError` with ``field=value: why; use allowed`` so the CLI can print
one line and exit non-zero before a process group, a model or a run folder exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Union

from megatron_ext import backends


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
    # keep phi / alpha / bias in fp32 when the model is cast to bf16/fp16 (Float16Module); the
    # mappings are computed in fp32 either way, this removes the rounding of the weights themselves
    fp32_params: bool = False
    # fold each sublayer's input RMSNorm into the site's fused pre mix (no effect with LayerNorm)
    fold_norm: bool = True
    # pin the fused kernels' tilings (ops.mhc.pin_tilings): bitwise-equal runs; Megatron's
    # --deterministic-mode (config.deterministic_mode) pins them too
    deterministic: bool = False

    def folds_norm(self, normalization: str) -> bool:
        """Whether the sites fold the sublayers' input norms: ``fold_norm`` and an RMSNorm model."""
        return self.fold_norm and normalization == "RMSNorm"

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
        if not isinstance(self.fp32_params, bool):
            raise _err("mhc_fp32_params", self.fp32_params, "must be a boolean", "true or false")
        if not isinstance(self.fold_norm, bool):
            raise _err("mhc_fold_norm", self.fold_norm, "must be a boolean", "true or false")
        if not isinstance(self.deterministic, bool):
            raise _err("mhc_deterministic", self.deterministic, "must be a boolean", "true or false")
        if self.alpha_init <= 0:
            raise _err("mhc_alpha_init", self.alpha_init, "must be positive", "a small value such as 0.01")
        if hidden_size < 1:
            raise _err("hidden_size", hidden_size, "must be positive", "the per-stream width C")


ATTENTION_PATTERN_LETTERS = {"D": "dense causal", "W": "window + sinks", "T": "top-k (+ window/sinks)"}


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Sparse MQA attention knobs (docs/sparse_attention.md), attached as ``tconfig.sparse_attention``.

    Kept off Megatron's TransformerConfig fields on purpose: TransformerConfig has its own
    ``window_size`` tuple (FlashAttention's ``(left, right)``), which counts one key less.
    ``pattern`` holds one letter per layer, repeated cyclically over the layers: ``D`` dense causal,
    ``W`` sliding window + token sinks, ``T`` learned top-k keys (united with the window and sinks).
    """

    pattern: str = "W"
    window_size: Optional[int] = None  # keys per query, counting the query itself
    num_sink_tokens: int = 0
    learnable_sink: bool = False
    topk: Optional[int] = None
    indexer_num_heads: int = 4
    indexer_head_dim: int = 32
    indexer_kl_coeff: float = 0.01
    indexer_dense_warmup_iters: int = 0
    backend: str = "auto"  # auto | triton | torch

    def letter(self, layer_number: int) -> str:
        """Pattern letter of global 1-based ``layer_number`` (the pattern repeats cyclically)."""
        return self.pattern[(layer_number - 1) % len(self.pattern)]

    def validate(self, num_attention_heads: int, num_query_groups: int, head_dim: int,
                 context_parallel_size: int = 1, lane: Optional[str] = None) -> None:
        pattern = self.pattern
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(ATTENTION_PATTERN_LETTERS):
            allowed = ", ".join(f"{k} ({v})" for k, v in ATTENTION_PATTERN_LETTERS.items())
            raise _err("attention_pattern", pattern, "one letter per layer, repeated cyclically",
                       f"a non-empty string of {allowed}, e.g. 'WWWD'")
        if self.window_size is not None and (isinstance(self.window_size, bool)
                                             or not isinstance(self.window_size, int) or self.window_size < 1):
            raise _err("window_size", self.window_size, "the window counts the query itself, so it is >= 1",
                       "an integer >= 1 (1 = only itself)")
        if "W" in pattern and self.window_size is None:
            raise _err("window_size", None, f"attention_pattern={pattern!r} has windowed (W) layers",
                       "--window-size N (keys per query, the query included)")
        if not isinstance(self.num_sink_tokens, int) or self.num_sink_tokens < 0:
            raise _err("num_sink_tokens", self.num_sink_tokens, "must not be negative", "an integer >= 0")
        if self.topk is not None and (not isinstance(self.topk, int) or self.topk < 1):
            raise _err("sparse_topk", self.topk, "must be positive", "an integer >= 1 (keys per query)")
        if "T" in pattern:
            if self.topk is None:
                raise _err("sparse_topk", None, f"attention_pattern={pattern!r} has top-k (T) layers",
                           "--sparse-topk K")
            import importlib.util

            if importlib.util.find_spec("megatron_ext.modules.indexer") is None:
                raise _err("attention_pattern", pattern, "sparse_topk needs the lightning indexer "
                           "(megatron_ext.modules.indexer), which is not installed",
                           "only D and W letters")
            _check_indexer_fields(self)
        if self.backend not in ("auto", "triton", "torch"):
            raise _err("sparse_attention_backend", self.backend, "unknown backend", "'auto', 'triton' or 'torch'")
        if num_query_groups < 1 or num_attention_heads % num_query_groups:
            raise _err("num_query_groups", num_query_groups,
                       f"must divide num_attention_heads={num_attention_heads}", "a divisor of the head count (1 = MQA)")
        if self.backend == "triton":
            from megatron_ext.ops.sparse_attention import _TRITON_HEAD_DIMS

            if head_dim not in _TRITON_HEAD_DIMS:
                raise _err("sparse_attention_backend", self.backend,
                           f"head_dim={head_dim} has no Triton tile",
                           f"a head dim in {list(_TRITON_HEAD_DIMS)}, or backend 'auto'/'torch'")
            if lane == "cpu" and not backends.triton_interpret_env():
                raise _err("sparse_attention_backend", self.backend,
                           "the CPU lane runs Triton only under TRITON_INTERPRET=1 (slow)",
                           "'torch' or 'auto' on CPU")
        if context_parallel_size > 1:
            raise _err("context_parallel_size", context_parallel_size,
                       "sparse attention has no context parallelism yet", "1")


ATTENTION_TYPES = ("dense", "gqla", "mla")


def _check_indexer_fields(cfg) -> None:
    """The lightning indexer's sizes and loss settings (sparse-MQA T layers and GQLA with top-k)."""
    for name in ("indexer_num_heads", "indexer_head_dim"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise _err(name, getattr(cfg, name), "must be positive", "an integer >= 1")
    if cfg.indexer_kl_coeff < 0:
        raise _err("indexer_kl_coeff", cfg.indexer_kl_coeff, "must not be negative", "a value >= 0")
    if cfg.indexer_dense_warmup_iters < 0:
        raise _err("indexer_dense_warmup_iters", cfg.indexer_dense_warmup_iters,
                   "must not be negative", "an integer >= 0")


def _check_latent_ranks(kv_lora_rank: int, q_lora_rank: Optional[int], rope_dim: int, tp: int) -> None:
    """The latent ranks of GQLA and MLA: q-LoRA off or positive, and both down-projections split
    evenly over TP (Megatron's column-parallel down-projections split their outputs over TP before
    gathering them)."""
    if q_lora_rank is not None and (isinstance(q_lora_rank, bool) or not isinstance(q_lora_rank, int)
                                    or q_lora_rank < 1):
        raise _err("q_lora_rank", q_lora_rank, "must be positive", "an integer >= 1, or None (no q-LoRA)")
    if (kv_lora_rank + rope_dim) % tp:
        raise _err("kv_lora_rank", kv_lora_rank,
                   f"kv_lora_rank + qk_pos_emb_head_dim = {kv_lora_rank + rope_dim} is split over "
                   f"tensor_model_parallel_size={tp}", f"a sum divisible by {tp}")
    if q_lora_rank is not None and q_lora_rank % tp:
        raise _err("q_lora_rank", q_lora_rank, f"is split over tensor_model_parallel_size={tp}",
                   f"a multiple of {tp}")


@dataclasses.dataclass(frozen=True)
class GQLAConfig:
    """Group-query latent attention (arXiv 2605.15250; docs/gqla.md), attached as ``tconfig.gqla``.

    Field names follow Megatron's MLA (``kv_lora_rank``, ``q_lora_rank``, ``qk_head_dim`` = the
    no-rope part of a query/key head, ``qk_pos_emb_head_dim`` = the shared rope key, ``v_head_dim``);
    ``num_query_groups`` is G, the number of K/V up-projection blocks.
    """

    num_query_groups: int
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    latent_norm: bool = True  # RMSNorm/LayerNorm on the latent c_t, as MLA's kv_layernorm
    rotary_base: float = 10000.0
    window_size: Optional[int] = None  # sliding window (keys per query, the query included)
    num_sink_tokens: int = 0
    backend: str = "auto"  # the sparse-attention op's backend: auto | triton | torch
    # learned top-k keys per query (DSA's lightning indexer, as sparse-MQA T layers); one selection
    # per token shared by every group, so both decode paths attend the same keys
    topk: Optional[int] = None
    indexer_num_heads: int = 4
    indexer_head_dim: int = 32
    indexer_kl_coeff: float = 0.01
    indexer_dense_warmup_iters: int = 0

    def validate(self, num_attention_heads: int, tensor_model_parallel_size: int = 1) -> None:
        tp = tensor_model_parallel_size
        for name in ("num_query_groups", "kv_lora_rank", "qk_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _err(name, value, "must be a positive integer", "an integer >= 1")
        dr = self.qk_pos_emb_head_dim
        if isinstance(dr, bool) or not isinstance(dr, int) or dr < 0 or dr % 2:
            raise _err("qk_pos_emb_head_dim", dr, "RoPE rotates pairs of dims",
                       "an even integer >= 0 (0: no rope key)")
        g = self.num_query_groups
        if num_attention_heads % g:
            raise _err("num_query_groups", g, f"GQLA groups must divide num_attention_heads={num_attention_heads}",
                       "a divisor of the head count (1: MQA over the latent, H: MLA)")
        if g % tp:
            raise _err("tensor_model_parallel_size", tp,
                       f"GQLA shards its num_query_groups={g} up-projection blocks over TP ranks",
                       "a divisor of num_query_groups")
        _check_latent_ranks(self.kv_lora_rank, self.q_lora_rank, dr, tp)
        if self.window_size is not None and (isinstance(self.window_size, bool)
                                             or not isinstance(self.window_size, int) or self.window_size < 1):
            raise _err("window_size", self.window_size, "the window counts the query itself", "an integer >= 1 or None")
        if isinstance(self.num_sink_tokens, bool) or not isinstance(self.num_sink_tokens, int) \
                or self.num_sink_tokens < 0:
            raise _err("num_sink_tokens", self.num_sink_tokens, "must not be negative", "an integer >= 0")
        if self.backend not in ("auto", "triton", "torch"):
            raise _err("gqla_backend", self.backend, "unknown backend", "'auto', 'triton' or 'torch'")
        if self.topk is not None:
            if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
                raise _err("sparse_topk", self.topk, "must be positive", "an integer >= 1 (keys per query)")
            _check_indexer_fields(self)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Megatron's multi-latent attention (DeepSeek-V2, arXiv 2405.04434) for ``attention_type="mla"``:
    the dims of Megatron's ``MLATransformerConfig`` (the names GQLA shares), plain RoPE on the decoupled
    rope key (``rope_type="rope"``, no YaRN) and the latent norms (Megatron's ``qk_layernorm``)."""

    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    latent_norm: bool = True  # kv_layernorm on c_t (and q_layernorm on the q-LoRA latent)
    rotary_base: float = 10000.0

    def validate(self, num_attention_heads: int, tensor_model_parallel_size: int = 1) -> None:
        tp = tensor_model_parallel_size
        for name in ("kv_lora_rank", "qk_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _err(name, value, "must be a positive integer", "an integer >= 1")
        dr = self.qk_pos_emb_head_dim
        if isinstance(dr, bool) or not isinstance(dr, int) or dr < 2 or dr % 2:
            raise _err("qk_pos_emb_head_dim", dr, "Megatron's MLA always rotates its decoupled rope key "
                       "(pairs of dims)", "an even integer >= 2")
        _check_latent_ranks(self.kv_lora_rank, self.q_lora_rank, dr, tp)
        if num_attention_heads % tp:
            raise _err("tensor_model_parallel_size", tp, f"does not divide num_attention_heads={num_attention_heads}",
                       "a divisor of the head count")

    def transformer_fields(self) -> Dict[str, Any]:
        """The ``MLATransformerConfig`` fields this config sets."""
        return dict(multi_latent_attention=True, kv_lora_rank=self.kv_lora_rank, q_lora_rank=self.q_lora_rank,
                    qk_head_dim=self.qk_head_dim, qk_pos_emb_head_dim=self.qk_pos_emb_head_dim,
                    v_head_dim=self.v_head_dim, qk_layernorm=self.latent_norm, rope_type="rope",
                    rotary_base=self.rotary_base, rotary_percent=1.0, apply_rope_fusion=False)


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
    # Megatron's multi-token prediction (DeepSeek-V3): MTP layers after the decoder, on the last
    # pipeline stage; depth d predicts the token d + 1 places further on
    mtp_num_layers: Optional[int] = None
    mtp_loss_scaling_factor: float = 0.1
    num_experts: Optional[int] = None  # MoE layers when set (every layer unless moe_layer_freq says)
    # Megatron's --moe-layer-freq: N (an MoE layer every N layers, from layer 1) or a 0/1 list, one
    # entry per layer, as a list expression, e.g. "([0]+[1]*26)": 1 = MoE, 0 = dense MLP (ffn_hidden_size)
    moe_layer_freq: Optional[str] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default: ffn_hidden_size
    # one coefficient, or one per type when moe_router_load_balancing_type lists several (Megatron)
    moe_aux_loss_coeff: Union[float, List[float]] = 0.0
    # MoE (docs/moe.md): router options keep Megatron's names; the rest drive the fused layer
    moe_impl: str = "fused"  # fused (this project's FusedMoELayer) | megatron (stock MoELayer baseline)
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: Optional[float] = None
    # default: aux_loss if moe_aux_loss_coeff > 0 else none; a list combines aux-loss types (Megatron)
    moe_router_load_balancing_type: Optional[Union[str, List[str]]] = None
    moe_router_quantile_balancing_ema: float = 0.0  # Megatron >= 0.19's quantile_balancing bias EMA
    moe_z_loss_coeff: Optional[float] = None
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"
    moe_input_jitter_eps: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False  # Megatron's: the shared output scaled by sigmoid(x . w_g) (Qwen-MoE)
    moe_apply_probs_on_input: bool = False  # Megatron's: the gate scales the expert's input (top-1, Llama-4 style)
    moe_latent_size: Optional[int] = None  # Megatron's latent MoE: experts run at this width, projected in and out
    moe_router_force_load_balancing: bool = False  # Megatron's benchmark mode: random router logits
    moe_router_force_biased: Optional[float] = None  # Megatron's benchmark mode: random logits + a random bias
    moe_backend: str = "auto"  # auto | triton | grouped_mm | te | torch
    moe_deterministic: bool = False
    moe_pregather: Optional[bool] = None  # Triton experts: rows copied to expert order once (None: the tiles' choice)
    moe_gradient_accumulation_fusion: bool = True  # Triton experts: weight grads added into DDP's main_grad in-kernel
    moe_checkpoint_format: str = "fused"  # fused (grouped w1/w2 keys) | megatron (Megatron MoELayer's keys and layouts)
    moe_routing_trace_out: Optional[str] = None
    moe_routing_replay: Optional[str] = None
    moe_routing_log: Optional[str] = None  # DIR: async JSONL log of expert ids + gates per token
    moe_pad_expert_input_to_capacity: bool = False  # Megatron's; --moe-impl megatron only
    moe_monitor_interval: int = 10
    # mHC stream mixers: off unless mhc_num_streams is set; hidden_size is the width of one stream
    mhc_num_streams: Optional[int] = None
    mhc_sinkhorn_iters: int = 20
    mhc_mode: str = "dynamic"
    mhc_backend: str = "auto"
    mhc_fp32_params: bool = False  # mixer weights stay fp32 in a --bf16/--fp16 model
    mhc_fold_norm: bool = True  # sublayer input RMSNorms fused into the sites' pre mix
    mhc_deterministic: bool = False  # fused kernels' tilings pinned: bitwise-equal runs
    # Megatron's --deterministic-mode: bitwise-equal runs of the whole step (both flags above, torch's
    # deterministic algorithms, cuBLAS workspace and NCCL algorithm pinned; docs/training.md)
    deterministic_mode: bool = False
    # sparse MQA attention: on when sparse_attention or attention_pattern is set
    sparse_attention: Optional[bool] = None  # None: implied by attention_pattern
    attention_pattern: Optional[str] = None  # per-layer letters, cyclic: D dense, W window, T top-k
    window_size: Optional[int] = None  # keys per query, the query included (1 = only itself)
    num_sink_tokens: int = 0
    learnable_sink: bool = False
    sparse_topk: Optional[int] = None
    indexer_num_heads: int = 4
    indexer_head_dim: int = 32
    indexer_kl_coeff: float = 0.01
    indexer_dense_warmup_iters: int = 0
    sparse_attention_backend: str = "auto"
    # GQLA (docs/gqla.md): attention_type gqla; num_query_groups is G; None dims derive from the head dim.
    # attention_type mla: Megatron's MLASelfAttention with the same dims (gqla_latent_norm = its qk_layernorm)
    attention_type: str = "dense"  # dense | gqla | mla
    kv_lora_rank: Optional[int] = None  # default 4 * head dim
    q_lora_rank: Optional[int] = None  # None: no q-LoRA
    qk_head_dim: Optional[int] = None  # default head dim (hidden_size / num_attention_heads)
    qk_pos_emb_head_dim: Optional[int] = None  # default head dim / 2 with rope, 0 otherwise
    v_head_dim: Optional[int] = None  # default head dim
    gqla_latent_norm: bool = True
    gqla_backend: str = "auto"
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
    bf16: Optional[bool] = None  # default: on for CUDA, off on CPU (where it is allowed)
    # activation recompute (Megatron's): full layers, uniform chunks of recompute_num_layers
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    # selective recompute (Megatron's --recompute-modules): names, comma separated (default core_attn)
    recompute_modules: Optional[str] = None
    # parallel lanes
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # experts split along F over this many TP ranks: None = tensor_model_parallel_size (Megatron's
    # default), or 1 (whole experts on every rank, each TP rank running its own tokens)
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # FSDP2 (torch fully_shard) over the data-parallel group instead of replicated DDP: parameters,
    # gradients and Adam states sharded (docs/lanes.md, FSDP2); the lane spec's `fsdp2` sets it
    use_torch_fsdp2: bool = False
    # Megatron's distributed optimizer (ZeRO-1): Adam states and fp32 master weights sharded over the
    # data-parallel group, gradients reduce-scattered, parameters all-gathered after the step
    use_distributed_optimizer: bool = False
    # "auto" or an explicit lane spec ("tp2,sp,pp1,ep4,dp2"): planned by launch/plan.py before
    # validation; the lane fields above are then set from the plan (docs/lanes.md)
    lanes: Optional[str] = None
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
    # a step running longer than this dumps every thread's Python stack to stderr (again every
    # that many seconds until the step ends): shows where a hung collective or kernel waits
    hang_dump_seconds: Optional[float] = None
    # Megatron's profiling flags: steps [start, end) (1-based); the torch profiler writes a trace and
    # a top-operator table per rank under <run folder>/profile, else a cudaProfilerStart/Stop range
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    use_pytorch_profiler: bool = False


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
    "attention_type": ATTENTION_TYPES,
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
                     mode=cfg.mhc_mode, backend=cfg.mhc_backend, fp32_params=cfg.mhc_fp32_params,
                     fold_norm=cfg.mhc_fold_norm, deterministic=cfg.mhc_deterministic or cfg.deterministic_mode)


def sparse_attention_config(cfg: TrainConfig) -> Optional[SparseAttentionConfig]:
    """None unless sparse attention is on (``sparse_attention`` or an ``attention_pattern``)."""
    if cfg.sparse_attention is False:
        if cfg.attention_pattern is not None:
            raise _err("sparse_attention", False, f"attention_pattern={cfg.attention_pattern!r} asks for it",
                       "drop --no-sparse-attention or --attention-pattern")
        return None
    if cfg.sparse_attention is None and cfg.attention_pattern is None:
        return None
    return SparseAttentionConfig(
        pattern=cfg.attention_pattern or "W", window_size=cfg.window_size,
        num_sink_tokens=cfg.num_sink_tokens, learnable_sink=cfg.learnable_sink, topk=cfg.sparse_topk,
        indexer_num_heads=cfg.indexer_num_heads, indexer_head_dim=cfg.indexer_head_dim,
        indexer_kl_coeff=cfg.indexer_kl_coeff, indexer_dense_warmup_iters=cfg.indexer_dense_warmup_iters,
        backend=cfg.sparse_attention_backend)


MOE_BACKENDS = ("auto", "triton", "grouped_mm", "te", "torch")
# TrainConfig / TransformerConfig field (Megatron's name) -> RouterConfig field
MOE_ROUTER_FIELDS = {
    "moe_router_topk": "topk", "moe_router_score_function": "score_function",
    "moe_router_pre_softmax": "pre_softmax", "moe_router_topk_scaling_factor": "topk_scaling_factor",
    "moe_router_load_balancing_type": "load_balancing_type", "moe_aux_loss_coeff": "aux_loss_coeff",
    "moe_z_loss_coeff": "z_loss_coeff", "moe_router_enable_expert_bias": "enable_expert_bias",
    "moe_router_bias_update_rate": "bias_update_rate", "moe_expert_capacity_factor": "capacity_factor",
    "moe_token_drop_policy": "drop_policy", "moe_input_jitter_eps": "input_jitter_eps",
    "moe_router_num_groups": "num_groups", "moe_router_group_topk": "group_topk",
    "expert_model_parallel_size": "expert_parallel_size",
    "moe_pad_expert_input_to_capacity": "pad_to_capacity",
    "moe_router_quantile_balancing_ema": "quantile_balancing_ema",
}


CHECKPOINT_FORMATS = ("fused", "megatron")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The fused MoE layer's own knobs (not router math), attached as ``tconfig.moe``."""

    impl: str = "fused"
    backend: str = "auto"
    deterministic: bool = False
    routing_trace_out: Optional[str] = None
    routing_replay: Optional[str] = None
    routing_log: Optional[str] = None
    # Triton experts: x's rows copied into expert order once (faster GEMMs; the [T*k, H] copy is
    # kept for backward instead of x). None: the tiles' choice (on for the H100 tiles)
    pregather: Optional[bool] = None
    # Triton experts under Megatron's DDP: the weight-gradient kernel adds into each expert
    # weight's main_grad itself (Megatron's gradient-accumulation fusion, for the experts only)
    gradient_accumulation_fusion: bool = True
    # the layer's distributed-checkpoint entries: "fused" (its grouped weights under its own names)
    # or "megatron" (the keys and layouts of Megatron's MoELayer: SequentialMLP / TEGroupedMLP
    # experts, router, shared expert), so checkpoints move between the two layers
    checkpoint_format: str = "fused"
    monitor_interval: int = 10
    seed: int = 1234

    def validate(self, device: str = "auto", prefix: str = "moe_") -> "MoEConfig":
        """The layer knobs' own checks, fields named ``prefix + name`` (``moe_backend`` for the
        flags, ``moe.backend`` for a knob file); ``device``: the run's device setting."""
        if self.impl not in ("fused", "megatron"):
            raise _err(prefix + "impl", self.impl, "unknown MoE implementation", "'fused' or 'megatron'")
        if self.backend not in MOE_BACKENDS:
            raise _err(prefix + "backend", self.backend, "unknown expert backend", f"one of {list(MOE_BACKENDS)}")
        if self.backend == "te":
            from megatron_ext.ops.moe import te_grouped

            why = te_grouped.unavailable()   # "transformer_engine is not installed", or TE's own reason
            if not why and device == "cpu":
                why = "device='cpu': it runs on CUDA tensors"
            if why:
                raise _err(prefix + "backend", self.backend,
                           f"Transformer Engine's grouped GEMM cannot run here ({why})",
                           "auto, triton or grouped_mm, or install Transformer Engine >= 2.1")
        if not isinstance(self.monitor_interval, int) or self.monitor_interval < 1:
            raise _err(prefix + "monitor_interval", self.monitor_interval, "must be a positive integer",
                       "an integer >= 1")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise _err(prefix + "checkpoint_format", self.checkpoint_format, "unknown checkpoint layout",
                       "'fused' (the layer's own grouped weights) or 'megatron' (Megatron MoELayer's keys, "
                       "to load or write checkpoints of its SequentialMLP / TEGroupedMLP layers)")
        if not isinstance(self.gradient_accumulation_fusion, bool):
            raise _err(prefix + "gradient_accumulation_fusion", self.gradient_accumulation_fusion,
                       "must be a boolean", "true / false (--no-moe-gradient-accumulation-fusion turns it off)")
        if self.pregather is not None:
            if not isinstance(self.pregather, bool):
                raise _err(prefix + "pregather", self.pregather, "must be a boolean",
                           "true / false (--moe-pregather / --no-moe-pregather), or unset")
            if self.impl == "megatron" or self.backend in ("grouped_mm", "te", "torch"):
                where = "--moe-impl megatron" if self.impl == "megatron" else f"--moe-backend {self.backend}"
                raise _err(prefix + "pregather", self.pregather,
                           f"only the Triton expert kernels have it, not {where}",
                           "--moe-impl fused with --moe-backend auto or triton, or leave it unset")
        return self


def check_expert_tp(etp: int, tp: int) -> None:
    """The fused MoE layer splits experts over the whole TP group (etp = tp) or not at all (1)."""
    if etp not in (1, tp):
        raise _err("expert_tensor_parallel_size", etp,
                   f"the fused MoE layer splits experts over the whole tensor-parallel group "
                   f"(tensor_model_parallel_size={tp}) or not at all",
                   f"1 or {tp}" if tp > 1 else "1")


def check_expert_widths(etp: int, widths: Dict[str, Optional[int]]) -> None:
    """Each expert width (field name -> value, None = absent) splits evenly over expert TP."""
    for name, width in widths.items():
        if width and width % etp:
            raise _err(name, width, f"expert tensor parallelism splits it over expert_tensor_parallel_size={etp}",
                       f"a multiple of {etp}, or --expert-tensor-parallel-size 1")


def expert_tensor_parallel_size(cfg: TrainConfig) -> int:
    """The expert-TP size the run uses: the flag, else the TP size (Megatron's default)."""
    etp = cfg.expert_tensor_parallel_size
    return cfg.tensor_model_parallel_size if etp is None else etp


def moe_load_balancing_type(cfg: TrainConfig) -> Union[str, List[str]]:
    if cfg.moe_router_load_balancing_type is not None:
        return cfg.moe_router_load_balancing_type
    if not isinstance(cfg.moe_aux_loss_coeff, (int, float)):
        raise _err("moe_aux_loss_coeff", cfg.moe_aux_loss_coeff, "a list of coefficients needs one "
                   "balancing type each", "--moe-router-load-balancing-type with as many types, or one coefficient")
    return "aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none"


def moe_config(cfg: TrainConfig) -> Optional[MoEConfig]:
    if not cfg.num_experts:
        return None
    return MoEConfig(impl=cfg.moe_impl, backend=cfg.moe_backend,
                     deterministic=bool(cfg.moe_deterministic or cfg.deterministic_mode),
                     routing_trace_out=cfg.moe_routing_trace_out, routing_replay=cfg.moe_routing_replay,
                     routing_log=cfg.moe_routing_log, pregather=cfg.moe_pregather,
                     gradient_accumulation_fusion=cfg.moe_gradient_accumulation_fusion,
                     checkpoint_format=cfg.moe_checkpoint_format,
                     monitor_interval=cfg.moe_monitor_interval, seed=cfg.seed)


_FREQ = "moe_layer_freq"
_FREQ_FORMS = "an integer N >= 1 (an MoE layer every N layers) or a 0/1 list expression such as '([0]+[1]*26)'"


def _eval_layer_list(node, text: str) -> Union[int, List[int]]:
    """The value of a list expression built from int literals, ``[...]``, ``+`` and ``*`` (what
    Megatron's ``--moe-layer-freq`` patterns use), without ``eval``."""
    import ast

    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_eval_layer_list(e, text) for e in node.elts]
        if any(isinstance(i, list) for i in items):
            raise _err(_FREQ, text, "nested lists are not a layer pattern", _FREQ_FORMS)
        return list(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_layer_list(node.left, text), _eval_layer_list(node.right, text)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
            times = right if isinstance(left, list) else left
            if times < 0 or times > 1_000_000:
                raise _err(_FREQ, text, f"repeat count {times} is out of range", _FREQ_FORMS)
            return (left if isinstance(left, list) else right) * times
    raise _err(_FREQ, text, "only int literals, [...], + and * may appear in the pattern", _FREQ_FORMS)


def parse_moe_layer_freq(value: Any) -> Union[int, List[int]]:
    """Megatron's ``moe_layer_freq`` in any form a user gives it (int, its string, a list, or a
    list expression string such as ``"([0]*3+[1]*9)"``) -> an int or a list of ints."""
    import ast

    if isinstance(value, bool):
        raise _err(_FREQ, value, "not a layer frequency", _FREQ_FORMS)
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        raise _err(_FREQ, value, f"a {type(value).__name__} is not a layer frequency", _FREQ_FORMS)
    text = value.strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _err(_FREQ, value, "not an integer or a list expression", _FREQ_FORMS) from None
    return _eval_layer_list(tree.body, value)


def moe_layer_pattern(freq: Any, num_layers: int) -> List[int]:
    """One entry per layer (1 = MoE, 0 = dense MLP), as Megatron reads ``moe_layer_freq``: an int N
    puts MoE in layers 1, 1+N, 1+2N, ...; a list gives every layer's entry."""
    parsed = parse_moe_layer_freq(1 if freq is None else freq)
    if isinstance(parsed, int):
        if parsed < 1:
            raise _err(_FREQ, freq, "must be positive", _FREQ_FORMS)
        return [1 if i % parsed == 0 else 0 for i in range(num_layers)]
    bad = [v for v in parsed if isinstance(v, bool) or v not in (0, 1)]
    if bad:
        raise _err(_FREQ, freq, f"entries must be 0 (dense) or 1 (MoE), got {bad[0]!r}", _FREQ_FORMS)
    if len(parsed) != num_layers:
        raise _err(_FREQ, freq, f"the pattern has {len(parsed)} entries for num_layers={num_layers}",
                   f"one 0/1 entry per layer ({num_layers})")
    return list(parsed)


def moe_layer_numbers(cfg: "TrainConfig") -> List[int]:
    """The 1-based numbers of the MoE layers of a run (``moe_layer_freq``). The MTP layers, numbered
    after the decoder's, have the last decoder layer's MLP, so they are MoE when it is."""
    pattern = moe_layer_pattern(cfg.moe_layer_freq, cfg.num_layers)
    pattern += pattern[-1:] * (cfg.mtp_num_layers or 0)
    return [n for n, v in enumerate(pattern, 1) if v]


# Megatron MoE options (TransformerConfig fields) the fused layer meets under ``--spec``, and what it
# does with one set away from its default. Refused: the option changes the model's math and the
# fused layer does not implement it (an error at build time, before any GPU work). Ignored: the
# option picks one of Megatron's implementations (kernels, dispatcher, memory layout, logging) and
# the fused layer computes the same model its own way; logged once and listed in the receipt.
REFUSED_MEGATRON_MOE_OPTIONS = {
    "moe_expert_rank_capacity_factor": "drops tokens by a per-rank capacity of Megatron's flex dispatcher",
    "expert_gtp_weight_remat_size": "shards each expert's weights over a further generalized-TP axis "
                                    "(expert_tensor_parallel_num_weight_shards), gathered again for every use",
}
_OWN_GEMMS = "the fused layer runs its own grouped GEMMs"
_OWN_DISPATCH = "the fused layer has its own dispatch (sort by expert; all-to-all over EP)"
IGNORED_MEGATRON_MOE_OPTIONS = {
    "moe_grouped_gemm": _OWN_GEMMS,
    "moe_use_legacy_grouped_gemm": _OWN_GEMMS,
    "moe_single_grouped_weight": _OWN_GEMMS + " on grouped weights of its own",
    "moe_single_grouped_bias": _OWN_GEMMS + " on grouped weights of its own",
    "moe_mlp_glu_interleave_size": "the fused layer keeps its own [gate | up] weight layout",
    "moe_shared_expert_glu_interleave_size": "the fused layer keeps its own [gate | up] weight layout",
    "moe_permute_fusion": "the fused layer's sort and gathers are fused already",
    "moe_router_fusion": "the fused layer's router has a fused top-k kernel of its own",
    "moe_shared_expert_overlap": "the fused layer overlaps the shared expert with the EP dispatch itself",
    "moe_token_dispatcher_type": _OWN_DISPATCH,
    "moe_enable_deepep": _OWN_DISPATCH,
    "moe_flex_dispatcher_backend": _OWN_DISPATCH,
    "moe_flex_dispatcher_num_sms": _OWN_DISPATCH,
    "moe_deepep_num_sms": _OWN_DISPATCH,
    "moe_hybridep_num_sms": _OWN_DISPATCH,
    "moe_hybridep_num_sms_preprocessing": _OWN_DISPATCH,
    "moe_hybridep_num_blocks_permute": _OWN_DISPATCH,
    "moe_hybridep_num_blocks_unpermute": _OWN_DISPATCH,
    "moe_hybridep_pad_uneven_dispatch_inputs": _OWN_DISPATCH,
    "moe_permute_fusion_into_hybridep": _OWN_DISPATCH,
    "moe_ncclep_static_shape": _OWN_DISPATCH,
    "moe_ncclep_zero_copy": _OWN_DISPATCH,
    "moe_router_padding_for_fp8": "padding for FP8 expert GEMMs; the fused layer's GEMMs are bf16 and jagged",
    "moe_router_padding_for_quantization": "padding for FP8/FP4 expert GEMMs; the fused layer's GEMMs are "
                                           "bf16 and jagged",
    "moe_pad_experts_for_cuda_graph_inference": "an inference option of Megatron's MoE layer",
    "moe_paged_stash": "a memory option of Megatron's MoE layer",
    "moe_paged_stash_page_size": "a memory option of Megatron's MoE layer",
    "moe_paged_stash_buffer_size_factor_cuda": "a memory option of Megatron's MoE layer",
    "moe_paged_stash_buffer_size_factor_cpu": "a memory option of Megatron's MoE layer",
    "use_grouped_gemm_for_shared_expert": "the fused layer runs the shared expert as two GEMMs of its own",
    "overlap_dispatch_backward_with_experts_wgrad": "delays Transformer Engine's grouped-GEMM expert weight "
                                                    "gradients under FSDP; the fused layer's experts are its own",
    "moe_per_layer_logging": "the fused layer logs per layer always (receipt['moe'], metrics.jsonl)",
    "overlap_moe_expert_parallel_comm": "Megatron's combined 1F1B schedule splits only its own MoELayer "
                                        "into dispatch / experts / combine nodes; the fused layer runs "
                                        "as one MLP node there, its EP exchanges inside it (overlapped "
                                        "with its shared expert, not with the other micro-batch; "
                                        "not run on GPUs here)",
}


# Megatron MoE options the fused layer reads as Megatron reads them, beyond the router's
# (MOE_ROUTER_FIELDS): with REFUSED_ and IGNORED_MEGATRON_MOE_OPTIONS every moe_* / expert field of
# the supported TransformerConfigs is accounted for (a test checks it, so a field a new Megatron
# adds is noticed)
READ_MEGATRON_MOE_OPTIONS = (
    "num_moe_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "expert_tensor_parallel_size", "moe_layer_recompute",
    # the tokens' gates and the aux-loss scale: the layer runs through Megatron's MoEAuxLossAutoScaler
    "moe_grad_scale_func",
    # Megatron turns it into groups of EP size before the layer is built
    "moe_router_topk_limited_devices",
    # recorded as running in fp32 (check_megatron_moe_options)
    "moe_router_dtype",
    # the implied shard count; expert_gtp_weight_remat_size != 1 is what is refused
    "expert_tensor_parallel_num_weight_shards",
    # "currently unsupported so should remain False" (Megatron's own doc); capacity is moe_expert_capacity_factor
    "moe_token_dropping",
    # 0.16.1: "deprecated from MCore v0.10. This flag is ignored" (Megatron's own doc)
    "moe_extended_tp",
    # the gate on the expert's input (top-1), the latent projections, Megatron's two benchmark
    # routers (random logits, plus a random bias): the fused layer does what Megatron's does
    "moe_apply_probs_on_input", "moe_latent_size", "moe_router_force_load_balancing", "moe_router_force_biased",
    # Megatron's RouterReplay (one instance per layer, driven by its static methods)
    "moe_enable_routing_replay",
)

# Megatron's --recompute-modules entries that concern an MoE layer, as the fused layer honours them
MOE_RECOMPUTE_MODULES = {
    "moe": "the routed experts and the shared expert (after the router: sort, EP exchanges, expert "
           "FFNs, combine) run again in backward; only the layer input and the routing are kept",
    "moe_act": "the expert activation's output is rebuilt in backward from the pre-activation "
               "(the Triton kernels always do; the other expert backends do it when asked)",
    "shared_experts": "the shared expert runs again in backward",
}


def moe_recompute_modules(config) -> set:
    """The MoE entries of Megatron's selective recompute on ``config`` (a TransformerConfig:
    ``recompute_granularity == "selective"`` and ``recompute_modules``; Megatron turns
    ``moe_layer_recompute`` into "moe" itself), recorded once in the run receipt."""
    if getattr(config, "recompute_granularity", None) != "selective":
        return set()
    mods = set(getattr(config, "recompute_modules", None) or ()) & set(MOE_RECOMPUTE_MODULES)
    if mods:
        backends.note("moe_recompute", ",".join(sorted(mods)), ",".join(sorted(mods)),
                      "; ".join(f"{m}: {MOE_RECOMPUTE_MODULES[m]}" for m in sorted(mods)))
    return mods


# (option, value) pairs that describe the fused layer itself: set, they need no record
_WHAT_THE_FUSED_LAYER_DOES = {("moe_token_dispatcher_type", "alltoall"), ("moe_grouped_gemm", True)}


def check_megatron_moe_options(config) -> None:
    """Refuse the Megatron MoE options the fused layer cannot honour, note the ones it ignores.
    An option counts as set when it differs from its TransformerConfig default."""
    defaults = {}
    for f in dataclasses.fields(type(config)) if dataclasses.is_dataclass(config) else ():
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
    for name, what in REFUSED_MEGATRON_MOE_OPTIONS.items():
        value = getattr(config, name, None)
        if name in defaults and value != defaults[name]:
            raise ConfigError(f"{name}={value!r}: {what}, which the fused MoE layer does not implement; "
                              "unset it, or use Megatron's MoELayer (knob moe.impl: megatron, "
                              "megatron-ext train --moe-impl megatron)")
    for name, why in IGNORED_MEGATRON_MOE_OPTIONS.items():
        value = getattr(config, name, None)
        if name in defaults and value != defaults[name] and (name, value) not in _WHAT_THE_FUSED_LAYER_DOES:
            backends.fallback(f"megatron_option.{name}", repr(value), "ignored", why)
    if getattr(config, "moe_router_dtype", None) == "fp64":
        backends.fallback("megatron_option.moe_router_dtype", "'fp64'", "fp32",
                          "the fused layer routes in fp32")
    if getattr(config, "add_bias_linear", False):
        # Megatron's default: its router and every expert linear then carry a learned bias
        raise ConfigError("add_bias_linear=True: Megatron's MoE layer then adds a learned bias to the router's "
                          "logits and to every expert's linear layers, which the fused MoE layer does not "
                          "implement; pass --disable-bias-linear (as Megatron's MoE recipes do), or use "
                          "Megatron's MoELayer (knob moe.impl: megatron, megatron-ext train --moe-impl megatron)")
    check_moe_forms(getattr(config, "moe_apply_probs_on_input", False), config.moe_router_topk,
                    getattr(config, "moe_latent_size", None), getattr(config, "moe_router_force_biased", None))


def check_moe_forms(probs_on_input: bool, topk: int, latent_size: Optional[int],
                    force_biased: Optional[float]) -> None:
    """The expert-input gate, the latent width and the forced bias as Megatron defines them."""
    if probs_on_input and topk != 1:
        raise _err("moe_apply_probs_on_input", True, f"scales each token's expert input by its gate, which "
                   f"Megatron defines for one expert per token (moe_router_topk={topk})",
                   "moe_router_topk=1, or leave moe_apply_probs_on_input off")
    if latent_size is not None and (isinstance(latent_size, bool) or not isinstance(latent_size, int)
                                    or latent_size < 1):
        raise _err("moe_latent_size", latent_size, "the experts' width in the latent space must be a positive "
                   "integer", "None (no latent projections) or an integer >= 1")
    if force_biased is not None and not (isinstance(force_biased, (int, float)) and math.isfinite(force_biased)):
        raise _err("moe_router_force_biased", force_biased, "the random bias's standard deviation must be a finite "
                   "number (negative: drawn once per layer)", "None or a float")


def router_config_from(src: Any, num_experts: int):
    """A validated ``RouterConfig`` from any object with Megatron's ``moe_*`` attribute names
    (TrainConfig or TransformerConfig); a RouterConfig error is re-raised under Megatron's name."""
    from megatron_ext.ops.moe.routing import RouterConfig

    values = {ours: getattr(src, theirs) for theirs, ours in MOE_ROUTER_FIELDS.items() if hasattr(src, theirs)}
    if isinstance(src, TrainConfig):
        values["load_balancing_type"] = moe_load_balancing_type(src)
    try:
        return RouterConfig(num_experts=num_experts, **values).validate()
    except ValueError as e:
        field, _, rest = str(e).partition("=")
        theirs = {v: k for k, v in MOE_ROUTER_FIELDS.items()}.get(field, "num_experts" if field == "num_experts" else field)
        raise ConfigError(f"{theirs}={rest}") from None


def _validate_moe(cfg: TrainConfig, world_size: int) -> None:
    """MoE checks beyond the router's own (which :func:`router_config_from` runs)."""
    moe_config(cfg).validate(cfg.device)
    if not any(moe_layer_pattern(cfg.moe_layer_freq, cfg.num_layers)):
        raise _err("moe_layer_freq", cfg.moe_layer_freq, f"no layer of {cfg.num_layers} would be MoE",
                   "a pattern with at least one 1, or drop --num-experts for a dense model")
    if cfg.moe_shared_expert_gate and not cfg.moe_shared_expert_intermediate_size:
        raise _err("moe_shared_expert_gate", True, "gates the shared expert, but the model has none",
                   "--moe-shared-expert-intermediate-size N, or drop the gate")
    if cfg.moe_shared_expert_intermediate_size is not None and cfg.moe_shared_expert_intermediate_size < 1:
        raise _err("moe_shared_expert_intermediate_size", cfg.moe_shared_expert_intermediate_size,
                   "must be positive", "None or an integer >= 1")
    check_moe_forms(cfg.moe_apply_probs_on_input, cfg.moe_router_topk, cfg.moe_latent_size,
                    cfg.moe_router_force_biased)
    router = router_config_from(cfg, cfg.num_experts)
    if router.selection == "quantile_balancing":
        tokens = cfg.seq_length * cfg.micro_batch_size
        if tokens * cfg.moe_router_topk % cfg.num_experts:
            raise _err("moe_router_load_balancing_type", "quantile_balancing",
                       f"each expert's share of a micro-batch, seq_length x micro_batch_size x topk / "
                       f"num_experts = {tokens}*{cfg.moe_router_topk}/{cfg.num_experts}, must be whole",
                       f"a micro-batch whose tokens x topk is a multiple of {cfg.num_experts}")
    if cfg.moe_impl == "megatron":
        for name in ("moe_deterministic", "moe_routing_trace_out", "moe_routing_replay",
                     "moe_routing_log"):
            if getattr(cfg, name):
                raise _err(name, getattr(cfg, name), "only the fused MoE layer has it "
                           "(the stock baseline spec is Megatron's MoELayer + SequentialMLP)",
                           "--moe-impl fused")
        from megatron_ext import compat

        if router.selection == "quantile_balancing" and not compat.mcore_has_quantile_balancing():
            raise _err("moe_router_load_balancing_type", "quantile_balancing",
                       f"Megatron's router in megatron-core {compat.mcore_version()} has no quantile "
                       "balancing (it came with 0.19)", "--moe-impl fused, or megatron-core >= 0.19")
        if cfg.moe_latent_size and not compat.HAVE_TE:
            raise _err("moe_latent_size", cfg.moe_latent_size, "Megatron's MoELayer builds its latent "
                       "projections from Transformer Engine, which is not installed", "--moe-impl fused")
        if cfg.moe_router_force_biased is not None and not compat.mcore_has_field("moe_router_force_biased"):
            raise _err("moe_router_force_biased", cfg.moe_router_force_biased, f"Megatron's router in "
                       f"megatron-core {compat.mcore_version()} has no forced bias (it came with 0.19)",
                       "--moe-impl fused, or megatron-core >= 0.19")
        known = compat.mcore_score_functions()
        if cfg.moe_router_score_function not in known:
            raise _err("moe_router_score_function", cfg.moe_router_score_function,
                       f"Megatron's MoELayer in megatron-core {compat.mcore_version()} knows "
                       f"{list(known)} (sqrtsoftplus came with 0.19)",
                       "--moe-impl fused, or megatron-core >= 0.19")
        return
    if cfg.moe_pad_expert_input_to_capacity:
        raise _err("moe_pad_expert_input_to_capacity", True, "the fused layer's grouped GEMM takes "
                   "jagged expert groups, so padding them to capacity would only add zero rows",
                   "--no-moe-pad-expert-input-to-capacity, or --moe-impl megatron")
    # with etp = 1 the shared expert is replicated over TP like the routed ones (no split either)
    check_expert_widths(expert_tensor_parallel_size(cfg),
                        {"moe_ffn_hidden_size": cfg.moe_ffn_hidden_size or ffn_hidden_size(cfg),
                         "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size})
    if cfg.context_parallel_size > 1:
        raise _err("context_parallel_size", cfg.context_parallel_size, "not supported by the fused MoE layer", "1")
    if cfg.moe_routing_trace_out and cfg.moe_routing_replay and \
            os.path.abspath(cfg.moe_routing_trace_out) == os.path.abspath(cfg.moe_routing_replay):
        raise _err("moe_routing_trace_out", cfg.moe_routing_trace_out, "would overwrite the trace being replayed",
                   "another folder than --moe-routing-replay")
    if (cfg.moe_routing_trace_out or cfg.moe_routing_replay) and cfg.recompute_granularity \
            and cfg.pipeline_model_parallel_size > 1:
        raise _err("recompute_granularity", cfg.recompute_granularity, "routing trace/replay count micro-batches "
                   "in forward order, which recompute under pipeline schedules breaks", "no recompute with PP")
    if cfg.moe_routing_replay is not None:
        import json

        meta_path = os.path.join(cfg.moe_routing_replay, "meta.json")
        if not os.path.isfile(meta_path):
            raise _err("moe_routing_replay", cfg.moe_routing_replay, "no routing trace there (meta.json missing)",
                       "the folder a run wrote with --moe-routing-trace-out")
        with open(meta_path) as f:
            meta = json.load(f)
        want = {"num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "topk": cfg.moe_router_topk,
                "seq_length": cfg.seq_length, "micro_batch_size": cfg.micro_batch_size, "world_size": world_size}
        # traces written before moe_layer_freq existed had MoE in every layer
        meta.setdefault("moe_layers", list(range(1, cfg.num_layers + 1)))
        want["moe_layers"] = moe_layer_numbers(cfg)
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            shown = ", ".join(f"{k}: trace {t} vs run {r}" for k, (t, r) in bad.items())
            raise _err("moe_routing_replay", cfg.moe_routing_replay, f"trace shape does not match this run ({shown})",
                       "the same model, batch, sequence length and world size as the traced run")


_GQLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


def gqla_config(cfg: TrainConfig) -> Optional[GQLAConfig]:
    """None unless ``attention_type == "gqla"``; unset dims derive from the head dim."""
    if cfg.attention_type != "gqla":
        return None
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.position_embedding_type == "rope"
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return GQLAConfig(
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        kv_lora_rank=pick(cfg.kv_lora_rank, 4 * head_dim),
        qk_head_dim=pick(cfg.qk_head_dim, head_dim),
        qk_pos_emb_head_dim=pick(cfg.qk_pos_emb_head_dim, head_dim // 2 // 2 * 2 if rope else 0),
        v_head_dim=pick(cfg.v_head_dim, head_dim),
        q_lora_rank=cfg.q_lora_rank, latent_norm=cfg.gqla_latent_norm, backend=cfg.gqla_backend,
        # the sparse-MQA window/sink flags mean the same for GQLA: keys per query, first tokens kept
        window_size=cfg.window_size, num_sink_tokens=cfg.num_sink_tokens,
        topk=cfg.sparse_topk, indexer_num_heads=cfg.indexer_num_heads, indexer_head_dim=cfg.indexer_head_dim,
        indexer_kl_coeff=cfg.indexer_kl_coeff, indexer_dense_warmup_iters=cfg.indexer_dense_warmup_iters)


def mla_config(cfg: TrainConfig) -> Optional[MLAConfig]:
    """None unless ``attention_type == "mla"``; unset dims derive as GQLA's do, except that MLA always
    has a rope key (Megatron's MLA rotates it whatever the model's position embedding)."""
    if cfg.attention_type != "mla":
        return None
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return MLAConfig(kv_lora_rank=pick(cfg.kv_lora_rank, 4 * head_dim), qk_head_dim=pick(cfg.qk_head_dim, head_dim),
                     qk_pos_emb_head_dim=pick(cfg.qk_pos_emb_head_dim, max(2, head_dim // 2 // 2 * 2)),
                     v_head_dim=pick(cfg.v_head_dim, head_dim), q_lora_rank=cfg.q_lora_rank,
                     latent_norm=cfg.gqla_latent_norm)


def _validate_mla(cfg: TrainConfig, mla: MLAConfig) -> None:
    heads = cfg.num_attention_heads
    if cfg.num_query_groups not in (None, heads):
        raise _err("num_query_groups", cfg.num_query_groups, "MLA has one K/V up-projection block per query "
                   "head (GQLA's groups are --attention-type gqla)", f"no --num-query-groups, or {heads}")
    if cfg.attention_pattern is not None or cfg.sparse_attention:
        raise _err("attention_type", "mla", "MLA layers take no sparse-MQA attention pattern",
                   "either --attention-type mla or --attention-pattern, not both")
    if cfg.gqla_backend != "auto":
        raise _err("gqla_backend", cfg.gqla_backend, "MLA layers run Megatron's MLASelfAttention with SDPA "
                   "core attention, not the GQLA kernels", "no --gqla-backend with --attention-type mla")
    mla.validate(heads, cfg.tensor_model_parallel_size)


def ffn_hidden_size(cfg: TrainConfig) -> int:
    if cfg.ffn_hidden_size is not None:
        return cfg.ffn_hidden_size
    if cfg.swiglu:  # keep the parameter count of a 4h GELU MLP, rounded to 64
        return int((8 * cfg.hidden_size / 3 + 63) // 64 * 64)
    return 4 * cfg.hidden_size


# Megatron's --recompute-modules choices (TransformerConfig.recompute_modules)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


def parse_recompute_modules(value: Optional[str]) -> List[str]:
    """``"moe_act,layernorm"`` (commas or spaces) -> ``["moe_act", "layernorm"]``."""
    return [m for m in str(value or "").replace(",", " ").split() if m]


def _validate_recompute_modules(cfg: TrainConfig) -> None:
    if cfg.recompute_modules is None:
        return
    mods = parse_recompute_modules(cfg.recompute_modules)
    if cfg.recompute_granularity != "selective":
        raise _err("recompute_modules", cfg.recompute_modules, "chooses what selective recompute "
                   f"recomputes, but recompute_granularity={cfg.recompute_granularity!r}",
                   "--recompute-granularity selective, or drop --recompute-modules")
    bad = [m for m in mods if m not in RECOMPUTE_MODULES]
    if bad or not mods:
        raise _err("recompute_modules", cfg.recompute_modules, f"unknown module(s) {bad}" if bad else "empty",
                   f"names from {list(RECOMPUTE_MODULES)}, comma separated")
    moe_parts = [m for m in mods if m in MOE_RECOMPUTE_MODULES]
    if moe_parts and not cfg.num_experts:
        raise _err("recompute_modules", cfg.recompute_modules, f"{moe_parts} recompute MoE parts, but the "
                   "model has no experts", "drop them, or --num-experts N")
    if "shared_experts" in mods and not cfg.moe_shared_expert_intermediate_size:
        raise _err("recompute_modules", cfg.recompute_modules, "shared_experts: the model has no shared "
                   "expert", "--moe-shared-expert-intermediate-size N, or drop shared_experts")
    if "moe_act" in mods and cfg.moe_impl == "megatron":
        raise _err("recompute_modules", cfg.recompute_modules, "moe_act: Megatron recomputes the expert "
                   "activation only in its grouped-GEMM experts (Transformer Engine); --moe-impl megatron "
                   "here runs SequentialMLP", "--moe-impl fused (it honours moe_act), or drop moe_act")
    if "mla_up_proj" in mods and cfg.attention_type != "mla":
        raise _err("recompute_modules", cfg.recompute_modules, "mla_up_proj recomputes Megatron's MLA "
                   f"up-projections, but attention_type={cfg.attention_type!r}",
                   "--attention-type mla, or drop mla_up_proj")


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
    _validate_recompute_modules(cfg)
    for name in ("eval_iters", "lr_warmup_iters"):
        if getattr(cfg, name) < 0:
            raise _err(name, getattr(cfg, name), "must not be negative", "an integer >= 0")
    if cfg.lr <= 0:
        raise _err("lr", cfg.lr, "must be positive", "a learning rate > 0")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise _err("min_lr", cfg.min_lr, f"must lie in [0, lr={cfg.lr}]", "a value <= lr")
    if cfg.lr_warmup_iters and cfg.lr_warmup_iters >= cfg.train_iters:
        raise _err("lr_warmup_iters", cfg.lr_warmup_iters,
                   f"must be smaller than train_iters={cfg.train_iters} (a preset brings its own "
                   "warm-up)", f"--lr-warmup-iters below {cfg.train_iters} (0 for none)")
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
    gqla = gqla_config(cfg)
    if gqla is not None:
        if cfg.attention_pattern is not None or cfg.sparse_attention:
            raise _err("attention_type", "gqla", "GQLA layers take no sparse-MQA attention pattern",
                       "either --attention-type gqla or --attention-pattern, not both")
        gqla.validate(cfg.num_attention_heads, cfg.tensor_model_parallel_size)
        if cfg.learnable_sink:
            raise _err("learnable_sink", cfg.learnable_sink, "GQLA layers have a window, sinks and learned "
                       "top-k keys but no learned sink logit", "--window-size / --num-sink-tokens / --sparse-topk")
    elif cfg.attention_type == "mla":
        _validate_mla(cfg, mla_config(cfg))
    else:
        for name in _GQLA_FIELDS:
            if getattr(cfg, name) is not None:
                raise _err(name, getattr(cfg, name), "a GQLA dimension (MLA's too), only read by GQLA and "
                           "MLA layers", "--attention-type gqla or mla, or drop the option")
    sparse = sparse_attention_config(cfg)
    if sparse is not None:
        sparse.validate(cfg.num_attention_heads, groups, cfg.hidden_size // cfg.num_attention_heads,
                        cfg.context_parallel_size, lane)
    elif gqla is None and (cfg.window_size is not None or cfg.num_sink_tokens or cfg.learnable_sink
                           or cfg.sparse_topk):
        raise _err("attention_pattern", None, "window/sink/top-k options need sparse attention on",
                   "--attention-pattern (e.g. W) or --sparse-attention (window/sinks also: --attention-type gqla)")
    if cfg.bf16 and lane == "cpu" and backends.triton_interpret_env():
        raise _err("bf16", True, "under TRITON_INTERPRET=1 the CPU lane runs the Triton kernels in the "
                   "interpreter, whose tl.dot is wrong on bf16 inputs", "--no-bf16, or unset TRITON_INTERPRET")
    if cfg.mtp_num_layers is not None and (not isinstance(cfg.mtp_num_layers, int) or cfg.mtp_num_layers < 1):
        raise _err("mtp_num_layers", cfg.mtp_num_layers, "must be a positive integer",
                   "an integer >= 1 (DeepSeek-V3 uses 1), or leave it unset for no MTP layers")
    if not (math.isfinite(cfg.mtp_loss_scaling_factor) and cfg.mtp_loss_scaling_factor >= 0):
        raise _err("mtp_loss_scaling_factor", cfg.mtp_loss_scaling_factor, "must be a finite number >= 0",
                   "e.g. 0.1 (Megatron's default; DeepSeek-V3 used 0.3, then 0.1)")
    if cfg.deterministic_mode:
        check_determinism_env(os.environ)
    if cfg.exit_after_iters is not None and cfg.exit_after_iters < 1:
        raise _err("exit_after_iters", cfg.exit_after_iters, "must be positive", "an integer >= 1")
    if cfg.hang_dump_seconds is not None and not cfg.hang_dump_seconds > 0:
        raise _err("hang_dump_seconds", cfg.hang_dump_seconds, "must be positive",
                   "seconds > 0 (e.g. 120), or leave it unset")
    if cfg.profile and not 1 <= cfg.profile_step_start < cfg.profile_step_end <= cfg.train_iters + 1:
        raise _err("profile_step_start", f"{cfg.profile_step_start}..{cfg.profile_step_end}",
                   f"the profiled steps [start, end) must lie within 1..{cfg.train_iters}",
                   f"1 <= --profile-step-start < --profile-step-end <= {cfg.train_iters + 1}")

    if cfg.context_parallel_size > 1:
        raise _err("context_parallel_size", cfg.context_parallel_size,
                   "context parallelism is not supported yet", "1")
    if cfg.resume and cfg.run_dir is not None and not os.path.isdir(cfg.run_dir):
        raise _err("run_dir", cfg.run_dir, "--resume needs an existing run folder",
                   "the folder of an earlier run, or omit --run-dir to resume the newest run")
    if cfg.data_path is not None:
        from megatron_ext.data import DataError, validate_data_path

        try:
            validate_data_path(cfg.data_path)
        except DataError as e:
            raise ConfigError(str(e)) from None
    return check_lanes(cfg, world_size, gpus_per_node)


# --deterministic-mode: the environment settings a bitwise-repeatable step needs, read by the libraries
# when they start (cuBLAS at its first handle, NCCL at its first communicator). Unset ones are set to
# the first value listed; a value set to anything else is refused.
DETERMINISM_ENV = {
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),   # cuBLAS's two deterministic workspace layouts
    "NCCL_ALGO": ("Ring",),                              # a fixed reduction order (Megatron's default)
}


def check_determinism_env(env) -> None:
    for name, allowed in DETERMINISM_ENV.items():
        value = env.get(name)
        if value is not None and value not in allowed:
            raise _err("deterministic_mode", True, f"{name}={value!r} in the environment does not give "
                       "bitwise-repeatable steps", f"{name} unset or one of {list(allowed)}")


def _check_fsdp2(cfg: TrainConfig) -> None:
    """FSDP2 in ``train`` shards over the data-parallel group alone (one-dimensional mesh)."""
    why = {"tensor_model_parallel_size": "FSDP2 in train shards over data parallelism only (no 2-D mesh "
                                         "with tensor parallelism yet)",
           "pipeline_model_parallel_size": "FSDP2 does not run under pipeline schedules (Megatron's "
                                           "--use-torch-fsdp2 has the same limit)",
           "expert_model_parallel_size": "FSDP2 does not shard expert-parallel weights (Megatron's "
                                         "--use-torch-fsdp2 has the same limit)",
           "context_parallel_size": "FSDP2 in train shards over data parallelism only"}
    for field, reason in why.items():
        if getattr(cfg, field) > 1:
            raise _err(field, getattr(cfg, field), f"{reason}", "1 with --use-torch-fsdp2, or drop "
                       "--use-torch-fsdp2 (lane 'dp') to keep this lane")
    if cfg.num_experts:
        raise _err("num_experts", cfg.num_experts, "MoE layers are not run under FSDP2 in train yet",
                   "a dense model with --use-torch-fsdp2, or drop --use-torch-fsdp2 for MoE")
    if cfg.mhc_fp32_params and cfg.mhc_num_streams:
        raise _err("mhc_fp32_params", True, "FSDP2 gathers every parameter in the one dtype of its "
                   "mixed-precision policy (bf16 under --bf16), so the mixers' weights would not stay fp32",
                   "drop --mhc-fp32-params under --use-torch-fsdp2, or use data parallelism / "
                   "--use-distributed-optimizer")


def check_lanes(cfg: TrainConfig, world_size: int, gpus_per_node: Optional[int] = None) -> int:
    """The lane arithmetic (TP/PP/CP/EP/SP vs world size, heads, layers, batch); returns the
    data-parallel size. Shared with the lane planner (launch/plan.py), which runs it on every
    candidate plan, so the planner and ``train`` reject the same lanes with the same words."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    tp, pp, cp, ep = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                      cfg.context_parallel_size, cfg.expert_model_parallel_size)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise _err("world_size", world_size,
                   f"not divisible by tensor*pipeline*context parallel = {tp}*{pp}*{cp} = {model_parallel}",
                   f"a world size that is a multiple of {model_parallel}, or smaller lanes")
    dp = world_size // model_parallel
    if cfg.use_torch_fsdp2:
        _check_fsdp2(cfg)
        if cfg.use_distributed_optimizer:
            raise _err("use_distributed_optimizer", True, "FSDP2 already shards the optimizer states",
                       "one of --use-torch-fsdp2 and --use-distributed-optimizer")
    if ep > 1 and not cfg.num_experts:
        raise _err("expert_model_parallel_size", ep, "expert parallelism needs an MoE model",
                   "--num-experts N (a multiple of the EP size), or expert_model_parallel_size 1")
    if cfg.moe_layer_freq is not None and not cfg.num_experts:
        raise _err("moe_layer_freq", cfg.moe_layer_freq, "says which layers are MoE, but the model has no experts",
                   "--num-experts N, or leave it unset")
    etp = expert_tensor_parallel_size(cfg)
    if cfg.expert_tensor_parallel_size is not None:
        if not cfg.num_experts:
            raise _err("expert_tensor_parallel_size", etp, "expert tensor parallelism needs an MoE model",
                       "--num-experts N, or leave it unset")
        if cfg.moe_impl == "fused":
            check_expert_tp(etp, tp)
    if cfg.num_experts is not None:
        if cfg.num_experts < 1 or cfg.num_experts % ep:
            raise _err("num_experts", cfg.num_experts,
                       f"must be a positive multiple of expert_model_parallel_size={ep}",
                       f"a multiple of {ep}")
        if not 1 <= cfg.moe_router_topk <= cfg.num_experts:
            raise _err("moe_router_topk", cfg.moe_router_topk,
                       f"must lie in [1, num_experts={cfg.num_experts}]", "1 <= k <= num_experts")
        _validate_moe(cfg, world_size)
        if tp > 1 and not cfg.sequence_parallel:
            raise _err("sequence_parallel", False, "MoE with tensor parallelism needs sequence parallel",
                       "--sequence-parallel")
    if world_size % (etp * ep * pp):
        raise _err("expert_model_parallel_size", ep,
                   f"expert-tensor*expert*pipeline parallel = {etp}*{ep}*{pp} = {etp * ep * pp} does not "
                   f"divide world_size={world_size}",
                   "a divisor of world_size / (pipeline_model_parallel_size * expert_tensor_parallel_size)"
                   + (", or --expert-tensor-parallel-size 1" if etp > 1 else ""))
    if gpus_per_node is not None and tp > gpus_per_node:
        raise _err("tensor_model_parallel_size", tp,
                   f"larger than the {gpus_per_node} devices of one node", f"at most {gpus_per_node}")
    if cfg.num_attention_heads % tp:
        raise _err("tensor_model_parallel_size", tp,
                   f"does not divide num_attention_heads={cfg.num_attention_heads}", "a divisor of the head count")
    if groups % tp and tp % groups:
        # Megatron takes either: KV heads split over TP, or (fewer KV heads than TP ranks) each
        # group's fused QKV all-gathered so its KV head is shared by tp/groups ranks (MQA).
        raise _err("tensor_model_parallel_size", tp,
                   f"neither divides nor is a multiple of num_query_groups={groups}",
                   "a divisor or a multiple of the KV group count")
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
    step = cfg.micro_batch_size * dp
    if cfg.global_batch_size % step:
        raise _err("global_batch_size", cfg.global_batch_size,
                   f"not divisible by micro_batch_size*data_parallel_size = "
                   f"{cfg.micro_batch_size}*{dp} = {step}", f"a multiple of {step}")
    return dp
