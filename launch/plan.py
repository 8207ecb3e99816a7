"""Lane planner: model shape + cluster + hardware profile -> a LaunchPlan with memory and step-time estimates.

The planner enumerates every layout (TP, SP, PP + virtual stages, CP, EP + expert TP, DP or FSDP2,
micro-batch, recompute policy) that the lane checks of :func:`megatron_ext.config.check_lanes` accept,
estimates each one, keeps those whose memory fits the device, and picks the fastest; among plans
within 3% of the fastest it takes the simplest (no FSDP2, fewest pipeline stages, smallest TP/CP/EP,
least recompute). Pinned lanes restrict the search; a pin that admits no plan is rejected with the
reason and the nearest pin value that works.

Memory per GPU (bytes, the fullest pipeline stage):
- weights 2 B/param (bf16), gradients 4 B/param (Megatron keeps fp32 main grads under bf16), Adam
  12 B/param (fp32 master + two moments), sharded over DP x CP with the distributed optimizer (experts
  over the expert-data-parallel group); FSDP2 shards all 16 B/param (fp32 master, fp32 grad, two
  moments) and adds the gathered bf16 weights of two layers and fp32 grads of one.
- activations per layer and micro-batch, after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", Eq. 1-5): ``sbh (34 + 5as/h)`` bytes without
  parallelism, ``sbh (10 + 24/t + 5as/(ht))`` with TP, ``sbh (34/t + 5as/(ht))`` with TP + SP,
  ``34 sbh/t`` with selective recompute and ``2 sbh/t`` (the layer input) with full recompute. We
  generalise the 34 to this model's shapes: attention ``7 sbh + 4 sb·kv`` (QKV input, Q, K, V for
  ``kv = groups x head_dim``, projection input, dropout mask), MLP ``3 sbh + 6 sbf`` for SwiGLU
  (``3 sbh + 4 sbf`` for GELU: 19 sbh at f = 4h, as in the paper), MoE ``3 sbh + 4 sbE +
  k (4 sbh + 6 sb·f_moe)`` (router logits in fp32, k routed copies), norms ``4 sbh``, mHC ``4 n sbh``.
  MoE recompute (``recompute-moe``: Megatron's ``--recompute-granularity selective
  --recompute-modules moe``, which the fused layer honours) keeps of the MoE block only its input,
  the router logits and the gates and expert ids, ``3 sbh + 4 sbE + 12 k sb``; the rest is rebuilt
  in backward, one layer at a time (that layer's share is counted once on top, as under full
  recompute); dense layers keep everything (``core_attn`` too when attention is not flash).
  With flash attention (this project's SDPA core attention and TE both use it) the ``5as/h`` score
  term is never stored; only the fp32 log-sum-exp ``4 a s b`` is. Under 1F1B the first stage holds
  ``min(pp, m)`` micro-batches of its ``L/pp`` layers, times ``1 + (pp-1)/(pp*vpp)`` when
  interleaved (Korthikanti Sec. 4.2.3); the last stage also holds the fp32 logits ``4 sbV/t``.
- attention workspace (transient, one layer): flash: the fp32 dQ accumulator ``4 sbh/t``; else
  the fp32 score matrix ``4 (a/t) s^2 b``.
- overhead: 3 GiB (CUDA context, NCCL communicators, cuBLAS workspaces) + 5% of HBM (allocator
  fragmentation).

Step time (s): compute ``FLOPs / (world x peak x achievable)`` with FLOPs = ``6 N_active tokens`` plus
causal attention ``6 L s h tokens`` (x 4/3 under full recompute; MoE recompute runs the experts'
forward twice, ``4 x`` instead of ``3 x`` their forward FLOPs), GEMM-shape factors ``x/(x+256)`` on
the token and per-rank width dimensions; the pipeline bubble ``(pp-1)/(vpp m)`` of compute; TP (or
SP's all-gather + reduce-scatter, the same volume) ``4`` all-reduces of ``2sbh`` per layer and
micro-batch on NVLink (6 with full recompute, 5 in an MoE layer under MoE recompute); CP ring exchange
of K and V; EP ``4`` all-to-alls of ``k sbh/t x 2`` bytes (6 with full or MoE recompute; NVLink while
the EP group stays in one node, else IB); DP gradient
reduce-scatter + parameter all-gather (all-reduce without the distributed optimizer; FSDP2 gathers
weights in forward and backward) on IB when the group spans nodes, 70% hidden behind backward when
the target overlaps it. Collective costs use ring formulas ``2(n-1)/n`` (all-reduce) and ``(n-1)/n``.
The mHC stream mixers (with ``mhc_num_streams``) are memory-bound: ``35.5 B`` of HBM traffic per
stream element per site, two sites per layer, at the datasheet HBM rate (the fused lane's measured
0.71 ms per site on an H100), split by TP only under SP (x 1.31 under full recompute).
The sum of those is the GPU time; the step is the longer of it and the host floor, ``micro-batches x
layers per stage x Target.host_s_per_layer + Target.host_s_per_step`` (the host issues every
layer's kernels for every micro-batch; fitted 3.2 ms per layer pass + 24 ms per step for the train
loop): small models are host-bound, so fewer, larger micro-batches win there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

from launch.hardware import HardwareProfile
from launch.lanes import Lanes, parse_lanes, pins_spec
from megatron_ext.config import (ConfigError, TrainConfig, check_lanes, ffn_hidden_size, moe_layer_pattern,
                                 parse_recompute_modules)

GIB = float(2**30)
_OVERHEAD_FIXED = 3 * GIB
_OVERHEAD_FRACTION = 0.05
_TIE = 0.03  # plans within 3% of the fastest count as equally fast (the estimate is no finer); the simplest wins
# HBM bytes per stream element of one mHC site, forward + backward, at the datasheet HBM rate:
# 0.71 ms per site at T = 8192 tokens, C = 2048, n = 4 on an H100 (3.35 TB/s; docs/mhc.md, the
# fused lane replayed as a CUDA graph) = 35.5 B per element
_MHC_SITE_BYTES = 35.5


class PlanError(ConfigError):
    """No plan satisfies the pinned lanes; the message names the reason and the nearest valid pin."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What will run the plan: this project's ``train`` loop or Megatron's own pretrain CLI."""

    name: str
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    fsdp2: bool
    vpp: bool
    cp: bool
    # host time to issue one layer's forward + backward for one micro-batch (Python, autograd,
    # kernel launches), plus a fixed host cost per step (optimizer, data, logging); the step
    # cannot be faster than the host, however small the GPU work. Fitted on the `small` preset
    # (8 layers, hidden 512) at tp1 on one H100: 0.433 / 0.230 / 0.126 s per step at micro-batch
    # 4 / 8 / 16 = 128 / 64 / 32 layer passes -> 3.2 ms per pass + 24 ms per step (each within
    # 1 %). Lanes with more host work measured above it on 2 x H200 (TP=2+SP 1.7x, PP=2 1.4x,
    # FSDP2 2.5x, MoE at EP=2 2.9x), so the floor is a lower bound. Not fitted separately for
    # Megatron's pretrain: same values.
    host_s_per_layer: float = 3.2e-3
    host_s_per_step: float = 0.024


TARGETS = {
    # The train loop: Megatron DDP (the distributed optimizer when the config asks for it), no
    # overlap, no VPP/CP yet; or FSDP2 over the data-parallel group alone (TP = PP = EP = 1, dense).
    "train": Target("train", distributed_optimizer=False, overlap_grad_reduce=False, fsdp2=True, vpp=False,
                    cp=False),
    # Megatron's pretrain with --use-distributed-optimizer --overlap-grad-reduce and this project's --spec.
    "megatron": Target("megatron", distributed_optimizer=True, overlap_grad_reduce=True, fsdp2=True, vpp=True,
                       cp=True),
}

_NOT_IN_TRAIN = {
    "vpp": "virtual pipeline stages are not wired into train yet; use vpp1",
    "cp": "context parallelism is not supported yet by train; use cp1",
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    profile: Optional[HardwareProfile] = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        hw = self.profile.name if self.profile else "no hardware profile"
        return f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node} x {hw}"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    global_batch_size: int
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    mhc_num_streams: Optional[int] = None
    # one entry per layer, 1 = MoE, 0 = dense MLP (Megatron's moe_layer_freq); None: every layer MoE
    moe_pattern: Optional[Tuple[int, ...]] = None
    swiglu: bool = True
    untied: bool = False
    flash_attention: bool = True
    make_vocab_size_divisible_by: int = 128

    @classmethod
    def from_config(cls, cfg: TrainConfig, vocab_size: int) -> "ModelShape":
        return cls(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                   num_attention_heads=cfg.num_attention_heads,
                   num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
                   ffn_hidden_size=ffn_hidden_size(cfg), vocab_size=vocab_size, seq_length=cfg.seq_length,
                   global_batch_size=cfg.global_batch_size, num_experts=cfg.num_experts or None,
                   moe_router_topk=cfg.moe_router_topk,
                   moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or (ffn_hidden_size(cfg) if cfg.num_experts else None),
                   mhc_num_streams=cfg.mhc_num_streams, swiglu=cfg.swiglu,
                   moe_pattern=(tuple(moe_layer_pattern(cfg.moe_layer_freq, cfg.num_layers))
                                if cfg.num_experts else None),
                   untied=cfg.untie_embeddings_and_output_weights,
                   make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)

    # -- parameter counts (per layer unless named otherwise) -------------------------------------
    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * (self.hidden_size // self.num_attention_heads)

    @property
    def _gated(self) -> int:
        return 3 if self.swiglu else 2

    def attention_params(self) -> int:
        h = self.hidden_size
        return h * (h + 2 * self.kv_dim) + h * h

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has experts (else the dense MLP)."""
        if not self.num_experts:
            return False
        return self.moe_pattern is None or bool(self.moe_pattern[layer])

    def moe_layers(self, start: int = 0, stop: Optional[int] = None) -> int:
        """How many of layers [start, stop) have experts."""
        return sum(self.is_moe(i) for i in range(start, self.num_layers if stop is None else stop))

    def busiest_stage_moe_layers(self, pp: int) -> int:
        """MoE layers of the pipeline stage that holds the most (``pp`` equal stages): with
        ``moe_layer_freq`` the stages can differ."""
        per = self.num_layers // pp
        return max(self.moe_layers(st * per, (st + 1) * per) for st in range(pp))

    def mlp_params(self) -> int:
        """The dense MLP of one layer without experts."""
        return self._gated * self.hidden_size * self.ffn_hidden_size

    def router_params(self) -> int:
        return self.hidden_size * self.num_experts if self.num_experts else 0

    def expert_params(self) -> int:
        """All experts of one layer."""
        if not self.num_experts:
            return 0
        return self.num_experts * self._gated * self.hidden_size * self.moe_ffn_hidden_size

    def replicated_params(self) -> int:
        """Norms and mHC mixers: not split by TP."""
        h, n = self.hidden_size, self.mhc_num_streams or 0
        mhc = 2 * (n * h * (n * n + 2 * n) + n * h) if n else 0
        return 2 * h + mhc

    def padded_vocab(self, tp: int) -> int:
        step = self.make_vocab_size_divisible_by * tp
        return (self.vocab_size + step - 1) // step * step

    def _layers_params(self, experts: int) -> int:
        """Every layer's parameters, with ``experts`` counted per MoE layer."""
        moe = self.moe_layers()
        common = self.num_layers * (self.attention_params() + self.replicated_params())
        return (common + (self.num_layers - moe) * self.mlp_params()
                + moe * (self.router_params() + experts))

    def total_params(self) -> int:
        emb = self.padded_vocab(1) * self.hidden_size * (2 if self.untied else 1)
        return self._layers_params(self.expert_params()) + emb

    def active_params(self) -> int:
        """Parameters one token multiplies (embedding lookup excluded, output projection included)."""
        experts = 0
        if self.num_experts:
            experts = self.moe_router_topk * self._gated * self.hidden_size * self.moe_ffn_hidden_size
        return self._layers_params(experts) + self.padded_vocab(1) * self.hidden_size


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_by_policy: Dict[str, float]  # none / selective / full, same lanes
    attention_workspace: float
    overhead: float
    capacity: Optional[float]

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.attention_workspace
                + self.overhead)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity


@dataclasses.dataclass(frozen=True)
class TimeEstimate:
    compute: float
    pp_bubble: float
    tp_comm: float
    cp_comm: float
    ep_comm: float
    pp_p2p: float
    dp_comm: float
    model_flops: float
    tokens: int
    peak_flops: float  # of the whole cluster
    host: float = 0.0  # host floor: layer passes per step x Target.host_s_per_layer + per step
    mhc: float = 0.0   # the mHC stream mixers (memory-bound; see _MHC_SITE_BYTES)

    @property
    def gpu(self) -> float:
        return (self.compute + self.mhc + self.pp_bubble + self.tp_comm + self.cp_comm + self.ep_comm
                + self.pp_p2p + self.dp_comm)

    @property
    def host_bound(self) -> bool:
        return self.host > self.gpu

    @property
    def total(self) -> float:
        """GPU work and host issue overlap: the step takes the longer of the two."""
        return max(self.gpu, self.host)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.total * self.peak_flops)


@dataclasses.dataclass(frozen=True)
class Candidate:
    lanes: Lanes
    memory: MemoryEstimate
    time: Optional[TimeEstimate]

    def key_time(self) -> float:
        return self.time.total if self.time else 0.0


RECOMPUTE_ORDER = {None: 0, "selective": 1, "moe": 2, "full": 3}   # least recompute first


def recompute_lane(cfg: TrainConfig) -> Optional[str]:
    """The recompute lane a configuration asks for: Megatron's selective recompute with ``moe``
    among ``--recompute-modules`` is the ``moe`` lane, other selective sets the ``selective`` one."""
    if cfg.recompute_granularity == "selective" and "moe" in parse_recompute_modules(cfg.recompute_modules):
        return "moe"
    return cfg.recompute_granularity


def _simplicity(lanes: Lanes) -> Tuple:
    rc = RECOMPUTE_ORDER[lanes.recompute]
    return (lanes.fsdp2, lanes.pp, lanes.vpp, lanes.cp, lanes.tp, lanes.ep, lanes.etp, rc, lanes.micro_batch_size)


# ------------------------------------------------------------------------------------------------
# estimates
# ------------------------------------------------------------------------------------------------

def _stage_params(m: ModelShape, L: Lanes) -> Tuple[float, float, float, float]:
    """(dense params on the first stage, on the last stage, expert params, params of one layer) per GPU."""
    layers = m.num_layers // L.pp

    def dense_layer(i: int) -> float:
        moe = m.is_moe(i)
        return ((m.attention_params() + (0 if moe else m.mlp_params())) / L.tp
                + (m.router_params() if moe else 0) + m.replicated_params())

    def stage_dense(stage: int) -> float:
        return sum(dense_layer(i) for i in range(stage * layers, (stage + 1) * layers))

    emb = m.padded_vocab(L.tp) * m.hidden_size / L.tp
    # Tied embeddings share one matrix only when one stage holds both ends (train unties at PP > 1).
    output = emb if (m.untied or L.pp > 1) else 0.0
    first = stage_dense(0) + emb + (output if L.pp == 1 else 0.0)
    last = stage_dense(L.pp - 1) + (output if L.pp > 1 else 0.0)
    experts = m.busiest_stage_moe_layers(L.pp) * m.expert_params() / (L.ep * L.etp)
    one_layer = max(dense_layer(i) + (m.expert_params() / (L.ep * L.etp) if m.is_moe(i) else 0.0)
                    for i in range(m.num_layers))
    return first, last, experts, one_layer


def _layer_activations(m: ModelShape, L: Lanes, moe: Optional[bool] = None) -> Dict[str, float]:
    """Bytes one layer stores for backward per micro-batch, by recompute policy (Korthikanti, generalised)."""
    s = m.seq_length / L.cp
    b = L.micro_batch_size
    h, a, t = m.hidden_size, m.num_attention_heads, L.tp
    sbh = s * b * h
    attn = 7 * sbh + 4 * s * b * m.kv_dim
    scores = 4 * a * s * b if m.flash_attention else 5 * a * s * s * b
    if m.num_experts and (moe is None or moe):
        k, fm, E = m.moe_router_topk, m.moe_ffn_hidden_size, m.num_experts
        mlp = 3 * sbh + 4 * s * b * E + k * (4 * sbh + (6 if m.swiglu else 4) * s * b * fm)
        # under MoE recompute: the block's input, the fp32 router logits, fp32 gates + int64 ids
        mlp_kept = 3 * sbh + 4 * s * b * E + 12 * k * s * b
    else:
        mlp = 3 * sbh + (6 if m.swiglu else 4) * s * b * m.ffn_hidden_size
        mlp_kept = mlp
    mhc = 4 * (m.mhc_num_streams or 0) * sbh
    # Korthikanti's "10 sbh" that TP alone does not split: norm inputs (4), attention/MLP inputs (4),
    # the two dropout masks (2); sequence parallelism splits them too. mHC streams live there as well.
    unsplit = 10 * sbh + mhc
    split = (attn - 3 * sbh) + (mlp - 3 * sbh)
    seq_div = t if L.sp else 1
    selective = unsplit / seq_div + split / t
    none = selective + scores / t
    streams = m.mhc_num_streams or 1
    full = 2 * sbh * streams / seq_div
    out = {"none": none, "selective": selective, "full": full}
    if m.num_experts:
        # recompute-moe: --recompute-modules moe (plus core_attn where attention is not flash);
        # "moe_rebuilt": what one MoE layer rebuilds in its backward (held while it runs)
        rebuilt = (mlp - mlp_kept) / t
        out["moe"] = (none if m.flash_attention else selective) - rebuilt
        out["moe_rebuilt"] = rebuilt
    return out


def estimate_memory(m: ModelShape, L: Lanes, cluster: Cluster, target: Target) -> MemoryEstimate:
    world = cluster.world_size
    first, last, experts, one_layer = _stage_params(m, L)
    edp = max(1, world // (L.pp * L.ep * L.etp))
    dense_shard = L.dp * L.cp

    def state(dense: float) -> Tuple[float, float, float]:
        if L.fsdp2:
            # fp32 master shard + fp32 grad shard + two moments, plus the gathered working set.
            w = 4 * (dense / dense_shard + experts / edp) + 2 * 2 * one_layer
            g = 4 * (dense / dense_shard + experts / edp) + 4 * one_layer
            o = 8 * (dense / dense_shard + experts / edp)
            return w, g, o
        w = 2 * (dense + experts)
        g = 4 * (dense + experts)
        shard_d, shard_e = (dense_shard, edp) if target.distributed_optimizer else (1, 1)
        o = 12 * (dense / shard_d + experts / shard_e)
        return w, g, o

    layers = m.num_layers // L.pp
    micro = max(1, m.global_batch_size // (L.micro_batch_size * L.dp))
    inflight = min(L.pp, micro)
    interleave = 1 + (L.pp - 1) / (L.pp * L.vpp) if L.vpp > 1 else 1.0
    by_kind = {moe: _layer_activations(m, L, moe) for moe in (False, True)}
    logits = 4 * (m.seq_length / L.cp) * L.micro_batch_size * m.padded_vocab(L.tp) / L.tp

    def acts(policy: str, stage: str) -> float:
        n_micro = inflight * interleave if stage == "first" else 1
        first_layer = 0 if stage == "first" else (L.pp - 1) * layers
        kinds = [m.is_moe(i) for i in range(first_layer, first_layer + layers)]
        if policy == "full":
            # the stored layer inputs, plus one layer's activations while it is recomputed
            stored = (sum(by_kind[k]["full"] for k in kinds) * n_micro
                      + max(by_kind[k]["none"] for k in kinds))
        elif policy == "moe":
            # what the layers keep, plus one MoE layer's rebuilt experts while its backward runs
            stored = (sum(by_kind[k]["moe"] for k in kinds) * n_micro
                      + max(by_kind[k]["moe_rebuilt"] for k in kinds))
        else:
            stored = sum(by_kind[k][policy] for k in kinds) * n_micro
        return stored + (logits if stage == "last" or L.pp == 1 else 0.0)

    policy = L.recompute or "none"
    stages = []
    for stage, dense in (("first", first), ("last", last)):
        w, g, o = state(dense)
        stages.append((w + g + o + acts(policy, stage), stage, w, g, o))
    _, worst, w, g, o = max(stages)
    by_policy = {p: acts(p, worst) for p in ("none", "selective", "full") + (("moe",) if m.num_experts else ())}
    s = m.seq_length / L.cp
    if m.flash_attention:
        workspace = 4 * s * L.micro_batch_size * m.hidden_size / L.tp
    else:
        workspace = 4 * (m.num_attention_heads / L.tp) * s * s * L.micro_batch_size
    capacity = cluster.profile.hbm_bytes if cluster.profile else None
    overhead = _OVERHEAD_FIXED + (_OVERHEAD_FRACTION * capacity if capacity else 0.0)
    return MemoryEstimate(weights=w, grads=g, optimizer=o, activations=by_policy[policy],
                          activations_by_policy=by_policy, attention_workspace=workspace,
                          overhead=overhead, capacity=capacity)


def _shape_factor(x: float) -> float:
    return x / (x + 256.0)


def estimate_time(m: ModelShape, L: Lanes, cluster: Cluster, target: Target) -> TimeEstimate:
    hw = cluster.profile
    assert hw is not None
    world, gpn = cluster.world_size, cluster.gpus_per_node
    nvlink = hw.nvlink_gbps * 1e9 * hw.nvlink_efficiency
    ib = hw.ib_gbps * 1e9 * hw.ib_efficiency
    peak = hw.bf16_tflops * 1e12
    tokens = m.global_batch_size * m.seq_length
    h, s_full = m.hidden_size, m.seq_length
    # forward FLOPs per token: 2 per multiply-add of every active weight + causal attention 2*s*h per layer
    expert_fwd = 0.0
    if m.num_experts:
        expert_fwd = 2.0 * m.moe_layers() * m.moe_router_topk * m._gated * h * m.moe_ffn_hidden_size
    attn_core_fwd = 2.0 * m.num_layers * s_full * h
    dense_fwd = 2.0 * m.active_params() - expert_fwd + attn_core_fwd
    model_flops = 3.0 * tokens * (dense_fwd + expert_fwd)
    # forward work run again in backward: selective recomputes the attention core, moe the MoE
    # blocks (their experts; the attention core too where it is not flash), full everything
    dense_again = {None: 0.0, "selective": attn_core_fwd,
                   "moe": 0.0 if m.flash_attention else attn_core_fwd, "full": dense_fwd}[L.recompute]
    dense_hw = tokens * (3.0 * dense_fwd + dense_again)
    experts_again = L.recompute in ("full", "moe")   # the MoE blocks' forward runs again in backward
    expert_hw = tokens * (4.0 if experts_again else 3.0) * expert_fwd
    m_tokens = L.micro_batch_size * s_full / L.cp
    eff_dense = hw.achievable_fraction * _shape_factor(m_tokens) * _shape_factor(h / L.tp)
    compute = dense_hw / world / (peak * eff_dense)
    if m.num_experts:
        per_expert_tokens = m.moe_router_topk * m_tokens * L.ep * L.etp / (L.tp * m.num_experts)
        eff_exp = (hw.achievable_fraction * _shape_factor(per_expert_tokens)
                   * _shape_factor(m.moe_ffn_hidden_size / L.etp))
        compute += expert_hw / world / (peak * eff_exp)

    mhc = 0.0
    if m.mhc_num_streams:
        # two mixer sites per layer, each fwd + bwd moving _MHC_SITE_BYTES per stream element; the
        # sequence shard with SP, the whole sequence on every TP rank without it; full recompute
        # runs the sites' forward (~31 % of their time) again
        elements = tokens * m.num_layers * 2 * m.mhc_num_streams * h / world * (1 if L.sp else L.tp)
        mhc = elements * _MHC_SITE_BYTES * (1.31 if L.recompute == "full" else 1.0) / (hw.hbm_tbps * 1e12)

    micro = max(1, m.global_batch_size // (L.micro_batch_size * L.dp))
    layers = m.num_layers // L.pp
    bubble = (compute + mhc) * (L.pp - 1) / (L.vpp * micro)
    s = s_full / L.cp
    sbh_bytes = 2.0 * s * L.micro_batch_size * h
    passes = 6 if L.recompute == "full" else 4
    stage_moe = m.busiest_stage_moe_layers(L.pp) if m.num_experts else 0
    tp_comm = 0.0
    if L.tp > 1:
        allreduce = 2 * (L.tp - 1) / L.tp * sbh_bytes / nvlink
        # MoE recompute: each MoE block's forward exchange (one all-reduce's volume) runs again
        tp_comm = micro * (layers * passes + (stage_moe if L.recompute == "moe" else 0)) * allreduce
    cp_comm = 0.0
    if L.cp > 1:
        kv_bytes = 2.0 * 2 * s * L.micro_batch_size * m.kv_dim / L.tp
        bw = nvlink if L.tp * L.cp <= gpn else ib
        cp_comm = micro * layers * 3 * (L.cp - 1) * kv_bytes / bw
    ep_comm = 0.0
    if m.num_experts and L.ep > 1:
        a2a = m.moe_router_topk * sbh_bytes / L.tp * (L.ep - 1) / L.ep
        bw = nvlink if L.tp * L.cp * L.ep <= gpn else ib
        ep_passes = 6 if experts_again else 4
        ep_comm = micro * stage_moe * ep_passes * a2a / bw
    pp_p2p = 0.0
    if L.pp > 1:
        bw = ib if cluster.nodes > 1 else nvlink
        pp_p2p = (micro + L.pp - 1) * 2 * (sbh_bytes / (L.tp if L.sp else 1)) / bw

    first, last, experts, _ = _stage_params(m, L)
    dense = max(first, last)
    dp_comm = 0.0

    def reduce_time(params: float, group: int, span: int, again: bool) -> float:
        """``again``: these parameters' forward runs again in backward (FSDP2 gathers them again)."""
        if group <= 1:
            return 0.0
        bw = ib if span > gpn else nvlink
        frac = (group - 1) / group
        if L.fsdp2:
            gathers = 3 if again else 2
            return frac * (2.0 * gathers + 4.0) * params / bw
        if target.distributed_optimizer:
            return frac * (4.0 + 2.0) * params / bw
        return 2 * frac * 4.0 * params / bw

    d = L.dp * L.cp
    dp_comm += reduce_time(dense, d, L.tp * d, L.recompute == "full")
    edp = max(1, world // (L.pp * L.ep * L.etp))
    dp_comm += reduce_time(experts, edp, L.etp * L.ep * edp, experts_again)
    if target.overlap_grad_reduce:
        dp_comm *= 0.3
    # each rank issues its stage's layers for every micro-batch (full recompute: one more forward;
    # MoE recompute: one more forward of the MoE blocks, about half of a layer's launches)
    host_again = {"full": 1.0 / 3.0, "moe": stage_moe / layers / 6.0}.get(L.recompute, 0.0)
    host = micro * layers * target.host_s_per_layer * (1.0 + host_again) + target.host_s_per_step
    return TimeEstimate(compute=compute, pp_bubble=bubble, tp_comm=tp_comm, cp_comm=cp_comm, ep_comm=ep_comm,
                        pp_p2p=pp_p2p, dp_comm=dp_comm, model_flops=model_flops, tokens=tokens,
                        peak_flops=peak * world, host=host, mhc=mhc)


# ------------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------------

def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass
class _Search:
    feasible: List[Candidate]
    over_memory: List[Candidate]
    first_error: Optional[str]


class Planner:
    def __init__(self, cfg: TrainConfig, cluster: Cluster, vocab_size: int, target: str = "train"):
        if target not in TARGETS:
            raise ConfigError(f"target={target!r}: unknown plan target; use one of {sorted(TARGETS)}")
        for name, value in (("nodes", cluster.nodes), ("gpus_per_node", cluster.gpus_per_node)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be a positive integer; use an integer >= 1")
        self.cfg = cfg
        self.cluster = cluster
        self.target = TARGETS[target]
        if target == "train" and cfg.use_distributed_optimizer:
            # train with --use-distributed-optimizer: Adam states sharded over DP; FSDP2 excludes it
            self.target = dataclasses.replace(self.target, distributed_optimizer=True, fsdp2=False)
        self.model = ModelShape.from_config(cfg, vocab_size)
        self._structural: Dict[Tuple, Optional[str]] = {}

    # -- one candidate -----------------------------------------------------------------------------
    def _structural_error(self, L: Lanes) -> Optional[str]:
        """The lane-check message for this layout, or None if it is valid (before memory)."""
        m, c, world = self.model, self.cluster, self.cluster.world_size
        if L.world_size != world:
            return (f"tp*pp*cp*dp = {L.tp}*{L.pp}*{L.cp}*{L.dp} = {L.world_size} is not the world size "
                    f"{world} ({c.describe()})")
        # train's FSDP2 limits live in check_lanes; Megatron's own FSDP2 also composes with TP
        fsdp2_train = L.fsdp2 and self.target.name == "train"
        key = (L.tp, L.pp, L.cp, L.ep, L.etp, L.sp, L.micro_batch_size, fsdp2_train)
        if key not in self._structural:
            trial = dataclasses.replace(
                self.cfg, tensor_model_parallel_size=L.tp, pipeline_model_parallel_size=L.pp,
                context_parallel_size=L.cp, expert_model_parallel_size=L.ep,
                expert_tensor_parallel_size=L.etp if self.cfg.num_experts else None, sequence_parallel=L.sp,
                micro_batch_size=L.micro_batch_size, data_path=None, resume=False,
                use_torch_fsdp2=fsdp2_train)
            island = c.gpus_per_node
            if c.profile is not None:
                island = min(island, c.profile.gpus_per_nvlink_island)
            try:
                check_lanes(trial, world, island)
                self._structural[key] = None
            except ConfigError as e:
                self._structural[key] = str(e)
        err = self._structural[key]
        if err:
            return err
        t = self.target
        if L.fsdp2 and not t.fsdp2:
            return f"fsdp2 is not supported by target {t.name}; use dp"
        if L.fsdp2 and L.dp == 1:
            return "fsdp2 shards over data parallelism and the other lanes leave dp=1; use dp"
        if L.fsdp2 and (L.pp > 1 or L.ep > 1):
            return ("fsdp2 runs without pipeline or expert parallelism (Megatron's --use-torch-fsdp2 "
                    "asserts it too); use dp, or pp1 and ep1")
        if L.vpp > 1:
            if not t.vpp:
                return _NOT_IN_TRAIN["vpp"]
            if L.pp == 1:
                return f"vpp={L.vpp} needs pipeline parallelism (pp > 1); use vpp1"
            if m.num_layers % (L.pp * L.vpp):
                return (f"vpp={L.vpp}: pp*vpp = {L.pp * L.vpp} does not divide num_layers={m.num_layers}; "
                        "use a vpp with num_layers divisible by pp*vpp")
        if L.cp > 1:
            if not t.cp:
                return _NOT_IN_TRAIN["cp"]
            if m.seq_length % (2 * L.cp):
                return (f"cp={L.cp}: seq_length={m.seq_length} is not divisible by 2*cp (causal load "
                        f"balancing splits it into 2*cp chunks); use a cp with seq_length % (2*cp) == 0")
        # an MoE model's etp went through check_lanes above (the fused layer's 1-or-tp rule, its
        # widths, the expert grid); left here: a dense model, and the stock layer's widths
        if L.recompute == "moe" and not m.num_experts:
            return ("recompute-moe recomputes the MoE blocks and this model has no experts; use "
                    "recompute-selective or recompute-full")
        if L.etp > 1 or (m.num_experts and L.etp != L.tp):
            if not m.num_experts:
                return f"etp={L.etp}: expert tensor parallelism needs an MoE model; use etp1"
            if m.moe_ffn_hidden_size % L.etp:
                return f"etp={L.etp}: does not divide moe_ffn_hidden_size={m.moe_ffn_hidden_size}"
        return None

    def evaluate(self, L: Lanes) -> Candidate:
        mem = estimate_memory(self.model, L, self.cluster, self.target)
        tm = estimate_time(self.model, L, self.cluster, self.target) if self.cluster.profile else None
        return Candidate(L, mem, tm)

    # -- enumeration -------------------------------------------------------------------------------
    def _choices(self, pins: Dict[str, object]) -> Dict[str, List]:
        m, c, world, t = self.model, self.cluster, self.cluster.world_size, self.target
        gpn = c.gpus_per_node
        choices: Dict[str, List] = {}
        choices["tp"] = [d for d in _divisors(gpn) if world % d == 0]
        choices["pp"] = [d for d in _divisors(m.num_layers) if world % d == 0]
        cps = [1]
        if t.cp and m.seq_length >= 8192:
            cps += [d for d in (2, 4, 8, 16) if world % d == 0 and m.seq_length % (2 * d) == 0]
        choices["cp"] = cps
        choices["vpp"] = [1, 2] if t.vpp else [1]
        choices["ep"] = _divisors(m.num_experts) if m.num_experts else [1]
        choices["etp"] = None  # derived from tp below
        choices["fsdp2"] = [False, True] if t.fsdp2 else [False]
        if c.profile is None:  # nothing to size them against: keep the configuration's
            choices["micro_batch_size"] = [self.cfg.micro_batch_size]
            choices["recompute"] = [recompute_lane(self.cfg)]
        else:
            choices["micro_batch_size"] = [1, 2, 4, 8, 16]
            choices["recompute"] = ([None, "full"] + ([] if m.flash_attention else ["selective"])
                                    + (["moe"] if m.num_experts else []))
        choices["sp"] = None
        choices["dp"] = None
        for field, value in pins.items():
            choices[field] = [value]
        return choices

    def search(self, pins: Dict[str, object]) -> _Search:
        ch = self._choices(pins)
        m, world = self.model, self.cluster.world_size
        feasible: List[Candidate] = []
        over: List[Candidate] = []
        first_error: Optional[str] = None
        for tp in ch["tp"]:
            sps = ch["sp"] or [tp > 1]
            etps = ch["etp"] or (sorted({1, tp}) if m.num_experts else [1])
            for pp in ch["pp"]:
                for cp in ch["cp"]:
                    if ch["dp"]:
                        dps = ch["dp"]
                    else:
                        dps = [world // (tp * pp * cp)] if world % (tp * pp * cp) == 0 else [0]
                    for dp in dps:
                        for vpp, ep, etp, fsdp2, mbs, rc, sp in _product(
                                ch["vpp"], ch["ep"], etps, ch["fsdp2"], ch["micro_batch_size"],
                                ch["recompute"], sps):
                            # unpinned micro-batches that do not divide the batch are not layouts
                            if len(ch["micro_batch_size"]) > 1 and dp and m.global_batch_size % (mbs * dp):
                                continue
                            if not dp:
                                L = Lanes(tp, sp, pp, vpp, cp, ep, etp, 1, fsdp2, mbs, rc)
                                err = (f"tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp} does not divide the world "
                                       f"size {world} ({self.cluster.describe()})")
                            else:
                                L = Lanes(tp, sp, pp, vpp, cp, ep, etp, dp, fsdp2, mbs, rc)
                                err = self._structural_error(L)
                            if err:
                                first_error = first_error or err
                                continue
                            cand = self.evaluate(L)
                            (feasible if cand.memory.fits else over).append(cand)
        return _Search(feasible, over, first_error)

    @staticmethod
    def best(cands: List[Candidate]) -> Candidate:
        fastest = min(c.key_time() for c in cands)
        near = [c for c in cands if c.key_time() <= fastest * (1 + _TIE)]
        return min(near, key=lambda c: (_simplicity(c.lanes), c.key_time()))

    # -- the plan ----------------------------------------------------------------------------------
    def plan(self, spec: Optional[str] = None, pins: Optional[Dict[str, object]] = None) -> "LaunchPlan":
        pins = dict(parse_lanes(spec) if pins is None else pins)
        spec_text = spec if spec is not None else pins_spec(pins)
        found = self.search(pins)
        if found.feasible:
            chosen = self.best(found.feasible)
            return LaunchPlan(self, chosen, pins, found.feasible + found.over_memory)
        if found.over_memory:
            low = min(found.over_memory, key=lambda c: c.memory.total)
            cap = self.cluster.profile.hbm_bytes / GIB
            reason = (f"memory estimate {low.memory.total / GIB:.1f} GiB per GPU (best case, "
                      f"{low.lanes.spec()}) is over the {cap:.1f} GiB of {self.cluster.profile.name}")
        else:
            reason = found.first_error or "no layout satisfies these lanes"
        if not pins:
            raise PlanError(f"lanes='auto': {reason}; use more GPUs or nodes, a shorter sequence or a "
                            "smaller model")
        raise PlanError(f"lanes={spec_text!r}: {reason}; nearest valid choice: {self._nearest(pins)}")

    def _nearest(self, pins: Dict[str, object]) -> str:
        """The smallest change of the pins (fewest lanes, then log distance for sizes) that leaves a
        working plan; the planner's own pick among the plans with those pin values."""
        import itertools

        def distance(field: str, old: object, new: object) -> float:
            if isinstance(old, bool) or old is None or isinstance(old, str) or new is None:
                return 0.0 if new == old else 1.0
            return abs(math.log2(new) - math.log2(old))

        for size in (1, 2):
            options = []
            for freed in itertools.combinations(pins, size):
                rest = {k: v for k, v in pins.items() if k not in freed}
                for cand in self.search(rest).feasible:
                    new = tuple(getattr(cand.lanes, f) for f in freed)
                    dist = sum(distance(f, pins[f], n) for f, n in zip(freed, new))
                    options.append((dist, cand.key_time(), freed, new))
            if options:
                break
        else:
            return "none close to these pins; try 'auto'"
        _, _, freed, new = min(options, key=lambda o: (o[0], o[1]))
        changed = dict(zip(freed, new))
        pinned = dict(pins, **changed)
        cand = self.best(self.search(pinned).feasible)
        mem = cand.memory
        fit = f", {mem.total / GIB:.1f} of {mem.capacity / GIB:.1f} GiB" if mem.capacity else ""
        return f"{pins_spec(changed)} (lanes {pins_spec(pinned)} -> {cand.lanes.spec()}{fit})"


def _pin_text(field: str, value: object) -> str:
    return pins_spec({field: value})


def _product(*lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(*lists[1:]):
            yield (head,) + tail


# ------------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------------

class LaunchPlan:
    def __init__(self, planner: Planner, chosen: Candidate, pins: Dict[str, object], pool: List[Candidate]):
        self.planner = planner
        self.lanes = chosen.lanes
        self.memory = chosen.memory
        self.time = chosen.time
        self.pins = pins
        self.reasons = _reasons(planner, chosen, pins, pool)

    @property
    def model(self) -> ModelShape:
        return self.planner.model

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the lane fields of this plan (what ``train --lanes`` runs)."""
        L = self.lanes
        for field, bad in (("vpp", L.vpp > 1), ("cp", L.cp > 1)):
            if bad:
                raise ConfigError(f"lanes={L.spec()!r}: {_NOT_IN_TRAIN[field]}")
        values = dict(use_torch_fsdp2=L.fsdp2, tensor_model_parallel_size=L.tp, pipeline_model_parallel_size=L.pp,
                      context_parallel_size=L.cp, expert_model_parallel_size=L.ep, sequence_parallel=L.sp,
                      expert_tensor_parallel_size=L.etp if cfg.num_experts else None,
                      micro_batch_size=L.micro_batch_size,
                      recompute_granularity="selective" if L.recompute == "moe" else L.recompute)
        if L.recompute == "full" and cfg.recompute_granularity != "full":
            values.update(recompute_method="uniform", recompute_num_layers=1)
        if L.recompute == "moe":
            mods = parse_recompute_modules(cfg.recompute_modules) if cfg.recompute_granularity == "selective" else []
            want = ["moe"] + ([] if self.model.flash_attention else ["core_attn"])
            values["recompute_modules"] = ",".join(mods + [x for x in want if x not in mods])
        return dataclasses.replace(cfg, **values)

    # -- output ------------------------------------------------------------------------------------
    def rows(self) -> List[Tuple[str, str, str]]:
        L = self.lanes
        micro = self.model.global_batch_size // (L.micro_batch_size * L.dp)
        values = {
            "tp": str(L.tp), "sp": "on" if L.sp else "off", "pp": str(L.pp), "vpp": str(L.vpp),
            "cp": str(L.cp), "ep": str(L.ep), "etp": str(L.etp),
            "dp": f"{L.dp} ({'fsdp2' if L.fsdp2 else 'replicated'})",
            "micro_batch_size": f"{L.micro_batch_size} ({micro} per step per DP rank)",
            "recompute": L.recompute or "none",
        }
        return [(lane, values[lane], self.reasons[lane]) for lane in values]

    def to_json(self) -> dict:
        mem, tm = self.memory, self.time
        out = {
            "lanes": dataclasses.asdict(self.lanes),
            "spec": self.lanes.spec(),
            "pinned": pins_spec(self.pins),
            "target": self.planner.target.name,
            "cluster": {"nodes": self.planner.cluster.nodes, "gpus_per_node": self.planner.cluster.gpus_per_node,
                        "world_size": self.planner.cluster.world_size,
                        "hardware": self.planner.cluster.profile.name if self.planner.cluster.profile else None},
            "model": {**dataclasses.asdict(self.model), "total_params": self.model.total_params(),
                      "active_params": self.model.active_params()},
            "reasons": dict(self.reasons),
            "memory_gib": {
                "weights": mem.weights / GIB, "grads": mem.grads / GIB, "optimizer": mem.optimizer / GIB,
                "activations": mem.activations / GIB,
                "activations_by_recompute": {k: v / GIB for k, v in mem.activations_by_policy.items()},
                "attention_workspace": mem.attention_workspace / GIB, "overhead": mem.overhead / GIB,
                "total": mem.total / GIB,
                "capacity": mem.capacity / GIB if mem.capacity else None,
            },
            "time_s": None,
        }
        if tm is not None:
            out["time_s"] = {"compute": tm.compute, "mhc": tm.mhc, "pp_bubble": tm.pp_bubble, "tp_comm": tm.tp_comm,
                             "cp_comm": tm.cp_comm, "ep_comm": tm.ep_comm, "pp_p2p": tm.pp_p2p,
                             "dp_comm": tm.dp_comm, "gpu": tm.gpu, "host": tm.host,
                             "host_bound": tm.host_bound, "step": tm.total}
            out["tokens_per_s"] = tm.tokens_per_s
            out["mfu"] = tm.mfu
        return out

    def table(self) -> str:
        m, c, mem, tm = self.model, self.planner.cluster, self.memory, self.time
        active = (f", {m.active_params() / 1e9:.2f}B active" if m.num_experts else "")
        lines = [f"megatron-ext plan | {m.total_params() / 1e9:.2f}B params{active} | {c.describe()} "
                 f"(world {c.world_size}) | seq {m.seq_length} | global batch {m.global_batch_size} | "
                 f"target {self.planner.target.name}",
                 f"lanes: {self.lanes.spec()}   (pinned: {pins_spec(self.pins)})", ""]
        rows = [("lane", "value", "why")] + self.rows()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        for lane, value, why in rows:
            lines.append(f"{lane:<{w0}}  {value:<{w1}}  {why}")
        lines.append("")
        by = mem.activations_by_policy
        cap = f" of {mem.capacity / GIB:.1f} GiB ({'fits' if mem.fits else 'OVER'})" if mem.capacity else \
            " (no hardware profile: not checked)"
        lines.append(f"memory per GPU (GiB): weights {mem.weights / GIB:.2f} | grads {mem.grads / GIB:.2f} | "
                     f"optimizer {mem.optimizer / GIB:.2f} | activations {mem.activations / GIB:.2f} "
                     f"(recompute none {by['none'] / GIB:.2f}, selective {by['selective'] / GIB:.2f}, "
                     + (f"moe {by['moe'] / GIB:.2f}, " if "moe" in by else "")
                     + f"full {by['full'] / GIB:.2f}) | attention workspace {mem.attention_workspace / GIB:.2f} | "
                     f"overhead {mem.overhead / GIB:.2f} | total {mem.total / GIB:.2f}{cap}")
        if tm is not None:
            lines.append(f"step time (s): compute {tm.compute:.3f} | "
                         + (f"mhc mixers {tm.mhc:.3f} | " if tm.mhc else "")
                         + f"pp bubble {tm.pp_bubble:.3f} | "
                         f"tp {tm.tp_comm:.3f} | cp {tm.cp_comm:.3f} | ep a2a {tm.ep_comm:.3f} | "
                         f"pp p2p {tm.pp_p2p:.3f} | dp reduce {tm.dp_comm:.3f} | GPU {tm.gpu:.3f} | "
                         f"host floor {tm.host:.3f} | step {tm.total:.3f}"
                         f"{' (host-bound: few FLOPs per kernel launch)' if tm.host_bound else ''} "
                         f"-> {tm.tokens_per_s:,.0f} tokens/s, MFU {100 * tm.mfu:.0f}%")
        else:
            lines.append("step time: no hardware profile, not estimated")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# reasons
# ------------------------------------------------------------------------------------------------

def _reasons(planner: Planner, chosen: Candidate, pins: Dict[str, object], pool: List[Candidate]) -> Dict[str, str]:
    L = chosen.lanes
    m, c = planner.model, planner.cluster
    out: Dict[str, str] = {}
    if c.profile is None:
        text = "no hardware profile: the simplest layout the lane checks accept"
        for lane in ("tp", "sp", "pp", "vpp", "cp", "ep", "etp", "dp"):
            out[lane] = "pinned" if _pinned(lane, pins) else text
        out["micro_batch_size"] = "pinned" if "micro_batch_size" in pins else "kept from the configuration"
        out["recompute"] = "pinned" if "recompute" in pins else "kept from the configuration"
        if L.sp:
            out["sp"] = ("pinned; " if "sp" in pins else "") + "on with TP: shards norm/dropout activations"
        return out

    def gib(cand: Candidate) -> str:
        return f"{cand.memory.total / GIB:.1f} GiB"

    def versus(alt_filter, label: str) -> str:
        alts = [x for x in pool if alt_filter(x.lanes)]
        if not alts:
            return ""
        # compare like with like: keep the chosen data-parallel mode when the alternative has it
        same_mode = [x for x in alts if x.lanes.fsdp2 == L.fsdp2]
        if any(x.memory.fits for x in same_mode) or not any(x.memory.fits for x in alts):
            alts = same_mode or alts
        fitting = [x for x in alts if x.memory.fits]
        if not fitting:
            low = min(alts, key=lambda x: x.memory.total)
            return f"{label} needs {gib(low)} > {low.memory.capacity / GIB:.1f} GiB"
        best = Planner.best(fitting)
        tie = " (within 3%: the simpler plan wins)" if best.key_time() < chosen.key_time() else ""
        return f"{label} est. {best.key_time():.2f} s/step vs {chosen.key_time():.2f} s{tie}"

    island = min(c.gpus_per_node, c.profile.gpus_per_nvlink_island)
    # tp
    if L.tp > 1:
        why = versus(lambda x: x.tp < L.tp, f"TP<{L.tp}")
        out["tp"] = f"within one NVLink island ({island} GPUs); " + (why or "smallest TP the lane checks allow")
    else:
        out["tp"] = "fits without TP: no per-layer all-reduces"
    out["sp"] = ("on with TP: norm/dropout activations split by TP at the same communication volume"
                 if L.sp else ("off: TP=1" if L.tp == 1 else "off (pinned)"))
    # pp
    if L.pp > 1:
        cross = "across nodes" if c.world_size // L.pp >= c.gpus_per_node and c.nodes > 1 else "inside a node"
        out["pp"] = f"stages {cross}; " + (versus(lambda x: x.pp < L.pp, f"PP<{L.pp}") or "needed")
    else:
        out["pp"] = "one stage: no pipeline bubble"
    if L.vpp > 1:
        out["vpp"] = _joined("interleaving shrinks the bubble to (pp-1)/(vpp*m)",
                             versus(lambda x: x.vpp < L.vpp, "vpp=1"))
    else:
        out["vpp"] = "no interleaving" + (" (target does not support it)" if not planner.target.vpp else "")
    if L.cp > 1:
        out["cp"] = _joined(f"seq {m.seq_length} split over {L.cp} ranks", versus(lambda x: x.cp < L.cp, f"CP<{L.cp}"))
    else:
        out["cp"] = "whole sequence on each rank"
    if m.num_experts:
        share = m.moe_layers() * m.expert_params() / m.total_params()
        head = f"experts are {100 * share:.0f}% of the parameters; "
        if L.ep > 1:
            where = "NVLink" if L.tp * L.cp * L.ep <= c.gpus_per_node else "IB"
            out["ep"] = head + _joined(f"all-to-all over {where}", versus(lambda x: x.ep < L.ep, f"EP<{L.ep}"))
        else:
            out["ep"] = head + "replicated experts fit and skip the all-to-all"
        out["etp"] = ("experts split by TP too" if L.etp > 1 else "whole experts per EP rank (no expert TP)")
    else:
        out["ep"] = "dense model"
        out["etp"] = "dense model"
    if L.fsdp2:
        out["dp"] = (f"FSDP2 shards weights/grads/Adam over {L.dp} ranks; "
                     + versus(lambda x: not x.fsdp2, "replicated DP"))
    else:
        opt = ("distributed optimizer shards Adam states over DP"
               if planner.target.distributed_optimizer else "replicated weights and Adam states")
        out["dp"] = f"the rest of the world; {opt}"
    mbs = L.micro_batch_size
    alt = versus(lambda x: x.micro_batch_size == mbs * 2, f"mbs={mbs * 2}")
    why_mbs = 'largest that helps' if mbs > 1 else 'smallest bubble and memory'
    if chosen.time is not None and chosen.time.host_bound:
        why_mbs += " (host-bound: fewer micro-batches, fewer kernel launches per token)"
    out["micro_batch_size"] = why_mbs + (f"; {alt}" if alt else "")
    if L.recompute == "full":
        out["recompute"] = "full: " + (_joined(
            versus(lambda x: x.recompute is None, "no recompute"),
            versus(lambda x: x.recompute == "moe", "MoE recompute") if m.num_experts else "")
            or "every layer's forward runs again in backward")
    elif L.recompute == "selective":
        out["recompute"] = "selective: attention scores recomputed"
    elif L.recompute == "moe":
        by = chosen.memory.activations_by_policy
        out["recompute"] = _joined(
            f"moe: the MoE blocks run their forward again in backward (--recompute-granularity selective "
            f"--recompute-modules moe), activations {by['moe'] / GIB:.1f} GiB",
            versus(lambda x: x.recompute is None, "no recompute"),
            versus(lambda x: x.recompute == "full", "full recompute"))
    else:
        by = chosen.memory.activations_by_policy
        out["recompute"] = (f"activations fit ({by['none'] / GIB:.1f} GiB); full recompute would cost "
                            "an extra forward")
    for lane in list(out):
        if _pinned(lane, pins):
            out[lane] = "pinned; " + out[lane]
    return out


def _joined(*parts: str) -> str:
    """Reason parts that are not empty, "; "-separated (a comparison is empty when the pins leave
    nothing to compare with)."""
    return "; ".join(p for p in parts if p)


def _pinned(lane: str, pins: Dict[str, object]) -> bool:
    return lane in pins or (lane == "dp" and "fsdp2" in pins)


def plan_for_config(cfg: TrainConfig, nodes: int, gpus_per_node: int, profile: Optional[HardwareProfile],
                    vocab_size: int, spec: Optional[str] = None, target: str = "train",
                    pins: Optional[Dict[str, object]] = None) -> LaunchPlan:
    return Planner(cfg, Cluster(nodes, gpus_per_node, profile), vocab_size, target).plan(spec, pins)
