"""GQLA: group-query latent attention (arXiv 2605.15250, section 3.1), a Megatron ``self_attention``.

MLA (DeepSeek-V2, arXiv 2405.04434, eq. 9-19) with the K/V up-projection indexed by KV group instead
of by query head. For a token ``t`` with input ``h_t``::

    c_t      = RMSNorm(W_DKV h_t)                    in R^{r_kv}      (latent; the norm is optional)
    k^R_t    = RoPE(W_KR h_t)                        in R^{d_rope}    (one rope key for all heads)
    q_{t,h}  = [q^C_{t,h}; RoPE(q^R_{t,h})]          from W_Q h_t, or W_UQ Norm(W_DQ h_t) (q-LoRA)
    k_{t,h}  = [W^UK_{g(h)} c_t ; k^R_t]             g(h) = floor(h / (H / G))
    v_{t,h}  = W^UV_{g(h)} c_t
    o_t      = W_O [softmax_j(q_{t,h} . k_{j,h} * scale) v_{j,h}]_h

with ``G = num_query_groups`` blocks ``W^UK_g [d_nope, r_kv]`` and ``W^UV_g [d_v, r_kv]`` instead of
MLA's ``H``. The same weights compute one function three ways:

* training / prefill (:meth:`GQLAttention.forward`): expand the G per-group K/V and run GQA attention
  through the sparse-attention op (dense causal by default; window / sinks from the config);
* decode path "gqa": cache the per-group ``W^UK_g c_t``, ``W^UV_g c_t`` and the shared ``k^R_t``
  (``G*(d_nope+d_v) + d_rope`` values per token) and run GQA attention; shards over groups under TP;
* decode path "absorb": cache only ``c_t`` and ``k^R_t`` (``r_kv + d_rope`` per token), fold
  ``W^UK_g`` into the query (``q^C_h W^UK_{g(h)}`` lives in latent space) and ``W^UV_g`` into the
  output, i.e. MQA over the latent as in MLA's absorbed decode.

Tensor parallelism: every rank owns ``H/TP`` query heads and the ``G/TP`` up-projection blocks they
read (``G % TP == 0`` is checked at config time). The down-projections are column-parallel linears
whose outputs are all-gathered (as Megatron's MLA does); the gathered latent and rope key are then
identical on every rank but each rank's heads contribute only part of their gradient, so they pass
through an identity-forward, all-reduce-backward op (``_SumGradOverTP``) *after* the
latent norm: the norm's weight then gets the full gradient on every rank and must not be all-reduced
again by ``finalize_model_grads`` (its ``sequence_parallel`` mark is cleared).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_ext import backends
from megatron_ext.modules.param_hooks import run_forward_pre_hooks
from megatron_ext.ops.sparse_attention import sparse_attention

PATHS = ("gqa", "absorb")
_TILE_HEAD_DIMS = (16, 32, 64, 128, 256)  # head dims the sparse-attention Triton kernels tile


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over TP. Megatron's
    ``copy_to_tensor_model_parallel_region`` does the same but reduces a temporary copy when the
    incoming gradient is non-contiguous (as the rope key's is here), silently dropping the sum."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclasses.dataclass
class GQLASelfAttentionSubmodules:
    """Megatron-MLA names where the concept is the same (``MLASelfAttentionSubmodules``)."""

    linear_q_proj: type = ColumnParallelLinear
    linear_q_down_proj: type = ColumnParallelLinear
    linear_q_up_proj: type = ColumnParallelLinear
    linear_kv_down_proj: type = ColumnParallelLinear
    linear_kv_up_proj: type = ColumnParallelLinear
    linear_proj: type = RowParallelLinear
    q_layernorm: Optional[type] = None
    kv_layernorm: Optional[type] = None


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """``cos, sin [len(positions), dim]`` of Megatron's non-interleaved RoPE (pairs ``(i, i + dim/2)``)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=cdt) / dim))
    angles = positions.to(cdt)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [s, ..., dim]`` rotated by ``cos, sin [s, dim]`` (broadcast over the middle dims)."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.view(shape) + torch.cat([-x2, x1], dim=-1) * sin.view(shape)


@dataclasses.dataclass
class GQLACache:
    """Decode cache of one layer on one TP rank. ``path="gqa"``: ``k_nope [b, G_local, T, d_nope]``,
    ``v [b, G_local, T, d_v]``, ``k_rope [b, T, d_rope]``; ``path="absorb"``: ``latent [b, T, r_kv]``,
    ``k_rope [b, T, d_rope]``. ``length`` tokens are filled."""

    path: str
    batch: int
    max_len: int
    k_rope: torch.Tensor
    latent: Optional[torch.Tensor] = None
    k_nope: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    length: int = 0
    # RoPE cos/sin of every position [max_len, d_rope] (module dtype), made once by init_cache: a
    # decode step is launch-bound at small batch, and recomputing them cost ~30 tiny kernels a step.
    rope_cos: Optional[torch.Tensor] = None
    rope_sin: Optional[torch.Tensor] = None
    # top-k layers: the lightning indexer's key of every position [b, T, d_I] (the indexer may pick
    # any past key, so it is cached for all of them, as a sparse-MQA T layer does)
    index_keys: Optional[torch.Tensor] = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.k_rope, self.latent, self.k_nope, self.v, self.index_keys) if t is not None)


class GQLAttention(MegatronModule):
    """Megatron ``self_attention`` module: ``[s, b, h]`` -> ``(output [s, b, h], bias)``.

    Reads ``config.gqla`` (a :class:`megatron_ext.config.GQLAConfig`); ``config.num_attention_heads``
    is H. Input and output are sequence-parallel shards when ``config.sequence_parallel`` is set.
    """

    def __init__(self, config, submodules: GQLASelfAttentionSubmodules = None, layer_number: int = 1,
                 attn_mask_type=AttnMaskType.causal, cp_comm_type=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        g = getattr(config, "gqla", None)
        if g is None:
            raise ValueError("config.gqla=None: GQLAttention needs a GQLAConfig on the TransformerConfig; "
                             "use --attention-type gqla (or set config.gqla)")
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError(f"context_parallel_size={config.context_parallel_size}: GQLA has no context "
                             "parallelism; use 1")
        submodules = submodules or GQLASelfAttentionSubmodules()
        tp = ps.get_tensor_model_parallel_world_size()
        g.validate(config.num_attention_heads, tp)
        self.gqla = g
        backends.note("gqla.attention", g.backend, "torch_sdpa" if self._dense_sdpa else "sparse_attention",
                      "dense causal: SDPA" if self._dense_sdpa else
                      "window/sinks, learned top-k or backend='triton'")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.tp = tp
        self.num_heads = config.num_attention_heads
        self.heads_local = self.num_heads // tp
        self.groups_local = g.num_query_groups // tp
        self.heads_per_group = self.num_heads // g.num_query_groups
        self.d_nope, self.d_rope, self.d_v = g.qk_head_dim, g.qk_pos_emb_head_dim, g.v_head_dim
        self.r_kv = g.kv_lora_rank
        self.q_head_dim = self.d_nope + self.d_rope
        self.softmax_scale = 1.0 / math.sqrt(self.q_head_dim)
        h = config.hidden_size

        def column(spec, n_in, n_out, name):
            return build_module(spec, n_in, n_out, config=config, init_method=config.init_method,
                                gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                                tp_comm_buffer_name=name)

        def norm(spec, size):
            from megatron_ext.modules.norm import Norm

            module = build_module(spec or Norm, config=config, hidden_size=size,
                                  eps=getattr(config, "layernorm_epsilon", 1e-5))
            # Its input is the full (gathered) latent and its output gradient is all-reduced over
            # TP below, so its weight gradient is already complete on every rank.
            for p in module.parameters():
                p.sequence_parallel = False
            return module

        if g.q_lora_rank is None:
            self.linear_q_proj = column(submodules.linear_q_proj, h, self.num_heads * self.q_head_dim, "q_proj")
        else:
            self.linear_q_down_proj = column(submodules.linear_q_down_proj, h, g.q_lora_rank, "q_down_proj")
            self.q_layernorm = norm(submodules.q_layernorm, g.q_lora_rank)
            self.linear_q_up_proj = column(submodules.linear_q_up_proj, g.q_lora_rank,
                                           self.num_heads * self.q_head_dim, "q_up_proj")
        self.linear_kv_down_proj = column(submodules.linear_kv_down_proj, h, self.r_kv + self.d_rope,
                                          "kv_down_proj")
        self.kv_layernorm = norm(submodules.kv_layernorm, self.r_kv) if g.latent_norm else None
        self.linear_kv_up_proj = column(submodules.linear_kv_up_proj, self.r_kv,
                                        g.num_query_groups * (self.d_nope + self.d_v), "kv_up_proj")
        self.linear_proj = build_module(
            submodules.linear_proj, self.num_heads * self.d_v, h, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj")
        self.indexer = None
        if g.topk is not None:
            # DSA's lightning indexer: one top-k list per token, shared by this rank's groups (so the
            # GQA and absorb decode paths attend the same keys); it learns from its KL loss alone.
            from megatron_ext.modules.indexer import LightningIndexer

            self.indexer = LightningIndexer(config, g, layer_number=layer_number, num_kv_heads=self.groups_local,
                                            tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None)

    # -------------------------------------------------------------------------------------------
    # projections shared by every path

    def _full_replica(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n/TP]`` column shard -> ``[..., n]`` on every rank (gather forward, slice backward)."""
        return gather_from_tensor_model_parallel_region(x) if self.tp > 1 else x

    def _sum_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward; backward sums the partial gradients of each rank's heads."""
        return _SumGradOverTP.apply(x, ps.get_tensor_model_parallel_group()) if self.tp > 1 else x

    def latent_and_rope_key(self, hidden: torch.Tensor, positions: torch.Tensor, rope=None):
        """``hidden [s(/TP), b, h]`` -> ``c [s, b, r_kv]``, ``k^R [s, b, d_rope]`` (rope applied);
        ``rope``: precomputed ``(cos, sin)`` of ``positions`` (decode reads them from the cache)."""
        kv, _ = self.linear_kv_down_proj(hidden)
        kv = self._full_replica(kv)
        c, kr = torch.split(kv, [self.r_kv, self.d_rope], dim=-1)
        if self.kv_layernorm is not None:
            c = self.kv_layernorm(c)
        if self.d_rope:
            cos, sin = rope or rope_cos_sin(positions, self.d_rope, self.gqla.rotary_base, kr.dtype)
            kr = apply_rope(kr, cos, sin)
        return self._sum_grad(c), self._sum_grad(kr)

    def queries(self, hidden: torch.Tensor, positions: torch.Tensor, rope=None):
        """-> ``q_nope [s, b, H_local, d_nope]``, ``q_rope [s, b, H_local, d_rope]`` (rope applied)."""
        if self.gqla.q_lora_rank is None:
            q, _ = self.linear_q_proj(hidden)
        else:
            qc, _ = self.linear_q_down_proj(hidden)
            qc = self._sum_grad(self.q_layernorm(self._full_replica(qc)))
            q = F.linear(qc, self.linear_q_up_proj.weight)  # input is already full-sequence on every rank
        q = q.view(*q.shape[:2], self.heads_local, self.q_head_dim)
        q_nope, q_rope = torch.split(q, [self.d_nope, self.d_rope], dim=-1)
        if self.d_rope:
            cos, sin = rope or rope_cos_sin(positions, self.d_rope, self.gqla.rotary_base, q.dtype)
            q_rope = apply_rope(q_rope, cos, sin)
        return q_nope, q_rope

    def up_weights(self):
        """This rank's ``W^UK [G_local, d_nope, r_kv]`` and ``W^UV [G_local, d_v, r_kv]``."""
        w = self.linear_kv_up_proj.weight.view(self.groups_local, self.d_nope + self.d_v, self.r_kv)
        return w[:, :self.d_nope], w[:, self.d_nope:]

    def _project_out(self, ctx: torch.Tensor):
        out, bias = self.linear_proj(ctx)
        return out, bias

    # -------------------------------------------------------------------------------------------
    # training / prefill: expanded per-group K/V, GQA attention through the sparse-attention op

    def _expanded(self, hidden: torch.Tensor):
        s = hidden.shape[0] * (self.tp if self.config.sequence_parallel else 1)
        positions = torch.arange(s, device=hidden.device)
        q_nope, q_rope = self.queries(hidden, positions)
        c, kr = self.latent_and_rope_key(hidden, positions)
        # c is already full-sequence on every rank, so the weight is applied here rather than by
        # the module (which would gather the sequence again); its pre-hooks run first
        run_forward_pre_hooks(self.linear_kv_up_proj)
        kv = F.linear(c, self.linear_kv_up_proj.weight)
        kv = kv.view(*kv.shape[:2], self.groups_local, self.d_nope + self.d_v)
        k_nope, v = torch.split(kv, [self.d_nope, self.d_v], dim=-1)
        return q_nope, q_rope, c, kr, k_nope, v

    @property
    def _dense_pattern(self) -> bool:
        """No window, no sinks and the op's Triton lane not forced: a call without a top-k list is
        plain causal attention and goes to SDPA (top-k layers: during the dense warm-up)."""
        g = self.gqla
        return g.window_size is None and g.num_sink_tokens == 0 and g.backend != "triton"

    @property
    def _dense_sdpa(self) -> bool:
        """Every call goes to SDPA (a top-k layer attends its lists after the warm-up)."""
        return self._dense_pattern and self.gqla.topk is None

    def _attend_expanded(self, q_nope, q_rope, kr, k_nope, v, topk=None, note_qk=None):
        """GQA attention of ``[s, b, heads, d]`` tensors -> ``[s, b, H_local * d_v]``; ``topk [b, s,
        G_local, k]``: the indexer's keys (top-k layers, after the dense warm-up); ``note_qk``: a
        callback given the main ``q [b, s, H_local, d_qk]``, ``k [b, s, G_local, d_qk]`` (the KL's target)."""
        s, b = q_nope.shape[:2]
        k = torch.cat([k_nope, kr.unsqueeze(2).expand(s, b, self.groups_local, self.d_rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if note_qk is not None:
            note_qk(q.transpose(0, 1), k.transpose(0, 1))
        if topk is None and self._dense_pattern:
            # Plain causal attention: SDPA (flash / cuDNN / memory-efficient on GPU) is faster than
            # the band kernel at full causal width. K/V are repeated per query head (head h reads
            # group h // (H/G)) so SDPA stays on its fused kernels; d_v may differ from d_qk there.
            rep = self.heads_local // self.groups_local
            qh = q.permute(1, 2, 0, 3)
            kh, vh = (t.permute(1, 2, 0, 3).repeat_interleave(rep, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(s, b, self.heads_local * self.d_v)
        # The op takes one head dim for q, k and v: zero-pad to a common one (exact: zero query/key
        # columns add nothing to the scores, zero value columns are sliced off), rounded up to a
        # Triton tile so the kernels stay usable when d_qk != d_v (e.g. 192 / 128 -> 256).
        d = max(self.q_head_dim, self.d_v)
        d = next((t for t in _TILE_HEAD_DIMS if t >= d), d)
        pad = lambda t: F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] < d else t  # noqa: E731
        q, k, v = (pad(t).transpose(0, 1) for t in (q, k, v))  # [b, s, heads, d]
        out = sparse_attention(q, k, v, window_size=self.gqla.window_size,
                               num_sink_tokens=self.gqla.num_sink_tokens, topk_indices=topk, causal=True,
                               softmax_scale=self.softmax_scale, backend=self.gqla.backend,
                               check_topk_range=False)  # the indexer's own top-k: always in range
        return out[..., :self.d_v].transpose(0, 1).reshape(s, b, self.heads_local * self.d_v)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, inference_params=None, **_unused):
        """``hidden_states [s, b, h]`` -> ``(out [s, b, h], bias)``. GQLA applies its own RoPE of
        ``qk_pos_emb_head_dim`` (the model's ``rotary_pos_emb`` is for ``kv_channels`` and ignored);
        the mask is causal (plus the config's window / sinks)."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed_seq_params: GQLA has no packed-sequence path; use unpacked batches")
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("inference_context: Megatron's inference engine is not wired to GQLA; "
                                      "use GQLAttention.init_cache / prefill / decode_step")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias: GQLA attention is causal only")
        q_nope, q_rope, _, kr, k_nope, v = self._expanded(hidden_states)
        if self.indexer is None:
            return self._project_out(self._attend_expanded(q_nope, q_rope, kr, k_nope, v))
        topk = self.indexer(hidden_states)                                   # [b, s, G_local, k]
        main = []
        ctx = self._attend_expanded(q_nope, q_rope, kr, k_nope, v, None if self.indexer.dense_warmup else topk,
                                    note_qk=lambda q, k: main.append((q, k)))
        out, bias = self._project_out(ctx)
        # DSA's KL(p_main || p_index) on detached q/k, attached to the output's backward
        out = self.indexer.attach_kl_loss(out, main[0][0], main[0][1], softmax_scale=self.softmax_scale)
        return out, bias

    # -------------------------------------------------------------------------------------------
    # decode

    def cache_bytes_per_token(self, path: str, dtype: Optional[torch.dtype] = None) -> int:
        """KV-cache bytes per token of this layer on one TP rank. "gqa": ``G/TP*(d_nope + d_v) +
        d_rope`` values (shards over groups); "absorb": ``r_kv + d_rope`` (replicated on every rank)."""
        _check_path(path)
        size = torch.empty((), dtype=dtype or self.linear_kv_up_proj.weight.dtype).element_size()
        extra = 0 if self.indexer is None else \
            self.indexer.head_dim * self.indexer.linear_k.weight.element_size()  # the index key
        if path == "gqa":
            return size * (self.groups_local * (self.d_nope + self.d_v) + self.d_rope) + extra
        return size * (self.r_kv + self.d_rope) + extra

    def init_cache(self, batch: int, max_len: int, path: str = "gqa", dtype=None, device=None) -> GQLACache:
        _check_path(path)
        for name, value in (("batch", batch), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive int; use an int >= 1")
        w = self.linear_kv_up_proj.weight
        dtype, device = dtype or w.dtype, device or w.device
        new = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        cache = GQLACache(path=path, batch=batch, max_len=max_len, k_rope=new(batch, max_len, self.d_rope))
        if path == "gqa":
            cache.k_nope = new(batch, self.groups_local, max_len, self.d_nope)
            cache.v = new(batch, self.groups_local, max_len, self.d_v)
        else:
            cache.latent = new(batch, max_len, self.r_kv)
        if self.indexer is not None:
            cache.index_keys = torch.zeros(batch, max_len, self.indexer.head_dim, device=device,
                                           dtype=self.indexer.linear_k.weight.dtype)
        if self.d_rope:
            cache.rope_cos, cache.rope_sin = rope_cos_sin(torch.arange(max_len, device=device), self.d_rope,
                                                          self.gqla.rotary_base, w.dtype)
        return cache

    def _check_decode_input(self, hidden, cache: GQLACache, steps: int):
        if self.config.sequence_parallel:
            raise ValueError("sequence_parallel=True: decode runs without sequence parallel; "
                             "build the inference model with sequence_parallel=False")
        if hidden.dim() != 3 or hidden.shape[1] != cache.batch:
            raise ValueError(f"hidden.shape={tuple(hidden.shape)}: must be [s, b={cache.batch}, "
                             f"h={self.config.hidden_size}]; use the batch the cache was made for")
        if cache.length + steps > cache.max_len:
            raise ValueError(f"position={cache.length + steps - 1}: past the cache's max_len="
                             f"{cache.max_len}; use init_cache with a larger max_len")

    def _store(self, cache: GQLACache, start: int, c: torch.Tensor, kr: torch.Tensor) -> None:
        """Write ``c [s, b, r_kv]``, ``k^R [s, b, d_rope]`` of positions ``start..start+s-1``."""
        end = start + c.shape[0]
        cache.k_rope[:, start:end] = kr.transpose(0, 1).to(cache.k_rope.dtype)
        if cache.path == "absorb":
            cache.latent[:, start:end] = c.transpose(0, 1).to(cache.latent.dtype)
        else:
            # One GEMM against the stacked up-projection, as the training forward does (a batched
            # matmul with the weight broadcast over the batch would first copy it b times).
            kv = F.linear(c.transpose(0, 1), self.linear_kv_up_proj.weight)   # [b, s, G_local*(dn+dv)]
            kv = kv.view(*kv.shape[:2], self.groups_local, self.d_nope + self.d_v).transpose(1, 2)
            cache.k_nope[:, :, start:end] = kv[..., :self.d_nope].to(cache.k_nope.dtype)
            cache.v[:, :, start:end] = kv[..., self.d_nope:].to(cache.v.dtype)
        cache.length = end

    @torch.no_grad()
    def prefill(self, hidden: torch.Tensor, cache: GQLACache):
        """Run the expanded forward over ``hidden [s, b, h]`` (positions 0..s-1) and fill ``cache``.
        Returns ``(out [s, b, h], bias)`` like :meth:`forward`."""
        if cache.length:
            raise ValueError(f"cache.length={cache.length}: prefill starts an empty cache; use a fresh "
                             "init_cache, or decode_step to extend this one")
        self._check_decode_input(hidden, cache, hidden.shape[0])
        q_nope, q_rope, c, kr, k_nope, v = self._expanded(hidden)
        self._store(cache, 0, c, kr)
        topk = None
        if self.indexer is not None:
            topk, k_idx = self.indexer.prefill_topk(hidden)
            cache.index_keys[:, :hidden.shape[0]] = k_idx.to(cache.index_keys.dtype)
        return self._project_out(self._attend_expanded(q_nope, q_rope, kr, k_nope, v, topk))

    def _allowed(self, position: int, device, selected: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Boolean key mask of one query (window / sinks, plus the indexer's ``selected [b, k]``
        keys of a top-k layer): ``[position + 1]``, ``[b, 1, position + 1]`` with ``selected``, None
        when dense. As in the training op, with top-k and no window only sinks + selected keys count."""
        w, n_sink = self.gqla.window_size, self.gqla.num_sink_tokens
        if w is None and selected is None:
            return None
        L = position + 1
        j = torch.arange(L, device=device)
        base = j < n_sink
        if w is not None:
            base = base | (position - j < w)
        if selected is None:
            return base
        sel = selected.to(device=device, dtype=torch.long)
        hit = torch.zeros(sel.shape[0], L + 1, dtype=torch.bool, device=device)
        hit.scatter_(1, torch.where((sel < 0) | (sel >= L), L, sel), True)   # -1 -> dummy column L
        return (hit[:, :L] | base).unsqueeze(1)

    def _decode_backend(self, q: torch.Tensor) -> str:
        """"triton" (the split-KV decode kernel) or "torch" (the reference below), through
        ``backends.resolve`` with ``gqla.backend`` as the request; "auto" takes Triton on CUDA only."""
        from megatron_ext.ops.sparse_attention.decode import triton_decode_unusable_reason

        dims = (self.d_nope, self.d_rope, self.d_v, self.r_kv)
        topk_reason = "top-k layer: the decode kernel takes window/sinks only" if self.indexer is not None else None
        return backends.resolve("gqla.decode", self.gqla.backend, [
            ("triton", lambda: topk_reason or triton_decode_unusable_reason(q, auto=self.gqla.backend == "auto",
                                                                            head_dims=dims)),
            ("torch", lambda: None)])

    def _attend_cache_triton(self, q_nope, q_rope, cache: GQLACache, L: int) -> torch.Tensor:
        """``q_nope [b, H_local, d_nope]``, ``q_rope [b, H_local, d_rope]`` over the first ``L``
        cached tokens -> ``ctx [b, H_local, d_v]`` through the split-KV kernel. GQA path: keys =
        ``[k_nope_g | k^R]`` (the rope key shared by every group, never copied per group), values
        ``v_g``. Absorb path: MQA of the absorbed queries over keys ``[c | k^R]`` with values ``c``,
        the latent read once for both products."""
        from megatron_ext.ops.sparse_attention.triton_decode import decode_attention

        b = q_nope.shape[0]
        rope = dict(q_rope=q_rope, k_rope=cache.k_rope[:, :L].unsqueeze(1)) if self.d_rope else {}
        mask = dict(window_size=self.gqla.window_size, num_sink_tokens=self.gqla.num_sink_tokens,
                    softmax_scale=self.softmax_scale)
        if cache.path == "gqa":
            return decode_attention(q_nope, cache.k_nope[:, :, :L], cache.v[:, :, :L], **rope, **mask)
        w_uk, w_uv = self.up_weights()
        gl, hg = self.groups_local, self.heads_per_group
        # Group-major bmm ([G, b*hg, .] @ [G, ., .]): a matmul broadcasting W over the batch would
        # first copy it b times (33 MB per product at b=64, G=4, measured as 0.12 ms of a 0.43 ms step).
        q_g = q_nope.reshape(b, gl, hg, self.d_nope).transpose(0, 1).reshape(gl, b * hg, self.d_nope)
        q_lat = torch.bmm(q_g, w_uk).view(gl, b, hg, self.r_kv).transpose(0, 1)          # absorb W^UK
        o_lat = decode_attention(q_lat.reshape(b, gl * hg, self.r_kv), cache.latent[:, :L].unsqueeze(1),
                                 None, **rope, **mask)
        o_g = o_lat.view(b, gl, hg, self.r_kv).transpose(0, 1).reshape(gl, b * hg, self.r_kv)
        ctx = torch.bmm(o_g, w_uv.transpose(1, 2))                                         # absorb W^UV
        return ctx.view(gl, b, hg, self.d_v).transpose(0, 1)

    @torch.no_grad()
    def decode_step(self, hidden: torch.Tensor, cache: GQLACache, position: int):
        """One new token per sequence: ``hidden [1, b, h]`` at ``position`` (== ``cache.length``)
        -> ``(out [1, b, h], bias)``; appends the token to ``cache``. Attention over the cache runs
        in the Triton split-KV kernel (``_attend_cache_triton``) when :meth:`_decode_backend` picks
        it, else in the torch reference below (CPU, fp64, or ``backend="torch"``)."""
        if isinstance(position, bool) or not isinstance(position, int) or position != cache.length:
            raise ValueError(f"position={position!r}: decode appends at cache.length={cache.length}; "
                             f"use position={cache.length}")
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(f"hidden.shape={tuple(hidden.shape)}: decode_step takes one token; use [1, b, h]")
        self._check_decode_input(hidden, cache, 1)
        pos = slice(position, position + 1)
        rope = (cache.rope_cos[pos], cache.rope_sin[pos]) if self.d_rope else None
        q_nope, q_rope = self.queries(hidden, None, rope)
        c, kr = self.latent_and_rope_key(hidden, None, rope)
        self._store(cache, position, c, kr)
        L, b = position + 1, hidden.shape[1]
        selected = None
        if self.indexer is not None:
            q_idx, k_idx, w_idx = self.indexer.decode_inputs(hidden, position)
            cache.index_keys[:, position:L] = k_idx.to(cache.index_keys.dtype)
            selected = self.indexer.decode_topk(q_idx, w_idx, cache.index_keys[:, :L], position)  # [b, 1, k]
            selected = selected.reshape(b, -1)
        gl, hg = self.groups_local, self.heads_per_group
        if self._decode_backend(q_nope) == "triton":
            ctx = self._attend_cache_triton(q_nope[0], q_rope[0], cache, L)
            return self._project_out(ctx.reshape(1, b, self.heads_local * self.d_v))
        q_nope = q_nope[0].reshape(b, gl, hg, self.d_nope)
        q_rope = q_rope[0].reshape(b, gl * hg, self.d_rope)
        # rope scores are shared across groups: [b, H_local, d_rope] @ [b, d_rope, L]
        scores = torch.matmul(q_rope, cache.k_rope[:, :L].transpose(1, 2))
        if cache.path == "gqa":
            k_nope, v = cache.k_nope[:, :, :L], cache.v[:, :, :L]
            scores = scores + torch.matmul(q_nope, k_nope.transpose(2, 3)).reshape(b, gl * hg, L)
        else:
            w_uk, w_uv = self.up_weights()
            latent = cache.latent[:, :L]
            q_lat = torch.matmul(q_nope, w_uk.unsqueeze(0)).reshape(b, gl * hg, self.r_kv)  # absorb W^UK
            scores = scores + torch.matmul(q_lat, latent.transpose(1, 2))
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        scores = scores * self.softmax_scale
        allowed = self._allowed(position, hidden.device, selected)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(q_nope.dtype)                       # [b, H_local, L]
        if cache.path == "gqa":
            ctx = torch.matmul(p.view(b, gl, hg, L), v)                           # [b, gl, hg, d_v]
        else:
            o_lat = torch.matmul(p, latent).view(b, gl, hg, self.r_kv)           # MQA over the latent
            ctx = torch.matmul(o_lat, w_uv.transpose(1, 2).unsqueeze(0))          # absorb W^UV
        return self._project_out(ctx.reshape(1, b, self.heads_local * self.d_v))


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path={path!r}: unknown decode path; use one of {list(PATHS)}")


def gqla_spec() -> ModuleSpec:
    """The GQLA ``self_attention`` slot for a transformer layer spec."""
    from megatron_ext.modules.norm import Norm

    return ModuleSpec(module=GQLAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=GQLASelfAttentionSubmodules(q_layernorm=Norm, kv_layernorm=Norm))
