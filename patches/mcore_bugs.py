"""Upstream megatron-core bugs and limits hit on every lane (not CPU-specific)."""

from __future__ import annotations

from patches import after_init, patch


@patch("moe_te_general_gemm_name", lane="any",
       reason="moe_utils.RouterGatingLinearFunction tests `te_general_gemm is not None`, but the name "
              "is only bound when Transformer Engine imports: NameError on every MoE forward without TE")
def _te_general_gemm():
    import megatron.core.transformer.moe.moe_utils as mu

    if not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


@patch("mla_have_te_mock", lane="any",
       reason="multi_latent_attention.HAVE_TE is True without TE because extensions/transformer_engine "
              "imports with MagicMock classes; isinstance(x, TELinear) then raises TypeError")
def _mla_have_te():
    from megatron_ext.compat import HAVE_TE

    if HAVE_TE:
        return
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False


@patch("pp_p2p_stream_width", lane="any",
       reason="pipeline p2p buffers are sized from config.hidden_size (schedules.get_tensor_shapes for "
              "1F1B, a local [s, b, hidden_size] in the interleaved schedule, the CUDA-graph runner); mHC "
              "layers exchange n streams ([s, b, n*hidden]), so P2PCommunicator._communicate, which all of "
              "them call, multiplies the last dim by config.mhc_num_streams (absent: 1, no change). "
              "Upstream Megatron refuses mHC with PP>1 for this reason")
def _pp_stream_width():
    import functools

    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    original = P2PCommunicator._communicate

    @functools.wraps(original)
    def _communicate(self, *, tensor_shape, **kwargs):
        n = getattr(self.config, "mhc_num_streams", None) or 1
        if n > 1 and tensor_shape is not None:
            tensor_shape = tuple(tensor_shape[:-1]) + (tensor_shape[-1] * n,)
        return original(self, tensor_shape=tensor_shape, **kwargs)

    P2PCommunicator._communicate = _communicate


@patch("dist_optimizer_fresh_state_dict", lane="any",
       reason="distrib_optimizer.DistributedOptimizer.state_dict without apex/TE reads Adam's 'step' "
              "from the inner optimizer's per-parameter state and asserts exactly one value; before the "
              "first step that state is empty, and loading a checkpoint builds exactly that state dict "
              "(sharded_state_dict(is_loading=True)), so every distributed-optimizer resume without "
              "apex/TE failed with a bare AssertionError. A never-stepped optimizer reports step 0")
def _dist_optimizer_fresh_state_dict():
    import functools

    import torch
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer.state_dict

    @functools.wraps(original)
    def state_dict(self):
        inner = getattr(self, "optimizer", None)
        if dopt.HAVE_APEX_OR_TE or inner is None or len(inner.state) > 0:
            return original(self)
        real = inner.state_dict

        def stepped_zero():
            sd = real()
            # state_dict keeps only the step from the per-parameter state (and drops the rest)
            sd["state"] = {0: {"step": torch.tensor(0.0)}}
            return sd

        inner.state_dict = stepped_zero
        try:
            return original(self)
        finally:
            del inner.state_dict

    dopt.DistributedOptimizer.state_dict = state_dict


@patch("dist_optimizer_loaded_step", lane="any",
       reason="distrib_optimizer._set_main_param_and_optimizer_states copies every entry of a "
              "parameter's Adam state from the checkpoint's tensors; without apex/TE that state also "
              "holds torch Adam's 'step', which load_state_dict has just set from the saved param "
              "groups. The 'fully_reshardable' tensors never carry it (KeyError 'step'); the "
              "'dp_reshardable' ones carry the load's placeholder, not a loaded value, so a resumed Adam "
              "restarted its bias correction at step 0. Keep the saved step in both; and copy under "
              "no_grad (the 'dp_reshardable' load copies into an fp32 model's parameter views outside "
              "no_grad: 'a view of a leaf Variable that requires grad')")
def _dist_optimizer_loaded_step():
    import functools

    import torch
    from megatron.core.optimizer import distrib_optimizer as dopt

    set_states = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(set_states)
    @torch.no_grad()
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not dopt.HAVE_APEX_OR_TE:
            # the getter that pairs with this setter: the parameter's current Adam state (its step a tensor)
            step = self._get_main_param_and_optimizer_states(model_param).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return set_states(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


@patch("dist_optimizer_step_per_param", lane="any",
       reason="distrib_optimizer.DistributedOptimizer.load_state_dict without apex/TE gives every "
              "parameter's Adam state the same 'step' tensor object; torch's Adam increments each "
              "parameter's step in place, so after a resume the shared step advanced once per parameter "
              "per iteration (3 -> 27 after one step of a 24-parameter group) and the bias correction "
              "ran at the wrong step. One step tensor per parameter")
def _dist_optimizer_step_per_param():
    import functools

    import torch
    from megatron.core.optimizer import distrib_optimizer as dopt

    load = dopt.DistributedOptimizer.load_state_dict

    @functools.wraps(load)
    def load_state_dict(self, state_dict):
        out = load(self, state_dict)
        inner = getattr(self, "optimizer", None)
        if not dopt.HAVE_APEX_OR_TE and inner is not None:
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        return out

    dopt.DistributedOptimizer.load_state_dict = load_state_dict


@patch("float16_optimizer_fp32_params_checkpoint", lane="any",
       reason="optimizer.Float16OptimizerWithFloat16Params.sharded_state_dict numbers the optimizer's "
              "parameters over its bf16/fp16 groups only, while torch numbers every parameter of each "
              "group: a bf16 model with any fp32 parameter (e.g. mHC mixers under --mhc-fp32-params) "
              "failed to save its checkpoint with KeyError, and its fp32 master copies were paired with "
              "the wrong ids. Numbered over all parameters in the optimizer's order; models without fp32 "
              "parameters take the original method")
def _float16_optimizer_fp32_params():
    import functools

    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor, optim_state_to_sharding_state)
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    original = Float16OptimizerWithFloat16Params.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if not any(self.fp32_from_fp32_groups):
            return original(self, model_sharded_state_dict, is_loading=is_loading, metadata=metadata)
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        # the model parameter behind each optimizer slot, in torch's numbering (groups in order)
        model_params, half_ids = [], []
        for group, halves, mains in zip(self.optimizer.param_groups, self.float16_groups,
                                        self.fp32_from_float16_groups):
            model_of_main = {id(main): half for main, half in zip(mains, halves)}
            group_half_ids = []
            for param in group["params"]:
                if id(param) in model_of_main:
                    group_half_ids.append(len(model_params))
                    model_params.append(model_of_main[id(param)])
                else:
                    model_params.append(param)
            half_ids.append(group_half_ids)
        id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, model_params)
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(id_to_sharded[i], main, prefix="optimizer.state.fp32_param")
             for i, main in zip(ids, mains)]
            for ids, mains in zip(half_ids, state_dict["fp32_from_fp16_params"])
        ]
        step = self._extract_common_per_param_step(state_dict["optimizer"])
        optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
        if step:
            state_dict["optimizer"]["state"]["common_step"] = step
        return state_dict

    Float16OptimizerWithFloat16Params.sharded_state_dict = sharded_state_dict


@patch("dist_optimizer_mixed_dtype_index", lane="any",
       reason="distrib_optimizer.DistributedOptimizer orders each inner param group as [fp32 shards, then "
              "the fp32 copies of bf16/fp16 shards] but indexes model_param_group_index_map by the buffer "
              "order, where the two kinds interleave: with fp32 parameters in a bf16 model (e.g. mHC mixers "
              "under --mhc-fp32-params) every checkpoint save and load fetched another parameter's state "
              "(size mismatch at save). The map is rebuilt in the group's actual order; models of one "
              "dtype keep the original map (identical)")
def _dist_optimizer_mixed_dtype_index():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def fix(self):
        fp32_groups = getattr(self, "model_fp32_groups", None) or []
        half_groups = getattr(self, "model_float16_groups", None) or []
        if not (any(fp32_groups) and any(half_groups)):
            return
        index = {}
        for g, (fp32s, halves) in enumerate(zip(fp32_groups, half_groups)):
            index.update({p: (g, i) for i, p in enumerate(fp32s)})
            index.update({p: (g, len(fp32s) + i) for i, p in enumerate(halves)})
        self.model_param_group_index_map = index

    after_init(DistributedOptimizer, fix)


@patch("fused_moe_not_recomputed_as_mlp", lane="any",
       reason="transformer_layer.TransformerLayer recognises an MoE layer by isinstance(mlp, MoELayer) "
              "and checkpoints every other MLP whole under --recompute-modules mlp, so the fused MoE "
              "layer (router, losses and statistics included) ran its forward again in backward, and "
              "three times with 'moe' also set. Megatron's 'mlp' is the dense MLP's entry (an MoE "
              "layer takes 'moe', 'moe_act', 'shared_experts'); the fused layer is left to those")
def _fused_moe_not_recomputed_as_mlp():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_ext import backends
    from megatron_ext.modules.moe import FusedMoELayer

    def fix(self):
        if getattr(self, "recompute_mlp", False) and isinstance(getattr(self, "mlp", None), FusedMoELayer):
            self.recompute_mlp = False
            backends.note("recompute_modules.mlp", "mlp", "dense MLPs only",
                          "as in Megatron, 'mlp' checkpoints dense MLPs; the fused MoE layer takes "
                          "'moe' (all after the router), 'moe_act' or 'shared_experts'")

    after_init(TransformerLayer, fix)


@patch("checkpoint_without_output_no_te", lane="any",
       reason="tensor_parallel.random.CheckpointWithoutOutput sets self.fp8 = (fp8 is not None), so its "
              "default fp8=False reads as FP8 on and its forward calls Transformer Engine's "
              "FP8GlobalStateManager, a name bound only when TE imports: selective recompute of the "
              "layer norms (--recompute-modules layernorm) died with a NameError without TE. Without "
              "TE there is no FP8, so the flag is off")
def _checkpoint_without_output_no_te():
    import megatron.core.tensor_parallel.random as rnd

    if not getattr(rnd, "HAVE_TE", False):
        after_init(rnd.CheckpointWithoutOutput, lambda self: setattr(self, "fp8", False))


@patch("fused_moe_unflattened_for_packed_batches", lane="any", min_version="0.19.0",
       reason="transformer_layer.TransformerLayer un-flattens a packed micro-batch of mbs > 1 "
              "([mbs*S, 1, h] -> [S, mbs, h], PackedSeqParams.tokens_per_sample) before an MoE layer "
              "only when the MLP is isinstance(mlp, MoELayer), so the fused MoE layer saw one "
              "sequence of mbs*S tokens and its seq_aux_loss spanned the whole micro-batch. The fused "
              "layer is un-flattened by the same code (is_moe_layer itself stays as Megatron set it: "
              "its CUDA-graph scopes reach into Megatron's MoELayer). Under sequence parallelism "
              "Megatron's count, local tokens // tokens_per_sample on the [mbs*S/tp, 1, h] shard, "
              "groups the wrong tokens (nothing un-flattened at mbs = tp; samples of different "
              "ranks joined by the gather otherwise; its own MoELayer too): there the fused layer "
              "is told tokens_per_sample and groups the gathered tokens by sample itself")
def _fused_moe_unflattened_for_packed_batches():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_ext.modules.moe import FusedMoELayer

    if not hasattr(TransformerLayer, "_maybe_unflatten_for_moe"):
        return
    original = TransformerLayer._maybe_unflatten_for_moe

    def unflatten(self, hidden_states, padding_mask, packed_seq_params):
        mlp = getattr(self, "mlp", None)
        if self.is_moe_layer or not isinstance(mlp, FusedMoELayer):
            return original(self, hidden_states, padding_mask, packed_seq_params)
        tokens = getattr(packed_seq_params, "tokens_per_sample", None) if packed_seq_params is not None else None
        if mlp.tp_size > 1:
            # the sequence-parallel shard: left flat, the layer groups its gathered tokens by sample
            mlp.packed_tokens_per_sample = tokens
            return hidden_states, padding_mask, None
        self.is_moe_layer = True
        try:
            return original(self, hidden_states, padding_mask, packed_seq_params)
        finally:
            self.is_moe_layer = False

    TransformerLayer._maybe_unflatten_for_moe = unflatten


@patch("expert_bias_load_with_padding_mask", lane="any",
       reason="moe.router.TopKRouter._apply_expert_bias counts the load that moves the aux-loss-free "
              "bias as routing_map & ~padding_mask, a [T, E] map against a [T] mask: with a padding "
              "mask (padded fine-tuning batches) Megatron's own MoELayer failed to broadcast unless "
              "T == E, and then masked experts instead of tokens. The mask now drops the padding "
              "tokens' rows (the fused layer counts the same)")
def _expert_bias_load_with_padding_mask():
    import inspect

    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    if "routing_map & (~padding_mask)" not in inspect.getsource(TopKRouter._apply_expert_bias):
        return   # a version that masks the rows itself

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & (~padding_mask.reshape(-1, 1).bool())
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    TopKRouter._apply_expert_bias = _apply_expert_bias


UNKNOWN_MLP_TEXT = ("Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. "
                    "Using default kwargs.")


class _DropSpecTypeWarning:
    """A logging filter that drops the one record whose text is ``UNKNOWN_MLP_TEXT``."""

    def filter(self, record) -> bool:
        return record.getMessage() != UNKNOWN_MLP_TEXT


@patch("unknown_mlp_type_warning", lane="any", max_version="0.19",
       reason="TransformerLayer.__init__ (0.16) logs 'Unknown MLP type: <class ModuleSpec>. Using "
              "default kwargs.' at WARNING once per layer whose MLP module is not one of Megatron's "
              "classes (the fused MoE layer): the text names the spec's type, not "
              "the module, and the default kwargs are what those modules take. That exact record is "
              "dropped; any other record of the logger passes")
def _quiet_unknown_mlp_type():
    import logging

    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _DropSpecTypeWarning) for f in logger.filters):
        logger.addFilter(_DropSpecTypeWarning())
