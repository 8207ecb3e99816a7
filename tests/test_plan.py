"""Lane planner: table-driven plans on H100/H200/B200 clusters and every rejection with its reason."""

import dataclasses
import json

import pytest

from launch.hardware import PROFILES, detect, get_profile
from launch.lanes import Lanes, parse_lanes
from launch.plan import Cluster, ModelShape, Planner, PlanError, _layer_activations
from megatron_ext.config import ConfigError, from_preset, validate

VOCAB = 32000
DENSE_7B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                seq_length=4096, global_batch_size=512)
# Mixtral-style: 8 experts top-2, GQA 8 groups, half the depth so it also fits one H100 node.
MOE_23B = dict(num_layers=16, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=14336, num_experts=8, moe_router_topk=2, seq_length=4096, global_batch_size=256)
CLUSTERS = [(1, "h100-80g"), (2, "h200-141g"), (4, "b200-192g")]


def _planner(model, nodes=1, hw="h100-80g", target="megatron", **extra):
    cfg = from_preset("tiny", **model, **extra)
    return Planner(cfg, Cluster(nodes, 8, PROFILES[hw]), VOCAB, target)


def _check_valid(plan, nodes):
    L = plan.lanes
    assert L.tp * L.pp * L.cp * L.dp == nodes * 8
    assert L.tp <= 8 and 32 % L.tp == 0
    assert plan.memory.total <= plan.memory.capacity, plan.table()
    assert plan.time.tokens_per_s > 0 and 0.1 < plan.time.mfu < 0.6
    assert set(plan.reasons) == {"tp", "sp", "pp", "vpp", "cp", "ep", "etp", "dp", "micro_batch_size", "recompute"}
    assert all(plan.reasons.values())


@pytest.mark.parametrize("nodes,hw", CLUSTERS)
@pytest.mark.parametrize("target", ["train", "megatron"])
def test_dense_7b_plans_fit_and_stay_in_the_nvlink_island(nodes, hw, target):
    plan = _planner(DENSE_7B, nodes, hw, target).plan()
    _check_valid(plan, nodes)
    L = plan.lanes
    assert L.ep == 1 and L.cp == 1 and L.sp == (L.tp > 1)
    # 7B fits without tensor parallelism on these devices: the planner must not pay for TP
    assert L.tp == 1, plan.table()
    if target == "megatron":  # distributed optimizer: a 7B fits one stage on every profile
        assert L.pp == 1 and not L.fsdp2, plan.table()
    else:  # replicated Adam (18 B/param = 119 GB) needs pipeline stages on H100, none inside a stage
        assert L.pp <= 4 and not L.fsdp2 and L.vpp == 1
        if hw == "h100-80g":
            assert L.pp > 1 and "PP<" in plan.reasons["pp"]


@pytest.mark.parametrize("nodes,hw", CLUSTERS)
@pytest.mark.parametrize("target", ["train", "megatron"])
def test_moe_plans_use_expert_parallelism(nodes, hw, target):
    plan = _planner(MOE_23B, nodes, hw, target).plan()
    _check_valid(plan, nodes)
    L = plan.lanes
    assert L.ep > 1 and 8 % L.ep == 0, plan.table()
    assert "experts are 9" in plan.reasons["ep"]  # experts hold >90% of the parameters
    if target == "train":
        # the planner's pick for this model (etp1 is a candidate too: train runs whole experts)
        assert L.etp == L.tp


def test_small_models_are_host_bound_and_take_fewer_larger_micro_batches():
    """The host floor (micro-batches x layers x host time per layer pass + a per-step cost): the
    `small` preset (8 layers, hidden 512) at tp1 on one H100 measured 0.433 / 0.230 / 0.126 s per
    step at micro-batch 4 / 8 / 16; the plan says the same within 1 % and picks the largest
    micro-batch, while a 7B model stays GPU-bound."""
    small = from_preset("small")
    for mbs, measured in ((4, 0.433), (8, 0.230), (16, 0.126)):
        tm = Planner(small, Cluster(1, 1, PROFILES["h100-80g"]), VOCAB, "train").plan(
            f"tp1,mbs{mbs}").time
        assert tm.host_bound and tm.total == tm.host > tm.gpu
        assert tm.host == pytest.approx(64 // mbs * 8 * 3.2e-3 + 0.024)
        assert tm.total == pytest.approx(measured, rel=0.01)
    plan = Planner(small, Cluster(1, 1, PROFILES["h200-141g"]), VOCAB, "train").plan()
    assert plan.lanes.micro_batch_size == 16, plan.table()
    assert "host floor" in plan.table() and "host-bound" in plan.reasons["micro_batch_size"]
    assert plan.to_json()["time_s"]["host_bound"] is True
    full = Planner(small, Cluster(1, 1, PROFILES["h200-141g"]), VOCAB, "train").plan(
        "tp1,mbs16,recompute-full")
    assert full.time.host == pytest.approx(4 * 8 * 3.2e-3 * 4 / 3 + 0.024)
    big = _planner(DENSE_7B, 1, "h100-80g", "train").plan()
    assert not big.time.host_bound and big.time.total == big.time.gpu > 5 * big.time.host


def test_larger_device_needs_fewer_lanes():
    h100 = _planner(MOE_23B, 1, "h100-80g", "train").plan()
    b200 = Planner(from_preset("tiny", **MOE_23B), Cluster(1, 8, PROFILES["b200-192g"]), VOCAB, "train").plan()
    assert b200.lanes.pp * b200.lanes.ep <= h100.lanes.pp * h100.lanes.ep
    assert b200.time.total < h100.time.total


def test_memory_terms_follow_korthikanti():
    """Per-layer activations at f=4h, GELU, MHA, without flash attention: sbh(34 + 5as/h) bytes,
    sbh(10 + 24/t + 5as/(ht)) with TP, sbh(34/t + 5as/(ht)) with TP+SP, 2sbh/t with full recompute."""
    s, b, h, a, t = 2048, 2, 1024, 16, 4
    m = ModelShape(num_layers=4, hidden_size=h, num_attention_heads=a, num_query_groups=a, ffn_hidden_size=4 * h,
                   vocab_size=VOCAB, seq_length=s, global_batch_size=8, swiglu=False, flash_attention=False)
    sbh = s * b * h
    acts = _layer_activations(m, Lanes(micro_batch_size=b))
    assert acts["none"] == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert acts["selective"] == pytest.approx(sbh * 34)
    tp_only = _layer_activations(m, Lanes(tp=t, dp=1, micro_batch_size=b))
    assert tp_only["none"] == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    tp_sp = _layer_activations(m, Lanes(tp=t, sp=True, micro_batch_size=b))
    assert tp_sp["none"] == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
    assert tp_sp["full"] == pytest.approx(2 * sbh / t)


def test_optimizer_sharding_and_fsdp2_memory():
    p = _planner(DENSE_7B, 1, "h100-80g", "megatron")
    dp8 = p.evaluate(Lanes(dp=8)).memory
    fsdp = p.evaluate(Lanes(dp=8, fsdp2=True)).memory
    params = p.model.total_params() + p.model.padded_vocab(1) * 4096 * 0  # tied embeddings: counted once
    assert dp8.weights == pytest.approx(2 * params, rel=0.01)
    assert dp8.grads == pytest.approx(4 * params, rel=0.01)
    assert dp8.optimizer == pytest.approx(12 * params / 8, rel=0.01)
    assert fsdp.weights + fsdp.grads + fsdp.optimizer < 0.5 * (dp8.weights + dp8.grads + dp8.optimizer)
    train = _planner(DENSE_7B, 1, "h100-80g", "train").evaluate(Lanes(dp=8)).memory
    assert train.optimizer == pytest.approx(12 * params, rel=0.01)  # train's default: replicated Adam
    dist = _planner(DENSE_7B, 1, "h100-80g", "train", use_distributed_optimizer=True)
    assert dist.evaluate(Lanes(dp=8)).memory.optimizer == pytest.approx(12 * params / 8, rel=0.01)
    plan = dist.plan("auto")
    assert not plan.lanes.fsdp2 and plan.memory.fits, plan.table()  # FSDP2 and it exclude each other
    assert "distributed optimizer shards Adam states over DP" in plan.table()


def test_train_plans_fsdp2_and_applies_it_to_the_config():
    plan = _planner(DENSE_7B, 1, "h100-80g", "train").plan("fsdp2")
    L = plan.lanes
    assert L.fsdp2 and (L.tp, L.pp, L.ep, L.dp) == (1, 1, 1, 8), plan.table()
    assert plan.reasons["dp"].startswith("pinned; FSDP2 shards weights/grads/Adam over 8 ranks")
    # FSDP2 shards all 16 B/param where train's replicated Adam holds 18 B/param on every rank
    replicated = _planner(DENSE_7B, 1, "h100-80g", "train").evaluate(dataclasses.replace(L, fsdp2=False))
    assert plan.memory.total < replicated.memory.total and plan.memory.fits and not replicated.memory.fits
    cfg = plan.apply(from_preset("tiny", **DENSE_7B))
    assert cfg.use_torch_fsdp2 and cfg.tensor_model_parallel_size == 1
    assert not _planner(DENSE_7B, 1, "h100-80g", "train").plan("dp").apply(cfg).use_torch_fsdp2


def test_pinned_lanes_are_kept_and_reported():
    plan = _planner(DENSE_7B, 2, "h200-141g").plan("tp2,sp,pp2")
    L = plan.lanes
    assert (L.tp, L.sp, L.pp, L.dp) == (2, True, 2, 4)
    assert plan.reasons["tp"].startswith("pinned") and plan.reasons["pp"].startswith("pinned")
    assert json.loads(json.dumps(plan.to_json()))["pinned"] == "tp2,sp,pp2"


# (model, cluster nodes, hardware, target, lanes spec, the reason, the nearest valid choice)
REJECTIONS = [
    (DENSE_7B, 1, "h100-80g", "megatron", "tp2,pp2,dp4", "tp*pp*cp*dp = 2*2*1*4 = 16 is not the world size 8",
     "nearest valid choice: "),
    (DENSE_7B, 2, "h200-141g", "megatron", "tp16", "tensor_model_parallel_size=16: larger than the 8 devices",
     "nearest valid choice: tp8"),
    (dict(DENSE_7B, num_attention_heads=12, hidden_size=3072), 1, "h100-80g", "megatron", "tp8",
     "does not divide num_attention_heads=12", "nearest valid choice: tp4"),
    (MOE_23B, 1, "h100-80g", "megatron", "ep3", "num_experts=8: must be a positive multiple of expert_model_parallel_size=3",
     "nearest valid choice: ep4"),
    (DENSE_7B, 1, "h100-80g", "megatron", "tp1,pp1,dp8,mbs8,recompute-none",
     "memory estimate", "nearest valid choice: "),
    (DENSE_7B, 1, "h100-80g", "train", "fsdp2,tp2",
     "tensor_model_parallel_size=2: FSDP2 in train shards over data parallelism only", "nearest valid choice: "),
    (DENSE_7B, 1, "h100-80g", "megatron", "fsdp2,pp2", "fsdp2 runs without pipeline or expert parallelism",
     "nearest valid choice: "),
    (DENSE_7B, 1, "h100-80g", "train", "pp2,vpp2", "virtual pipeline stages are not wired into train",
     "nearest valid choice: vpp1"),
    (DENSE_7B, 1, "h100-80g", "megatron", "ep2", "expert parallelism needs an MoE model",
     "nearest valid choice: ep1"),
    (DENSE_7B, 1, "h100-80g", "megatron", "sp,tp1", "sequence_parallel=True: needs tensor_model_parallel_size > 1",
     "nearest valid choice: "),
]


@pytest.mark.parametrize("model,nodes,hw,target,spec,reason,nearest", REJECTIONS,
                         ids=[r[4] for r in REJECTIONS])
def test_impossible_pins_are_rejected_with_reason_and_nearest_choice(model, nodes, hw, target, spec, reason, nearest):
    with pytest.raises(PlanError) as e:
        _planner(model, nodes, hw, target).plan(spec)
    msg = str(e.value)
    assert msg.startswith(f"lanes={spec!r}: "), msg
    assert reason in msg and nearest in msg, msg
    # the suggestion itself must plan
    suggested = msg.split("nearest valid choice: ")[1].split(" (lanes ")[1].split(" -> ")[0]
    plan = _planner(model, nodes, hw, target).plan(suggested)
    assert plan.memory.total <= plan.memory.capacity


def test_memory_rejection_names_the_device_and_the_estimate():
    with pytest.raises(PlanError) as e:
        _planner(DENSE_7B, 1, "h100-80g", "megatron").plan("tp1,pp1,dp8,mbs8,recompute-none")
    msg = str(e.value)
    assert "GiB per GPU" in msg and "over the 79.6 GiB of h100-80g" in msg


def test_auto_with_nothing_that_fits_says_so():
    big = dict(DENSE_7B, num_layers=80, hidden_size=8192, num_attention_heads=64, ffn_hidden_size=28672)
    with pytest.raises(PlanError, match=r"lanes='auto': memory estimate .* use more GPUs"):
        Planner(from_preset("tiny", **big), Cluster(1, 2, PROFILES["h100-80g"]), VOCAB, "train").plan()


@pytest.mark.parametrize("spec,msg", [
    ("tp2,xx4", "unknown token 'xx4'"), ("tp0", "'tp0' must be at least 1"), ("tp2,tp4", "contradicts"),
    ("auto,tp2", "'auto' cannot be mixed"),
])
def test_lane_spec_grammar_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_lanes(spec)


def test_lane_spec_round_trip():
    assert parse_lanes("tp2,sp,pp1,ep4,dp2") == {"tp": 2, "sp": True, "pp": 1, "ep": 4, "dp": 2, "fsdp2": False}
    assert parse_lanes("fsdp2") == {"fsdp2": True} and parse_lanes("auto") == {}
    L = Lanes(tp=2, sp=True, pp=2, vpp=2, ep=4, dp=2, micro_batch_size=2, recompute="full")
    assert Lanes(**{**dataclasses.asdict(L), **parse_lanes(L.spec())}) == L


def test_hardware_profiles():
    assert set(PROFILES) == {"h100-80g", "h200-141g", "b200-192g"}
    assert PROFILES["b200-192g"].fp4 and not PROFILES["h100-80g"].fp4
    assert PROFILES["h200-141g"].hbm_gib > PROFILES["h100-80g"].hbm_gib
    assert detect("NVIDIA H100 80GB HBM3").name == "h100-80g" and detect("NVIDIA H200").name == "h200-141g"
    assert detect("NVIDIA B200").name == "b200-192g" and detect("Tesla V100") is None
    with pytest.raises(ConfigError, match=r"hardware='a100': unknown hardware profile; use one of"):
        get_profile("a100")


def test_moe_layer_freq_counts_dense_layers_as_dense():
    """A first dense layer (DeepSeek-style ``--moe-layer-freq ([0]+[1]*15)``) swaps one layer's router
    and experts for a dense MLP in the parameter counts, and the first stage, which holds it, plans
    fewer expert parameters than the last."""
    cfg = from_preset("tiny", **MOE_23B)
    every = ModelShape.from_config(cfg, VOCAB)
    mixed = ModelShape.from_config(dataclasses.replace(cfg, moe_layer_freq="([0]+[1]*15)"), VOCAB)
    assert every.moe_layers() == 16 and mixed.moe_layers() == 15 and mixed.moe_layers(0, 8) == 7
    swap = every.router_params() + every.expert_params() - mixed.mlp_params()
    assert every.total_params() - mixed.total_params() == swap
    active_swap = every.router_params() + 2 * every._gated * 4096 * 14336 - mixed.mlp_params()
    assert every.active_params() - mixed.active_params() == active_swap
    # every other layer MoE (Megatron's integer form): half the expert parameters per stage
    half = ModelShape.from_config(dataclasses.replace(cfg, moe_layer_freq="2"), VOCAB)
    assert half.moe_pattern == (1, 0) * 8
    from launch.plan import _stage_params

    lanes = Lanes(pp=2, ep=8)
    e_every, e_half = _stage_params(every, lanes)[2], _stage_params(half, lanes)[2]
    assert e_half == pytest.approx(e_every / 2)
    first, last, _, _ = _stage_params(mixed, lanes)
    assert first > last  # the dense MLP (and the embedding) sit on the first stage


def test_moe_recompute_keeps_the_block_input_gates_and_ids():
    """recompute-moe (Megatron's selective recompute with ``moe``): an MoE layer keeps the block's
    input, the fp32 router logits and the gates + expert ids; what it rebuilds is held for one
    layer at a time. Dense layers keep everything (core_attn is recomputed where not flash)."""
    s, b, h, E, k, fm, t = 4096, 2, 2048, 64, 6, 1408, 2
    shape = dict(num_layers=4, hidden_size=h, num_attention_heads=16, num_query_groups=16, ffn_hidden_size=4 * h,
                 vocab_size=VOCAB, seq_length=s, global_batch_size=8, num_experts=E, moe_router_topk=k,
                 moe_ffn_hidden_size=fm)
    sb, sbh = s * b, s * b * h
    mlp = 3 * sbh + 4 * sb * E + k * (4 * sbh + 6 * sb * fm)
    kept = 3 * sbh + 4 * sb * E + 12 * k * sb
    for flash in (True, False):
        m = ModelShape(**shape, flash_attention=flash)
        for lanes in (Lanes(micro_batch_size=b), Lanes(tp=t, sp=True, ep=2, micro_batch_size=b)):
            tp = lanes.tp
            acts = _layer_activations(m, lanes, moe=True)
            base = acts["none"] if flash else acts["selective"]
            assert acts["moe_rebuilt"] == pytest.approx((mlp - kept) / tp)
            assert acts["moe"] == pytest.approx(base - (mlp - kept) / tp)
            assert acts["full"] < acts["moe"] < 0.35 * acts["none"]
            dense = _layer_activations(m, lanes, moe=False)
            assert dense["moe"] == (dense["none"] if flash else dense["selective"]) and dense["moe_rebuilt"] == 0
    assert "moe" not in _layer_activations(ModelShape(**dict(shape, num_experts=None)), Lanes())


def test_moe_recompute_is_planned_where_experts_do_not_fit_and_full_costs_more():
    """With the lanes pinned so that an MoE model's activations do not fit, the plan recomputes
    the MoE blocks rather than whole layers (the experts' forward runs twice instead of every
    forward), says why against both alternatives, and hands Megatron's flags to the config."""
    cfg = from_preset("tiny", **MOE_23B)
    planner = Planner(cfg, Cluster(1, 8, PROFILES["h100-80g"]), VOCAB, "train")
    plan = planner.plan("tp1,ep8,mbs2")
    L = plan.lanes
    assert L.recompute == "moe" and L.spec().endswith("recompute-moe"), plan.table()
    why = plan.reasons["recompute"]
    assert why.startswith("moe: the MoE blocks run their forward again in backward"), why
    assert "no recompute needs" in why and "full recompute est." in why, why
    by = plan.memory.activations_by_policy
    assert by["full"] < by["moe"] < by["none"] and plan.memory.activations == by["moe"]
    assert f"moe {by['moe'] / 2**30:.2f}, full" in plan.table()
    # ep is pinned: nothing to compare it with, and the reason says so without a dangling separator
    assert plan.reasons["ep"].endswith("all-to-all over NVLink"), plan.reasons["ep"]
    none, full = (planner.evaluate(dataclasses.replace(L, recompute=r)) for r in (None, "full"))
    assert not none.memory.fits and full.memory.fits and plan.time.total < full.time.total
    # the extra work: the experts' forward once more, and the block's all-to-alls (6 instead of 4)
    assert plan.time.ep_comm == pytest.approx(none.time.ep_comm * 6 / 4)
    assert none.time.compute < plan.time.compute < full.time.compute
    # twice the micro-batch: the experts' rebuilt activations no longer fit either, so full it is
    full4 = planner.plan("tp1,ep8,mbs4")
    assert full4.lanes.recompute == "full"
    assert "MoE recompute needs" in full4.reasons["recompute"], full4.reasons["recompute"]
    assert planner.plan("tp1,ep8,mbs2,recompute-full").reasons["recompute"] == \
        "pinned; full: every layer's forward runs again in backward"
    applied = plan.apply(cfg)
    assert (applied.recompute_granularity, applied.recompute_modules) == ("selective", "moe")
    assert validate(applied, 8) == 8
    # modules already chosen stay, moe is added
    mixed = dataclasses.replace(cfg, recompute_granularity="selective", recompute_modules="moe_act")
    assert plan.apply(mixed).recompute_modules == "moe_act,moe"


def test_moe_recompute_pins():
    from launch.commands import pins_from

    cfg = from_preset("tiny", **MOE_23B, recompute_granularity="selective", recompute_modules="core_attn,moe")
    assert pins_from(cfg, {"recompute_granularity": "selective"}) == {"recompute": "moe"}
    assert pins_from(dataclasses.replace(cfg, lanes="recompute-selective"), {}) == {"recompute": "moe"}
    # the lane and the flags name the same selective set with moe in it: no conflict
    both = dataclasses.replace(cfg, lanes="recompute-selective")
    assert pins_from(both, {"recompute_granularity": "selective"}) == {"recompute": "moe"}
    assert pins_from(dataclasses.replace(cfg, lanes="recompute-moe"),
                     {"recompute_granularity": "selective"}) == {"recompute": "moe"}
    with pytest.raises(ConfigError, match=r"pins recompute-full but --recompute-granularity selective "
                                          r"--recompute-modules core_attn,moe was also given"):
        pins_from(dataclasses.replace(cfg, lanes="recompute-full"), {"recompute_granularity": "selective"})
    attn_only = dataclasses.replace(cfg, recompute_modules="core_attn")
    assert pins_from(attn_only, {"recompute_granularity": "selective"}) == {"recompute": "selective"}
    # without a hardware profile the configuration's choice is kept, read the same way
    plain = Planner(cfg, Cluster(1, 8, None), VOCAB, "megatron").plan()
    assert plain.lanes.recompute == "moe"
    assert parse_lanes("recompute-moe") == {"recompute": "moe"}
    L = Lanes(ep=8, dp=8, recompute="moe")
    assert Lanes(**{**dataclasses.asdict(L), **parse_lanes(L.spec())}) == L
    with pytest.raises(PlanError, match=r"recompute-moe recomputes the MoE blocks and this model has no "
                                        r"experts; use recompute-selective or recompute-full"):
        _planner(DENSE_7B, 1, "h100-80g", "megatron").plan("recompute-moe")
    assert "moe" not in _planner(DENSE_7B, 1, "h100-80g", "megatron").plan().memory.activations_by_policy


def test_mhc_mixers_cost_their_memory_traffic():
    """The mHC sites are memory-bound: 35.5 B of HBM traffic per stream element per site (the fused
    lane's 0.71 ms per site at T = 8192, C = 2048, n = 4 on an H100), two sites per layer. The
    benchmark's site comes out at its measured time; SP splits the streams over TP, and without
    SP every TP rank mixes its data-parallel shard's whole sequence."""
    bench = dict(num_layers=1, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192, seq_length=4096,
                 global_batch_size=2, mhc_num_streams=4)
    one = Planner(from_preset("tiny", **bench), Cluster(1, 1, PROFILES["h100-80g"]), VOCAB, "megatron")
    tm = one.plan("tp1,mbs2").time
    assert tm.mhc == pytest.approx(2 * 0.71e-3, rel=0.01)   # two sites of the measured 0.71 ms
    assert tm.gpu == pytest.approx(tm.compute + tm.mhc + tm.tp_comm + tm.dp_comm + tm.ep_comm + tm.cp_comm
                                   + tm.pp_p2p + tm.pp_bubble)
    plain = Planner(from_preset("tiny", **dict(bench, mhc_num_streams=None)), Cluster(1, 1, PROFILES["h100-80g"]),
                    VOCAB, "megatron").plan("tp1,mbs2").time
    assert plain.mhc == 0 and "mhc mixers" not in _planner(DENSE_7B).plan().table()
    model = dict(DENSE_7B, mhc_num_streams=4)
    p = _planner(model)
    sp, nosp, tp1 = (p.evaluate(L).time for L in (Lanes(tp=2, sp=True, dp=4), Lanes(tp=2, dp=4), Lanes(dp=8)))
    # per GPU: with SP a TP rank mixes 1/tp of the tokens, as a DP rank does; without, all of them
    assert sp.mhc == pytest.approx(tp1.mhc) and nosp.mhc == pytest.approx(2 * tp1.mhc)
    assert p.evaluate(Lanes(dp=8, recompute="full")).time.mhc == pytest.approx(1.31 * tp1.mhc)
    plan = p.plan()
    assert f"mhc mixers {plan.time.mhc:.3f}" in plan.table() and plan.to_json()["time_s"]["mhc"] == plan.time.mhc
