"""Lightning indexer (DeepSeek-V3.2 DSA, arXiv 2512.02556 sec. 2.1) as a Megatron module.

Picks, per query token, the ``sparse_topk`` keys a top-k (pattern letter ``T``) attention layer
attends on top of its window and sinks. Index score (DSA eq. 1)::

    I[t, s] = sum_{h < H_I} w[t, h] * ReLU(q_I[t, h] . k_I[s])
    q_I = W_q x_t  [H_I, d_I],   k_I = LayerNorm(W_k x_s)  [d_I] (one shared key, MQA),
    w   = W_w x_t * H_I^-1/2 * d_I^-1/2

``H_I = indexer_num_heads``, ``d_I = indexer_head_dim``. The three linears are small and replicated
on every tensor-parallel rank (no TP split); their input is the layer's ``hidden_states``
DETACHED, so the language-model loss never reaches them and the indexer never changes the main
model's gradients: it learns only from its KL loss (DSA eqs. 3-4),
``KL(p_main || softmax(I))`` with ``p_main`` the main attention's probabilities summed over the
query heads and L1-normalised, computed from the main attention's DETACHED q and k. With
``indexer_kl_coeff = 0`` its weights are frozen (``requires_grad`` off).

Contract for the attention module (``SparseMQAttention`` calls this for ``T`` layers)::

    indexer = LightningIndexer(config, sparse_cfg)          # config: Megatron TransformerConfig
    topk = indexer(hidden_states, rotary_pos_emb=None)      # [b, s, hkv, k] int32, -1 padded
    if indexer.dense_warmup:                                # first indexer_dense_warmup_iters steps:
        out = <dense causal attention>                      #   main attention runs dense
    else:
        out = sparse_attention(q, k, v, topk_indices=topk, window_size=..., ...)
    out = indexer.attach_kl_loss(out, q, k)                 # q [b, s, hq_local, d], k [b, s, hkv, d]

SparseMQAttention attaches the KL to its OUTPUT (after the output projection), with the q/k the core
attention handed over through :meth:`LightningIndexer.note_main_qk`: inside the core attention the
attachment would be lost under Megatron's selective recompute (its first pass runs without grad).
Decode (T layers keep every index key: O(S)): :meth:`prefill_topk`, :meth:`decode_inputs`,
:meth:`decode_topk`.

* ``hidden_states [s, b, h]`` (Megatron layout; with sequence parallelism the local shard -- it is
  all-gathered over the TP group here, the indexer needs every position). Returns the same index
  list for every KV head (``expand``, no copy); ``hkv`` = this rank's KV heads (``num_kv_heads``
  argument, default ``max(1, num_query_groups // tp)``). Keys the layer's window and sinks already
  cover (``sparse_cfg.window_size``, ``num_sink_tokens``) are excluded before the top-k, so the
  whole budget goes to keys outside the window; ``-1`` pads rows with fewer than ``k`` candidates.
  Selection has no gradient.
* ``rotary_pos_emb``: optional Megatron RoPE table ``[s, 1, 1, R]`` (``cat(freqs, freqs)``, or a
  ``(q, k)`` tuple of them); the first ``r = min(R, d_I)`` dims of ``q_I`` and ``k_I`` are rotated
  (rotate-half convention) with the table's first ``r / 2`` frequencies. DSA ropes 64 of 128 dims.
  Without it the indexer is position-free apart from the causal mask.
* ``attach_kl_loss(out, q, k)``: ``q``/``k`` are the main attention's inputs after RoPE in the op
  layout; in the dense warm-up the KL runs over all causal keys, afterwards over the selected keys
  (the list of the last forward). Returns ``out`` unchanged; the backward injects
  ``d(coeff * KL)`` into the indexer through :class:`IndexerLossAutoScaler` (Megatron's
  ``MoEAuxLossAutoScaler`` pattern). No-op in eval / ``torch.no_grad()`` / ``coeff == 0``. With
  TP, the target is summed over every rank's query heads (all-reduce), so all ranks compute the same
  loss and the replicated weights get identical gradients.
* Dense warm-up: ``dense_warmup`` is True while the training iteration (:func:`begin_step`, called by
  the training loop before each step with the 1-based step number) is
  ``<= indexer_dense_warmup_iters``.
* Logging: :func:`indexer_loss_values` returns (and resets) the mean KL per layer since the last call.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_ext.ops.sparse_attention.indexer import (
    indexer_kl_loss, indexer_scores_reference, indexer_topk, select_topk)


# --------------------------------------------------------------------------------------------------
# step state, loss scaling and logging (process-wide, like Megatron's aux-loss trackers)
# --------------------------------------------------------------------------------------------------

class _State:
    iteration: int = 0  # 1-based number of the step being run (0: not told, counts as step 0)
    losses: Dict[int, list] = {}
    stages: set = set()  # "dense_warmup" / "sparse": which KL the attached losses of this step were


def begin_step(iteration: int, num_microbatches: int = 1) -> None:
    """Tell the indexers which training step (1-based) runs next (drives the dense warm-up); the KL
    gradient is scaled by ``1 / num_microbatches`` like the micro-batch-averaged LM loss."""
    _State.iteration = int(iteration)
    IndexerLossAutoScaler.set_loss_scale(1.0 / max(1, int(num_microbatches)))


def end_step(iteration: int, metrics_path=None) -> None:
    """Append ``{"kind": "indexer", "step", "stage", "kl": {layer: mean KL}}`` to ``metrics_path``
    (if given and any top-k layer ran) and reset the per-step values. ``stage``: ``"dense_warmup"``
    (KL over all causal keys, the main attention dense) or ``"sparse"`` (KL over the selected keys)."""
    stages, _State.stages = _State.stages, set()
    values = indexer_loss_values(reset=True)
    if values and metrics_path is not None:
        from megatron_ext.observability.files import append_jsonl

        append_jsonl(metrics_path, {"kind": "indexer", "step": int(iteration),
                                    "stage": "/".join(sorted(stages)) or None,
                                    "kl": {str(k): v for k, v in sorted(values.items())}})


def indexer_loss_values(reset: bool = True) -> Dict[int, float]:
    """``{layer_number: mean KL}`` over the forwards since the last reset (unscaled by the coeff)."""
    out = {layer: float(torch.stack(vals).float().mean()) for layer, vals in _State.losses.items() if vals}
    if reset:
        _State.losses = {}
    return out


class IndexerLossAutoScaler(torch.autograd.Function):
    """Returns the activation unchanged; its backward also sends ``scale`` as the gradient of the
    attached loss, so the loss's graph (the indexer's) is differentiated with the main backward.
    ``scale`` defaults to 1; a loop that averages the LM loss over micro-batches sets
    ``1 / num_microbatches`` (Megatron's ``MoEAuxLossAutoScaler.set_loss_scale`` convention)."""

    main_loss_backward_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        scale = IndexerLossAutoScaler.main_loss_backward_scale
        scale = torch.ones((), device=loss.device) if scale is None else scale.to(loss.device)
        return grad_output, torch.ones_like(loss) * scale

    @staticmethod
    def set_loss_scale(scale) -> None:
        IndexerLossAutoScaler.main_loss_backward_scale = torch.as_tensor(scale, dtype=torch.float32).detach()


# --------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------

def _rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``r`` dims of ``x [s, b, (heads,) d]`` by the table's first ``r/2`` freqs."""
    d = x.shape[-1]
    big = table.shape[-1]
    r = min(big, d) // 2 * 2
    if r == 0:
        return x
    freqs = table[..., : r // 2].float()
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(table.shape[0], 1, *([1] * (x.dim() - 3)), r)
    rot, rest = x[..., :r].float(), x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * torch.cos(freqs) + rotated * torch.sin(freqs)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class LightningIndexer(MegatronModule):
    """See the module docstring. ``sparse_cfg``: ``megatron_ext.config.SparseAttentionConfig``
    (``topk``, ``indexer_num_heads``, ``indexer_head_dim``, ``indexer_kl_coeff``,
    ``indexer_dense_warmup_iters``, ``window_size``, ``num_sink_tokens``, ``backend``)."""

    def __init__(self, config, sparse_cfg, layer_number: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, tp_group=None):
        super().__init__(config=config)
        k = getattr(sparse_cfg, "topk", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"sparse_topk={k!r}: a top-k layer needs the number of keys per query; "
                             f"use an int >= 1")
        self.sparse = sparse_cfg
        self.topk = k
        self.num_heads = int(sparse_cfg.indexer_num_heads)
        self.head_dim = int(sparse_cfg.indexer_head_dim)
        self.kl_coeff = float(sparse_cfg.indexer_kl_coeff)
        self.warmup_iters = int(sparse_cfg.indexer_dense_warmup_iters)
        self.backend = getattr(sparse_cfg, "backend", "auto")
        self.layer_number = layer_number
        self.tp_group = tp_group if tp_group is not None else (
            parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized()
            else None)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        if num_kv_heads is None:  # this rank's KV heads (MQA at TP > 1: every rank holds the one head)
            num_kv_heads = max(1, (config.num_query_groups or config.num_attention_heads) // tp)
        self.num_kv_heads = num_kv_heads
        h = config.hidden_size
        device = "cpu" if getattr(config, "use_cpu_initialization", True) or not torch.cuda.is_available() \
            else torch.cuda.current_device()
        dtype = config.params_dtype
        self.linear_q = torch.nn.Linear(h, self.num_heads * self.head_dim, bias=False, device=device, dtype=dtype)
        self.linear_k = torch.nn.Linear(h, self.head_dim, bias=False, device=device, dtype=dtype)
        self.k_norm = torch.nn.LayerNorm(self.head_dim, eps=config.layernorm_epsilon, device=device, dtype=dtype)
        self.linear_w = torch.nn.Linear(h, self.num_heads, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            for lin in (self.linear_q, self.linear_k, self.linear_w):
                config.init_method(lin.weight)
        if self.kl_coeff == 0:
            # The KL is the indexer's only loss: without it the weights are frozen (a pretrained
            # indexer kept as it is), so the optimizer does not decay them and Megatron's DDP,
            # which with --overlap-grad-reduce waits for every trainable parameter's gradient
            # hook, does not wait for theirs.
            for p in self.parameters():
                p.requires_grad_(False)
        self._saved = None  # (q_idx, k_idx, w, topk) of the last forward, for attach_kl_loss
        # Set by SparseMQAttention around its forward: the core attention then hands its q/k over
        # (note_main_qk) and the KL is attached after the whole attention, outside Megatron's
        # selective-recompute region, whose no-grad first pass could not attach it.
        self.collect_main_qk = False
        self._main_qk = None

    @property
    def dense_warmup(self) -> bool:
        """True during the first ``indexer_dense_warmup_iters`` training steps."""
        return self.training and _State.iteration <= self.warmup_iters and self.warmup_iters > 0

    def index_inputs(self, hidden_states: torch.Tensor, rotary_pos_emb=None, position: int = 0):
        """``(q_idx [b, s, H_I, d_I], k_idx [b, s, d_I], w [b, s, H_I])`` from DETACHED input;
        ``position``: absolute position of the first token (decode), for RoPE."""
        x = hidden_states.detach()
        if self.config.sequence_parallel and self.tp_group is not None and self.tp_group.size() > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        s, b, _ = x.shape
        q = self.linear_q(x).view(s, b, self.num_heads, self.head_dim)
        k = self.k_norm(self.linear_k(x))                                   # [s, b, d_I]
        if rotary_pos_emb is not None:
            q_table, k_table = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            q = _rope(q, q_table[position:position + s])
            k = _rope(k, k_table[position:position + s])
        w = self.linear_w(x) * (self.num_heads ** -0.5 * self.head_dim ** -0.5)
        return q.transpose(0, 1), k.transpose(0, 1), w.transpose(0, 1)

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb=None) -> torch.Tensor:
        q_idx, k_idx, w = self.index_inputs(hidden_states, rotary_pos_emb)
        topk = indexer_topk(q_idx.detach(), k_idx.detach(), w.detach(), self.topk,
                            window_size=self.sparse.window_size, num_sink_tokens=self.sparse.num_sink_tokens,
                            backend=self.backend)                           # [b, s, 1, k]
        self._saved = (q_idx, k_idx, w, topk) if torch.is_grad_enabled() else None
        return topk.expand(-1, -1, self.num_kv_heads, -1)

    def note_main_qk(self, query: torch.Tensor, key: torch.Tensor, softmax_scale: Optional[float]) -> None:
        """Called by the core attention with its ``q [b, s, hq, d]``, ``k [b, s, hkv, d]`` (after
        RoPE) while :attr:`collect_main_qk` is set; kept detached (the KL never reaches them)."""
        if self.collect_main_qk:
            self._main_qk = (query.detach(), key.detach(), softmax_scale)

    def take_main_qk(self):
        """``(q, k, softmax_scale)`` noted during the last forward (or None), and forget them."""
        qk, self._main_qk = self._main_qk, None
        return qk

    # -- decode (inference): the cache keeps every position's index key ---------------------------

    def prefill_topk(self, hidden_states: torch.Tensor, rotary_pos_emb=None):
        """Prompt ``[p, b, h]`` from position 0 -> ``(topk [b, p, hkv, k], k_idx [b, p, d_I])``:
        the training forward's selection plus the index keys to cache."""
        q_idx, k_idx, w = self.index_inputs(hidden_states, rotary_pos_emb)
        topk = indexer_topk(q_idx, k_idx, w, self.topk, window_size=self.sparse.window_size,
                            num_sink_tokens=self.sparse.num_sink_tokens, backend=self.backend)
        return topk.expand(-1, -1, self.num_kv_heads, -1), k_idx

    def decode_inputs(self, hidden_states: torch.Tensor, position: int, rotary_pos_emb=None):
        """One token ``[1, b, h]`` at ``position`` -> ``(q_idx [b, 1, H_I, d_I], k_idx [b, 1, d_I],
        w [b, 1, H_I])``; cache ``k_idx``, then :meth:`decode_topk`."""
        return self.index_inputs(hidden_states, rotary_pos_emb, position=position)

    def decode_topk(self, q_idx: torch.Tensor, w: torch.Tensor, index_keys: torch.Tensor,
                    position: int) -> torch.Tensor:
        """Top-k of the query at ``position`` over ``index_keys [b, position + 1, d_I]`` (every
        cached index key, its own included) -> ``[b, 1, k]`` int32, -1 padded; the same scores,
        exclusions and selection as the training forward (ties may fall either way)."""
        scores = indexer_scores_reference(q_idx, index_keys, w, causal=True, query_offset=position)
        return select_topk(scores, self.topk, window_size=self.sparse.window_size,
                           num_sink_tokens=self.sparse.num_sink_tokens, query_offset=position)[:, 0]

    def attach_kl_loss(self, output: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                       softmax_scale: Optional[float] = None) -> torch.Tensor:
        """Attach ``indexer_kl_coeff * KL`` to ``output``'s backward (see the module docstring)."""
        saved, self._saved = self._saved, None
        if saved is None or not self.training or self.kl_coeff == 0 or not torch.is_grad_enabled():
            return output
        q_idx, k_idx, w, topk = saved
        tp = self.tp_group if self.tp_group is not None and self.tp_group.size() > 1 else None
        dense = self.dense_warmup
        kl = indexer_kl_loss(query, key, q_idx, k_idx, w, None if dense else topk,
                             softmax_scale=softmax_scale, tp_group=tp)
        _State.losses.setdefault(self.layer_number or 0, []).append(kl.detach())
        _State.stages.add("dense_warmup" if dense else "sparse")
        return IndexerLossAutoScaler.apply(output, kl * self.kl_coeff)

