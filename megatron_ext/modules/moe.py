"""Fused MoE layer for Megatron: route (fp32) -> sort by expert -> grouped expert FFN -> weighted
combine, with expert parallelism over an all-to-all, routing trace/replay and a deterministic mode.

Math (Switch Transformer eq. 1-2, arXiv 2101.03961; DeepSeekMoE shared experts, arXiv 2401.06066)::

    l = x W_r^T  (fp32)           p, idx = route(l)          (megatron_ext.ops.moe.routing)
    y_t = sum_j p[t, j] * FFN_{idx[t, j]}(x_t)  +  g_t * FFN_shared(x_t)
    g_t = sigmoid(x_t . w_g) with Megatron's moe_shared_expert_gate, else 1
    FFN_e(x) = (act(x W1_e[:, :F]) * x W1_e[:, F:]) W2_e      (Megatron's GLU order [gate | up])

Megatron's variants, as its MoELayer has them: ``moe_apply_probs_on_input`` (top-1: ``y_t =
FFN_e(p_t x_t)``, the gate on the expert's input); ``moe_latent_size`` L (the routed experts run at
width L between ``latent_w1 [H, L]`` before the dispatch and ``latent_w2 [L, H]`` after the
combine; the router and the shared expert read ``x``); the benchmark routers
``moe_router_force_load_balancing`` (random logits from Megatron's expert-parallel RNG, the
gradient handed to the real logits) and ``moe_router_force_biased`` (random logits plus a random
per-expert bias shared by all ranks).

Megatron's RouterReplay (``moe_enable_routing_replay``): the layer registers an instance as
Megatron's router does, and its RECORD / REPLAY_FORWARD / REPLAY_BACKWARD actions act on this
layer's selection; each rank records and replays its own ``[s/tp * b, k]`` tokens (see
``_replayed_ids``).

Drop-in for the ``mlp`` submodule of a TransformerLayer spec on megatron-core 0.16.1 and 0.19.2:
called as ``mlp(hidden_states [s, b, h], padding_mask=...)``, returns ``(output [s, b, h], None)``.
``padding_mask`` (``[b, s]``, True = padding, as Megatron passes it) leaves padding tokens out of
the load, the aux losses and the z-loss, as Megatron's router does; they are still routed.
Experts live as grouped weights ``w1 [E_local, H, 2F]``, ``w2 [E_local, F, H]`` drawn from a
generator seeded by (seed, layer, *global* expert id), so every EP size builds the same model;
they carry Megatron's expert-parallel tag (``allreduce=False``) where Megatron's expert linears do
(:func:`expert_parallel_tag`), so DDP reduces their grads over the expert-data-parallel group and
Megatron's optimizer keeps them in its expert part; elsewhere that group is the dense one and they
are plain parameters, so a checkpoint's optimizer state has the shape Megatron's MoELayer gives it.
The aux-loss-free expert bias (DeepSeek-V3 §2.1.2) and the quantile-balancing bias are fp32
buffers moved once per optimizer step from the step's load (or quantile) over the data-parallel
ranks: by Megatron's ``finalize_model_grads``, which finds them under its own router's attribute
names, or by :func:`moe_step_end` where that did not run.

EP > 1 (token dispatch like Megatron's alltoall dispatcher, GShard §3.2): pairs sorted by expert,
per-rank counts exchanged (the one host sync: ``all_to_all_single`` needs split sizes on the
host), rows + probs exchanged, each rank runs its local experts on the received rows with k=1
(weighted by their probs), rows go back, and each token sums its k results in choice order.
The sorted rows are made and summed back by ``ops.moe.pairs`` (``gather_rows`` /
``combine_rows``): one fixed-order fp32 pass each way, reading through the inverse permutation,
in place of fp32 pair rows built by an index copy and an atomic index-add in backward.

Expert tensor parallelism (Megatron's expert-TP with sequence parallel, Shoeybi et al. 2019 §3;
Korthikanti et al. 2022 §4.2.2): the layer input is ``[s/tp, b, h]``. Router logits are computed
on the local tokens (so the router's gradient is a TP partial sum, reduced by Megatron like any
``sequence_parallel`` parameter) and all-gathered; the tokens are all-gathered too, so every TP
rank routes the same ``[s, b]`` tokens identically. Each TP rank holds columns ``F/tp`` of every
local expert (and of the shared expert), ``w1 = [gate_r | up_r]`` and the matching rows of
``w2``; its output is a partial sum that a reduce-scatter turns back into ``[s/tp, b, h]``.
Losses computed from the gathered logits are identical on the TP ranks, so each rank attaches
``1/tp`` of them (the gather's backward sums the TP ranks). With EP > 1 as well, the EP group
links ranks of equal TP rank (Megatron's default expert_tensor_parallel_size = TP), and each
exchanges the same rows with its EP peers and computes its own ``F/tp`` slice.

Without expert TP (``expert_tensor_parallel_size = 1`` with TP > 1, Megatron's "MoE parallel
folding"): the logits are all-gathered and routed as above (same routing, losses and capacity as
at TP = 1), but the tokens are not: every rank holds whole experts (and a whole shared expert) and
runs only its own ``s/tp`` tokens, so no reduce-scatter follows. The expert-DP group then contains
the TP ranks (Megatron's expert grid ETP x EP x EDP), so DDP sums their expert gradients; the
shared expert is marked ``sequence_parallel`` so Megatron sums its gradient over TP. With EP > 1
the EP group is made of ranks holding different tokens, so each dispatches only its own.

Overlap: with EP > 1 the dispatch all-to-alls are launched asynchronously and the shared expert
runs before waiting on them.

Selective recompute (Megatron's ``--recompute-granularity selective --recompute-modules``, read
from the TransformerConfig): ``moe`` checkpoints everything after the router (sort, EP exchanges,
experts, combine, shared expert; the router, its losses, trace and statistics run once),
``shared_experts`` the shared expert, ``moe_act`` drops the expert activation's output until the
backward needs it (``ops.moe.recompute``; the Triton experts never keep it).

Deterministic mode: every GEMM runs on fixed 16-row chunks (a GEMM's per-row result depends on
its shape, not on the other rows), the combine is a fixed-order sum over the k choices, no
atomics: the layer's output for a token is bitwise the same whatever batch it comes in, for
routers whose selection is per token (no capacity dropping, Sinkhorn or training noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_ext import backends, compat
from megatron_ext.config import (ConfigError, MoEConfig, check_expert_tp, check_expert_widths,
                                 check_megatron_moe_options, moe_recompute_modules,
                                 router_config_from)
from megatron_ext.observability.moe_stats import STATE, fp8_saturation
from megatron_ext.ops.moe import batch_invariant, moe_ffn
from megatron_ext.ops.moe.autograd import track_zeroed_main_grad
from megatron_ext.ops.moe.pairs import combine_rows, gather_rows, inverse_order
from megatron_ext.ops.moe.recompute import recomputed_activation
from megatron_ext.ops.moe.reference import GATED_ACTIVATIONS, expert_activation
from megatron_ext.ops.moe.routing import route, seq_ids_for_layout, update_expert_bias, update_qb_beta

Tensor = torch.Tensor
DET_CHUNK = 16
_AUX_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
              "global_aux_loss": "global_load_balancing_loss"}


def activation_name(config) -> str:
    """Megatron's (gated_linear_unit, activation_func) -> an activation name of ``moe_ffn``."""
    fn = getattr(config, "activation_func", F.gelu)
    name = getattr(fn, "__name__", "")
    base = {"silu": "silu", "gelu": "gelu", "relu": "relu", "squared_relu": "squared_relu"}.get(name)
    if base is None:
        raise ValueError(f"activation_func={name or fn!r}: the fused MoE layer knows silu, gelu, relu "
                         "and squared_relu; use one of those or --moe-impl megatron")
    if getattr(config, "gated_linear_unit", False):
        gated = {"silu": "swiglu", "gelu": "geglu"}.get(base)
        if gated is None:
            raise ValueError(f"activation_func={name!r} with gated_linear_unit=True: no gated form in "
                             f"the fused MoE layer; use silu (swiglu) or gelu (geglu)")
        return gated
    return base


def expert_parallel_tag(ep_size: int, etp_size: int, tp_size: int) -> bool:
    """Whether expert weights are expert-parallel parameters (``allreduce=False``): Megatron's rule
    for its expert linears (megatron-core 0.19's; 0.16 looks at EP alone), EP > 1 or an expert TP
    other than TP. Only then does the expert-data-parallel group differ from the dense one."""
    return ep_size > 1 or etp_size != tp_size


def _expert_seed(seed: int, layer: int, expert: int, which: str) -> int:
    digest = hashlib.sha256(f"{seed}/{layer}/{expert}/{which}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rows_mm(a: Tensor, w: Tensor, deterministic: bool) -> Tensor:
    """``a [n, K] @ w [K, N]``; deterministic: a row's result does not depend on how many rows
    come with it. On CUDA one Triton GEMM of fixed tiling (``ops.moe.invariant_mm``), elsewhere
    one library GEMM per zero-padded 16-row chunk."""
    if not deterministic:
        return a @ w
    if a.is_cuda and compat.HAVE_TRITON:
        from megatron_ext.ops.moe import invariant_mm

        if invariant_mm.usable(a):
            backends.note("moe.deterministic_gemm", "auto", "triton",
                          "the deterministic mode's GEMMs outside the Triton experts on one fixed tiling")
            return invariant_mm.invariant_mm(a, w)
    return _chunks_mm(_pad_rows(a), w, a.shape[0])


def _pad_rows(a: Tensor) -> Tensor:
    """``a [n, K]`` zero-padded to a multiple of the deterministic chunk's rows."""
    return F.pad(a, (0, 0, 0, (-a.shape[0]) % DET_CHUNK))


def _chunks_mm(padded: Tensor, w: Tensor, n: int) -> Tensor:
    """The first ``n`` rows of ``padded @ w``, one 16-row chunk per GEMM."""
    a = padded.view(-1, DET_CHUNK, padded.shape[1])
    out = torch.cat([a[i] @ w for i in range(a.shape[0])], dim=0) if a.shape[0] else a.new_zeros(0, w.shape[1])
    return out[:n]


def _rng_fork(name: str):
    """Megatron's model-parallel RNG tracker forked to ``name`` where it was seeded (training and
    tests seed it), else the default generator."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return tracker.fork(name) if name in tracker.get_states() else contextlib.nullcontext()


class _RandomLogits(torch.autograd.Function):
    """Random router logits (Megatron's RandomSTE: ``normal_`` on a copy, from the expert-parallel
    RNG); backward hands the gradient to the real logits unchanged."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        with _rng_fork("expert-parallel-rng"):
            return logits.clone().normal_()

    @staticmethod
    def backward(ctx, g: Tensor):
        return g


class _RouterLogits(torch.autograd.Function):
    """fp32 logits ``x @ w^T`` from 16-bit ``x [T, H]`` and ``w [E, H]`` on the tensor cores: the
    products of 16-bit values are exact in fp32 and the sums run in fp32, so this is the fp32
    router GEMM (Megatron's ``moe_router_dtype=fp32``) without upcast copies of x or an fp32
    (non-tensor-core) GEMM. Backward splits the fp32 logit gradient into two 16-bit terms
    (``hi + lo``, ~16 mantissa bits) and runs each GEMM once over both, fp32 accumulation."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        E = w.shape[0]
        hi = g.to(x.dtype)
        hl = torch.cat([hi, (g - hi.float()).to(x.dtype)], dim=1)          # [T, 2E]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = hl @ torch.cat([w, w], dim=0)                             # [T, H]
        if ctx.needs_input_grad[1]:
            d2 = torch.mm(hl.t(), x, out_dtype=torch.float32)              # [2E, H]
            dw = (d2[:E] + d2[E:]).to(w.dtype)
        return dx, dw


_MM_OUT_DTYPE: Dict[str, Optional[str]] = {}


def _mm_out_dtype_why(x: Tensor) -> Optional[str]:
    """None where ``torch.mm(..., out_dtype=float32)`` runs for 16-bit CUDA inputs, else why not
    (probed once per device type and dtype)."""
    key = f"{x.device.type}/{x.dtype}"
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(16, 16, dtype=x.dtype, device=x.device)
            torch.mm(a, a, out_dtype=torch.float32)
            _MM_OUT_DTYPE[key] = None
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            _MM_OUT_DTYPE[key] = f"torch.mm(out_dtype=float32) unavailable: {str(exc).splitlines()[0][:120]}"
    return _MM_OUT_DTYPE[key]


def router_logits(x: Tensor, w: Tensor, deterministic: bool = False) -> Tensor:
    """fp32 router logits ``x [T, H] @ w [E, H]^T``. 16-bit CUDA inputs (not deterministic): one
    tensor-core GEMM with fp32 output (:class:`_RouterLogits`). Otherwise (CPU, fp32 weights,
    the deterministic mode's fixed-chunk GEMM) x and w are upcast and multiplied in fp32; on CUDA
    that fallback is logged once and in the run receipt."""
    lane_ok = x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
    if lane_ok and not deterministic:
        why = _mm_out_dtype_why(x)
        if why is None:
            return _RouterLogits.apply(x, w)
        backends.fallback("moe.router_logits", "16-bit GEMM, fp32 out", "fp32 GEMM", why)
    return rows_mm(x.float(), w.float().t(), deterministic)


def _ffn_rows_deterministic(rows: Tensor, local_ids: Tensor, probs: Tensor, w1: Tensor, w2: Tensor,
                            activation: str, recompute_activation: bool = False) -> Tensor:
    """Expert FFN of each row ``rows [n, H]`` for its expert ``local_ids [n]``, weighted by its
    gate ``probs [n]`` in fp32 (``[n, H]`` fp32: the caller sums a token's rows in that dtype);
    ``recompute_activation``: the padded activation output the chunked GEMM saves is rebuilt in
    backward instead of kept (``ops.moe.recompute``)."""
    out = rows.new_zeros(rows.shape[0], w2.shape[2])
    for e in range(w1.shape[0]):
        sel = (local_ids == e).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        a = rows_mm(rows[sel], w1[e], True)
        if recompute_activation:
            hp, state = recomputed_activation(a, lambda t: _pad_rows(expert_activation(t, activation)))
            y = state.release(_chunks_mm(hp, w2[e], sel.numel()))
        else:
            y = rows_mm(expert_activation(a, activation), w2[e], True)
        out = out.index_copy(0, sel, y)
    return out.float() * probs[:, None].float()


class _Pending:
    """Handles of asynchronous collectives launched in a forward pass, and the send buffers they
    read (kept alive until the wait)."""

    def __init__(self):
        self.works, self.keep = [], []

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.keep = [], []


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits (the combine); its gradient is the reverse
    exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        torch.distributed.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        torch.distributed.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _Dispatch(torch.autograd.Function):
    """The dispatch of token rows and their gates as ONE autograd node, launched asynchronously
    (``async_op=True``): its outputs must not be read before ``pending.wait()`` (on NCCL the
    exchange runs on the communicator's stream while the caller's stream computes the shared
    expert; on gloo on a background thread). As two nodes, autograd
    ran their reverse exchanges in whichever order their gradients became ready, which depends on
    the routing (an expert with no rows changes the graph), so two ranks could issue the two
    all-to-alls in opposite orders: NCCL hangs and gloo aborts on the size mismatch. One node
    issues both reverse exchanges in a fixed order on every rank."""

    @staticmethod
    def forward(ctx, rows: Tensor, gates: Tensor, out_splits: List[int], in_splits: List[int], group,
                pending: _Pending):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        outs = []
        for t in (rows.contiguous(), gates.contiguous()):
            out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
            pending.works.append(torch.distributed.all_to_all_single(out, t, out_splits, in_splits,
                                                                     group=group, async_op=True))
            pending.keep.append(t)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_rows: Tensor, g_gates: Tensor):
        out_splits, in_splits = ctx.splits
        grads = []
        for g in (g_rows, g_gates):  # materialised (zeros) when unused: both exchanges always run
            back = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
            torch.distributed.all_to_all_single(back, g.contiguous(), in_splits, out_splits, group=ctx.group)
            grads.append(back)
        return grads[0], grads[1], None, None, None, None


class CommTimer:
    """Times the EP all-to-alls of a layer (set ``layer.comm_timer = CommTimer()``): CUDA events
    on the compute stream around launch..wait on GPU, wall clock on CPU. ``records`` holds
    ``(name, seconds, bytes sent to other ranks)``; read it after :meth:`resolve`."""

    def __init__(self):
        self.records: list = []
        self._open: dict = {}

    def start(self, name: str, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open[name] = ev
        else:
            self._open[name] = time.perf_counter()

    def stop(self, name: str, nbytes: int) -> None:
        t0 = self._open.pop(name)
        if isinstance(t0, float):
            self.records.append((name, time.perf_counter() - t0, nbytes))
        else:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.records.append((name, (t0, ev), nbytes))

    def resolve(self) -> list:
        """Seconds for every record (synchronises on the CUDA events)."""
        out = []
        for name, t, nbytes in self.records:
            if isinstance(t, tuple):
                t[1].synchronize()
                t = t[0].elapsed_time(t[1]) / 1e3
            out.append((name, t, nbytes))
        self.records = out
        return out


def _tp_cols(full: Tensor, parts: int, rank: int, size: int) -> Tensor:
    """Columns of TP rank ``rank`` from ``full [..., parts * F]`` laid out ``[gate | up]``
    (``parts`` = 2) or ``[F]`` (1): ``[gate_r | up_r]``, each ``F/size`` wide (Megatron's GLU
    sharding: gate and up split the same way, so ``act(gate_r) * up_r`` stays rank-local)."""
    per = full.shape[-1] // parts // size
    return full.unflatten(-1, (parts, size, per)).select(-2, rank).flatten(-2)


def _refuse_flattened(key: str, flattened_range) -> None:
    """The expert weights' checkpoint factories build whole shards only."""
    if flattened_range is not None:
        raise NotImplementedError(f"{key}: flattened (distributed-optimizer) checkpoint shards of "
                                  "fused MoE weights are not supported; use the plain optimizer")


def _reshaping_factory(key: str, param: Tensor, view_shape, axes, sharded_offsets, replica_id):
    """A checkpoint entry for ``param`` saved as ``param.view(view_shape)`` sharded along
    ``axes`` = [(view axis, rank, fragments)]: the GLU's ``[gate_r | up_r]`` columns become a
    ``[..., 2, F/tp]`` view, so the global tensor ``[..., 2, F]`` is the same at every TP size.
    A factory keeps ``param`` itself as the data, which Megatron's optimizer needs to map its
    state onto the same sharding."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    prepend = len(sharded_offsets)
    shape = tuple(param.shape)

    def build(k, t, rid, flattened_range):
        _refuse_flattened(k, flattened_range)
        return ShardedTensor.from_rank_offsets(
            k, t.view(view_shape), *sharded_offsets, *[(prepend + a, r, n) for a, r, n in axes],
            replica_id=rid, prepend_axis_num=prepend)

    def merge(loaded):
        return loaded.reshape(shape)

    return ShardedTensorFactory(key, param, build, merge, replica_id)


class FusedMoELayer(MegatronModule):
    """Megatron ``mlp`` submodule: router + grouped experts (+ shared expert); see module doc."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None,
                 pg_collection=None, is_mtp_layer: bool = False, **_ignored):
        super().__init__(config=config)
        # inside a multi-token-prediction layer (megatron-core 0.19 says so and numbers the layer
        # from 1 within its MTP depth; 0.16.1 numbers it num_layers + depth): see _global_number
        self.is_mtp_layer = bool(is_mtp_layer)
        self.moe: MoEConfig = getattr(config, "moe", None) or MoEConfig()
        self._register_load_state_dict_pre_hook(self._drop_megatron_extra_state)
        if getattr(config, "deterministic_mode", False) and not self.moe.deterministic:
            # Megatron's --deterministic-mode (its pretrain CLI under --spec): this layer's as well
            self.moe = dataclasses.replace(self.moe, deterministic=True)
            backends.note("moe.deterministic", "deterministic_mode", "on",
                          "Megatron's deterministic_mode turns the fused layer's deterministic mode on")
        check_megatron_moe_options(config)
        # Megatron's selective recompute of MoE parts (--recompute-modules moe / moe_act /
        # shared_experts; --moe-layer-recompute is "moe"): see moe_recompute_modules
        mods = moe_recompute_modules(config)
        self.recompute_layer = "moe" in mods
        self.recompute_shared = "shared_experts" in mods and not self.recompute_layer
        # inside the layer's checkpoint nothing is kept anyway
        self.recompute_act = "moe_act" in mods and not self.recompute_layer
        E = config.num_moe_experts
        self.router_cfg = router_config_from(config, E)
        self.activation = activation_name(config)
        (self.ep_group, self.ep_rank, self.ep_size, self.edp_rank, self.dp_group) = compat.expert_parallel_groups()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        if E % self.ep_size:
            raise ValueError(f"num_moe_experts={E}: not divisible by expert_model_parallel_size="
                             f"{self.ep_size}; use a multiple of {self.ep_size}")
        # expert TP: the whole TP group (etp = tp) or none (etp = 1: whole experts, local tokens)
        self.etp_size = ps.get_expert_tensor_parallel_world_size()
        check_expert_tp(self.etp_size, self.tp_size)
        if self.tp_size > 1:
            if not config.sequence_parallel:
                raise ValueError("sequence_parallel=False: the fused MoE layer with tensor parallelism "
                                 "takes [s/tp, b, h] inputs; use --sequence-parallel")
        self.num_local_experts = E // self.ep_size
        self.local_offset = self.ep_rank * self.num_local_experts
        H = config.hidden_size
        Fe = config.moe_ffn_hidden_size or config.ffn_hidden_size
        Fs = getattr(config, "moe_shared_expert_intermediate_size", None)
        check_expert_widths(self.etp_size, {"moe_ffn_hidden_size": Fe, "moe_shared_expert_intermediate_size": Fs})
        gated = self.activation in GATED_ACTIVATIONS
        self.parts = 2 if gated else 1
        # Megatron's latent MoE: the routed experts run at width L between two replicated
        # projections (H -> L before the dispatch, L -> H after the combine); the router and the
        # shared expert see the full hidden state
        L = getattr(config, "moe_latent_size", None)
        Hx = L or H
        # Megatron's moe_apply_probs_on_input (top-1): the gate scales the expert's input, the
        # expert's output is taken whole
        self.probs_on_input = bool(getattr(config, "moe_apply_probs_on_input", False))
        # Megatron's benchmark routers: random logits (expert-parallel RNG, as Megatron's), plus a
        # random per-expert bias shared by all ranks (data-parallel RNG; drawn once per layer when
        # the std is negative)
        self.force_balance = bool(getattr(config, "moe_router_force_load_balancing", False))
        self.force_bias_std = getattr(config, "moe_router_force_biased", None)
        self._forced_bias: Optional[Tensor] = None
        if self.force_balance or self.force_bias_std is not None:
            forced = "random logits" + ("" if self.force_bias_std is None else
                                        f" + a random bias (std {abs(self.force_bias_std)})")
            backends.fallback("moe.forced_router", "the router's logits", forced,
                              "Megatron's benchmark routers (moe_router_force_load_balancing / "
                              "moe_router_force_biased): the experts do not follow the learned router")
        # Megatron's RouterReplay (moe_enable_routing_replay; RL frameworks record a rollout's
        # routing and replay it in training): one instance per MoE layer, registered in build order
        # in Megatron's global list, driven by RouterReplay's static methods (see _replayed_ids)
        self.router_replay = None
        if getattr(config, "moe_enable_routing_replay", False):
            from megatron.core.transformer.moe.router_replay import RouterReplay

            self.router_replay = RouterReplay()
            backends.note("moe.router_replay", "RouterReplay", "RouterReplay",
                          "Megatron's moe_enable_routing_replay: RouterReplay's RECORD / REPLAY_FORWARD / "
                          "REPLAY_BACKWARD act on this layer's top-k selection (every selection type)")
        dtype = config.params_dtype
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        # this rank's slice of F: (rank, count) over expert TP; with etp = 1 every rank holds all
        self.etp_rank = self.tp_rank if self.etp_size > 1 else 0
        Fl = Fe // self.etp_size

        # Router: replicated over TP/EP/DP like Megatron's (a normal, all-reduced parameter; with
        # sequence parallel its per-rank gradient covers the local tokens and is summed over TP).
        self.router_weight = torch.nn.Parameter(torch.empty(E, H, dtype=dtype, device=device))
        config.init_method(self.router_weight.data)
        setattr(self.router_weight, "sequence_parallel", config.sequence_parallel)
        self.w1 = torch.nn.Parameter(torch.empty(self.num_local_experts, Hx, self.parts * Fl,
                                                 dtype=dtype, device=device))
        self.w2 = torch.nn.Parameter(torch.empty(self.num_local_experts, Fl, Hx, dtype=dtype, device=device))
        expert_pgs = expert_parallel_tag(self.ep_size, self.etp_size, self.tp_size)
        for p, dim in ((self.w1, 2), (self.w2, 1)):
            # expert-parallel where Megatron's expert linears are (EP > 1 or etp != tp): grads
            # reduced over the expert-DP group (with etp = 1 it holds the TP ranks, so their
            # per-rank partial sums over different tokens add up there). Otherwise that group is
            # the dense DP group and the weights are plain parameters, in the dense optimizer.
            setattr(p, "allreduce", not expert_pgs)
            # marked TP-parallel at any etp, as Megatron's expert linears are: the expert
            # optimizer counts a parameter in its grad norm on every rank only if so (it dedups
            # unmarked ones over the dense TP group, and with etp = 1 would drop them on TP rank 1)
            set_tensor_model_parallel_attributes(p, True, dim, 1)
            if self.moe.gradient_accumulation_fusion:
                # the step's first micro-batch stores its gradient into Megatron DDP's freshly
                # zeroed buffer instead of adding to it (docs/moe.md, gradient-accumulation fusion)
                track_zeroed_main_grad(p)
        self.shared_w1 = self.shared_w2 = self.shared_gate_weight = None
        if getattr(config, "moe_shared_expert_gate", False) and not Fs:
            raise ConfigError("moe_shared_expert_gate=True: gates the shared expert, but the layer has none; "
                              "set moe_shared_expert_intermediate_size, or drop the gate")
        if Fs:
            # drawn whole and sliced (like Megatron's CPU initialisation), so every TP size builds
            # the same shared expert from the same RNG position
            full1 = torch.empty(H, self.parts * Fs, dtype=dtype, device=device)
            full2 = torch.empty(Fs, H, dtype=dtype, device=device)
            config.init_method(full1)
            config.output_layer_init_method(full2)
            r, n = self.etp_rank, self.etp_size
            Fsl = Fs // n
            self.shared_w1 = torch.nn.Parameter(_tp_cols(full1, self.parts, r, n).clone())
            self.shared_w2 = torch.nn.Parameter(full2[r * Fsl:(r + 1) * Fsl].clone())
            if n > 1:
                set_tensor_model_parallel_attributes(self.shared_w1, True, 1, 1)
                set_tensor_model_parallel_attributes(self.shared_w2, True, 0, 1)
            else:
                # whole on every TP rank, each over its own tokens: Megatron sums the gradients
                # of `sequence_parallel` parameters over TP
                for p in (self.shared_w1, self.shared_w2):
                    setattr(p, "sequence_parallel", self.tp_size > 1)
            if getattr(config, "moe_shared_expert_gate", False):
                # Megatron's shared-expert gate (Qwen-MoE): the shared output scaled per token by
                # sigmoid(x . w_g). Replicated; each TP rank's gradient covers its tokens (etp = 1)
                # or its F slice's partial output (etp = tp), so Megatron sums it over TP
                self.shared_gate_weight = torch.nn.Parameter(torch.empty(1, H, dtype=dtype, device=device))
                config.init_method(self.shared_gate_weight.data)
                setattr(self.shared_gate_weight, "sequence_parallel", self.tp_size > 1)
        self.latent_w1 = self.latent_w2 = None
        if L:
            # stored as x @ w ([in, out]); drawn in Megatron's [out, in] layout with its init methods.
            # Replicated over TP: each rank's gradient covers its own tokens (etp = 1), or its F
            # slice's share of all of them (etp = tp), so Megatron sums it over TP as for any
            # `sequence_parallel` parameter
            down = torch.empty(L, H, dtype=dtype, device=device)
            up = torch.empty(H, L, dtype=dtype, device=device)
            config.init_method(down)
            config.output_layer_init_method(up)
            self.latent_w1 = torch.nn.Parameter(down.t().contiguous())
            self.latent_w2 = torch.nn.Parameter(up.t().contiguous())
            for p in (self.latent_w1, self.latent_w2):
                setattr(p, "sequence_parallel", self.tp_size > 1)
        # The router's running state, kept in fp32 whatever the module is cast to (see _apply) and
        # also reachable under the names Megatron's finalize_model_grads looks for (the
        # properties below), so its once-per-step updates reach this layer under Megatron's own
        # training loop as they reach its own router.
        f32 = dict(dtype=torch.float32, device=device)
        if self.router_cfg.enable_expert_bias:
            self.register_buffer("router_expert_bias", torch.zeros(E, **f32))
        else:
            self.router_expert_bias = None
        # load summed over the micro-batches of one optimizer step (not saved)
        self.register_buffer("router_load_accum", torch.zeros(E, **f32), persistent=False)
        # the global batch's plain top-k counts summed over this step's micro-batches so far
        # (f_e of each micro-batch is their running mean, as Megatron's ga_steps)
        glob = "global_aux_loss" in self.router_cfg.aux_coeffs()
        self.register_buffer("router_global_load", torch.zeros(E, **f32) if glob else None, persistent=False)
        self.register_buffer("router_global_steps", torch.zeros((), **f32) if glob else None, persistent=False)
        qb = self.router_cfg.selection == "quantile_balancing"
        self.register_buffer("router_qb_beta", torch.zeros(E, **f32) if qb else None)   # saved, as Megatron's
        self.register_buffer("router_qb_accum", torch.zeros(E, **f32) if qb else None, persistent=False)
        self.register_buffer("router_qb_count", torch.zeros((), **f32) if qb else None, persistent=False)
        self.comm_timer: Optional[CommTimer] = None
        # Megatron's packed micro-batch ([mbs*S, 1] tokens, PackedSeqParams.tokens_per_sample) under
        # sequence parallelism, set per call by the patch fused_moe_unflattened_for_packed_batches:
        # the gathered tokens are grouped into samples of this many for the per-sequence aux loss
        self.packed_tokens_per_sample: Optional[int] = None
        self.layer_number = None
        self._init_experts(self._global_number(layer_number) or 0)
        if layer_number is not None:
            self.layer_number = self._global_number(layer_number)

    def _global_number(self, layer_number: Optional[int]) -> Optional[int]:
        """The layer's number across the decoder and its MTP layers: 1..num_layers for the decoder,
        num_layers + depth for an MTP layer (as Megatron's router numbers MTP layers in its
        aux-loss tracker). ``layer_number`` holds it: the expert initialisation, the aux-loss
        tracker, the routing trace / replay / log and the per-layer statistics are keyed by it, so
        an MTP layer neither repeats decoder layer 1's experts nor logs into its slot."""
        if layer_number and self.is_mtp_layer and layer_number <= self.config.num_layers:
            return layer_number + self.config.num_layers
        return layer_number

    # ---- construction helpers
    def _init_experts(self, layer: int) -> None:
        """Draw each local expert whole from its own generator keyed by its *global* id, then keep
        this TP rank's slice: every (EP, TP) layout builds the same experts."""
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        r, n = self.etp_rank, self.etp_size
        Fl = self.w2.shape[1]
        with torch.no_grad():
            for i in range(self.num_local_experts):
                e = self.local_offset + i
                for w, s, which in ((self.w1, std, "w1"), (self.w2, out_std, "w2")):
                    g = torch.Generator().manual_seed(_expert_seed(self.moe.seed, layer, e, which))
                    full_shape = (w.shape[1], w.shape[2] * n) if which == "w1" else (Fl * n, w.shape[2])
                    full = torch.randn(full_shape, generator=g, dtype=torch.float32) * s
                    w[i].copy_(_tp_cols(full, self.parts, r, n) if which == "w1" else full[r * Fl:(r + 1) * Fl])

    # ---- the router state as Megatron's finalize_model_grads finds a router's
    _FP32_STATE = ("router_expert_bias", "router_load_accum", "router_global_load", "router_global_steps",
                   "router_qb_beta", "router_qb_accum", "router_qb_count")

    @property
    def expert_bias(self) -> Tensor:
        """Megatron's name for the aux-loss-free bias: its finalize_model_grads moves every
        module's ``expert_bias`` in place from ``local_tokens_per_expert`` once per step (summed
        over TP x DP x CP; the TP ranks here hold the same load, so the sign is the same)."""
        if self.router_expert_bias is None:
            raise AttributeError("expert_bias: this router has no expert bias")
        return self.router_expert_bias

    @property
    def local_tokens_per_expert(self) -> Tensor:
        return self.router_load_accum

    @property
    def qb_beta(self) -> Optional[Tensor]:
        return self.router_qb_beta

    @property
    def qb_beta_accum(self) -> Optional[Tensor]:
        """Megatron (>= 0.19) averages it over DP and moves ``qb_beta`` once per step."""
        return self.router_qb_accum

    @property
    def qb_beta_count(self) -> Optional[Tensor]:
        return self.router_qb_count

    def reset_global_aux_loss_tracker(self) -> None:
        """Called by Megatron's finalize_model_grads (and :func:`moe_step_end`) once per step."""
        if self.router_global_load is not None:
            self.router_global_load.zero_()
            self.router_global_steps.zero_()

    def _apply(self, fn, *args, **kwargs):
        """Module casts (Megatron's Float16Module turns every float buffer into bf16) leave the
        router's running state in fp32: a bias moving by 1e-3 a step would round away in bf16,
        and a checkpoint's fp32 values would be rounded on load. Device moves still apply."""
        keep = {n: self._buffers[n] for n in self._FP32_STATE if self._buffers.get(n) is not None}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return out

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron calls this after construction (0.16.1 passes no layer number to ``mlp``)."""
        if self.router_replay is not None:
            self.router_replay.layer_number = layer_number   # as Megatron's router sets it
        layer_number = self._global_number(layer_number)
        if layer_number != self.layer_number:
            self._init_experts(layer_number)
        self.layer_number = layer_number

    def expert_weights(self) -> Dict[str, Tensor]:
        out = {"w1": self.w1, "w2": self.w2}
        if self.shared_w1 is not None:
            out.update(shared_w1=self.shared_w1, shared_w2=self.shared_w2)
        return out

    # ---- forward
    def forward(self, hidden_states: Tensor, padding_mask: Optional[Tensor] = None, **_ignored):
        s_local, b, h = hidden_states.shape
        det = self.moe.deterministic
        cfg = self.router_cfg
        training = self.training
        tracked = training and torch.is_grad_enabled()  # once per micro-batch, even under recompute
        logits = router_logits(hidden_states.reshape(s_local * b, h), self.router_weight, det)
        if self.force_balance or self.force_bias_std is not None:
            logits = self._forced_logits(logits)
        if self.tp_size > 1:
            # [s/tp, b] -> [s, b]: every TP rank routes all tokens of the sequence identically
            logits = gather_from_sequence_parallel_region(logits.view(s_local, b, -1), group=self.tp_group)
            logits = logits.reshape(-1, logits.shape[-1])
        if self.etp_size > 1:
            # each expert split over TP: every rank runs its F slice on all the tokens
            hidden_full = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        else:
            hidden_full = hidden_states
        s = logits.shape[0] // b
        x = hidden_full.reshape(-1, h)
        valid = self._valid_tokens(padding_mask, s_local, b)

        replay = None
        mb = None
        if training and self.layer_number and (STATE.replay is not None or STATE.trace_out is not None
                                               or STATE.routing_log is not None):
            mb = STATE.micro_batch(self.layer_number, advance=tracked)
            if STATE.replay is not None:
                ids = STATE.read_trace(self.layer_number, mb, (b, s, cfg.topk))
                replay = ids.permute(1, 0, 2).reshape(s * b, cfg.topk)  # route() checks, moves
        rr_action = getattr(self.router_replay, "router_replay_action", None)
        rr_action = getattr(rr_action, "name", None)   # RECORD / REPLAY_FORWARD / REPLAY_BACKWARD
        if rr_action in ("REPLAY_FORWARD", "REPLAY_BACKWARD"):
            if replay is not None:
                raise ValueError(f"RouterReplay action {rr_action} on MoE layer {self.layer_number} while "
                                 "--moe-routing-replay replays a trace: two routing replays at once; use one")
            replay = self._replayed_ids(rr_action, s_local, b, cfg.topk, logits.device)

        bias = None
        if self.router_expert_bias is not None:
            bias = self.router_expert_bias.float()
        aux = cfg.aux_coeffs()
        seq_ids, num_seqs = None, b
        if "seq_aux_loss" in aux:
            per = self.packed_tokens_per_sample
            if per and b == 1 and s > per:
                if s % per:
                    raise ValueError(f"tokens_per_sample={per}: the packed micro-batch's {s} tokens do not "
                                     f"split into samples of {per}; use a sequence length that is a multiple")
                seq_ids, num_seqs = torch.arange(s, device=x.device) // per, s // per
            else:
                seq_ids = seq_ids_for_layout(s, b, device=x.device)
        # the fused top-k gate unless the torch reference path was asked for
        gate = "torch" if self.moe.backend == "torch" else "auto"
        reduce_counts = self._global_counts if "global_aux_loss" in aux and tracked else None
        # Training noise (jitter) must be the same on the TP ranks, which route the same tokens, and
        # again in a recomputed forward: with TP > 1 it comes from Megatron's data-parallel RNG
        # (seeded alike on the TP ranks; Megatron's recompute rewinds its tracker), at TP = 1 from
        # the default generator (which that recompute rewinds too)
        noisy = training and (cfg.input_jitter_eps is not None or cfg.noise_std) and self.tp_size > 1
        with _rng_fork("data-parallel-rng") if noisy else contextlib.nullcontext():
            res = route(logits, cfg, training=training, expert_bias=bias, seq_ids=seq_ids,
                        replay_indices=replay, reduce_counts=reduce_counts, num_seqs=num_seqs,
                        valid=valid, qb_beta=self.router_qb_beta, backend=gate)
        if tracked and res.qb_quantile is not None:
            with torch.no_grad():
                self.router_qb_accum += res.qb_quantile
                self.router_qb_count += 1

        # this rank's own tokens: rows [r*s/tp*b, (r+1)*s/tp*b) of the gathered [s, b] order (all at TP = 1)
        mine = slice(self.tp_rank * s_local * b, (self.tp_rank + 1) * s_local * b)
        if rr_action == "RECORD":
            # as Megatron's router records them (into RouterReplay's static buffer when one is set)
            self.router_replay.record_indices(res.indices[mine].detach())
        if mb is not None and tracked:
            if STATE.trace_out is not None:
                STATE.write_trace(self.layer_number, mb, res.indices.view(s, b, cfg.topk).permute(1, 0, 2))
            if STATE.routing_log is not None and self.tp_rank == 0:  # TP ranks log the same routing
                STATE.log_routing(self.layer_number, mb, res.indices.detach().view(s, b, cfg.topk),
                                  res.probs.detach().view(s, b, cfg.topk))

        shared = None
        grad = torch.is_grad_enabled()
        if self.shared_w1 is not None:
            def shared_ffn(x: Tensor) -> Tensor:
                hs = expert_activation(rows_mm(x, self.shared_w1, det), self.activation)
                out = rows_mm(hs, self.shared_w2, det).float()
                if self.shared_gate_weight is not None:  # one dot per token, in fp32
                    out = out * torch.sigmoid(rows_mm(x.float(), self.shared_gate_weight.float().t(), det))
                return out

            def shared() -> Tensor:
                if self.recompute_shared and grad:
                    return torch.utils.checkpoint.checkpoint(shared_ffn, x, use_reentrant=False,
                                                             preserve_rng_state=False)
                return shared_ffn(x)
        probs, indices, kept = res.probs, res.indices, res.kept
        if self.tp_size > 1 and self.etp_size == 1:
            # whole experts: each rank runs its own tokens
            probs, indices, kept = probs[mine], indices[mine], kept[mine]
        in_scale = None
        if self.probs_on_input:
            # the gate (0 where dropped) scales the expert's input; the output is weighted by 1 (0 where dropped)
            in_scale, probs = probs, kept.to(probs.dtype)
        if self.recompute_layer and grad:
            # everything after the router, recomputed in backward (the EP exchanges included, as
            # Megatron's moe recompute does); the router, its losses, trace and statistics run once
            out = torch.utils.checkpoint.checkpoint(self._routed, x, probs, indices, shared, in_scale,
                                                    use_reentrant=False, preserve_rng_state=False)
        else:
            out = self._routed(x, probs, indices, shared, in_scale)
        out = out.to(hidden_states.dtype).view(-1, b, h)
        if self.etp_size > 1:
            out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)

        if tracked:
            out = self._attach_losses(out, res)
            with torch.no_grad():
                if self.router_load_accum.dtype != torch.float32:  # Float16Module casts buffers
                    self.router_load_accum = self.router_load_accum.float()
                self.router_load_accum += res.load
                sat = fp8_saturation(logits) if STATE.monitor_now else None
                STATE.record(self.layer_number or 0, res.load, (~res.kept).sum(), res.kept.numel(),
                             res.aux_loss, res.z_loss, sat)
        return out, None

    def _replayed_ids(self, action: str, s_local: int, b: int, k: int, device) -> Tensor:
        """The expert ids Megatron's RouterReplay hands this layer: REPLAY_FORWARD its target
        (``RouterReplay.set_replay_data``), REPLAY_BACKWARD the oldest target not yet replayed by a
        recompute (popped, as Megatron's router pops it). Each rank's target covers its own tokens
        ``[s/tp * b, k]``; under TP they are gathered like the logits, so every TP rank routes the
        whole sequence with them."""
        rr = self.router_replay
        where = f"MoE layer {self.layer_number}"
        if action == "REPLAY_FORWARD":
            ids = rr.target_topk_idx
            if ids is None:
                raise ValueError(f"RouterReplay action REPLAY_FORWARD on {where}: no target indices; set "
                                 "them with RouterReplay.set_replay_data([...]) (one [tokens, topk] tensor "
                                 "per MoE layer) before the forward")
        else:
            if not rr.replay_backward_list:
                raise ValueError(f"RouterReplay action REPLAY_BACKWARD on {where}: every target set with "
                                 "RouterReplay.set_replay_data has been replayed by a recompute already; "
                                 "set the targets again, or use REPLAY_FORWARD outside the recompute")
            ids = rr.replay_backward_list.pop(0)
        if tuple(ids.shape) != (s_local * b, k):
            raise ValueError(f"RouterReplay target indices of {where}: shape {tuple(ids.shape)}; this rank "
                             f"routes {s_local * b} tokens ([s/tp * b] = [{s_local} * {b}]) with moe_router_topk"
                             f"={k}; use [{s_local * b}, {k}]")
        ids = ids.to(device=device, dtype=torch.int64)
        if self.tp_size > 1:
            ids = gather_from_sequence_parallel_region(ids.view(s_local, b, k), group=self.tp_group)
        return ids.reshape(-1, k)

    def _global_counts(self, counts: Tensor, num_tokens: Tensor):
        """``global_aux_loss``'s f_e counts (arXiv 2501.11873, as Megatron): this micro-batch's
        plain top-k counts and token count summed over the data-parallel replicas (one collective,
        no host sync; the TP ranks route the same tokens), the counts averaged with the step's
        earlier micro-batches. The token count is this micro-batch's global one. P_e stays this
        rank's mean (the paper's form; Megatron's divides it by the global count too, which
        scales its loss down by the DP size: see docs/moe.md)."""
        with torch.no_grad():
            both = torch.cat([counts.float(), num_tokens.float().reshape(1)])
            if compat.torch_dist_size(self.dp_group) > 1:
                torch.distributed.all_reduce(both, group=self.dp_group)
            self.router_global_load += both[:-1]
            self.router_global_steps += 1
            return self.router_global_load / self.router_global_steps, both[-1]

    def _valid_tokens(self, padding_mask: Optional[Tensor], s_local: int, b: int) -> Optional[Tensor]:
        """Megatron's ``padding_mask`` (``[b, s]``, this rank's sequence part under sequence
        parallel; True marks padding) as ``[s * b]`` bool in the router's token order, True for a
        real token (gathered over TP like the logits), or None."""
        if padding_mask is None:
            return None
        if tuple(padding_mask.shape) != (b, s_local):
            raise ValueError(f"padding_mask.shape={tuple(padding_mask.shape)}: one flag per token of "
                             f"the layer input [s={s_local}, b={b}]; use [{b}, {s_local}] (True = padding)")
        valid = ~padding_mask.to(torch.bool).t()
        if self.tp_size > 1:
            valid = gather_from_sequence_parallel_region(valid.float().contiguous(), group=self.tp_group) > 0.5
        return valid.reshape(-1)

    def _attach_losses(self, out: Tensor, res) -> Tensor:
        """The TP ranks hold the same losses and the logits' gather sums their gradients over TP,
        so each rank attaches ``1/tp`` of each loss."""
        cfg = self.router_cfg
        mtp = getattr(self.config, "mtp_num_layers", None) or 0
        num_layers = self.config.num_layers + mtp   # the tracker's slots: the decoder's, then MTP's
        # one MTP layer run mtp_num_layers times a step: each run adds 1/mtp of its losses, as
        # Megatron's router scales its aux loss (its z-loss only in the log: see docs/moe.md)
        repeated = self.is_mtp_layer and mtp and getattr(self.config, "mtp_use_repeated_layer", False)
        runs = mtp if repeated else 1
        share = 1.0 / (self.tp_size * runs)
        if res.aux_losses:
            out = MoEAuxLossAutoScaler.apply(out, res.aux_loss * share if share != 1.0 else res.aux_loss)
            if self.layer_number:
                coeffs = cfg.aux_coeffs()
                for name, term in res.aux_losses.items():
                    compat.record_moe_aux_loss(_AUX_NAMES[name], term.detach() / (coeffs[name] * runs),
                                               self.layer_number, num_layers)
        if cfg.z_loss_coeff:
            out = MoEAuxLossAutoScaler.apply(out, res.z_loss * share if share != 1.0 else res.z_loss)
            if self.layer_number:
                compat.record_moe_aux_loss("z_loss", res.z_loss.detach() / (cfg.z_loss_coeff * runs),
                                           self.layer_number, num_layers)
        return out

    def _routed(self, x: Tensor, probs: Tensor, indices: Tensor,
                shared: Optional[Callable[[], Tensor]] = None, in_scale: Optional[Tensor] = None) -> Tensor:
        """Sum over choices of prob * expert FFN (+ the shared expert), ``[T, H]``: fp32 where
        something is summed after it (the shared expert, the expert-TP partial sums), else (the
        fused experts alone, no expert TP) the experts' output in the model dtype. With latent
        projections the experts run on ``x @ latent_w1`` and their sum goes through ``latent_w2``;
        ``in_scale [T, 1]`` (moe_apply_probs_on_input) scales the experts' input rows."""
        det = self.moe.deterministic
        T, k = indices.shape
        if self.latent_w1 is not None:
            x = rows_mm(x, self.latent_w1, det)
        if in_scale is not None:
            x = (x.float() * in_scale).to(x.dtype)   # Megatron's order: fp32 product, then the model dtype
        # The Triton experts are deterministic and batch-invariant as they are, so the deterministic
        # mode runs them (at any EP); elsewhere each expert's rows go through rows_mm's deterministic
        # GEMMs (one fixed tiling on CUDA, 16-row chunks on CPU)
        lane_ok = not det or batch_invariant(x, self.w1, self.w2, self.moe.backend)
        fused = self.ep_size == 1 and lane_ok
        if det:   # recorded in the receipt like any backend choice; a backend asked by name is not run
            if lane_ok:
                backends.note("moe_ffn.deterministic", "auto", "triton",
                              "--moe-deterministic: the Triton experts (no atomics, fixed K order, tiles "
                              "independent of the token count) are batch-invariant as they are")
            else:
                (backends.note if self.moe.backend == "auto" else backends.fallback)(
                    "moe_ffn", self.moe.backend, "deterministic_chunks",
                    "--moe-deterministic: each expert's rows through a GEMM of fixed tiling (CUDA) or "
                    "on fixed 16-row chunks, so a row's result does not depend on its batch "
                    "(docs/moe.md, Deterministic mode)")
        if fused:
            out = self._latent_up(moe_ffn(x, probs, indices, self.w1, self.w2, self.activation,
                                          self.moe.backend, pregather=self.moe.pregather,
                                          recompute_activation=self.recompute_act,
                                          accumulate_wgrad=self.moe.gradient_accumulation_fusion))
            if shared is None and self.etp_size == 1:
                return out   # nothing to sum: the model dtype, no fp32 round trip (2 passes each way)
            out = out.float()
            return out if shared is None else out + shared()
        flat_e = indices.reshape(-1)
        order = torch.sort(flat_e, stable=True).indices  # pair ids grouped by expert, token order within
        inv = inverse_order(order)
        rows = gather_rows(x, order, inv, k)       # backward: fixed-order sum over the k copies
        p_rows = probs.reshape(-1)[order]
        e_rows = flat_e[order]
        shared_out = None
        if self.ep_size == 1:
            y = _ffn_rows_deterministic(rows, e_rows, p_rows, self.w1, self.w2, self.activation,
                                        self.recompute_act)
        else:
            y, shared_out = self._expert_parallel(rows, p_rows, e_rows, shared, chunked=not lane_ok)
        # fp32 [T, H]: each token's k rows summed j = 0..k-1, read through inv (no fp32 pair rows)
        out = combine_rows(y, order, inv, k)
        if self.latent_w2 is not None:
            out = self._latent_up(out.to(x.dtype)).float()
        if shared is not None:
            out = out + (shared_out if shared_out is not None else shared())
        return out

    def options(self) -> Dict[str, object]:
        """The layer's Megatron options beyond the router's, for the run receipt."""
        return {"apply_probs_on_input": self.probs_on_input,
                "latent_size": None if self.latent_w1 is None else self.latent_w1.shape[1],
                "force_load_balancing": self.force_balance, "force_biased": self.force_bias_std}

    def _latent_up(self, out: Tensor) -> Tensor:
        """The experts' combined output back to the hidden width (latent MoE), else as it is."""
        return out if self.latent_w2 is None else rows_mm(out, self.latent_w2, self.moe.deterministic)

    def _forced_logits(self, logits: Tensor) -> Tensor:
        """Megatron's benchmark routers: random N(0, 1) logits from the expert-parallel RNG (its
        RandomSTE; the gradient passes to the real logits), plus, with moe_router_force_biased,
        a random per-expert bias from the RNG every rank shares (a new one each forward, or one
        per layer when the std is negative). With both options Megatron draws the logits twice;
        so does this, so that the RNG streams stay Megatron's."""
        if self.force_balance:
            logits = _RandomLogits.apply(logits)
        std = self.force_bias_std
        if std is None:
            return logits
        logits = _RandomLogits.apply(logits)
        bias = self._forced_bias if std < 0 else None
        if bias is None:
            with _rng_fork("data-parallel-rng"):
                bias = torch.empty(logits.shape[-1], device=logits.device, dtype=logits.dtype).normal_(std=abs(std))
            if std < 0:
                self._forced_bias = bias
        return logits + bias

    def _expert_parallel(self, rows: Tensor, p_rows: Tensor, e_rows: Tensor,
                         shared: Optional[Callable[[], Tensor]] = None, chunked: bool = False):
        """Rows sorted by global expert -> (their weighted expert outputs, the shared expert's
        output or None). The dispatch exchanges run asynchronously while the shared expert
        computes. ``chunked``: the deterministic mode off the Triton lane (each expert's rows
        through ``rows_mm``'s deterministic GEMMs, one expert at a time)."""
        group, n_local = self.ep_group, self.num_local_experts
        send_counts = torch.bincount(e_rows // n_local, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        torch.distributed.all_to_all_single(recv_counts, send_counts, group=group)
        counts = torch.stack([send_counts, recv_counts]).cpu()  # the one host sync of EP
        send, recv = counts[0].tolist(), counts[1].tolist()
        self.last_recv_rows = sum(recv)  # host int, already synced: for monitoring and tests
        timer = self.comm_timer
        off_rank = sum(send) - send[self.ep_rank]
        if timer is not None:
            timer.start("dispatch", rows.device)
        pending = _Pending()
        x_in, p_in = _Dispatch.apply(rows, p_rows.float(), recv, send, group, pending)
        with torch.no_grad():
            e_in = torch.empty(sum(recv), dtype=e_rows.dtype, device=e_rows.device)
            e_src = e_rows.contiguous()
            pending.works.append(torch.distributed.all_to_all_single(e_in, e_src, recv, send, group=group,
                                                                     async_op=True))
            pending.keep.append(e_src)
        shared_out = shared() if shared is not None else None
        pending.wait()
        if timer is not None:
            timer.stop("dispatch", off_rank * (rows.shape[1] * rows.element_size() + 4 + e_rows.element_size()))
        local = e_in - self.local_offset
        if x_in.shape[0] == 0:
            # No rows for this rank's experts (routing sent every token elsewhere). The expert FFN
            # builds no graph on empty input, so without this link the dispatch's reverse
            # exchange would not run in this rank's backward while the other ranks wait in it:
            # a hang on NCCL, an abort on gloo. The expert weights are linked too, for a zero
            # gradient: Megatron's DDP with --overlap-grad-reduce starts a bucket's reduce once
            # every parameter in it has had its gradient hook, and finish_grad_sync stops on a
            # bucket whose reduce never started ("Communication call has not been issued").
            link = x_in.sum() + p_in.sum()
            for w in (self.w1, self.w2):
                link = link + w.reshape(-1)[0].float() * 0   # one element read; backward: zeros
            y = x_in.new_zeros(0, x_in.shape[1]) + link.to(x_in.dtype) * 0
        elif chunked:
            # fp32 on the way back, as the EP = 1 chunked lane sums them
            y = _ffn_rows_deterministic(x_in, local, p_in, self.w1, self.w2, self.activation,
                                        self.recompute_act)
        else:
            # the model dtype on the way back, like Megatron's combine (half the bytes of fp32).
            # The deterministic mode runs this lane too: a row's result depends on that row alone
            # and the combine sums a token's k rows in a fixed order
            y = moe_ffn(x_in, p_in[:, None], local[:, None], self.w1, self.w2, self.activation,
                        self.moe.backend, pregather=self.moe.pregather,
                        recompute_activation=self.recompute_act,
                        accumulate_wgrad=self.moe.gradient_accumulation_fusion)
        if timer is not None:
            timer.start("combine", rows.device)
        y = _AllToAll.apply(y, send, recv, group)
        if timer is not None:
            timer.stop("combine", (sum(recv) - recv[self.ep_rank]) * y.shape[1] * y.element_size())
        return y, shared_out

    # ---- distributed checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Expert weights sharded along the expert axis over EP and along F over TP (global
        ``w1 [E, H, 2, F]`` for gated activations, else ``[E, H, F]``; ``w2 [E, F, H]``; H the
        latent width under latent MoE, whose projections are replicated like the router), the
        shared expert along F over TP: a checkpoint saved at one (EP, TP) layout loads at
        another. The router and the bias are replicated. ``moe.checkpoint_format="megatron"``:
        Megatron MoELayer's entries instead (:meth:`_megatron_layout`)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.moe.checkpoint_format == "megatron":
            return self._megatron_layout(sd, prefix, sharded_offsets)
        ep = (0, self.ep_rank, self.ep_size)
        r, n = self.etp_rank, self.etp_size
        g = self.parts == 2
        E_l, H, Fl = self.num_local_experts, self.w1.shape[1], self.w2.shape[1]
        # the F axis is sharded over expert TP (one fragment with etp = 1)
        rep = self._expert_replicas()
        specs = {
            "w1": ((E_l, H, 2, Fl) if g else (E_l, H, Fl), [ep, (3 if g else 2, r, n)], rep["w1"]),
            "w2": ((E_l, Fl, H), [ep, (1, r, n)], rep["w2"]),
        }
        if self.shared_w1 is not None:
            # the hidden width (the routed experts' H above is the latent width under latent MoE)
            Fsl, Hs = self.shared_w2.shape
            specs["shared_w1"] = ((Hs, 2, Fsl) if g else (Hs, Fsl), [(2 if g else 1, r, n)], rep["shared_w1"])
            specs["shared_w2"] = ((Fsl, Hs), [(0, r, n)], rep["shared_w2"])
        for name, (view, axes, replica) in specs.items():
            key = f"{prefix}{name}"
            sd[key] = _reshaping_factory(key, getattr(self, name), view, axes, sharded_offsets, replica)
        return sd

    def _expert_replicas(self) -> Dict[str, tuple]:
        """Checkpoint replica ids of the expert weights, in either layout. With etp = 1 the routed
        experts' copies on the TP ranks differ in expert-DP rank, and the shared expert's (whole on
        every TP rank) in TP rank: one copy of each is saved; split over TP, each rank's part is."""
        routed = (0, 0, self.edp_rank)
        shared = (0, 0 if self.etp_size > 1 else self.tp_rank, self.dp_rank)
        return {"w1": routed, "w2": routed, "shared_w1": shared, "shared_w2": shared}

    # this layer's persistent entries kept as they are -> Megatron MoELayer's names for them
    _MEGATRON_NAMES = {"router_weight": "router.weight", "router_expert_bias": "router.expert_bias",
                       "router_qb_beta": "router.qb_beta", "shared_gate_weight": "shared_experts.gate_weight"}

    def _megatron_layout(self, sd: dict, prefix: str, sharded_offsets) -> dict:
        """The checkpoint entries of Megatron's MoELayer (SequentialMLP experts; its TEGroupedMLP
        and GroupedMLP write the same): ``experts.experts.linear_fc1.weight [E, 2F, H]`` (``[gate;
        up]`` rows, each half sharded over expert TP as Megatron's SwiGLU factory does),
        ``linear_fc2 [E, H, F]``, the router as ``router.*``, the shared expert as
        ``shared_experts.*`` (``[out, in]`` weights), latent projections as ``fc1_latent_proj`` /
        ``fc2_latent_proj``, plus the empty ``_extra_state`` objects of those linears that Megatron's
        layer asks for when it loads. The state-dict keys stay this layer's (what
        ``load_state_dict`` takes); only the checkpoint keys and layouts change. The transposed
        entries are copies while a checkpoint is written, as in Megatron's GroupedMLP."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        ep = (0, self.ep_rank, self.ep_size)
        r, n = self.etp_rank, self.etp_size

        def rows(axis):   # the out axis: [gate; up] halves each sharded over expert TP, or one part
            return [[(axis, r + i * n, 2 * n)] for i in range(2)] if self.parts == 2 else [[(axis, r, n)]]

        replicas = self._expert_replicas()
        # name -> (Megatron key, per part of the [.., out, in] tensor: [(axis, rank, fragments)])
        specs = {"w1": ("experts.experts.linear_fc1.weight", [[ep] + a for a in rows(1)]),
                 "w2": ("experts.experts.linear_fc2.weight", [[ep, (2, r, n)]]),
                 "shared_w1": ("shared_experts.linear_fc1.weight", rows(0)),
                 "shared_w2": ("shared_experts.linear_fc2.weight", [[(1, r, n)]]),
                 "latent_w1": ("fc1_latent_proj.weight", [[]]),
                 "latent_w2": ("fc2_latent_proj.weight", [[]])}
        out = {}
        for name, t in sd.items():
            own = name[len(prefix):]
            if own in specs:
                key, parts = specs[own]
                # the latent projections as Megatron replicates them (super()'s ids)
                replica = replicas.get(own, t.replica_id)
                out[name] = _transposed_factory(f"{prefix}{key}", getattr(self, own), parts,
                                                sharded_offsets, replica)
            elif own in self._MEGATRON_NAMES:
                t.key = f"{prefix}{self._MEGATRON_NAMES[own]}"
                out[name] = t
            else:
                raise NotImplementedError(f"moe.checkpoint_format='megatron': no Megatron name for the "
                                          f"fused layer's entry {own!r}; use checkpoint_format='fused'")
        # the linears' _extra_state objects (None without Transformer Engine): one per expert, one
        # per shared-expert and latent linear, at the offsets Megatron's layer gives them. Loaded
        # back they are dropped (_drop_megatron_extra_state): the fused layer has no such state
        E = self.num_local_experts * self.ep_size
        objs = [(f"experts.experts.linear_fc{i}", [[(E, self.local_offset + j)] for j in range(self.num_local_experts)],
                 (0, r, self.edp_rank)) for i in (1, 2)]
        # a linear outside the experts has no axis of its own: one place at the layer's offsets,
        # or (1,) / (0,) without any (Megatron's make_sharded_object_for_checkpoint)
        single = [] if sharded_offsets else [(1, 0)]
        if self.shared_w1 is not None:
            objs += [(f"shared_experts.linear_fc{i}", [single], (0, self.tp_rank, self.dp_rank)) for i in (1, 2)]
        if self.latent_w1 is not None:
            objs += [(f"fc{i}_latent_proj", [single], (0, self.tp_rank, self.dp_rank)) for i in (1, 2)]
        lead_shape = tuple(size for _, _, size in sharded_offsets)
        lead_off = tuple(rank for _, rank, _ in sharded_offsets)
        for name, places, replica in objs:
            for j, place in enumerate(places):
                shape, offset = lead_shape + tuple(c for c, _ in place), lead_off + tuple(a for _, a in place)
                out[f"{prefix}{_MEGATRON_EXTRA}{name}.{j}"] = ShardedObject(
                    f"{prefix}{name}._extra_state", None, shape, offset, replica)
        return out

    @staticmethod
    def _drop_megatron_extra_state(state_dict, prefix, *_args):
        """Load pre-hook: the linears' ``_extra_state`` objects of a Megatron-layout checkpoint
        (see :meth:`_megatron_layout`) come back under keys the layer does not have."""
        for key in [k for k in state_dict if k.startswith(prefix + _MEGATRON_EXTRA)]:
            del state_dict[key]


# the state-dict keys under which _megatron_layout puts the linears' _extra_state objects
_MEGATRON_EXTRA = "megatron_extra_state."


def _transposed_factory(key: str, param: Tensor, parts, sharded_offsets, replica_id):
    """A checkpoint entry holding ``param`` with its last two axes swapped (``[.., in, out]``
    stored as Megatron's ``[.., out, in]``), the out axis cut into ``len(parts)`` equal parts (a
    GLU's gate and up halves), part ``i`` sharded along ``parts[i]`` = [(axis of the swapped
    tensor, rank, fragments)]. Loading swaps back."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    prepend = len(sharded_offsets)

    def build(k, t, rid, flattened_range):
        _refuse_flattened(k, flattened_range)
        halves = t.transpose(-1, -2).chunk(len(parts), dim=-2)
        return [ShardedTensor.from_rank_offsets(k, h.contiguous(), *sharded_offsets,
                                                *[(prepend + a, rk, fr) for a, rk, fr in axes],
                                                replica_id=rid, prepend_axis_num=prepend)
                for h, axes in zip(halves, parts)]

    def merge(loaded):
        return torch.cat(list(loaded), dim=-2).transpose(-1, -2)

    return ShardedTensorFactory(key, param, build, merge, replica_id)


def fused_moe_layers(model_chunks: Iterable[torch.nn.Module]) -> Dict[int, FusedMoELayer]:
    out = {}
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, FusedMoELayer):
                out[m.layer_number or len(out) + 1] = m
    return out


def moe_step_end(model_chunks: Iterable[torch.nn.Module],
                 megatron_handles: Iterable[str] = ()) -> Dict[str, dict]:
    """Once per optimizer step: move the aux-loss-free biases (from the step's load summed over
    the data-parallel replicas) and the quantile-balancing biases (from the step's mean quantile,
    averaged over them), reset the accumulators and return this step's statistics.
    ``megatron_handles``: what Megatron's finalize_model_grads already did this step to the
    layers it finds by attribute ("expert_bias", "quantile_balancing"; see
    ``compat.megatron_router_updates``), which is then not done twice."""
    handled = set(megatron_handles)
    layers = fused_moe_layers(model_chunks)
    mods = list(layers.values())
    if mods:
        group = mods[0].dp_group
        dp = compat.torch_dist_size(group)
        biased = [m for m in mods if m.router_expert_bias is not None and "expert_bias" not in handled]
        if biased:
            load = torch.stack([m.router_load_accum.float() for m in biased])
            if dp > 1:
                torch.distributed.all_reduce(load, group=group)
            for m, l in zip(biased, load):
                m.router_expert_bias.data = update_expert_bias(m.router_expert_bias, l,
                                                               m.router_cfg.bias_update_rate)
        qb = [m for m in mods if m.router_qb_beta is not None and "quantile_balancing" not in handled]
        if qb:
            mean = torch.stack([m.router_qb_accum / m.router_qb_count.clamp(min=1) for m in qb])
            if dp > 1:
                torch.distributed.all_reduce(mean, group=group)
                mean /= dp
            for m, q in zip(qb, mean):
                m.router_qb_beta.data = update_qb_beta(m.router_qb_beta, q, m.router_cfg.quantile_balancing_ema)
        for m in mods:
            m.router_load_accum.zero_()
            m.reset_global_aux_loss_tracker()
            if m.router_qb_accum is not None:
                m.router_qb_accum.zero_()
                m.router_qb_count.zero_()
    return STATE.end_step(layers)
