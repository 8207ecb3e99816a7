"""Fused MoE layer for Megatron: route (fp32) -> sort by expert -> grouped expert FFN -> weighted
combine, with expert parallelism over an all-to-all, routing trace/replay and a deterministic mode.

Math (Switch Transformer eq. 1-2, arXiv 2101.03961; DeepSeekMoE shared experts, arXiv 2401.06066)::

    l = x W_r^T  (fp32)           p, idx = route(l)          (megatron_ext.ops.moe.routing)
    y_t = sum_j p[t, j] * FFN_{idx[t, j]}(x_t)  +  FFN_shared(x_t)
    FFN_e(x) = (act(x W1_e[:, :F]) * x W1_e[:, F:]) W2_e      (Megatron's GLU order [gate | up])

Drop-in for the ``mlp`` submodule of a TransformerLayer spec on megatron-core 0.16.1 and 0.19.2:
called as ``mlp(hidden_states [s, b, h], padding_mask=...)``, returns ``(output [s, b, h], None)``.
Experts live as grouped weights ``w1 [E_local, H, 2F]``, ``w2 [E_local, F, H]`` drawn from a
generator seeded by (seed, layer, *global* expert id), so every EP size builds the same model;
they carry ``allreduce=False`` (Megatron's expert-parallel tag), so DDP reduces their grads over
the expert-data-parallel group. The aux-loss-free expert bias (DeepSeek-V3 §2.1.2) is a buffer
updated once per optimizer step by :func:`moe_step_end` from the load summed over the step and
the data-parallel ranks.

EP > 1 (token dispatch like Megatron's alltoall dispatcher, GShard §3.2): pairs sorted by expert,
per-rank counts exchanged (the one host sync: ``all_to_all_single`` needs split sizes on the
host), rows + probs exchanged, each rank runs its local experts on the received rows with k=1
(weighted by their probs), rows go back, and each token sums its k results in choice order.

Deterministic mode: every GEMM runs on fixed 16-row chunks (a GEMM's per-row result depends on
its shape, not on the other rows), the combine is a fixed-order sum over the k choices, no
atomics: the layer's output for a token is bitwise the same whatever batch it comes in, for
routers whose selection is per token (no capacity dropping, Sinkhorn or training noise).
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_ext import compat
from megatron_ext.config import MoEConfig, router_config_from
from megatron_ext.observability.moe_stats import STATE, fp8_saturation
from megatron_ext.ops.moe import moe_ffn
from megatron_ext.ops.moe.reference import GATED_ACTIVATIONS, expert_activation
from megatron_ext.ops.moe.routing import route, seq_ids_for_layout, update_expert_bias

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


def _expert_seed(seed: int, layer: int, expert: int, which: str) -> int:
    digest = hashlib.sha256(f"{seed}/{layer}/{expert}/{which}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rows_mm(a: Tensor, w: Tensor, deterministic: bool) -> Tensor:
    """``a [n, K] @ w [K, N]``; deterministic: on zero-padded fixed 16-row chunks, so a row's
    result does not depend on how many rows come with it."""
    if not deterministic:
        return a @ w
    n = a.shape[0]
    pad = (-n) % DET_CHUNK
    a = F.pad(a, (0, 0, 0, pad)).view(-1, DET_CHUNK, a.shape[1])
    out = torch.cat([a[i] @ w for i in range(a.shape[0])], dim=0) if a.shape[0] else a.new_zeros(0, w.shape[1])
    return out[:n]


def _ffn_rows_deterministic(rows: Tensor, local_ids: Tensor, w1: Tensor, w2: Tensor,
                            activation: str) -> Tensor:
    """Unweighted expert FFN of each row ``rows [n, H]`` for its expert ``local_ids [n]``."""
    out = rows.new_zeros(rows.shape[0], w2.shape[2])
    for e in range(w1.shape[0]):
        sel = (local_ids == e).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        h = expert_activation(rows_mm(rows[sel], w1[e], True), activation)
        out = out.index_copy(0, sel, rows_mm(h, w2[e], True))
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; its gradient is the reverse exchange."""

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


def _combine_fixed_order(y_pairs: Tensor, T: int, k: int) -> Tensor:
    """``y_pairs [T*k, H]`` (row ``t*k + j`` = weighted output of choice j) -> ``[T, H]``, summed
    over j = 0..k-1 in that order (fp32 accumulate, no atomics)."""
    y = y_pairs.view(T, k, -1)
    acc = y[:, 0].float()
    for j in range(1, k):
        acc = acc + y[:, j].float()
    return acc


class FusedMoELayer(MegatronModule):
    """Megatron ``mlp`` submodule: router + grouped experts (+ shared expert); see module doc."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None,
                 pg_collection=None, **_ignored):
        super().__init__(config=config)
        self.moe: MoEConfig = getattr(config, "moe", None) or MoEConfig()
        E = config.num_moe_experts
        self.router_cfg = router_config_from(config, E)
        self.activation = activation_name(config)
        (self.ep_group, self.ep_rank, self.ep_size, self.edp_rank, self.dp_group) = compat.expert_parallel_groups()
        if E % self.ep_size:
            raise ValueError(f"num_moe_experts={E}: not divisible by expert_model_parallel_size="
                             f"{self.ep_size}; use a multiple of {self.ep_size}")
        self.num_local_experts = E // self.ep_size
        self.local_offset = self.ep_rank * self.num_local_experts
        H = config.hidden_size
        Fe = config.moe_ffn_hidden_size or config.ffn_hidden_size
        gated = self.activation in GATED_ACTIVATIONS
        dtype = config.params_dtype
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()

        # Router: replicated over EP/DP like Megatron's (a normal, all-reduced parameter).
        self.router_weight = torch.nn.Parameter(torch.empty(E, H, dtype=dtype, device=device))
        config.init_method(self.router_weight.data)
        setattr(self.router_weight, "sequence_parallel", config.sequence_parallel)
        self.w1 = torch.nn.Parameter(torch.empty(self.num_local_experts, H, (2 if gated else 1) * Fe,
                                                 dtype=dtype, device=device))
        self.w2 = torch.nn.Parameter(torch.empty(self.num_local_experts, Fe, H, dtype=dtype, device=device))
        for p in (self.w1, self.w2):
            setattr(p, "allreduce", False)  # expert-parallel: grads reduced over the expert-DP group
        self.shared_w1 = self.shared_w2 = None
        Fs = getattr(config, "moe_shared_expert_intermediate_size", None)
        if Fs:
            self.shared_w1 = torch.nn.Parameter(torch.empty(H, (2 if gated else 1) * Fs, dtype=dtype, device=device))
            self.shared_w2 = torch.nn.Parameter(torch.empty(Fs, H, dtype=dtype, device=device))
            config.init_method(self.shared_w1.data)
            config.output_layer_init_method(self.shared_w2.data)
        if self.router_cfg.enable_expert_bias:
            self.register_buffer("router_expert_bias", torch.zeros(E, dtype=torch.float32, device=device))
        else:
            self.router_expert_bias = None
        # load summed over the micro-batches of one optimizer step (not saved)
        self.register_buffer("router_load_accum", torch.zeros(E, dtype=torch.float32, device=device),
                             persistent=False)
        self.layer_number = None
        self._init_experts(layer_number or 0)
        if layer_number is not None:
            self.layer_number = layer_number

    # ---- construction helpers
    def _init_experts(self, layer: int) -> None:
        """Draw each local expert from its own generator keyed by its *global* id."""
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        with torch.no_grad():
            for i in range(self.num_local_experts):
                e = self.local_offset + i
                for w, s, which in ((self.w1, std, "w1"), (self.w2, out_std, "w2")):
                    g = torch.Generator().manual_seed(_expert_seed(self.moe.seed, layer, e, which))
                    w[i].copy_(torch.randn(w.shape[1:], generator=g, dtype=torch.float32) * s)

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron calls this after construction (0.16.1 passes no layer number to ``mlp``)."""
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
        s, b, h = hidden_states.shape
        x = hidden_states.reshape(s * b, h)
        det = self.moe.deterministic
        cfg = self.router_cfg
        training = self.training
        tracked = training and torch.is_grad_enabled()  # once per micro-batch, even under recompute
        logits = rows_mm(x.float(), self.router_weight.float().t(), det)

        replay = None
        mb = None
        if training and (STATE.replay is not None or STATE.trace_out is not None) and self.layer_number:
            mb = STATE.micro_batch(self.layer_number, advance=tracked)
            if STATE.replay is not None:
                ids = STATE.read_trace(self.layer_number, mb, (b, s, cfg.topk))
                replay = ids.permute(1, 0, 2).reshape(s * b, cfg.topk).to(x.device)

        bias = None
        if self.router_expert_bias is not None:
            bias = self.router_expert_bias.float()
        seq_ids = seq_ids_for_layout(s, b, device=x.device) if cfg.load_balancing_type == "seq_aux_loss" else None
        g_load = g_tokens = None
        dp = compat.torch_dist_size(self.dp_group)
        if cfg.load_balancing_type == "global_aux_loss" and training and dp > 1:
            # f_e over the global batch (arXiv 2501.11873): this selection's load summed over the
            # data-parallel replicas (a collective, no host sync); the selection is then replayed
            with torch.no_grad():
                first = route(logits.detach(), cfg, training=training, expert_bias=bias,
                              replay_indices=replay)
                g_load = first.load.clone()
                torch.distributed.all_reduce(g_load, group=self.dp_group)
            replay, g_tokens = first.indices, s * b * dp
        res = route(logits, cfg, training=training, expert_bias=bias, seq_ids=seq_ids,
                    replay_indices=replay, global_tokens_per_expert=g_load, global_num_tokens=g_tokens)

        if mb is not None and STATE.trace_out is not None and tracked:
            STATE.write_trace(self.layer_number, mb, res.indices.view(s, b, cfg.topk).permute(1, 0, 2))

        out = self._routed(x, res.probs, res.indices)
        if self.shared_w1 is not None:
            hs = expert_activation(rows_mm(x, self.shared_w1, det), self.activation)
            out = out + rows_mm(hs, self.shared_w2, det).float()
        out = out.to(hidden_states.dtype).view(s, b, h)

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

    def _attach_losses(self, out: Tensor, res) -> Tensor:
        cfg = self.router_cfg
        num_layers = self.config.num_layers
        if cfg.load_balancing_type in _AUX_NAMES and cfg.aux_loss_coeff > 0:
            out = MoEAuxLossAutoScaler.apply(out, res.aux_loss)
            if self.layer_number:
                compat.record_moe_aux_loss(_AUX_NAMES[cfg.load_balancing_type],
                                           res.aux_loss.detach() / cfg.aux_loss_coeff, self.layer_number, num_layers)
        if cfg.z_loss_coeff:
            out = MoEAuxLossAutoScaler.apply(out, res.z_loss)
            if self.layer_number:
                compat.record_moe_aux_loss("z_loss", res.z_loss.detach() / cfg.z_loss_coeff,
                                           self.layer_number, num_layers)
        return out

    def _routed(self, x: Tensor, probs: Tensor, indices: Tensor) -> Tensor:
        """Sum over choices of prob * expert FFN, fp32 ``[T, H]``."""
        det = self.moe.deterministic
        T, k = indices.shape
        if self.ep_size == 1 and not det:
            return moe_ffn(x, probs, indices, self.w1, self.w2, self.activation, self.moe.backend).float()
        flat_e = indices.reshape(-1)
        order = torch.sort(flat_e, stable=True).indices  # pair ids grouped by expert, token order within
        rows = x[order // k]
        p_rows = probs.reshape(-1)[order]
        e_rows = flat_e[order]
        if self.ep_size == 1:
            y = _ffn_rows_deterministic(rows, e_rows, self.w1, self.w2, self.activation)
            y = y.float() * p_rows[:, None].float()
        else:
            y = self._expert_parallel(rows, p_rows, e_rows)
        y_pairs = y.new_zeros(T * k, y.shape[1]).index_copy(0, order, y)
        return _combine_fixed_order(y_pairs, T, k)

    def _expert_parallel(self, rows: Tensor, p_rows: Tensor, e_rows: Tensor) -> Tensor:
        """Rows sorted by global expert -> their weighted expert outputs (fp32), via all-to-all."""
        group, n_local = self.ep_group, self.num_local_experts
        send_counts = torch.bincount(e_rows // n_local, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        torch.distributed.all_to_all_single(recv_counts, send_counts, group=group)
        counts = torch.stack([send_counts, recv_counts]).cpu()  # the one host sync of EP
        send, recv = counts[0].tolist(), counts[1].tolist()
        x_in = _AllToAll.apply(rows, recv, send, group)
        p_in = _AllToAll.apply(p_rows.float(), recv, send, group)
        with torch.no_grad():
            e_in = torch.empty(sum(recv), dtype=e_rows.dtype, device=e_rows.device)
            torch.distributed.all_to_all_single(e_in, e_rows.contiguous(), recv, send, group=group)
            local = e_in - self.local_offset
        if self.moe.deterministic:
            y = _ffn_rows_deterministic(x_in, local, self.w1, self.w2, self.activation).float() * p_in[:, None]
        else:
            y = moe_ffn(x_in, p_in[:, None], local[:, None], self.w1, self.w2, self.activation,
                        self.moe.backend).float()
        return _AllToAll.apply(y, send, recv, group)

    # ---- distributed checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Expert weights sharded along the expert axis over EP (global shape ``[E, ...]``), so a
        checkpoint saved at one EP size loads at another; the rest replicated."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        prepend = len(sharded_offsets)
        for name in ("w1", "w2"):
            key = f"{prefix}{name}"
            sd[key] = ShardedTensor.from_rank_offsets(
                key, getattr(self, name), *sharded_offsets, (prepend, self.ep_rank, self.ep_size),
                replica_id=(0, 0, self.edp_rank), prepend_axis_num=prepend)
        return sd


def fused_moe_layers(model_chunks: Iterable[torch.nn.Module]) -> Dict[int, FusedMoELayer]:
    out = {}
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, FusedMoELayer):
                out[m.layer_number or len(out) + 1] = m
    return out


def moe_step_end(model_chunks: Iterable[torch.nn.Module]) -> Dict[str, dict]:
    """Once per optimizer step: sum the step's expert load over the data-parallel replicas,
    move the aux-loss-free biases, reset the accumulators and return this step's statistics."""
    layers = fused_moe_layers(model_chunks)
    if layers:
        mods = list(layers.values())
        load = torch.stack([m.router_load_accum.float() for m in mods])
        group = mods[0].dp_group
        if compat.torch_dist_size(group) > 1:
            torch.distributed.all_reduce(load, group=group)
        for m, l in zip(mods, load):
            if m.router_expert_bias is not None:
                m.router_expert_bias.data = update_expert_bias(m.router_expert_bias, l,
                                                               m.router_cfg.bias_update_rate)
            m.router_load_accum.zero_()
    return STATE.end_step(layers)
