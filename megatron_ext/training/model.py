"""TrainConfig -> TransformerConfig -> Megatron GPTModel built from this project's block spec."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext import compat
from megatron_ext.config import (TrainConfig, expert_tensor_parallel_size, ffn_hidden_size, gqla_config,
                                 mhc_config, mla_config, moe_config, moe_load_balancing_type,
                                 parse_moe_layer_freq, parse_recompute_modules,
                                 sparse_attention_config)


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    step = multiple * tp
    return (vocab_size + step - 1) // step * step


def transformer_config(cfg: TrainConfig, lane: str, bf16: bool):
    fields = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=ffn_hidden_size(cfg),
        normalization=cfg.normalization,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(cfg),
        sequence_parallel=cfg.sequence_parallel,
        use_cpu_initialization=lane == "cpu",
        perform_initialization=True,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        transformer_impl="local",
        # The fused kernels these flags select need apex/TE or CUDA; the spec's own modules fuse.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        deterministic_mode=cfg.deterministic_mode,
    )
    if cfg.mtp_num_layers:
        fields.update(mtp_num_layers=cfg.mtp_num_layers, mtp_loss_scaling_factor=cfg.mtp_loss_scaling_factor)
    recompute_modules = parse_recompute_modules(cfg.recompute_modules)
    if cfg.recompute_granularity is not None:
        fields.update(recompute_granularity=cfg.recompute_granularity)
        if cfg.recompute_granularity == "full":
            fields.update(recompute_method=cfg.recompute_method, recompute_num_layers=cfg.recompute_num_layers)
        elif recompute_modules:
            fields.update(recompute_modules=recompute_modules)
    if cfg.num_experts:
        fields.update(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or ffn_hidden_size(cfg),
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type=moe_load_balancing_type(cfg),
            moe_router_quantile_balancing_ema=cfg.moe_router_quantile_balancing_ema,
            moe_router_score_function=cfg.moe_router_score_function,
            moe_router_pre_softmax=bool(cfg.moe_router_pre_softmax),
            moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
            moe_z_loss_coeff=cfg.moe_z_loss_coeff,
            moe_router_enable_expert_bias=bool(cfg.moe_router_enable_expert_bias),
            moe_router_bias_update_rate=cfg.moe_router_bias_update_rate,
            moe_expert_capacity_factor=cfg.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=bool(cfg.moe_pad_expert_input_to_capacity),
            moe_token_drop_policy=cfg.moe_token_drop_policy,
            moe_input_jitter_eps=cfg.moe_input_jitter_eps,
            moe_router_num_groups=cfg.moe_router_num_groups,
            moe_router_group_topk=cfg.moe_router_group_topk,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=bool(cfg.moe_shared_expert_gate),
            moe_apply_probs_on_input=bool(cfg.moe_apply_probs_on_input),
            moe_latent_size=cfg.moe_latent_size,
            moe_router_force_load_balancing=bool(cfg.moe_router_force_load_balancing),
            moe_router_force_biased=cfg.moe_router_force_biased,
            moe_token_dispatcher_type="alltoall",
            # Megatron accepts moe_act only with grouped-GEMM experts, which the fused layer is
            moe_grouped_gemm="moe_act" in recompute_modules,
            moe_router_dtype="fp32",
            moe_layer_freq=parse_moe_layer_freq(cfg.moe_layer_freq or 1),
        )
    mla = mla_config(cfg)
    if mla is not None:  # Megatron's MLASelfAttention reads its dims from an MLATransformerConfig
        fields.update(mla.transformer_fields())
    tconfig = compat.make_transformer_config(compat.mla_transformer_config_class() if mla else None, **fields)
    # This project's knobs ride on the config object (the narrow adapter the specs read).
    tconfig.mhc = mhc_config(cfg)
    tconfig.moe = moe_config(cfg)
    tconfig.sparse_attention = sparse_attention_config(cfg)
    tconfig.gqla = gqla_config(cfg)
    return tconfig


def build_gpt(cfg: TrainConfig, tconfig, vocab_size: int):
    """One GPTModel chunk for this pipeline stage (virtual pipeline is not used)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from layer_specs.gpt import gpt_block_spec, mtp_block_spec
    from layer_specs.mhc import mhc_block_spec

    spec_fn = mhc_block_spec if tconfig.mhc is not None else gpt_block_spec
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec_fn(tconfig),
        vocab_size=padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by,
                                     cfg.tensor_model_parallel_size),
        max_sequence_length=cfg.seq_length,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        # Tied embeddings across pipeline stages need an embedding all-reduce between the first
        # and last stage; keep them tied only when one stage holds both.
        share_embeddings_and_output_weights=(not cfg.untie_embeddings_and_output_weights
                                             and cfg.pipeline_model_parallel_size == 1),
        position_embedding_type=cfg.position_embedding_type,
        # None without --mtp-num-layers and on every stage but the last
        mtp_block_spec=mtp_block_spec(tconfig),
    )
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
