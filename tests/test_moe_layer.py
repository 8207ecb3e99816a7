"""Fused MoE layer (megatron_ext.modules.moe): equality with Megatron's stock MoELayer +
SequentialMLP, replay, deterministic batch invariance, config errors, and training runs that
exercise the router options, monitoring, trace/replay and deterministic mode end to end."""

import json
import threading
from typing import Callable

import pytest
import torch

from megatron_ext import compat
from tests.helpers import (EP2_ONE_DEVICE_PREAMBLE, EP2_ONE_DEVICE_TEARDOWN, receipt, resume_from,
                           train_inprocess, train_losses)

S, B, H, E, F = 8, 2, 32, 4, 48
RUN = ["--train-iters", "6", "--eval-iters", "0", "--lr-warmup-iters", "1", "--save-interval", "100",
       "--num-layers", "2", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4"]


@pytest.fixture
def megatron_world():
    import patches
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron_ext.training.distributed import init_distributed

    from megatron_ext.observability.moe_stats import STATE

    init_distributed("cpu")
    patches.apply_patches("cpu")
    compat.initialize_model_parallel(1, 1, 1)
    compat.seed_model_parallel(1234)
    # an earlier in-process training run may have left its trace / replay / log folders set: the
    # layers here run outside any training loop
    STATE.reset()
    compat.clear_moe_aux_loss_tracker(drop=True)   # sized by the first model that logs: the MTP tests add a slot
    yield
    compat.destroy_model_parallel(destroy_groups=True)
    compat.clear_moe_aux_loss_tracker()
    # A backward without a schedule makes Megatron create a 0-d loss scale that the schedule's
    # later set_loss_scale (a [1] tensor) cannot copy into: leave none behind for in-process runs.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _tconfig(**moe):
    from megatron_ext.config import from_preset
    from megatron_ext.training.model import transformer_config

    cfg = from_preset("test", hidden_size=H, num_attention_heads=4, num_experts=E, moe_ffn_hidden_size=F,
                      **{"moe_router_topk": 2, **moe})
    return transformer_config(cfg, "cpu", False)


def _layers(tconfig, **build):
    """Megatron's stock MoELayer (SequentialMLP experts, SharedExpertMLP when the config has a shared
    expert) and the fused layer with the same weights (``build``: more constructor arguments)."""
    from layer_specs.gpt import stock_moe_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron_ext.modules.moe import FusedMoELayer

    stock = build_module(stock_moe_spec(), config=tconfig, pg_collection=get_default_pg_collection(), **build)
    stock.set_layer_number(1)
    fused = FusedMoELayer(tconfig, **build)
    fused.set_layer_number(1)
    with torch.no_grad():
        fused.router_weight.copy_(stock.router.weight)
        for e, mlp in enumerate(stock.experts.local_experts):
            fused.w1[e].copy_(mlp.linear_fc1.weight.t())
            fused.w2[e].copy_(mlp.linear_fc2.weight.t())
        if stock.shared_experts is not None:
            fused.shared_w1.copy_(stock.shared_experts.linear_fc1.weight.t())
            fused.shared_w2.copy_(stock.shared_experts.linear_fc2.weight.t())
            if stock.shared_experts.gate_weight is not None:
                fused.shared_gate_weight.copy_(stock.shared_experts.gate_weight)
        # the routers' biases at values that steer the selection (a fresh router's are zero)
        gen = torch.Generator().manual_seed(3)
        for theirs, ours in ((getattr(stock.router, "expert_bias", None), fused.router_expert_bias),
                             (getattr(stock.router, "qb_beta", None), fused.router_qb_beta)):
            assert (theirs is None) == (ours is None)
            if theirs is not None:
                b = torch.randn(E, generator=gen) * 0.5
                theirs.copy_(b)
                ours.copy_(b)
    return stock, fused


def _router_weight(layer):
    """The router weight of the fused layer or of Megatron's MoELayer."""
    return layer.router_weight if hasattr(layer, "router_weight") else layer.router.weight


def aux_router_grads(stock, fused, x):
    """(Megatron's, ours): each layer's router-weight gradient from its balancing losses alone
    (a zero output gradient) for the input ``x``."""
    grads = []
    for layer in (stock, fused):
        layer.zero_grad()
        y, _ = layer(x.clone())
        y.backward(torch.zeros_like(y))
        grads.append(_router_weight(layer).grad.clone())
    return tuple(grads)


@pytest.mark.parametrize("moe", [
    dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
    dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5,
         moe_router_num_groups=2, moe_router_group_topk=1),
    dict(moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0, moe_aux_loss_coeff=0.1,
         moe_token_drop_policy="probs"),
    dict(moe_shared_expert_intermediate_size=24, moe_aux_loss_coeff=0.01),
    dict(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True, moe_router_score_function="sigmoid",
         moe_router_topk_scaling_factor=2.0),
    dict(moe_router_score_function="sqrtsoftplus", moe_router_topk_scaling_factor=1.5, moe_aux_loss_coeff=0.01),
    # DeepSeek-V3's router: the biased, group-limited selection; f_e of the balance loss counts
    # the plain top-k of the scores (eq. 18), as Megatron's does
    dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=2,
         moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
         moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.05),
    dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
         moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.05),
    # Megatron's list form: three aux losses, one coefficient each
    dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss", "global_aux_loss"],
         moe_aux_loss_coeff=[0.01, 0.02, 0.03], moe_z_loss_coeff=0.001),
    dict(moe_router_load_balancing_type="quantile_balancing", moe_router_score_function="sigmoid",
         moe_router_topk_scaling_factor=2.0, moe_z_loss_coeff=0.001),
    dict(moe_router_load_balancing_type="quantile_balancing", moe_router_pre_softmax=True),
    # Llama-4's MoE: top-1 sigmoid gate on the expert's input, a shared expert on the raw input
    dict(moe_router_topk=1, moe_apply_probs_on_input=True, moe_router_score_function="sigmoid",
         moe_shared_expert_intermediate_size=24, moe_aux_loss_coeff=0.01),
    # the gate on the input with tokens dropped at capacity (a dropped token's expert input is 0)
    dict(moe_router_topk=1, moe_apply_probs_on_input=True, moe_router_pre_softmax=True,
         moe_expert_capacity_factor=0.5, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.001),
], ids=["softmax_aux_z", "sigmoid_groups_scaled", "pre_softmax_capacity", "shared_expert", "shared_expert_gate",
        "sqrtsoftplus_aux", "dsv3_bias_groups_seq_aux", "sigmoid_bias_aux", "listed_aux_types",
        "quantile_sigmoid", "quantile_pre_softmax", "probs_on_input_shared", "probs_on_input_capacity"])
def test_fused_layer_matches_megatron_stock_layer(megatron_world, moe):
    from megatron_ext import compat

    score = moe.get("moe_router_score_function", "softmax")
    if score not in compat.mcore_score_functions():
        pytest.skip(f"Megatron's router in megatron-core {compat.mcore_version()} has no {score}")
    quantile = moe.get("moe_router_load_balancing_type") == "quantile_balancing"
    if quantile and not compat.mcore_has_quantile_balancing():
        pytest.skip(f"Megatron's router in megatron-core {compat.mcore_version()} has no quantile balancing")
    stock, fused = _layers(_tconfig(**moe))
    _assert_matches_stock(stock, fused, torch.randn(S, B, H, dtype=torch.float64).float())
    if quantile:   # the step's quantile estimate, as Megatron accumulates it
        torch.testing.assert_close(fused.qb_beta_accum, stock.router.qb_beta_accum, rtol=1e-6, atol=1e-7)
        assert fused.qb_beta_count.item() == stock.router.qb_beta_count.item() == 1


def _assert_matches_stock(stock, fused, x, between: Callable[[], None] = lambda: None):
    """Megatron's layer and the fused one on ``x``: the same output, input gradient and every
    weight gradient; ``between`` runs after Megatron's forward (to rewind an RNG both draw from)."""
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, _ = stock(xs)
    between()
    yf, bias = fused(xf)
    assert bias is None and yf.shape == (S, B, H)
    torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ys)
    ys.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.router_weight.grad, stock.router.weight.grad, rtol=1e-5, atol=1e-6)
    for e, mlp in enumerate(stock.experts.local_experts):
        torch.testing.assert_close(fused.w1.grad[e], mlp.linear_fc1.weight.grad.t(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.w2.grad[e], mlp.linear_fc2.weight.grad.t(), rtol=1e-5, atol=1e-6)
    shared = stock.shared_experts
    if shared is not None:
        torch.testing.assert_close(fused.shared_w1.grad, shared.linear_fc1.weight.grad.t(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.shared_w2.grad, shared.linear_fc2.weight.grad.t(), rtol=1e-5, atol=1e-6)
        assert (fused.shared_gate_weight is None) == (shared.gate_weight is None)
        if shared.gate_weight is not None:
            assert fused.shared_gate_weight.grad.abs().sum() > 0
            torch.testing.assert_close(fused.shared_gate_weight.grad, shared.gate_weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("moe", [
    dict(moe_router_force_load_balancing=True, moe_aux_loss_coeff=0.05),
    dict(moe_router_force_biased=0.5, moe_router_score_function="sigmoid", moe_aux_loss_coeff=0.05),
    dict(moe_router_force_biased=-1.0, moe_router_force_load_balancing=True),
], ids=["random_logits", "random_bias_each_forward", "random_bias_once_per_layer"])
def test_forced_benchmark_routers_match_megatron(megatron_world, moe):
    """Megatron's benchmark routers (moe_router_force_load_balancing: random logits;
    moe_router_force_biased: random logits plus a random per-expert bias) draw from Megatron's
    model-parallel RNG tracker as Megatron's router does: with the tracker rewound between the two
    layers, the same routing, output and gradients (the random logits hand their gradient to the
    real ones, so the router weight learns from the balancing losses)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron_ext import compat

    if "moe_router_force_biased" in moe and not compat.mcore_has_field("moe_router_force_biased"):
        pytest.skip(f"Megatron's router in megatron-core {compat.mcore_version()} has no forced bias")
    if "moe_router_force_biased" in moe:
        from megatron.core.transformer.moe.moe_utils import RandomSTEShared

        RandomSTEShared._cache.clear()   # Megatron keeps a once-per-layer bias per process, by layer number
    stock, fused = _layers(_tconfig(**moe))
    tracker = get_cuda_rng_tracker()
    for step in range(2):   # a negative std keeps the first forward's bias
        states = tracker.get_states()
        _assert_matches_stock(stock, fused, torch.randn(S, B, H), between=lambda: tracker.set_states(states))
        assert fused.router_weight.grad.abs().max() > 0   # through the gates and the random logits
        if step == 0:
            first = fused._forced_bias
    if moe.get("moe_router_force_biased", 0) < 0:
        assert first is not None and fused._forced_bias is first


@pytest.fixture
def router_replay_registry():
    """Megatron's global list of RouterReplay instances, empty before the test and after it."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    yield
    RouterReplay.clear_global_router_replay_instances()


def _replay_config(**moe):
    """A TransformerConfig with Megatron's moe_enable_routing_replay (a TransformerConfig field set
    by the RL frameworks that drive RouterReplay, not a flag of megatron-ext train)."""
    tconfig = _tconfig(**moe)
    tconfig.moe_enable_routing_replay = True
    return tconfig


def _replay_targets(T: int, k: int, seed: int) -> torch.Tensor:
    """[T, k] distinct random expert ids per token (int64, as Megatron's top-k gives them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].contiguous()


@pytest.mark.parametrize("moe", [
    dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
    dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=2,
         moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
         moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.05),
    dict(moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0, moe_aux_loss_coeff=0.1,
         moe_shared_expert_intermediate_size=24),
], ids=["softmax_aux_z", "dsv3_bias_groups_seq_aux", "pre_softmax_capacity_shared"])
def test_megatron_router_replay_drives_the_fused_layer_as_megatrons(megatron_world, router_replay_registry, moe):
    """moe_enable_routing_replay (RL frameworks: record a rollout's routing, replay it in training)
    through Megatron's own RouterReplay API, the global list holding Megatron's layer's instance and
    the fused layer's: RECORD records the same expert ids; REPLAY_FORWARD routes both to the targets
    of RouterReplay.set_replay_data (gates, losses and capacity from the current logits) with the same
    output and every gradient, away from the layers' own routing; REPLAY_BACKWARD (a recompute) pops
    the oldest target; missing targets and a wrong shape are errors naming what to set."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    stock, fused = _layers(_replay_config(**moe))
    assert RouterReplay.global_router_replay_instances == [stock.router.router_replay, fused.router_replay]
    assert getattr(fused.router_replay, "layer_number", 1) == 1
    k = stock.router.topk
    x = torch.randn(S, B, H, dtype=torch.float64).float()
    # the layers' own routing, recorded by both
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    _assert_matches_stock(stock, fused, x)
    theirs, ours = RouterReplay.get_recorded_data()
    assert ours.shape == (S * B, k) and ours.dtype == torch.int64
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        own, _ = fused(x)
    # replayed targets: one per layer, in the global list's order
    target = _replay_targets(S * B, k, seed=11)
    assert not torch.equal(target.sort(dim=1).values, ours.sort(dim=1).values)
    RouterReplay.set_replay_data([target.clone(), target.clone()])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    for layer in (stock, fused):
        layer.zero_grad()
    _assert_matches_stock(stock, fused, x)
    with torch.no_grad():
        replayed, _ = fused(x)
    # the targets, not the layer's own choice
    assert (replayed - own).abs().max() > 0.1 * own.abs().max()
    # a recompute under REPLAY_BACKWARD takes the oldest target not replayed yet, once
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    with torch.no_grad():
        again, _ = fused(x)
    torch.testing.assert_close(again, replayed, rtol=0, atol=0)
    assert fused.router_replay.replay_backward_list == []
    with pytest.raises(ValueError, match=r"^RouterReplay action REPLAY_BACKWARD on MoE layer 1: every target"):
        fused(x)
    RouterReplay.clear_global_indices()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    with pytest.raises(ValueError, match=r"^RouterReplay action REPLAY_FORWARD on MoE layer 1: no target "
                                         r"indices; set them with RouterReplay.set_replay_data"):
        fused(x)
    fused.router_replay.set_target_indices(target[: S * B - 1])
    with pytest.raises(ValueError, match=rf"shape \({S * B - 1}, {k}\); this rank routes {S * B} tokens .* "
                                         rf"use \[{S * B}, {k}\]"):
        fused(x)
    # no action: the layer's own routing again
    RouterReplay.clear_global_router_replay_action()
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], own, rtol=0, atol=0)


@pytest.mark.parametrize("moe", [dict(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1),
                                 dict(moe_router_load_balancing_type="quantile_balancing")],
                         ids=["sinkhorn", "quantile"])
def test_megatron_router_replay_acts_on_every_selection_type(megatron_world, router_replay_registry, moe):
    """Megatron's RouterReplay acts on its top-k selection only: its Sinkhorn and quantile-balancing
    routers neither record nor replay. The fused layer's does both there too: replaying what it
    recorded gives the recorded run's output, a random target another one."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    if moe["moe_router_load_balancing_type"] == "quantile_balancing" and not compat.mcore_has_quantile_balancing():
        pytest.skip(f"megatron-core {compat.mcore_version()} has no quantile balancing")
    fused = _layers(_replay_config(**moe))[1]
    RouterReplay.clear_global_router_replay_instances()
    RouterReplay.global_router_replay_instances.append(fused.router_replay)
    x = torch.randn(S, B, H)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    own = fused(x)[0].detach()
    recorded = RouterReplay.get_recorded_data()[0].clone()
    outs = []
    for target in (recorded, _replay_targets(S * B, recorded.shape[1], seed=15)):
        RouterReplay.clear_global_indices()
        RouterReplay.set_replay_data([target])
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        outs.append(fused(x)[0].detach())
    torch.testing.assert_close(outs[0], own, rtol=0, atol=0)
    assert (outs[1] - own).abs().max() > 0.1 * own.abs().max()


def test_megatron_router_replay_under_full_layer_recompute(megatron_world, router_replay_registry):
    """The RL frameworks' order with Megatron's full recompute: the forward under REPLAY_FORWARD,
    the backward under REPLAY_BACKWARD, whose recomputed forward pops the same target: the output
    and every gradient equal the replayed layer without recompute."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    _, fused = _layers(_replay_config(moe_aux_loss_coeff=0.05))
    RouterReplay.clear_global_router_replay_instances()
    RouterReplay.global_router_replay_instances.append(fused.router_replay)
    target = _replay_targets(S * B, 2, seed=12)
    x = torch.randn(S, B, H)
    g = torch.randn(S, B, H)
    runs = []
    for recompute in (False, True):
        fused.zero_grad()
        RouterReplay.clear_global_indices()
        RouterReplay.set_replay_data([target])
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        xi = x.clone().requires_grad_()
        if recompute:
            y = tensor_parallel.checkpoint(lambda t: fused(t)[0], False, xi)
        else:
            y, _ = fused(xi)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
        y.backward(g)
        runs.append((y.detach(), xi.grad, fused.router_weight.grad.clone(), fused.w1.grad.clone()))
        assert fused.router_replay.replay_backward_list == ([] if recompute else [target])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _mtp_model(tconfig, mtp_spec):
    """A GPTModel of the fused MoE block with ``mtp_spec`` as its multi-token-prediction block."""
    from layer_specs.moe import moe_block_spec
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=tconfig, transformer_layer_spec=moe_block_spec(tconfig), vocab_size=64,
                    max_sequence_length=S, mtp_block_spec=mtp_spec)


def _mtp_config(**moe):
    tconfig = _tconfig(**moe)
    tconfig.mtp_num_layers, tconfig.mtp_loss_scaling_factor = 1, 0.1
    return tconfig


@pytest.mark.parametrize("built_by", ["layer_specs", "megatron"])
def test_fused_moe_in_a_multi_token_prediction_layer(megatron_world, monkeypatch, built_by):
    """DeepSeek-V3's multi-token prediction (mtp_num_layers) with the fused MoE layer in the MTP
    layer, whose block comes from layer_specs.gpt.mtp_block_spec or from Megatron's
    get_gpt_mtp_block_spec on this project's block. The MTP layer's MoE is number num_layers + 1
    (megatron-core 0.19 numbers it 1 within its depth and passes is_mtp_layer; 0.16.1 numbers it
    num_layers + 1): its experts are its own, not decoder layer 1's, and its aux loss goes to its own
    slot of Megatron's tracker of num_layers + 1 slots (0.16.1 raised an IndexError there, 0.19.2
    added it to layer 1's). The model's loss reaches the MTP layer's router."""
    from layer_specs.gpt import mtp_block_spec
    from layer_specs.moe import moe_block_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron_ext.modules.moe import FusedMoELayer

    tconfig = _mtp_config(moe_aux_loss_coeff=0.01)
    if built_by == "layer_specs":
        # Megatron's pretrain CLI default, which its local torch norm refuses: this project's norm
        # in the MTP module, as in the decoder
        tconfig.persist_layer_norm = True
    mtp = mtp_block_spec(tconfig) if built_by == "layer_specs" else \
        get_gpt_mtp_block_spec(tconfig, moe_block_spec(tconfig), use_transformer_engine=False)
    model = _mtp_model(tconfig, mtp)
    if built_by == "layer_specs":
        assert {type(model.mtp.layers[0].enorm).__name__, type(model.mtp.layers[0].hnorm).__name__} == {"Norm"}
    moes = [m for m in model.modules() if isinstance(m, FusedMoELayer)]
    assert [m.layer_number for m in moes] == [1, 2, 3]
    assert not torch.equal(moes[2].w1, moes[0].w1) and not torch.equal(moes[2].w1, moes[1].w1)
    logged = []
    record = compat.record_moe_aux_loss
    monkeypatch.setattr(compat, "record_moe_aux_loss", lambda name, value, layer, n: (
        logged.append((name, layer, n, float(value))), record(name, value, layer, n)))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    tokens = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(4))
    loss = model(tokens, torch.arange(S).expand(B, S), None, labels=tokens)
    loss.float().mean().backward()
    assert [(name, layer, n) for name, layer, n, _ in logged] == \
        [("load_balancing_loss", layer, 3) for layer in (1, 2, 3)]
    assert all(v > 0 for *_, v in logged)
    assert moes[2].router_weight.grad.abs().max() > 0


def test_mtp_layer_under_mhc_takes_one_stream(megatron_world):
    """Under mHC the decoder hands the MTP module its final norm's one [s, b, h] stream, so
    layer_specs.gpt.mtp_block_spec gives the MTP layer this project's attention and fused MoE
    with a plain residual (an mHC layer would expect n streams); the model trains through it."""
    from layer_specs.gpt import mtp_block_spec
    from layer_specs.mhc import mhc_block_spec
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron_ext.config import from_preset
    from megatron_ext.training.model import transformer_config

    cfg = from_preset("test", hidden_size=H, num_attention_heads=4, num_experts=E, moe_ffn_hidden_size=F,
                      moe_router_topk=2, moe_aux_loss_coeff=0.01, mhc_num_streams=4)
    tconfig = transformer_config(cfg, "cpu", False)
    tconfig.mtp_num_layers, tconfig.mtp_loss_scaling_factor = 1, 0.1
    model = GPTModel(config=tconfig, transformer_layer_spec=mhc_block_spec(tconfig), vocab_size=64,
                     max_sequence_length=S, mtp_block_spec=mtp_block_spec(tconfig))
    inner = model.mtp.layers[0]
    inner = getattr(inner, "mtp_model_layer", None) or inner.transformer_layer   # 0.19 / 0.16.1 name
    assert type(inner).__name__ == "TransformerLayer" and type(inner.mlp).__name__ == "FusedMoELayer"
    assert type(model.decoder.layers[0]).__name__ == "MHCTransformerLayer"
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    tokens = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(6))
    model(tokens, torch.arange(S).expand(B, S), None, labels=tokens).float().mean().backward()
    assert inner.mlp.router_weight.grad.abs().max() > 0 and inner.self_attention.linear_qkv.weight.grad.abs().max() > 0


def test_fused_moe_as_megatrons_repeated_mtp_layer(megatron_world):
    """Megatron 0.19's mtp_use_repeated_layer runs one MTP layer mtp_num_layers times a step, and its
    router adds 1/mtp_num_layers of the aux loss each time: with is_mtp_layer the fused layer's
    output and every gradient equal Megatron's MoELayer's. The z-loss is scaled the same way in the
    fused layer (its router gradient half the plain layer's at mtp_num_layers = 2), where Megatron's
    router scales only the logged value."""
    if not compat.mcore_has_field("mtp_use_repeated_layer"):
        pytest.skip(f"megatron-core {compat.mcore_version()} has no repeated MTP layer")
    tconfig = _tconfig(moe_aux_loss_coeff=0.05)
    tconfig.mtp_num_layers, tconfig.mtp_use_repeated_layer = 2, True
    stock, fused = _layers(tconfig, is_mtp_layer=True)
    assert fused.layer_number == 1 + tconfig.num_layers
    _assert_matches_stock(stock, fused, torch.randn(S, B, H))
    x = torch.randn(S, B, H)
    grads = []
    router = torch.randn(E, H) * 0.1
    for is_mtp in (True, False):
        tconfig = _tconfig(moe_z_loss_coeff=0.01)
        tconfig.mtp_num_layers, tconfig.mtp_use_repeated_layer = 2, True
        layer = _layers(tconfig, is_mtp_layer=is_mtp)[1]
        with torch.no_grad():
            layer.router_weight.copy_(router)
        y, _ = layer(x)
        y.backward(torch.zeros_like(y))   # the z-loss's gradient alone
        grads.append(layer.router_weight.grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1] / 2, rtol=1e-6, atol=0)


def test_pretrain_driver_builds_mtp_layers_from_this_projects_spec(megatron_world, monkeypatch):
    """megatron.training (0.19) builds the MTP layers from Megatron's default specs whatever --spec
    names: under this project's MoE block the MTP layer got Megatron's MoELayer. The patch
    mtp_layers_from_the_spec builds it from the spec's own layer (the fused MoE layer), and leaves
    other specs to Megatron."""
    import types

    import patches
    from layer_specs.moe import moe_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron_ext.modules.moe import FusedMoELayer

    if not compat.has_megatron_training():
        pytest.skip(f"megatron-core {compat.mcore_version()} has no megatron.training")
    try:
        import megatron.training.models.gpt as gpt
    except ImportError as e:   # 0.19's megatron.training needs Python >= 3.12 (runs on the GPU machines)
        pytest.skip(f"megatron.training does not import here: {e}")

    # Megatron's function (the patch keeps it as __wrapped__ where this process applied it), restored after the test
    monkeypatch.setattr(gpt, "mtp_block_spec", getattr(gpt.mtp_block_spec, "__wrapped__", gpt.mtp_block_spec))
    tconfig = _mtp_config(moe_aux_loss_coeff=0.01)
    model_config = types.SimpleNamespace(transformer=tconfig)   # what the driver's provider passes
    kinds = []
    for patched in (False, True):
        if patched:
            patches.registered()["mtp_layers_from_the_spec"].fn()
        model = _mtp_model(tconfig, gpt.mtp_block_spec(model_config, moe_block_spec(tconfig), vp_stage=None))
        kinds.append([type(m).__name__ for m in model.mtp.modules() if isinstance(m, (MoELayer, FusedMoELayer))])
    assert kinds == [["MoELayer"], ["FusedMoELayer"]]


@pytest.mark.parametrize("moe", [
    dict(moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.01),
    dict(moe_router_score_function="sigmoid", moe_router_load_balancing_type="seq_aux_loss",
         moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.01),
    dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.05),
], ids=["aux_z", "sigmoid_seq_aux_z", "global_aux"])
@pytest.mark.parametrize("real", [None, 1], ids=["tail_padding", "one_real_token"])
def test_padding_mask_leaves_padding_out_of_the_losses_as_megatron(megatron_world, moe, real):
    """Megatron's padding_mask ([b, s], True = padding; SFT batches): padding tokens are routed but
    left out of the aux losses and the z-loss. Same output and every gradient (the losses reach the
    router weight) as Megatron's MoELayer given the same mask, also when a single token is real
    (the sequences' mean real length below one); and the losses differ from the unmasked run, so
    the mask is not ignored."""
    stock, fused = _layers(_tconfig(**moe))
    torch.manual_seed(5)
    x = torch.randn(S, B, H)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -3:] = True   # the first sequence ends in three pad tokens, the second in one
    pad[1, -1] = True
    if real is not None:   # all but `real` tokens padding: the mean real length is below one
        pad[:] = True
        pad[1, :real] = False
    g = torch.randn(S, B, H)
    grads = []
    for layer, mask in ((stock, pad), (fused, pad), (fused, None)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = layer(xi, padding_mask=mask)
        y.backward(g)
        w = _router_weight(layer).grad
        grads.append((y.detach(), xi.grad, w.clone()))
    (ys, dxs, dws), (yf, dxf, dwf), (_, _, dw_unmasked) = grads
    torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dxf, dxs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dwf, dws, rtol=1e-5, atol=1e-6)
    assert (dwf - dw_unmasked).abs().max() > 1e-6


def _finalize_module():
    import importlib

    return importlib.import_module("megatron.core.distributed.finalize_model_grads")


def test_global_aux_loss_averages_the_steps_micro_batches_as_megatron(megatron_world):
    """global_aux_loss: f_e of each micro-batch is the running mean of the step's global counts
    so far (Megatron's ga_steps), reset once per step by Megatron's finalize_model_grads, which
    finds the fused layer's tracker as it finds its own router's."""
    cfg = _tconfig(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1)
    stock, fused = _layers(cfg)
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(S, B, H, generator=gen) * (1 + i) for i in range(3)]

    first = aux_router_grads(stock, fused, xs[0])
    second = aux_router_grads(stock, fused, xs[1])   # f_e: the mean of both micro-batches' counts
    for theirs, ours in (first, second):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)
    assert fused.router_global_steps.item() == 2
    _finalize_module().reset_model_temporary_tensors(cfg, [stock, fused])
    assert fused.router_global_steps.item() == 0 and fused.router_global_load.abs().sum() == 0
    theirs, ours = aux_router_grads(stock, fused, xs[2])   # a new step: this micro-batch's counts alone
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)
    fused.zero_grad()
    y, _ = fused(xs[0].clone())   # the first micro-batch's input, now averaged with xs[2]'s counts
    y.backward(torch.zeros_like(y))
    assert not torch.allclose(fused.router_weight.grad, first[1], rtol=1e-3, atol=0)


def test_expert_bias_moves_once_per_step_under_megatrons_finalize(megatron_world):
    """Megatron's finalize_model_grads moves every router's expert_bias from its
    local_tokens_per_expert: the fused layer answers to those names, so the bias moves under
    Megatron's own training loop; moe_step_end then leaves it (megatron-ext train runs both) and
    moves it itself where no finalize ran (FSDP2). Module casts keep it fp32."""
    from megatron_ext.modules.moe import FusedMoELayer, moe_step_end
    from megatron_ext.ops.moe import update_expert_bias

    cfg = _tconfig(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_router_bias_update_rate=0.01)
    layer = FusedMoELayer(cfg)
    layer.set_layer_number(1)
    gen = torch.Generator().manual_seed(9)
    before = torch.randn(E, generator=gen) * 0.1
    layer.router_expert_bias.copy_(before)
    layer(torch.randn(S, B, H, generator=gen))[0].sum().backward()
    load = layer.router_load_accum.clone()
    assert load.sum() == S * B * 2
    fin = _finalize_module()
    fin._update_router_expert_bias([layer], cfg)
    fin.reset_model_temporary_tensors(cfg, [layer])
    want = update_expert_bias(before, load, 0.01)
    torch.testing.assert_close(layer.router_expert_bias, want, rtol=0, atol=1e-7)
    assert not torch.equal(layer.router_expert_bias, before) and layer.router_load_accum.abs().sum() == 0
    moe_step_end([layer], compat.megatron_router_updates())
    torch.testing.assert_close(layer.router_expert_bias, want, rtol=0, atol=1e-7)   # not twice
    layer(torch.randn(S, B, H, generator=gen))[0].sum().backward()
    load2 = layer.router_load_accum.clone()
    moe_step_end([layer])   # no finalize ran (FSDP2's lane): the step end moves it
    torch.testing.assert_close(layer.router_expert_bias, update_expert_bias(want, load2, 0.01), rtol=0, atol=1e-7)
    # Megatron's Float16Module casts the module to bf16: the router state stays fp32, bit for bit
    kept = layer.router_expert_bias.clone()
    layer.bfloat16()
    assert layer.w1.dtype == torch.bfloat16 and layer.router_expert_bias.dtype == torch.float32
    assert torch.equal(layer.router_expert_bias, kept) and layer.router_load_accum.dtype == torch.float32
    assert not hasattr(FusedMoELayer(_tconfig()), "expert_bias")   # no bias: nothing for Megatron to move


def test_quantile_balancing_bias_moves_once_per_step(megatron_world):
    """quantile_balancing's bias: moved by Megatron's finalize_model_grads where it knows quantile
    balancing (0.19, as its own router's: same beta), else by moe_step_end; the EMA and the
    re-centring as Megatron's."""
    from megatron_ext.modules.moe import FusedMoELayer, moe_step_end
    from megatron_ext.ops.moe import update_qb_beta

    cfg = _tconfig(moe_router_load_balancing_type="quantile_balancing", moe_router_quantile_balancing_ema=0.25)
    assert cfg.moe_router_quantile_balancing_ema == 0.25   # carried on 0.16.1 too
    layer = FusedMoELayer(cfg)
    layer.set_layer_number(1)
    assert layer.router_cfg.quantile_balancing_ema == 0.25
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):   # two micro-batches
        layer(torch.randn(S, B, H, generator=gen))[0].sum().backward()
    assert layer.router_qb_count.item() == 2
    mean = layer.router_qb_accum / 2
    moe_step_end([layer])
    want = update_qb_beta(torch.zeros(E), mean, 0.25)
    torch.testing.assert_close(layer.router_qb_beta, want)
    assert abs(layer.router_qb_beta.sum().item()) < 1e-6 and layer.router_qb_beta.abs().sum() > 0
    assert layer.router_qb_count.item() == 0 and layer.router_qb_accum.abs().sum() == 0
    if not compat.mcore_has_quantile_balancing():
        assert "quantile_balancing" not in compat.megatron_router_updates()
        return
    stock, fused = _layers(cfg)
    for _ in range(2):
        x = torch.randn(S, B, H, generator=gen)
        for m in (stock, fused):
            m(x.clone())[0].sum().backward()
    _finalize_module()._update_router_qb_beta([stock, fused], cfg)
    torch.testing.assert_close(fused.router_qb_beta, stock.router.qb_beta, rtol=1e-6, atol=1e-7)
    moved = fused.router_qb_beta.clone()
    moe_step_end([fused], compat.megatron_router_updates())
    assert torch.equal(fused.router_qb_beta, moved)


def test_padding_mask_leaves_padding_out_of_the_load_and_the_bias_update(megatron_world):
    """With the aux-loss-free bias the load that moves it counts only real tokens, the same load as
    Megatron's router counts given the mask (its own count could not take one in 0.16-0.19: it
    broadcast [T] against [T, E]; patch expert_bias_load_with_padding_mask); a bad mask shape is an
    error naming it."""
    stock, layer = _layers(_tconfig(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True))
    torch.manual_seed(6)
    x = torch.randn(S, B, H)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 2:] = True
    for m in (stock, layer):
        m(x.clone().requires_grad_(), padding_mask=pad)[0].sum().backward()
    masked = layer.router_load_accum.clone()
    assert torch.equal(masked, stock.router.local_tokens_per_expert.float())
    layer.router_load_accum.zero_()
    layer(x.clone().requires_grad_())[0].sum().backward()
    full = layer.router_load_accum.clone()
    real = int((~pad).sum())
    assert masked.sum().item() == real * 2 and full.sum().item() == S * B * 2   # topk = 2
    with pytest.raises(ValueError, match=r"padding_mask.shape=\(8, 2\)"):
        layer(x, padding_mask=pad.t())


def test_expert_weights_are_drawn_per_global_expert_and_layer(megatron_world):
    from megatron_ext.modules.moe import FusedMoELayer

    tconfig = _tconfig()
    a, b = FusedMoELayer(tconfig), FusedMoELayer(tconfig)
    a.set_layer_number(2)
    b.set_layer_number(2)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.w2, b.w2)
    b.set_layer_number(3)
    assert not torch.equal(a.w1, b.w1)
    assert not torch.equal(a.w1[0], a.w1[1])
    # EP = 1, expert TP = TP: plain parameters, as Megatron's expert linears are there
    assert getattr(a.w1, "allreduce") is True and getattr(a.router_weight, "allreduce", True)


def test_expert_weights_are_expert_parallel_where_megatrons_are():
    from megatron_ext.modules.moe import expert_parallel_tag

    # (EP, expert TP, TP): Megatron's experts use the expert groups when EP > 1 or expert TP != TP
    assert [expert_parallel_tag(*lane) for lane in ((1, 1, 1), (1, 2, 2), (2, 1, 1), (2, 2, 2), (1, 1, 2))] == \
        [False, False, True, True, True]


def test_replay_forces_the_recorded_experts(megatron_world, monkeypatch):
    from megatron_ext.modules.moe import FusedMoELayer
    from megatron_ext.observability.moe_stats import STATE
    from megatron_ext.ops.moe import moe_ffn

    layer = FusedMoELayer(_tconfig())
    layer.set_layer_number(1)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(B * S)]).view(B, S, 2)
    monkeypatch.setattr(STATE, "replay", "unused")
    monkeypatch.setattr(STATE, "read_trace", lambda layer_no, mb, shape: ids)
    STATE.begin_step(1)
    x = torch.randn(S, B, H, requires_grad=True)
    y, _ = layer(x)
    indices = ids.permute(1, 0, 2).reshape(S * B, 2)
    logits = x.detach().reshape(-1, H) @ layer.router_weight.detach().t()
    probs = torch.softmax(logits.gather(1, indices), -1)
    want = moe_ffn(x.detach().reshape(-1, H), probs, indices, layer.w1.detach(), layer.w2.detach(),
                   backend="torch")
    torch.testing.assert_close(y.detach().reshape(-1, H), want, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert layer.router_weight.grad.abs().sum() > 0  # gates still learn under replay
    monkeypatch.setattr(STATE, "replay", None)


@pytest.mark.parametrize("shared", [None, 24])
@pytest.mark.parametrize("asked_by", ["moe_deterministic", "megatron_deterministic_mode"])
def test_deterministic_output_does_not_depend_on_the_batch(megatron_world, shared, asked_by):
    """The layer's deterministic mode, asked for by its own flag or by Megatron's deterministic_mode
    (its pretrain CLI's --deterministic-mode under --spec)."""
    from megatron_ext.modules.moe import FusedMoELayer

    own = asked_by == "moe_deterministic"
    tconfig = _tconfig(moe_deterministic=own, moe_shared_expert_intermediate_size=shared)
    tconfig.deterministic_mode = not own
    layer = FusedMoELayer(tconfig)
    assert layer.moe.deterministic
    layer.set_layer_number(1)
    layer.eval()
    x2 = torch.randn(S, 2, H)
    with torch.no_grad():
        y2, _ = layer(x2)
        y1, _ = layer(x2[:, :1].contiguous())
        y1b, _ = layer(x2[:, 1:].contiguous())
    assert torch.equal(y1, y2[:, :1]) and torch.equal(y1b, y2[:, 1:])


@pytest.mark.parametrize("argv,message", [
    (["--num-experts", "4", "--moe-router-topk", "5"], "moe_router_topk=5"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], "num_experts=3"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "0"], "moe_expert_capacity_factor=0.0"),
    (["--num-experts", "4", "--moe-router-score-function", "relu"], "moe_router_score_function='relu'"),
    (["--num-experts", "4", "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"],
     "moe_router_num_groups=3"),
    (["--num-experts", "4", "--moe-router-enable-expert-bias"], "moe_router_enable_expert_bias=True"),
    (["--num-experts", "4", "--moe-backend", "cuda"], "moe_backend='cuda'"),
    (["--num-experts", "4", "--moe-impl", "megatron", "--moe-deterministic"], "moe_deterministic=True"),
    (["--num-experts", "4", "--moe-routing-replay", "/nonexistent/trace"], "meta.json missing"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity"],
     "moe_pad_expert_input_to_capacity=True"),
    (["--num-experts", "4", "--moe-impl", "megatron", "--moe-routing-log", "somewhere"], "moe_routing_log='somewhere'"),
    (["--num-experts", "4", "--moe-impl", "megatron", "--no-moe-pregather"], "moe_pregather=False"),
    (["--num-experts", "4", "--moe-backend", "torch", "--moe-pregather"], "moe_pregather=True"),
    (["--num-experts", "4", "--moe-aux-loss-coeff", "0.01", "0.02"], "moe_aux_loss_coeff=[0.01, 0.02]"),
    (["--num-experts", "4", "--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
      "--moe-aux-loss-coeff", "0.01"], "moe_aux_loss_coeff=0.01: one coefficient per balancing type"),
    (["--num-experts", "4", "--moe-router-load-balancing-type", "aux_loss", "sinkhorn",
      "--moe-aux-loss-coeff", "0.01", "0"], "moe_router_load_balancing_type=['aux_loss', 'sinkhorn']"),
    (["--num-experts", "6", "--moe-router-load-balancing-type", "quantile_balancing"],
     "moe_router_load_balancing_type='quantile_balancing': each expert's share"),
    (["--num-experts", "4", "--moe-router-load-balancing-type", "quantile_balancing", "--moe-aux-loss-coeff",
      "0.01"], "moe_aux_loss_coeff=0.01"),
])
def test_moe_config_errors(tmp_path, capsys, argv, message):
    from megatron_ext.cli import main

    assert main(["train", "--preset", "test", "--device", "cpu", "--runs-root", str(tmp_path), *argv]) != 0
    err = capsys.readouterr().err
    assert message in err, err


def test_sqrtsoftplus_router_trains_on_every_megatron_core(tmp_path, capsys):
    """Megatron 0.19's sqrtsoftplus gate with the aux-loss-free bias through the fused layer also
    on a megatron-core whose config does not know it (0.16.1 validates the config with sigmoid, the
    layer routes with sqrtsoftplus); Megatron's own MoELayer there is refused at config time."""
    from megatron_ext import compat
    from megatron_ext.cli import main

    run = tmp_path / "sqrtsoftplus"
    assert train_inprocess(run, *RUN, "--num-experts", "4", "--moe-router-score-function", "sqrtsoftplus",
                           "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                           "--moe-router-topk-scaling-factor", "1.5") == 0
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.3
    moe = receipt(run)["moe"]
    assert moe["router"]["score_function"] == "sqrtsoftplus"
    assert moe["layers"]["1"]["expert_bias"]["mean_abs"] > 0
    stock = ["train", "--preset", "test", "--device", "cpu", "--runs-root", str(tmp_path), "--num-experts", "4",
             "--moe-impl", "megatron", "--moe-router-score-function", "sqrtsoftplus", "--train-iters", "2",
             "--eval-iters", "0", "--lr-warmup-iters", "0"]
    if "sqrtsoftplus" in compat.mcore_score_functions():
        assert main([*stock, "--run-dir", str(tmp_path / "stock")]) == 0
    else:
        assert main(stock) != 0
        assert "moe_router_score_function='sqrtsoftplus'" in capsys.readouterr().err


def test_listed_aux_losses_and_quantile_balancing_train(tmp_path, capsys):
    """Megatron's list form (three aux losses, one coefficient each, global_aux_loss averaging the
    step's two micro-batches) and quantile balancing train through `megatron-ext train` on every
    megatron-core (0.16.1's finalize does not know quantile balancing: the step end moves its bias,
    0.19's finalize does); Megatron's own MoELayer with quantile balancing only where it has it."""
    from megatron_ext import compat
    from megatron_ext.cli import main

    listed = tmp_path / "listed"
    assert train_inprocess(listed, *RUN, "--num-experts", "4", "--moe-router-load-balancing-type", "aux_loss",
                           "seq_aux_loss", "global_aux_loss", "--moe-aux-loss-coeff", "0.01", "0.001", "0.01",
                           "--moe-z-loss-coeff", "0.001") == 0
    assert train_losses(listed)[-1] < train_losses(listed)[0] - 0.3
    moe = receipt(listed)["moe"]
    assert moe["router"]["load_balancing_type"] == ["aux_loss", "seq_aux_loss", "global_aux_loss"]
    assert moe["router"]["aux_loss_coeff"] == [0.01, 0.001, 0.01]
    assert all(moe["layers"][n]["aux_loss"] > 0 for n in ("1", "2"))

    qb = tmp_path / "quantile"
    assert train_inprocess(qb, *RUN, "--num-experts", "4", "--moe-router-load-balancing-type", "quantile_balancing",
                           "--moe-router-quantile-balancing-ema", "0.5") == 0
    assert train_losses(qb)[-1] < train_losses(qb)[0] - 0.3
    moe = receipt(qb)["moe"]
    assert moe["router"]["load_balancing_type"] == "quantile_balancing"
    assert moe["router"]["quantile_balancing_ema"] == 0.5
    for n in ("1", "2"):
        beta = moe["layers"][n]["qb_beta"]
        assert beta["mean_abs"] > 0 and beta["min"] < 0 < beta["max"]   # moved, re-centred
    stock = ["train", "--preset", "test", "--device", "cpu", "--runs-root", str(tmp_path), "--num-experts", "4",
             "--moe-impl", "megatron", "--moe-router-load-balancing-type", "quantile_balancing",
             "--train-iters", "2", "--eval-iters", "0", "--lr-warmup-iters", "0"]
    if compat.mcore_has_quantile_balancing():
        assert main([*stock, "--run-dir", str(tmp_path / "stock")]) == 0
    else:
        assert main(stock) != 0
        assert "moe_router_load_balancing_type='quantile_balancing'" in capsys.readouterr().err


def _resumes_from_iteration_3(run, copy, opts, losses):
    """``run`` (six iterations, checkpoints at 3 and 6) copied to ``copy`` without its last
    checkpoint resumes from iteration 3 with ``opts`` and repeats ``losses`` (iterations 1-3 kept,
    4-6 run again)."""
    resume_from(run, copy, 3)
    assert train_inprocess(copy, *opts, "--resume") == 0
    assert receipt(copy)["loss"]["start_iteration"] == 3
    assert train_losses(copy) == pytest.approx(losses, rel=1e-5)


def test_latent_moe_with_the_gate_on_the_input_trains_and_resumes(tmp_path):
    """`megatron-ext train` with Megatron's --moe-latent-size (experts at width 16 of hidden 32)
    and --moe-apply-probs-on-input (top-1, Llama-4 style) plus a shared expert: learns, records
    both in the receipt, and resumes from its iteration-3 checkpoint with the same losses."""
    opts = [*RUN, "--save-interval", "3", "--num-experts", "4", "--moe-latent-size", "16",
            "--moe-router-topk", "1", "--moe-apply-probs-on-input", "--moe-router-score-function", "sigmoid",
            "--moe-shared-expert-intermediate-size", "24", "--moe-aux-loss-coeff", "0.01"]
    a = tmp_path / "latent"
    assert train_inprocess(a, *opts) == 0
    losses = train_losses(a)
    assert losses[-1] < losses[0] - 0.3
    assert receipt(a)["moe"]["options"] == {"apply_probs_on_input": True, "latent_size": 16,
                                            "force_load_balancing": False, "force_biased": None}
    _resumes_from_iteration_3(a, tmp_path / "resumed", opts, losses)


def test_forced_benchmark_routers_train_on_both_implementations(tmp_path, capsys):
    """Megatron's benchmark routers through `megatron-ext train`: random logits
    (--moe-router-force-load-balancing) with the fused layer and with Megatron's MoELayer, which
    spread the tokens evenly whatever the router; the forced router is logged and in the receipt's
    backend records. The random bias (--moe-router-force-biased) trains on every megatron-core
    with the fused layer; Megatron's own router has it from 0.19."""
    from megatron_ext.cli import main

    run = tmp_path / "forced"
    assert train_inprocess(run, *RUN, "--num-experts", "4", "--moe-router-force-load-balancing",
                           "--moe-aux-loss-coeff", "0.01") == 0
    rec = receipt(run)
    assert rec["moe"]["options"]["force_load_balancing"] is True
    assert any(r["op"] == "moe.forced_router" and r["observed"] == "random logits" for r in rec["backends"])
    for n in ("1", "2"):
        load = rec["moe"]["layers"][n]["load"]
        assert max(load) / (sum(load) / len(load)) < 1.3   # 6 steps x 2 micro-batches x 64 tokens x top-2
    biased = tmp_path / "biased"
    assert train_inprocess(biased, *RUN, "--num-experts", "4", "--moe-router-force-biased", "-1.0") == 0
    assert receipt(biased)["moe"]["options"]["force_biased"] == -1.0
    base = ["train", "--preset", "test", "--device", "cpu", "--runs-root", str(tmp_path), "--num-experts", "4",
            "--moe-impl", "megatron", "--train-iters", "2", "--eval-iters", "0", "--lr-warmup-iters", "0"]
    assert main([*base, "--moe-router-force-load-balancing", "--run-dir", str(tmp_path / "stock")]) == 0
    stock_biased = [*base, "--moe-router-force-biased", "0.5", "--run-dir", str(tmp_path / "stock_biased")]
    if compat.mcore_has_field("moe_router_force_biased"):
        assert main(stock_biased) == 0
    else:
        assert main(stock_biased) != 0
        assert "moe_router_force_biased=0.5: Megatron's router in megatron-core" in capsys.readouterr().err


def test_pregather_flag_reaches_the_layer_config():
    from megatron_ext.cli import parse
    from megatron_ext.config import TrainConfig, moe_config

    assert parse(["train", "--no-moe-pregather"]).moe_pregather is False
    assert parse(["train"]).moe_pregather is None
    cfg = TrainConfig(num_experts=4, moe_pregather=False)
    assert moe_config(cfg).pregather is False
    assert moe_config(TrainConfig(num_experts=4)).pregather is None


def test_gradient_accumulation_fusion_flag_reaches_the_layer_config():
    from megatron_ext.cli import parse
    from megatron_ext.config import ConfigError, MoEConfig, TrainConfig, moe_config

    assert parse(["train", "--no-moe-gradient-accumulation-fusion"]).moe_gradient_accumulation_fusion is False
    assert parse(["train"]).moe_gradient_accumulation_fusion is None   # unset: the TrainConfig default
    assert moe_config(TrainConfig(num_experts=4)).gradient_accumulation_fusion is True
    off = TrainConfig(num_experts=4, moe_gradient_accumulation_fusion=False)
    assert moe_config(off).gradient_accumulation_fusion is False
    with pytest.raises(ConfigError, match=r"moe.gradient_accumulation_fusion='yes': must be a boolean"):
        MoEConfig(gradient_accumulation_fusion="yes").validate(prefix="moe.")


def test_checkpoint_format_flag_reaches_the_layer_config():
    from megatron_ext.cli import parse
    from megatron_ext.config import ConfigError, MoEConfig, TrainConfig, moe_config

    assert parse(["train", "--moe-checkpoint-format", "megatron"]).moe_checkpoint_format == "megatron"
    assert moe_config(TrainConfig(num_experts=4)).checkpoint_format == "fused"
    assert moe_config(TrainConfig(num_experts=4, moe_checkpoint_format="megatron")).checkpoint_format == "megatron"
    with pytest.raises(ConfigError, match=r"moe_checkpoint_format='te': unknown checkpoint layout.*'megatron'"):
        MoEConfig(checkpoint_format="te").validate()


def test_replay_shape_mismatch_is_a_config_error(tmp_path, capsys):
    from megatron_ext.cli import main

    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "meta.json").write_text(json.dumps(
        {"num_layers": 2, "num_experts": 4, "topk": 2, "seq_length": 64, "micro_batch_size": 4, "world_size": 1}))
    assert main(["train", "--preset", "test", "--device", "cpu", "--runs-root", str(tmp_path), "--num-experts", "4",
                 "--moe-router-topk", "1", "--moe-router-pre-softmax", "--moe-routing-replay",
                 str(tmp_path / "trace")]) != 0
    assert "topk: trace 2 vs run 1" in capsys.readouterr().err


def _moe_rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["kind"] == "moe"]


def test_router_options_train_and_are_monitored(tmp_path):
    """One run covering sigmoid + expert bias + capacity dropping + z-loss + seq aux loss + groups
    + jitter + scaling + shared expert; a second with Sinkhorn; both must learn."""
    a = tmp_path / "sigmoid"
    assert train_inprocess(a, *RUN, "--num-experts", "4", "--moe-router-score-function", "sigmoid",
                           "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                           "--moe-expert-capacity-factor", "1.0", "--moe-z-loss-coeff", "0.001",
                           "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.01",
                           "--moe-router-num-groups", "2", "--moe-router-group-topk", "2",
                           "--moe-input-jitter-eps", "0.01", "--moe-router-topk-scaling-factor", "1.5",
                           "--moe-shared-expert-intermediate-size", "32", "--moe-monitor-interval", "3") == 0
    losses = train_losses(a)
    assert losses[-1] < losses[0] - 0.3
    moe = receipt(a)["moe"]
    assert moe["impl"] == "fused" and moe["router"]["enable_expert_bias"] and moe["steps"] == 6
    tokens_pairs = 6 * 4 * 32 * 2  # iterations x sequences x seq_length x topk
    for layer in ("1", "2"):
        row = moe["layers"][layer]
        assert sum(row["load"]) == tokens_pairs
        assert 0 < row["dropped_fraction"] < 0.5
        assert row["aux_loss"] > 0 and row["z_loss"] > 0
        assert row["expert_bias"]["mean_abs"] > 0  # moved by the load each step
        assert set(row["fp8_saturation"]) >= {"router_logits", "w1", "w2", "shared_w1", "shared_w2"}
        assert all(0 <= v <= 1 for v in row["fp8_saturation"].values())
    rows = _moe_rows(a)
    assert [r["step"] for r in rows] == [1, 3, 6]
    assert "fp8_saturation" in rows[1]["layers"]["1"] and "fp8_saturation" not in rows[0]["layers"]["1"]

    b = tmp_path / "sinkhorn"
    assert train_inprocess(b, *RUN, "--num-experts", "4", "--moe-router-load-balancing-type", "sinkhorn",
                           "--moe-router-topk", "1", "--moe-backend", "torch") == 0
    assert train_losses(b)[-1] < train_losses(b)[0] - 0.3
    assert receipt(b)["moe"]["router"]["load_balancing_type"] == "sinkhorn"


def test_trace_replay_and_deterministic_runs(tmp_path):
    """Deterministic run twice -> bitwise the same losses and the same routing trace; a replay of
    that trace (with training noise, whose draws it shares) reproduces routing and losses."""
    opts = [*RUN, "--num-experts", "4", "--moe-deterministic", "--moe-input-jitter-eps", "0.2",
            "--moe-aux-loss-coeff", "0.01"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train_inprocess(a, *opts, "--moe-routing-trace-out", str(tmp_path / "trace_a")) == 0
    assert train_inprocess(b, *opts, "--moe-routing-trace-out", str(tmp_path / "trace_b")) == 0
    assert train_losses(a) == train_losses(b)
    # each run's end wrote its traces and ended the writer thread (none left idle per run)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("moe-")]
    files = sorted(p.relative_to(tmp_path / "trace_a") for p in (tmp_path / "trace_a").rglob("*.pt"))
    assert len(files) == 6 * 2 * 2  # iterations x micro-batches x layers
    for f in files:
        ta, tb = torch.load(tmp_path / "trace_a" / f), torch.load(tmp_path / "trace_b" / f)
        assert ta.dtype == torch.uint16 and ta.shape == (2, 32, 2) and torch.equal(ta, tb)
    assert train_inprocess(c, *opts, "--moe-routing-replay", str(tmp_path / "trace_a"),
                           "--moe-routing-trace-out", str(tmp_path / "trace_c")) == 0
    assert train_losses(c) == train_losses(a)
    for f in files:
        assert torch.equal(torch.load(tmp_path / "trace_c" / f), torch.load(tmp_path / "trace_a" / f))
    assert receipt(c)["moe"]["routing_replay"] == str(tmp_path / "trace_a")
    # the chunked experts stand in for the fused backend: the receipt says so
    ffn = [b for b in receipt(a)["backends"] if b["op"] == "moe_ffn"]
    assert [(b["requested"], b["observed"]) for b in ffn] == [("auto", "deterministic_chunks")], ffn


def test_specs_pick_the_fused_layer_unless_megatron_is_asked(megatron_world):
    from layer_specs.gpt import mlp_spec_for
    from layer_specs.moe import moe_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron_ext.modules.moe import FusedMoELayer

    tconfig = _tconfig()
    assert mlp_spec_for(tconfig).module is FusedMoELayer
    assert all(s.submodules.mlp.module is FusedMoELayer for s in moe_block_spec(tconfig).layer_specs)
    assert mlp_spec_for(_tconfig(moe_impl="megatron")).module is MoELayer


def test_building_the_fused_layer_logs_no_unknown_mlp_warning(megatron_world, caplog):
    """megatron-core 0.16's TransformerLayer warns "Unknown MLP type: <ModuleSpec>" for every layer
    whose MLP is not Megatron's own; the patch drops that one record and nothing else."""
    import logging

    from layer_specs.moe import moe_block_spec
    from megatron.core.transformer.spec_utils import build_module
    from patches.mcore_bugs import UNKNOWN_MLP_TEXT

    tconfig = _tconfig()
    name = "megatron.core.transformer.transformer_layer"
    with caplog.at_level(logging.INFO, logger=name):
        build_module(moe_block_spec(tconfig).layer_specs[0], config=tconfig, layer_number=1)
        logging.getLogger(name).warning("another record")
    texts = [r.getMessage() for r in caplog.records if r.name == name]
    assert UNKNOWN_MLP_TEXT not in texts and "another record" in texts


@pytest.mark.parametrize("freq,pattern", [
    ("1", [1, 1, 1, 1]), ("2", [1, 0, 1, 0]), (3, [1, 0, 0, 1]), ("([0]+[1]*3)", [0, 1, 1, 1]),
    (" ( [0]*2 + [1]*2 ) ", [0, 0, 1, 1]), ("([1]*1+[0]*1)*2", [1, 0, 1, 0]), ("2*[0,1]", [0, 1, 0, 1]),
    ([0, 1, 1, 0], [0, 1, 1, 0]), (None, [1, 1, 1, 1]),
])
def test_moe_layer_freq_forms_read_as_megatron_reads_them(freq, pattern):
    from megatron_ext.config import moe_layer_pattern

    assert moe_layer_pattern(freq, 4) == pattern


@pytest.mark.parametrize("freq,message", [
    ("0", "must be positive"), ("[0,1,2,1]", "entries must be 0 (dense) or 1 (MoE), got 2"),
    ("[0,1]", "the pattern has 2 entries for num_layers=4"),
    ("__import__('os').getcwd()", "only int literals, [...], + and * may appear"),
    ("[1]*-4", "only int literals"), ("1.5", "only int literals"), ("[[1]]*4", "nested lists"),
    ("[1,", "not an integer or a list expression"), (True, "not a layer frequency"),
])
def test_moe_layer_freq_errors_name_the_field(freq, message):
    from megatron_ext.config import ConfigError, moe_layer_pattern

    with pytest.raises(ConfigError, match=r"^moe_layer_freq=") as e:
        moe_layer_pattern(freq, 4)
    assert message in str(e.value)


def test_packed_micro_batch_reaches_the_fused_layer_unflattened(megatron_world):
    """megatron-core >= 0.19 un-flattens a packed micro-batch of mbs > 1 ([mbs*S, 1, h]) to
    [S, mbs, h] before an MoE layer, so the per-sequence aux loss sees each sample; it did so for
    its own MoELayer only (patch fused_moe_unflattened_for_packed_batches). The output goes back
    flattened, the same values as the layer on the un-flattened input."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from layer_specs.moe import moe_block_spec

    if not hasattr(TransformerLayer, "_maybe_unflatten_for_moe"):
        pytest.skip(f"megatron-core {compat.mcore_version()} does not un-flatten packed batches for MoE")
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = _tconfig(moe_router_score_function="sigmoid", moe_router_load_balancing_type="seq_aux_loss",
                   moe_aux_loss_coeff=0.1)
    layer = build_module(moe_block_spec(cfg).layer_specs[0], config=cfg, layer_number=1)
    seen = []
    forward = layer.mlp.forward

    def spy(h, **kw):
        seen.append(tuple(h.shape))
        return forward(h, **kw)

    layer.mlp.forward = spy
    mbs = 2
    h = torch.randn(mbs * S, 1, H, generator=torch.Generator().manual_seed(12))
    out = layer._forward_mlp(h, packed_seq_params=PackedSeqParams(qkv_format="thd", tokens_per_sample=S))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert seen == [(S, mbs, H)] and tuple(out.shape) == (mbs * S, 1, H)
    assert not layer.is_moe_layer   # Megatron's flag (its CUDA-graph scopes) as it was
    y, _ = forward(layer.pre_mlp_layernorm(h).view(mbs, S, H).transpose(0, 1).contiguous())
    torch.testing.assert_close(out - h, y.transpose(0, 1).reshape(mbs * S, 1, H))


def test_moe_layer_freq_makes_dense_layers_in_every_block_spec(megatron_world):
    """Megatron's ``moe_layer_freq`` (read from the TransformerConfig under --spec, or set by
    ``megatron-ext train --moe-layer-freq``): the 0 layers get the dense MLP in the GPT, MoE, mHC and
    GQLA blocks, with the fused or the stock MoE layer in the others; the receipt records it."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from layer_specs.gpt import gpt_block_spec
    from layer_specs.gqla import gqla_block_spec
    from layer_specs.mhc import mhc_block_spec
    from layer_specs.moe import moe_block_spec
    from megatron_ext import backends
    from megatron_ext.modules.moe import FusedMoELayer

    def mlps(block):
        return [s.submodules.mlp.module for s in block.layer_specs]

    backends.reset()
    fused = [MLP, FusedMoELayer, FusedMoELayer, MLP]
    tconfig = _tconfig(num_layers=4, moe_layer_freq="([0]+[1]*2+[0])")
    assert tconfig.moe_layer_freq == [0, 1, 1, 0]
    for build in (gpt_block_spec, moe_block_spec, mhc_block_spec):
        assert mlps(build(tconfig)) == fused, build.__module__
    assert mlps(gqla_block_spec(_tconfig(num_layers=4, moe_layer_freq="[0,1,1,0]", attention_type="gqla"))) == fused
    assert mlps(gpt_block_spec(_tconfig(num_layers=4, moe_layer_freq="2", moe_impl="megatron"))) == \
        [MoELayer, MLP, MoELayer, MLP]
    assert mlps(gpt_block_spec(_tconfig(num_layers=4))) == [FusedMoELayer] * 4
    recorded = {r["observed"] for r in backends.records() if r["op"] == "moe_layer_pattern"}
    assert recorded == {"0110", "1010", "1111"}


def test_moe_layer_freq_trains_traces_and_replays(tmp_path, capsys):
    """Layer 1 dense, layer 2 MoE: the run trains, only layer 2 reports routing and writes a trace,
    the trace replays, and a replay under another pattern is refused at config time."""
    from megatron_ext.cli import main

    opts = [*RUN, "--num-experts", "4", "--moe-layer-freq", "[0,1]", "--moe-deterministic"]
    a, c = tmp_path / "a", tmp_path / "c"
    assert train_inprocess(a, *opts, "--moe-routing-trace-out", str(tmp_path / "trace")) == 0
    assert train_losses(a)[-1] < train_losses(a)[0]
    assert set(receipt(a)["moe"]["layers"]) == {"2"}
    assert {r["observed"] for r in receipt(a)["backends"] if r["op"] == "moe_layer_pattern"} == {"01"}
    assert {p.name.split("_")[0] for p in (tmp_path / "trace").rglob("*.pt")} == {"layer002"}
    assert json.loads((tmp_path / "trace" / "meta.json").read_text())["moe_layers"] == [2]
    assert train_inprocess(c, *opts, "--moe-routing-replay", str(tmp_path / "trace")) == 0
    assert train_losses(c) == train_losses(a)
    assert main(["train", "--device", "cpu", "--run-dir", str(tmp_path / "d"), *RUN, "--num-experts", "4",
                 "--moe-layer-freq", "[1,0]", "--moe-routing-replay", str(tmp_path / "trace")]) != 0
    assert "moe_layers: trace [2] vs run [1]" in capsys.readouterr().err
    # the stock baseline under the same pattern, with Megatron's gated SharedExpertMLP
    stock = tmp_path / "stock"
    assert train_inprocess(stock, *RUN, "--num-experts", "4", "--moe-layer-freq", "[0,1]", "--moe-impl", "megatron",
                           "--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-gate") == 0
    assert train_losses(stock)[-1] < train_losses(stock)[0]


@pytest.mark.parametrize("argv,message", [
    (["--moe-layer-freq", "2"], "moe_layer_freq='2': says which layers are MoE, but the model has no experts"),
    (["--num-experts", "4", "--moe-layer-freq", "[0,0]"], "moe_layer_freq='[0,0]': no layer of 2 would be MoE"),
    (["--num-experts", "4", "--moe-layer-freq", "[0,1,1]"], "the pattern has 3 entries for num_layers=2"),
    (["--num-experts", "4", "--moe-shared-expert-gate"],
     "moe_shared_expert_gate=True: gates the shared expert, but the model has none"),
])
def test_moe_layer_freq_config_errors(tmp_path, capsys, argv, message):
    from megatron_ext.cli import main

    assert main(["train", "--preset", "test", "--device", "cpu", "--runs-root", str(tmp_path), *argv]) != 0
    err = capsys.readouterr().err
    assert message in err, err


def test_megatron_moe_options_the_fused_layer_lacks_are_refused_or_recorded(megatron_world):
    """Under --spec the fused layer meets every moe_* field of Megatron's TransformerConfig: one that
    changes the model's math is refused naming it; one that picks an implementation Megatron has and
    the fused layer replaces is logged once and listed in the receipt's backend records."""
    from megatron_ext import backends
    from megatron_ext.config import IGNORED_MEGATRON_MOE_OPTIONS, REFUSED_MEGATRON_MOE_OPTIONS, ConfigError
    from megatron_ext.modules.moe import FusedMoELayer

    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_ext.config import MOE_ROUTER_FIELDS, READ_MEGATRON_MOE_OPTIONS

    fields = set(vars(_tconfig()))
    known = set(REFUSED_MEGATRON_MOE_OPTIONS) | set(IGNORED_MEGATRON_MOE_OPTIONS)
    # every MoE field of this megatron-core is read, refused or recorded as ignored
    moe_fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.name.startswith("moe_")
                  or "expert" in f.name}
    unaccounted = moe_fields - known - set(MOE_ROUTER_FIELDS) - set(READ_MEGATRON_MOE_OPTIONS)
    assert not unaccounted, f"Megatron MoE options the fused layer neither reads, refuses nor records: {unaccounted}"
    # every table entry that this megatron-core has is a real field (0.19.2 has all of them)
    assert {name for name in known if name in fields} >= {"moe_grouped_gemm", "moe_permute_fusion"}
    for name, value in (("moe_expert_rank_capacity_factor", 1.5), ("expert_gtp_weight_remat_size", 2)):
        if name not in fields:
            continue
        tconfig = _tconfig()
        setattr(tconfig, name, value)
        with pytest.raises(ConfigError, match=rf"^{name}={value}: .*which the fused MoE layer does not implement"):
            FusedMoELayer(tconfig)
    # Megatron's default add_bias_linear=True gives its router and experts biases the fused layer lacks
    tconfig = _tconfig()
    tconfig.add_bias_linear = True
    with pytest.raises(ConfigError, match=r"^add_bias_linear=True: .*pass --disable-bias-linear"):
        FusedMoELayer(tconfig)
    # the forms Megatron gives the new options
    for name, value, why in (("moe_apply_probs_on_input", True, "one expert per token \\(moe_router_topk=2\\)"),
                             ("moe_latent_size", 0, "must be a positive integer"),
                             ("moe_router_force_biased", float("nan"), "must be a finite number")):
        tconfig = _tconfig()
        setattr(tconfig, name, value)
        with pytest.raises(ConfigError, match=rf"^{name}={value!r}: .*{why}"):
            FusedMoELayer(tconfig)
    tconfig = _tconfig()
    tconfig.moe_shared_expert_gate = True  # a gate needs a shared expert
    with pytest.raises(ConfigError, match=r"^moe_shared_expert_gate=True: gates the shared expert, but"):
        FusedMoELayer(tconfig)
    backends.reset()
    tconfig = _tconfig()
    tconfig.moe_permute_fusion, tconfig.moe_token_dispatcher_type, tconfig.moe_router_dtype = True, "flex", "fp64"
    tconfig.overlap_moe_expert_parallel_comm = True
    FusedMoELayer(tconfig)
    FusedMoELayer(tconfig)
    recs = {r["op"]: r for r in backends.records() if r["op"].startswith("megatron_option.")}
    assert set(recs) == {"megatron_option.moe_permute_fusion", "megatron_option.moe_token_dispatcher_type",
                         "megatron_option.moe_router_dtype", "megatron_option.overlap_moe_expert_parallel_comm"}
    assert recs["megatron_option.moe_token_dispatcher_type"]["requested"] == "'flex'"
    assert recs["megatron_option.moe_permute_fusion"]["observed"] == "ignored"
    assert recs["megatron_option.moe_router_dtype"]["observed"] == "fp32"
    assert recs["megatron_option.moe_permute_fusion"]["count"] == 2  # logged once, counted per layer
    backends.reset()
    FusedMoELayer(_tconfig())  # this project's own config sets alltoall, fp32: nothing to record
    tconfig = _tconfig()
    tconfig.moe_grouped_gemm = True  # grouped-GEMM experts are what the fused layer is
    FusedMoELayer(tconfig)
    assert not [r for r in backends.records() if r["op"].startswith("megatron_option.")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_moe_trains_in_bf16(tmp_path):
    """Subprocess runs (see tests/test_train_gpu.py why): bf16 fused MoE learns with the auto
    backend and with --moe-deterministic; the experts' weight gradients added into Megatron DDP's
    fp32 buffers by the kernel (the default) and by the DDP hook
    (--no-moe-gradient-accumulation-fusion) give the same first loss and nearly the same last one
    (the fused sum is rounded once, the hook's twice)."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    def run(name, *extra):
        d = tmp_path / name
        cmd = [sys.executable, "-m", "megatron_ext", "train", "--preset", "test", "--device", "cuda",
               "--nproc-per-node", "1", "--runs-root", str(tmp_path), "--run-dir", str(d), "--train-iters", "20",
               "--lr-warmup-iters", "2", "--eval-iters", "0", "--progress", "log", "--num-experts", "8",
               "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--hidden-size", "128",
               "--ffn-hidden-size", "256", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return d

    fast = run("auto")
    assert train_losses(fast)[-1] < train_losses(fast)[0] - 1.0
    used = {r["observed"] for r in receipt(fast)["backends"] if r["op"] == "moe_ffn"}
    assert used and used <= {"triton", "grouped_mm", "torch"}
    assert not [r for r in receipt(fast)["backends"] if r["op"] == "moe_ffn.weight_grad_accumulation"]
    hook = run("hook", "--no-moe-gradient-accumulation-fusion")
    fused_losses, hook_losses = train_losses(fast), train_losses(hook)
    assert abs(fused_losses[0] - hook_losses[0]) <= 1e-4 * abs(hook_losses[0])
    assert abs(fused_losses[-1] - hook_losses[-1]) <= 2e-2 * abs(hook_losses[-1]), (fused_losses, hook_losses)
    # the rest of the model (embedding grads, SDPA) is not bitwise deterministic on CUDA, so the
    # GPU check is that the chunked deterministic path runs and learns; bitwise tests are on CPU
    det = run("det", "--moe-deterministic")
    assert train_losses(det)[-1] < train_losses(det)[0] - 1.0


# EP=2 with both ranks on one GPU (tests.helpers.EP2_ONE_DEVICE_PREAMBLE): the Triton experts after
# the dispatch, the shared expert computed while the dispatch is in flight, and a rank that receives
# no rows, each against the torch reference on the global experts in fp32.
_EP2_GPU_SCRIPT = EP2_ONE_DEVICE_PREAMBLE + r"""
from megatron_ext.modules.moe import FusedMoELayer
from megatron_ext.ops.moe import moe_ffn
H, T, k, E = 256, 200, 2, 8
tconfig = transformer_config(from_preset("test", hidden_size=H, num_attention_heads=4, num_experts=E,
                                         moe_ffn_hidden_size=192, moe_router_topk=k,
                                         expert_model_parallel_size=2), "cuda", True)
torch.manual_seed(0)
layer = FusedMoELayer(tconfig).to(device="cuda", dtype=torch.bfloat16).train()
assert layer.ep_size == 2 and layer.num_local_experts == E // 2 and layer.etp_size == 1


def gathered(t):
    parts = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def rel(a, b):   # relative norm error; absolute where the reference is zero
    if a is None:   # a weight no row reached: no gradient, where the reference has zeros
        a = torch.zeros_like(b)
    d, n = (a.float() - b.float()).norm().item(), b.float().norm().item()
    return d / n if n > 0 else d


W1, W2 = gathered(layer.w1.detach()).float(), gathered(layer.w2.detach()).float()
g = torch.Generator(device="cuda").manual_seed(5 + rank)   # each rank its own tokens
x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
dy = torch.randn(T, H, device="cuda", generator=g)
probs = torch.rand(T, k, device="cuda", generator=g)
w_shared = torch.randn(H, H, device="cuda", generator=g) / H ** 0.5
spread = torch.rand(T, E, device="cuda", generator=g).argsort(-1)[:, :k]
first_half = torch.rand(T, E // 2, device="cuda", generator=g).argsort(-1)[:, :k]  # rank 0's experts only
for name, idx in (("spread", spread), ("rank 1 receives nothing", first_half)):
    for p in layer.parameters():
        p.grad = None
    xi, pi = x.detach().clone().requires_grad_(), probs.detach().clone().requires_grad_()
    y = layer._routed(xi, pi, idx, lambda: xi.float() @ w_shared)
    y.backward(dy)
    assert (layer.last_recv_rows == 0) == (name != "spread" and rank == 1), (name, layer.last_recv_rows)
    xr, pr = x.detach().float().clone().requires_grad_(), probs.detach().clone().requires_grad_()
    w1r, w2r = W1.clone().requires_grad_(), W2.clone().requires_grad_()
    ref = moe_ffn(xr, pr, idx, w1r, w2r, layer.activation, backend="torch") + xr @ w_shared
    ref.backward(dy)
    for t in (w1r.grad, w2r.grad):   # a rank's experts take both ranks' tokens
        dist.all_reduce(t)
    mine = slice(layer.local_offset, layer.local_offset + layer.num_local_experts)
    errs = {"out": rel(y, ref), "dx": rel(xi.grad, xr.grad), "dprobs": rel(pi.grad, pr.grad),
            "dw1": rel(layer.w1.grad, w1r.grad[mine]), "dw2": rel(layer.w2.grad, w2r.grad[mine])}
    assert max(errs.values()) < 2e-2, (name, rank, errs)
    print(f"rank {rank} {name}: {errs}", flush=True)
seen = {(r["op"], r["observed"]) for r in backends.records()}
assert ("moe_ffn", "triton") in seen, seen
print(f"ep2-gpu-ok rank {rank}", flush=True)
""" + EP2_ONE_DEVICE_TEARDOWN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ep2_triton_experts_match_the_reference(tmp_path):
    """EP=2 on the GPU (two ranks on one device over gloo): the dispatched rows through the
    Triton experts, the overlapped shared expert and an empty rank match the torch reference on
    the global experts: output, input, gate and both weight gradients."""
    from tests.helpers import torchrun_script

    torchrun_script(_EP2_GPU_SCRIPT, tmp_path, 2, "ep2-gpu-ok")


@pytest.mark.parametrize("field,value,message", [
    ("moe_ffn_hidden_size", 33, "moe_ffn_hidden_size=33"),
    ("moe_shared_expert_intermediate_size", 15, "moe_shared_expert_intermediate_size=15"),
])
def test_expert_tensor_parallel_widths_must_split(field, value, message):
    from megatron_ext.config import ConfigError, from_preset, validate

    cfg = from_preset("test", num_experts=4, tensor_model_parallel_size=2, sequence_parallel=True, **{field: value})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 2)
    ok = from_preset("test", num_experts=4, tensor_model_parallel_size=2, sequence_parallel=True)
    assert validate(ok, 2) == 1  # TP=2 is accepted by the fused layer now


def test_expert_tensor_parallel_size_is_checked_at_config_time():
    """--expert-tensor-parallel-size: 1 or the TP size with the fused layer; widths then need to
    split over the expert-TP size only (with 1, odd widths are fine); it needs an MoE model; the
    expert grid etp*ep*pp must divide the world."""
    from megatron_ext.config import ConfigError, from_preset, validate

    base = dict(num_experts=4, tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"expert_tensor_parallel_size=4: the fused MoE layer splits experts "
                                          r"over the whole tensor-parallel group .* or not at all; use 1 or 2"):
        validate(from_preset("test", expert_tensor_parallel_size=4, **base), 4)
    # without TP there is no group to split experts over (the layer makes the same check)
    with pytest.raises(ConfigError, match=r"expert_tensor_parallel_size=2: .*\(tensor_model_parallel_size=1\) or "
                                          r"not at all; use 1$"):
        validate(from_preset("test", num_experts=4, expert_tensor_parallel_size=2), 2)
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size=1: expert tensor parallelism needs an MoE"):
        validate(from_preset("test", expert_tensor_parallel_size=1), 1)
    assert validate(from_preset("test", expert_tensor_parallel_size=1, moe_ffn_hidden_size=33,
                                moe_shared_expert_intermediate_size=15, **base), 2) == 1
    with pytest.raises(ConfigError, match=r"moe_ffn_hidden_size=33: .*expert_tensor_parallel_size=2"):
        validate(from_preset("test", expert_tensor_parallel_size=2, moe_ffn_hidden_size=33, **base), 2)
    # EP=2 folded onto the TP pair (world 2) is a valid grid only without expert TP
    assert validate(from_preset("test", expert_tensor_parallel_size=1, expert_model_parallel_size=2, **base), 2) == 1
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size=2: expert-tensor\*expert\*pipeline "
                                          r"parallel = 2\*2\*1 = 4 does not divide world_size=2"):
        validate(from_preset("test", expert_model_parallel_size=2, **base), 2)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_tensor_parallel_slices_sum_to_the_whole_expert(activation):
    """The TP sharding convention: rank r keeps columns [gate_r | up_r] of w1 and rows r of w2;
    the ranks' partial outputs sum to the unsharded layer's (what the reduce-scatter computes),
    in fp64, forward and gradients."""
    from megatron_ext.modules.moe import _tp_cols
    from megatron_ext.ops.moe import moe_ffn

    torch.manual_seed(0)
    parts, tp, T, k = (2 if activation == "swiglu" else 1), 2, 11, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, H, parts * F, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, F, H, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(T, k, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    whole = moe_ffn(x, probs, idx, w1, w2, activation, "torch")
    Fl = F // tp
    parts_out = [moe_ffn(x, probs, idx, _tp_cols(w1, parts, r, tp), w2[:, r * Fl:(r + 1) * Fl], activation, "torch")
                 for r in range(tp)]
    torch.testing.assert_close(sum(parts_out), whole, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(whole)
    want = torch.autograd.grad(whole, (x, w1, w2), g)
    got = torch.autograd.grad(sum(parts_out), (x, w1, w2), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # rank r's w1 columns are exactly gate[r-th F/tp] followed by up[r-th F/tp]
    sl = _tp_cols(w1, parts, 1, tp)
    torch.testing.assert_close(sl[..., :Fl], w1[..., Fl:F])
    if parts == 2:
        torch.testing.assert_close(sl[..., Fl:], w1[..., F + Fl:])


def test_routing_log_writes_jsonl_records_off_the_forward_pass(tmp_path):
    from megatron_ext.config import MoEConfig
    from megatron_ext.observability import moe_stats
    from megatron_ext.observability.moe_stats import STATE

    STATE.configure(MoEConfig(routing_log=str(tmp_path / "log")), rank=3)
    try:
        assert STATE._log_writer.q.maxsize == moe_stats.LOG_QUEUE_SIZE  # bounded
        STATE.begin_step(7)
        ids = torch.randint(0, E, (S, B, 2))
        probs = torch.rand(S, B, 2)
        STATE.log_routing(2, 1, ids, probs)
        STATE.log_routing(1, 0, ids.flip(0), probs)
        writer = STATE._log_writer
        thread = writer.thread
        STATE.close()   # the run's end: the records are written and the writer thread has ended
        assert not thread.is_alive() and not writer.thread.is_alive()
        rows = [json.loads(line) for line in (tmp_path / "log" / "rank00003.jsonl").read_text().splitlines()]
        STATE.log_routing(3, 0, ids, probs)   # a forward after the end starts the writer again
        assert writer.thread.is_alive() and writer.thread is not thread
        STATE.flush()
        assert len((tmp_path / "log" / "rank00003.jsonl").read_text().splitlines()) == 3
    finally:
        STATE.reset()
    assert STATE._log_writer is None and not [t for t in threading.enumerate() if t.name.startswith("moe-")]
    assert [(r["iteration"], r["micro_batch"], r["layer"], r["rank"]) for r in rows] == [(7, 1, 2, 3), (7, 0, 1, 3)]
    assert (rows[0]["batch"], rows[0]["seq"], rows[0]["topk"]) == (B, S, 2)
    # [batch][seq][k]: the token at batch row i, position j
    assert rows[0]["expert_ids"] == ids.permute(1, 0, 2).tolist()
    assert rows[1]["expert_ids"] == ids.flip(0).permute(1, 0, 2).tolist()
    assert torch.tensor(rows[0]["probs"]).equal(probs.permute(1, 0, 2))


# ----------------------------------------------------------------------------- GPU: the layer's hot path

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_router_logits_tensor_core_lane_matches_fp64(dtype):
    """16-bit x and w -> fp32 logits from one tensor-core GEMM with fp32 output: as exact as the
    fp32 GEMM on the upcast values (products exact, fp32 sums); the grads (hi + lo split of the
    fp32 logit gradient) match fp64 to the output dtype's rounding."""
    from megatron_ext import backends
    from megatron_ext.modules.moe import router_logits

    backends.reset()
    g = torch.Generator(device="cuda").manual_seed(5)
    T, Hd, Ex = 1000, 512, 64
    x = torch.randn(T, Hd, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(Ex, Hd, device="cuda", generator=g) * Hd ** -0.5).to(dtype).requires_grad_()
    dl = torch.randn(T, Ex, device="cuda", generator=g) * 1e-3       # small, full fp32 mantissa
    out = router_logits(x, w)
    assert out.dtype == torch.float32
    out.backward(dl)
    xd, wd = x.detach().double(), w.detach().double()
    ref = xd @ wd.t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for got, want in ((x.grad, dl.double() @ wd), (w.grad, dl.double().t() @ xd)):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        assert err <= 2 ** -7 * want.abs().max().item(), (err, want.abs().max().item())
    assert not [r for r in backends.records() if r["op"] == "moe.router_logits"]   # no fallback
    # deterministic mode keeps the fixed-chunk fp32 GEMM (batch invariance)
    det = router_logits(x.detach(), w.detach(), deterministic=True)
    torch.testing.assert_close(det.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


_NO_SYNC_CONFIGS = {
    "topk": {},
    "aux_z": dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
    "capacity": dict(moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
                     moe_token_drop_policy="probs"),
    "sigmoid_bias_groups": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                moe_router_num_groups=2, moe_router_group_topk=1),
    "seq_aux": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.01),
    "latent_probs_on_input": dict(moe_latent_size=32, moe_router_topk=1, moe_apply_probs_on_input=True,
                                  moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=64),
    "forced_balance": dict(moe_router_force_load_balancing=True, moe_aux_loss_coeff=0.01),
}

# Run in a fresh process: this suite's CPU fixtures patch torch.cuda for Megatron's CPU lane.
_NO_SYNC_SCRIPT = r"""
import json, sys, torch
from bench.parallel import ensure_model_parallel
ensure_model_parallel(cpu=False)
from megatron_ext.config import from_preset
from megatron_ext.modules.moe import FusedMoELayer
from megatron_ext.training.model import transformer_config
for name, moe in json.loads(sys.argv[1]).items():
    cfg = from_preset("test", hidden_size=64, num_attention_heads=4, num_experts=8,
                      moe_ffn_hidden_size=96, **{"moe_router_topk": 2, **moe})
    layer = FusedMoELayer(transformer_config(cfg, "cuda", True)).to(device="cuda", dtype=torch.bfloat16).train()
    layer.set_layer_number(1)
    x = torch.randn(64, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)[0].sum().backward()          # first call: compiles and probes (host work allowed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)[0]
        out.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all()), name
    assert x.grad is not None and layer.router_weight.grad is not None and layer.w1.grad is not None, name
    print("no-sync", name, flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_layer_step_has_no_host_sync():
    """The issue's rule for the hot path: a training forward + backward of the fused layer (EP=1)
    waits for the GPU nowhere (``set_sync_debug_mode('error')`` raises on any synchronising
    call), so the step overlaps host and device and can be captured in a CUDA graph; for the
    default top-k router and for aux/z losses, capacity dropping, sigmoid + expert bias + groups,
    the per-sequence aux loss, latent MoE with the gate on the input, and the random-logit router."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-c", _NO_SYNC_SCRIPT, json.dumps(_NO_SYNC_CONFIGS)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("no-sync")] == \
        list(_NO_SYNC_CONFIGS)


_REPLAY_GPU_SCRIPT = r"""
import torch
from bench.parallel import ensure_model_parallel
ensure_model_parallel(cpu=False)
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from megatron_ext import backends
from megatron_ext.config import from_preset
from megatron_ext.modules.moe import FusedMoELayer
from megatron_ext.training.model import transformer_config
for moe in (dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
            dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                 moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5)):
    RouterReplay.clear_global_router_replay_instances()
    tconfig = transformer_config(from_preset("test", hidden_size=256, num_attention_heads=4, num_experts=16,
                                             moe_ffn_hidden_size=192, moe_router_topk=4, **moe), "cuda", True)
    tconfig.moe_enable_routing_replay = True
    layer = FusedMoELayer(tconfig).to(device="cuda", dtype=torch.bfloat16).train()
    layer.set_layer_number(1)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(256, 4, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(256, 4, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    def step():
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)[0]
        y.backward(dy)
        return [y.detach(), xi.grad, layer.router_weight.grad.clone(), layer.w1.grad.clone()]
    step()                                    # compiles and probes (host work allowed)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    own = step()
    ids = RouterReplay.get_recorded_data()[0].clone()
    assert ids.shape == (1024, 4) and ids.dtype == torch.int64 and ids.is_cuda, (ids.shape, ids.dtype)
    RouterReplay.set_replay_data([ids])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(own, again):              # replaying the recorded ids: the recorded run, bitwise
        assert torch.equal(a, b)
    target = torch.rand(1024, 16, device="cuda", generator=g).argsort(dim=1)[:, :4]
    RouterReplay.clear_global_indices()
    RouterReplay.set_replay_data([target])
    other = step()
    assert (other[0].float() - own[0].float()).abs().max() > 0.1 * own[0].float().abs().max()
    gates = {r["observed"] for r in backends.records() if r["op"] == "moe.route"}
    assert "triton" in gates, gates
    print("replay-ok", sorted(moe), flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_megatron_router_replay_on_the_fused_gate_without_host_syncs():
    """Megatron's RouterReplay on CUDA in bf16, through the fused top-k gate: the recorded ids are
    int64 on the GPU; replaying them (REPLAY_FORWARD) runs forward + backward without a host
    synchronisation and gives the recorded step's output and gradients bitwise; a random target
    routes elsewhere. A fresh process (this suite's CPU fixtures patch torch.cuda)."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-c", _REPLAY_GPU_SCRIPT], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("replay-ok") == 2, proc.stdout[-2000:]


_LATENT_GPU_SCRIPT = r"""
import torch
from bench.parallel import ensure_model_parallel
ensure_model_parallel(cpu=False)
from megatron_ext import backends
from megatron_ext.config import from_preset
from megatron_ext.modules.moe import FusedMoELayer
from megatron_ext.training.model import transformer_config
for moe in (dict(moe_latent_size=256, moe_shared_expert_intermediate_size=512, moe_router_topk=4),
            dict(moe_latent_size=256, moe_router_topk=1, moe_apply_probs_on_input=True,
                 moe_router_score_function="sigmoid")):
    layers = {}
    for name, backend, dtype in (("fused", "auto", torch.bfloat16), ("ref", "torch", torch.float64)):
        cfg = from_preset("test", hidden_size=1024, num_attention_heads=8, num_experts=16, moe_ffn_hidden_size=704,
                          moe_backend=backend, **moe)
        torch.manual_seed(0)
        layers[name] = FusedMoELayer(transformer_config(cfg, "cuda", True)).to(device="cuda", dtype=dtype).train()
        layers[name].set_layer_number(1)
    with torch.no_grad():   # the reference: the bf16 layer's weights in fp64
        for (n, p), q in zip(layers["fused"].named_parameters(), layers["ref"].parameters()):
            q.copy_(p.double())
    g = torch.Generator(device="cuda").manual_seed(1)
    # bf16 values in both: the two layers route the same tokens (ties aside)
    x = torch.randn(512, 4, 1024, device="cuda", generator=g).bfloat16().double()
    dy = torch.randn(512, 4, 1024, device="cuda", generator=g).bfloat16().double()
    out = {}
    for name, layer in layers.items():
        xi = x.to(next(layer.parameters()).dtype).requires_grad_()
        y, _ = layer(xi)
        y.backward(dy.to(y.dtype))
        out[name] = [y, xi.grad] + [p.grad for p in layer.parameters()]
    names = ["y", "dx"] + [n for n, _ in layers["fused"].named_parameters()]
    errs = {}
    for n, a, b in zip(names, out["fused"], out["ref"]):
        errs[n] = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert errs[n] < 3e-2, (moe, n, errs[n])
    used = {r["observed"] for r in backends.records() if r["op"] == "moe_ffn"}
    assert "triton" in used, used
    print("latent-ok", moe, {n: f"{e:.1e}" for n, e in errs.items()}, flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_latent_moe_bf16_triton_matches_fp64():
    """Latent MoE (experts at width 256 of hidden 1024), with a shared expert and with the gate
    on the input (top-1), on the Triton experts in bf16: output, input gradient and every weight
    gradient within 3 % (of each tensor's largest entry) of the same layer in fp64 on the torch
    reference experts. A fresh process (this suite's CPU fixtures patch torch.cuda)."""
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-c", _LATENT_GPU_SCRIPT], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("latent-ok") == 2, proc.stdout[-2000:]


@pytest.mark.parametrize("moe", [
    dict(moe_latent_size=16, moe_shared_expert_intermediate_size=24, moe_router_score_function="sigmoid",
         moe_router_topk_scaling_factor=2.0),
    dict(moe_latent_size=16, moe_router_topk=1, moe_apply_probs_on_input=True, moe_router_pre_softmax=True),
    dict(moe_latent_size=16, moe_deterministic=True, moe_shared_expert_intermediate_size=24),
], ids=["latent_shared", "latent_probs_on_input", "latent_deterministic"])
def test_latent_moe_equals_its_definition(megatron_world, moe):
    """Megatron's latent MoE (moe_latent_size L): the router and the shared expert read the hidden
    state, the routed experts run at width L between the projections ``latent_w1 [H, L]`` (before
    the dispatch) and ``latent_w2 [L, H]`` (after the combine). Output and every gradient equal the
    definition written out with torch ops on copies of the layer's parameters (fp32); with
    moe_apply_probs_on_input the gate scales the latent expert input (Megatron's order)."""
    from megatron_ext.modules.moe import FusedMoELayer
    from megatron_ext.ops.moe import moe_ffn
    from megatron_ext.ops.moe.reference import expert_activation
    from megatron_ext.ops.moe.routing import route

    fused = FusedMoELayer(_tconfig(**moe))
    fused.set_layer_number(1)
    assert fused.w1.shape == (E, 16, 2 * F) and fused.w2.shape == (E, F, 16)
    assert fused.latent_w1.shape == (H, 16) and fused.latent_w2.shape == (16, H)
    torch.manual_seed(9)
    x = torch.randn(S, B, H, requires_grad=True)
    g = torch.randn(S, B, H)
    y, _ = fused(x)
    y.backward(g)

    p = {n: t.detach().clone().requires_grad_() for n, t in fused.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    x2 = xr.reshape(-1, H)
    res = route(x2 @ p["router_weight"].t(), fused.router_cfg, training=True, num_seqs=B, backend="torch")
    lat, gates = x2 @ p["latent_w1"], res.probs
    if moe.get("moe_apply_probs_on_input"):
        lat, gates = lat * res.probs, torch.ones_like(res.probs)
    ref = moe_ffn(lat, gates, res.indices, p["w1"], p["w2"], fused.activation, backend="torch") @ p["latent_w2"]
    if "shared_w1" in p:
        ref = ref + expert_activation(x2 @ p["shared_w1"], fused.activation) @ p["shared_w2"]
    ref = ref.view(S, B, H)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for name, t in fused.named_parameters():
        assert t.grad is not None and t.grad.abs().max() > 0, name
        torch.testing.assert_close(t.grad, p[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def _perturbed(layer):
    """``layer`` with every parameter and persistent buffer overwritten by fresh random values (so
    a load that leaves anything out shows)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for t in layer.state_dict().values():
            if torch.is_tensor(t) and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen))
    return layer


def _dist_save_load(source, target, path, prefix="decoder.layers.0.mlp."):
    """``source``'s distributed checkpoint written to ``path`` and read into ``target``, as
    Megatron's save and load do for a layer (its sharded state dict; ``load_state_dict`` strict)."""
    from megatron.core import dist_checkpointing

    path.mkdir()
    dist_checkpointing.save(source.sharded_state_dict(prefix=prefix), str(path))
    loaded = dist_checkpointing.load(target.sharded_state_dict(prefix=prefix), str(path))
    target.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, strict=True)


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
def test_megatron_checkpoint_layout_moves_both_ways(megatron_world, tmp_path, swiglu):
    """moe.checkpoint_format='megatron': a distributed checkpoint of Megatron's MoELayer
    (SequentialMLP experts, a gated shared expert, a sigmoid router with its expert bias) loads
    into the fused layer, and the fused layer's checkpoint into Megatron's layer: every weight
    bitwise, and the layers then compute the same output and gradients. The default layout keeps
    the fused layer's own keys."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron_ext.modules.moe import FusedMoELayer

    moe = dict(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True, swiglu=swiglu,
               moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    stock, fused = _layers(_tconfig(**moe))   # the same weights
    tconfig = _tconfig(**moe)
    assert tconfig.moe.checkpoint_format == "fused"
    assert "decoder.layers.0.mlp.w1" in {v.key for v in fused.sharded_state_dict("decoder.layers.0.mlp.").values()}
    tconfig.moe = dataclasses.replace(tconfig.moe, checkpoint_format="megatron")

    # Megatron's layer -> the fused one
    target = _perturbed(FusedMoELayer(tconfig))
    target.set_layer_number(1)
    _dist_save_load(stock, target, tmp_path / "from_megatron")
    for name, want in fused.state_dict().items():
        assert torch.equal(target.state_dict()[name], want), name
    # the layouts: the keys and global shapes of Megatron's layer
    theirs = {v.key for v in stock.sharded_state_dict("p.").values()}
    ours = target.sharded_state_dict("p.")
    assert {v.key for v in ours.values()} == theirs
    w1 = ours["p.w1"]
    assert isinstance(w1, ShardedTensorFactory) and w1.key == "p.experts.experts.linear_fc1.weight"
    assert {tuple(t.global_shape) for t in w1.build()} == {(E, (2 if swiglu else 1) * F, H)}
    _assert_matches_stock(stock, target, torch.randn(S, B, H, dtype=torch.float64).float())

    # the fused layer -> Megatron's
    again = _perturbed(_layers(_tconfig(**moe))[0])
    _dist_save_load(target, again, tmp_path / "to_megatron")
    for name, want in stock.state_dict().items():
        if torch.is_tensor(want):
            assert torch.equal(again.state_dict()[name], want), name
    stock.zero_grad()
    target.zero_grad()
    _assert_matches_stock(again, target, torch.randn(S, B, H, dtype=torch.float64).float())


# a fused MoE run with a shared expert and the expert bias, checkpointed at iterations 3 and 6
MOVE = [*RUN, "--save-interval", "3", "--num-experts", "4", "--moe-shared-expert-intermediate-size", "24",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-aux-loss-coeff", "0.01"]


def test_fused_run_in_the_megatron_layout_resumes(tmp_path):
    """`megatron-ext train --moe-checkpoint-format megatron`: the fused layer's weights, expert bias
    and optimizer state go through Megatron MoELayer's checkpoint keys (transposed on the way out,
    back on the way in) and the run resumes from its iteration-3 checkpoint with the same losses."""
    from megatron.core import dist_checkpointing

    opts = [*MOVE, "--moe-checkpoint-format", "megatron"]
    a = tmp_path / "megatron_layout"
    assert train_inprocess(a, *opts) == 0
    losses = train_losses(a)
    keys = {k.split("/")[0] for k in dist_checkpointing.load_tensors_metadata(str(a / "checkpoints" / "iter_0000003"))}
    for key in ("decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.router.expert_bias",
                "decoder.layers.mlp.shared_experts.linear_fc2.weight"):
        assert key in keys, sorted(keys)
    assert not any(k.startswith("decoder.layers.mlp.w1") for k in keys)
    _resumes_from_iteration_3(a, tmp_path / "resumed", opts, losses)


def test_a_run_moves_between_megatrons_moe_layer_and_the_fused_one_with_its_optimizer_state(tmp_path):
    """A run of Megatron's MoELayer (--moe-impl megatron) resumes from its iteration-3 checkpoint
    with the fused layer in Megatron's layout, Adam state and step included, and a fused run goes
    back the same way: iterations 4-6 repeat the source run's losses (a fresh optimizer would not:
    Adam's first step after a reset moves every weight by about the learning rate). The
    distributed optimizer's state goes through the same keys (fully_reshardable, per parameter;
    the one-optimizer/chain test below runs it)."""
    megatron = [*MOVE, "--moe-impl", "megatron"]
    fused = [*MOVE, "--moe-checkpoint-format", "megatron"]
    for name, src, dst in (("from_megatron", megatron, fused), ("from_fused", fused, megatron)):
        run = tmp_path / name
        assert train_inprocess(run, *src) == 0
        _resumes_from_iteration_3(run, tmp_path / f"{name}_moved", dst, train_losses(run))


@pytest.mark.parametrize("optimizer", ["plain", "distributed", "bf16"])
def test_optimizer_state_moves_between_one_optimizer_and_a_chain(tmp_path, monkeypatch, caplog, optimizer):
    """Megatron's optimizer is one optimizer without expert-parallel parameters and a chain [dense,
    expert] with them, each part's state under a ``chained_<i>.`` prefix. A run whose checkpoint
    has the other shape (EP > 1 resumed at EP = 1, or a fused run saved before its experts followed
    Megatron's tag) loads each parameter's state by its key, with the step counter: the resumed
    run repeats the source run's losses, both ways."""
    import logging

    from megatron.core import dist_checkpointing

    from megatron_ext.modules import moe

    # bf16: Megatron's mixed-precision optimizer, its fp32 masters and its grad scaler too
    opts = [*MOVE, *{"plain": [], "distributed": ["--use-distributed-optimizer"], "bf16": ["--bf16"]}[optimizer]]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # bf16 is refused under the interpreter
    tag = moe.expert_parallel_tag
    for name, chained_first in (("chained", True), ("one", False)):
        monkeypatch.setattr(moe, "expert_parallel_tag", (lambda *lane: True) if chained_first else tag)
        run = tmp_path / name
        assert train_inprocess(run, *opts) == 0
        keys = dist_checkpointing.load_tensors_metadata(str(run / "checkpoints" / "iter_0000003"))
        assert any(k.startswith("chained_1.optimizer.") for k in keys) is chained_first
        monkeypatch.setattr(moe, "expert_parallel_tag", tag if chained_first else (lambda *lane: True))
        with caplog.at_level(logging.INFO, logger="megatron_ext.train"):
            _resumes_from_iteration_3(run, tmp_path / f"{name}_moved", opts, train_losses(run))
        want = ("a chain of 2 optimizers", "one optimizer") if chained_first else ("one optimizer", "a chain of 2")
        assert any(f"written by {want[0]}, loaded into {want[1]}" in r.getMessage() for r in caplog.records)
        caplog.clear()


def test_a_chain_without_the_runs_parameters_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """A checkpoint whose optimizer holds no state for one of this run's parameters (a dense run's,
    resumed by an MoE run whose optimizer is a chain) fails naming the entry and what to do."""
    from megatron_ext.modules import moe

    dense = tmp_path / "dense"
    assert train_inprocess(dense, *RUN, "--save-interval", "3") == 0
    monkeypatch.setattr(moe, "expert_parallel_tag", lambda *lane: True)
    moved = resume_from(dense, tmp_path / "moved", 3)
    capsys.readouterr()
    assert train_inprocess(moved, *RUN, "--save-interval", "3", "--num-experts", "4", "--resume") != 0
    err = capsys.readouterr().err
    assert "holds no optimizer state for 'optimizer.state.exp_avg.decoder.layers.mlp." in err
    assert "resume with the model it was written with" in err
