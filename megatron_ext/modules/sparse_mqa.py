"""Sparse MQA attention as Megatron's ``self_attention``: one (or few) KV heads, sliding window +
token sinks, a learnable per-head sink logit, and learned top-k keys, per layer from a pattern.

- Window + sinks: StreamingLLM (Xiao et al., arXiv 2309.17453): query i attends key j iff j <= i and
  (i - j < window_size or j < num_sink_tokens); ``window_size`` counts the query itself.
- Learnable sink logit (gpt-oss; DeepSeek-V4): p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik)).
- Top-k keys chosen by DeepSeek-V3.2's lightning indexer (DSA), united with the window and sinks.
- MQA (Shazeer, arXiv 1911.02150): ``num_query_groups=1``; GQA with few groups is the same code.

:class:`SparseMQAttention` subclasses Megatron's ``SelfAttention``, so the fused QKV
ColumnParallelLinear, RoPE, the RowParallelLinear output projection and the checkpoint layout are
Megatron's own. Only the core attention differs (:class:`SparseCoreAttention`, calling
``megatron_ext.ops.sparse_attention.sparse_attention`` in its ``[b, s, h, d]`` layout).

Tensor parallelism with fewer KV heads than TP ranks (MQA at TP=2): Megatron (0.16.1 and 0.19.2)
splits the fused QKV weight's columns over the ranks and all-gathers the projection output, so
every rank sees the whole KV head; the all-gather's backward is a reduce-scatter, which sums every
rank's gradient into the rank that owns the KV columns. The KV head is therefore shared, not
copied, and needs no extra gradient all-reduce. Query heads (and their sink logits) split over TP.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_ext import backends
from megatron_ext.ops.sparse_attention import sparse_attention
from megatron_ext.ops.sparse_attention.decode import (
    IndexedKVCache, StreamingKVCache, decode_step as decode_attention,
    decode_step_topk as decode_attention_topk)

LETTERS = ("D", "W", "T")


def _sparse_config(config):
    sparse = getattr(config, "sparse_attention", None)
    if sparse is None:
        raise ValueError("config.sparse_attention=None: the sparse attention modules read their knobs "
                         "from it; use config.sparse_attention = SparseAttentionConfig(...) "
                         "(megatron_ext.config), as training/model.py does")
    return sparse


class SparseCoreAttention(MegatronModule):
    """Fills Megatron's ``core_attention`` slot: query ``[sq, b, np, hn]``, key/value
    ``[sk, b, ng, hn]`` (this rank's heads) -> ``[sq, b, np * hn]``.

    ``letter``: ``D`` dense causal, ``W`` window + sinks, ``T`` top-k (+ window/sinks; the indices
    are set in ``topk_indices`` by :class:`SparseMQAttention` before each forward). ``sink_logits``
    (learnable_sink) holds this rank's query heads' logits, fp32, initialised to 0.
    """

    def __init__(self, config, layer_number: int = 1, attn_mask_type=AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type=None, pg_collection=None,
                 letter: Optional[str] = None, **_unused):
        super().__init__(config=config)
        sparse = _sparse_config(config)
        if config.context_parallel_size > 1:
            raise ValueError(f"context_parallel_size={config.context_parallel_size}: sparse attention has "
                             "no context parallelism yet; use 1")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout!r}: the sparse attention op has no dropout; use 0.0")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type={attn_mask_type}: sparse attention is causal; use AttnMaskType.causal")
        self.letter = letter or sparse.letter(layer_number)
        if self.letter not in LETTERS:
            raise ValueError(f"letter={self.letter!r}: unknown attention pattern letter; use one of {list(LETTERS)}")
        self.layer_number = layer_number
        self.window_size = None if self.letter == "D" else sparse.window_size
        self.num_sink_tokens = 0 if self.letter == "D" else sparse.num_sink_tokens
        self.softmax_scale = softmax_scale
        self.backend = sparse.backend
        self.tp_group = pg_collection.tp if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_group()
        tp = self.tp_group.size()
        if config.num_attention_heads % tp:
            raise ValueError(f"tensor_model_parallel_size={tp}: does not divide num_attention_heads="
                             f"{config.num_attention_heads}; use a divisor of the head count")
        self.num_local_heads = config.num_attention_heads // tp
        self.sink_logits = None
        if sparse.learnable_sink:
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            # Zero: the sink starts as one extra unit of softmax mass, the same for every head and
            # independent of the init RNG (so TP and world size 1 agree); fp32: one logit per head.
            self.sink_logits = torch.nn.Parameter(torch.zeros(self.num_local_heads, dtype=torch.float32,
                                                              device=device))
            set_tensor_model_parallel_attributes(self.sink_logits, is_parallel=True, dim=0, stride=1)
        self.topk_indices: Optional[torch.Tensor] = None
        # (indexer,) of a T layer, set by SparseMQAttention; a tuple so the indexer's parameters stay
        # registered once, under self_attention.indexer.
        self.indexer_ref: tuple = ()
        dense_sdpa = self.letter == "D" and self.sink_logits is None
        backends.note("sparse_mqa.core_attention", "auto", "torch_sdpa" if dense_sdpa else "sparse_attention",
                      f"pattern letter {self.letter}")

    def _sink(self) -> Optional[torch.Tensor]:
        # A bf16 model (Float16Module casts every parameter) still takes the sink in fp32.
        s = self.sink_logits
        return s if s is None or s.dtype in (torch.float32, torch.float64) else s.float()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by SparseCoreAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SparseCoreAttention")
        if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type={attn_mask_type}: sparse attention is causal; use causal")
        sq, b = query.shape[0], query.shape[1]
        if self.letter == "D" and self.sink_logits is None:
            # A dense layer without a sink is plain causal attention: SDPA picks flash/cuDNN on GPU.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=k.size(1) != q.size(1))
            return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
        window, sinks, topk, indexer = self.window_size, self.num_sink_tokens, None, None
        if self.letter == "T":
            if not self.indexer_ref or self.topk_indices is None:
                raise RuntimeError("letter='T' layer ran without topk_indices: SparseMQAttention sets them "
                                   "from its indexer before each forward")
            indexer = self.indexer_ref[0]
            if indexer.dense_warmup:  # DSA's warm-up: the main attention stays dense, the indexer learns
                window, sinks = None, 0
            else:
                topk = self.topk_indices
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, d]
        out = sparse_attention(q, k, v, window_size=window, num_sink_tokens=sinks,
                               sink_logits=self._sink(), topk_indices=topk, causal=True,
                               softmax_scale=self.softmax_scale, backend=self.backend,
                               check_topk_range=False)  # the indexer's own top-k: always in range
        if indexer is not None:  # SparseMQAttention attaches the KL once the attention is done
            indexer.note_main_qk(q, k, self.softmax_scale)
        return out.transpose(0, 1).reshape(sq, b, -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """``sink_logits`` is split over TP along its only axis, like the query heads."""
        state = self.state_dict(prefix="", keep_vars=True) if self.sink_logits is not None else {}
        dp_cp = (metadata or {}).get("dp_cp_group")
        if dp_cp is None:
            dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"sink_logits": 0}, sharded_offsets,
                                                   tp_group=self.tp_group, dp_cp_group=dp_cp)


class SparseMQAttention(SelfAttention):
    """Megatron ``SelfAttention`` with :class:`SparseCoreAttention` for pattern ``letter`` (default:
    ``config.sparse_attention.letter(layer_number)``), plus streaming decode (:meth:`new_cache`,
    :meth:`prefill`, :meth:`decode_step`). Input/output ``[s, b, h]`` as in Megatron."""

    def __init__(self, config, submodules, layer_number: int, attn_mask_type=AttnMaskType.causal,
                 letter: Optional[str] = None, **kwargs):
        sparse = _sparse_config(config)
        letter = letter or sparse.letter(layer_number)
        submodules = dataclasses.replace(
            submodules, core_attention=functools.partial(SparseCoreAttention, letter=letter))
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, **kwargs)
        self.letter = letter
        self.sparse = sparse
        self.indexer = None
        if letter == "T":
            try:
                from megatron_ext.modules.indexer import LightningIndexer
            except ImportError as e:
                raise ValueError(f"attention_pattern={sparse.pattern!r}: sparse_topk needs the lightning "
                                 f"indexer (megatron_ext.modules.indexer: {e}); use only D and W letters") from e
            self.indexer = LightningIndexer(config, sparse, layer_number=layer_number,
                                            num_kv_heads=self.num_query_groups_per_partition,
                                            tp_group=self.pg_collection.tp)
            self.core_attention.indexer_ref = (self.indexer,)

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        indexer = self.indexer
        if indexer is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        # Kept until the next forward (not cleared) so a selective recompute of the core
        # attention in the backward sees the same indices.
        self.core_attention.topk_indices = indexer(hidden_states, rotary_pos_emb=kwargs.get("rotary_pos_emb"))
        # The KL is attached to this module's output, not inside the core attention: under
        # selective recompute the core attention first runs without grad (nothing could be
        # attached) and its backward re-run is too late to add a loss. The core attention only
        # hands over its q/k (after RoPE) here; a re-run in the backward finds the flag off.
        indexer.collect_main_qk = self.training and torch.is_grad_enabled()
        try:
            output, bias = super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            indexer.collect_main_qk = False
        qk = indexer.take_main_qk()
        if qk is not None:
            output = indexer.attach_kl_loss(output, qk[0], qk[1], softmax_scale=qk[2])
        else:
            indexer._saved = None
        return output, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """Megatron's layout, except the indexer: the block stacks every layer's tensors along one
        layer axis, which needs the same parameters in every layer, and only T layers have an
        indexer. Its tensors are keyed by the global layer number instead, without the layer axis."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.indexer is None:
            return state
        own = f"{prefix}indexer."
        state = {k: v for k, v in state.items() if not k.startswith(own)}
        indexer_state = self.indexer.sharded_state_dict(own, (), metadata)
        for entry in indexer_state.values():  # the local keys stay, the checkpoint keys gain the layer
            entry.key = entry.key.replace(own, f"{own}layer_{self.layer_number}.", 1)
        state.update(indexer_state)
        return state

    # ------------------------------------------------------------------------------------------
    # Streaming decode (inference): keys stored after RoPE at absolute positions.

    def _check_decode(self, cache=None):
        if self.config.sequence_parallel:
            raise ValueError("sequence_parallel=True: decode feeds one token, which cannot be split over "
                             "TP ranks; use sequence_parallel=False for inference")
        want = IndexedKVCache if self.letter == "T" else StreamingKVCache
        if cache is not None and not isinstance(cache, want):
            raise ValueError(f"cache={type(cache).__name__}: a letter={self.letter!r} layer decodes with a "
                             f"{want.__name__}; use this layer's new_cache()")

    def new_cache(self, batch: int, dtype=None, device=None):
        """An empty cache for this layer: this rank's KV heads, the layer's window and sinks. A D
        layer keeps every key; a T layer keeps every key AND the indexer's key of every position
        (:class:`IndexedKVCache`: the indexer may pick any past key, so its cache is O(S))."""
        core = self.core_attention
        weight = self.linear_qkv.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        if self.letter == "T":
            return IndexedKVCache(batch, self.num_query_groups_per_partition, self.hidden_size_per_attention_head,
                                  self.indexer.head_dim, core.window_size, core.num_sink_tokens, dtype=dtype,
                                  index_dtype=self.indexer.linear_k.weight.dtype, device=device)
        return StreamingKVCache(batch, self.num_query_groups_per_partition, self.hidden_size_per_attention_head,
                                core.window_size, core.num_sink_tokens, dtype=dtype, device=device)

    def _qkv_rope(self, hidden_states, position: int, rotary_pos_emb):
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        if rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):
                rotary_pos_emb = rotary_pos_emb[0]
            freqs = rotary_pos_emb[position:position + hidden_states.shape[0]]
            query = apply_rotary_pos_emb(query, freqs, config=self.config, cp_group=self.pg_collection.cp)
            key = apply_rotary_pos_emb(key, freqs, config=self.config, cp_group=self.pg_collection.cp)
        return query, key, value

    def prefill(self, hidden_states, cache: StreamingKVCache, rotary_pos_emb=None):
        """Prompt ``[p, b, h]`` from position 0: the training forward over it, filling ``cache``.
        ``rotary_pos_emb``: Megatron's RoPE table ``[>= p, 1, 1, d]``. Returns ``(out, bias)``."""
        self._check_decode(cache)
        if cache.length != 0:
            raise ValueError(f"cache.length={cache.length}: prefill starts a sequence; use an empty cache "
                             "(continue with decode_step)")
        query, key, value = self._qkv_rope(hidden_states, 0, rotary_pos_emb)
        if self.letter == "T":
            topk, k_idx = self.indexer.prefill_topk(hidden_states, rotary_pos_emb)
            self.core_attention.topk_indices = topk
            cache.append(key.transpose(0, 1), value.transpose(0, 1), 0, index_k=k_idx)
        else:
            cache.append(key.transpose(0, 1), value.transpose(0, 1), 0)
        return self.linear_proj(self.core_attention(query, key, value))

    def decode_step(self, hidden_states, cache: StreamingKVCache, position: int, rotary_pos_emb=None):
        """One token ``[1, b, h]`` at absolute ``position`` (== ``cache.length``): projections, RoPE,
        cache update, attention over sinks + window (T layers: + the indexer's top-k of the new
        query over every cached index key), output projection -> ``(out [1, b, h], bias)``."""
        self._check_decode(cache)
        if hidden_states.shape[0] != 1:
            raise ValueError(f"hidden_states.shape={tuple(hidden_states.shape)}: decode_step takes one token; "
                             "use [1, b, h] (prefill for a prompt)")
        query, key, value = self._qkv_rope(hidden_states, position, rotary_pos_emb)
        core = self.core_attention
        if self.letter == "T":
            q_idx, k_idx, w = self.indexer.decode_inputs(hidden_states, position, rotary_pos_emb)
            cache.append(key.transpose(0, 1), value.transpose(0, 1), position, index_k=k_idx)
            topk = self.indexer.decode_topk(q_idx, w, cache.index_keys(), position)   # [b, 1, k]
            out = decode_attention_topk(query[0], cache, topk, softmax_scale=core.softmax_scale,
                                        sink_logits=core._sink())
        else:
            cache.append(key.transpose(0, 1), value.transpose(0, 1), position)
            out = decode_attention(query[0], cache, softmax_scale=core.softmax_scale,
                                   sink_logits=core._sink())  # [b, np, hn]
        return self.linear_proj(out.reshape(1, out.shape[0], -1))
