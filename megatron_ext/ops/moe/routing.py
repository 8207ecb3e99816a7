"""MoE router as one pure function: logits ``[T, E]`` -> top-k probs/indices, losses and load.

Everything runs in fp32 whatever the logits' dtype (Megatron's ``moe_router_dtype`` fp32 lane):
top-k on bf16 ties and the exp in softmax/Sinkhorn are where low precision hurts routing.

Options (field names follow Megatron's ``moe_router_*`` / ``moe_*`` config, see
``megatron/core/transformer/moe/{router.py,moe_utils.py}``):

* score function: ``softmax`` (Switch/GShard; ``pre_softmax`` picks top-k on the full softmax,
  else softmax over the k chosen logits) or ``sigmoid`` (DeepSeek-V3 eq. 15-16: top-k of
  sigmoid scores, normalised over the k chosen when ``normalize_topk`` and k > 1, times
  ``topk_scaling_factor``, DeepSeek's ``route_scale``), or ``sqrtsoftplus`` (Megatron >= 0.19:
  ``sqrt(softplus(l))`` in place of the sigmoid, everything else as for sigmoid, the expert bias
  included).
* group-limited routing (DeepSeek-V2 device-limited / DeepSeek-V3 node-limited): experts split into
  ``num_groups`` equal groups; a group's score is the sum of its top ``max(1, topk // group_topk)``
  selection scores (Megatron; DeepSeek-V3's top-2 with k=8, 4 groups); the token picks the
  ``group_topk`` best groups, then its k experts inside them.
* aux-loss-free balancing (DeepSeek-V3 §2.1.2, arXiv 2408.15664): a per-expert bias is added to the
  scores for *selection only*; :func:`update_expert_bias` moves it by ``rate * sign(mean - load)``.
* load-balancing losses (Switch Transformer eq. 4-6, arXiv 2101.03961)::

      aux_loss = coeff * E * sum_e f_e * P_e
      f_e = (#(token, choice) pairs routed to e) / (T * k)      (fraction over the k choices)
      P_e = mean_t s[t, e]                                      (mean router prob over tokens)

  with ``s`` the softmax over all E (or, for sigmoid and sqrtsoftplus, the scores normalised
  over E, as Megatron does). ``seq_aux_loss`` (DeepSeek-V3 eq. 17-20) applies the same formula within
  each sequence and averages over sequences. ``global_aux_loss`` (arXiv 2501.11873) takes f_e
  from counts over the global batch (a ``reduce_counts`` callback sums them) and P_e from the
  local tokens. f_e counts the plain top-k of the scores ``s`` (DeepSeek-V3 eq. 18, Megatron's
  ``compute_routing_scores_for_aux_loss``): without the expert bias, the group limit, a replayed
  or quantile-balanced selection and capacity dropping, so a DeepSeek-V3 router's balance loss
  measures the scores' own preference, not the bias-corrected dispatch. Several of the three may
  be combined, each with its own coefficient (Megatron's list form of
  ``moe_router_load_balancing_type`` / ``moe_aux_loss_coeff``); ``aux_loss`` is their sum.
* router z-loss (ST-MoE eq. 5, arXiv 2202.08906): ``z_loss = coeff * mean_t logsumexp(l_t)^2``.
* Sinkhorn balancing (BASE layers / Megatron ``sinkhorn``): in training, experts are chosen by
  top-k of the Sinkhorn-balanced matrix; the gate values are the score function of the raw logits.
* quantile balancing (Megatron >= 0.19 ``quantile_balancing``, a dual coordinate-descent
  assignment): experts are chosen by top-k of ``l - beta`` with a per-expert bias ``beta`` on the
  raw fp32 logits; the gates are the score function's at those experts. In training the router
  also returns, per expert, the ``T*k/E + 1``-th largest over tokens of ``l - alpha_t`` (``alpha_t``
  the token's ``k+1``-th largest ``l - beta``): the ``beta`` that would give every expert its
  share. The caller averages it over the step's micro-batches and the data-parallel ranks and
  moves ``beta`` once per step (:func:`update_qb_beta`). No aux loss, groups, expert bias or
  capacity with it (Megatron refuses them too).
* capacity (Switch Transformer §2.2, GShard): ``capacity = ceil(T * k / E * capacity_factor)``
  (Megatron's ``get_capacity``); per expert the first ``capacity`` pairs are kept, by descending
  prob (``drop_policy="probs"``) or by token position (``"position"``); ties broken by position,
  so the counts are exact and deterministic. Dropped pairs get prob 0 and ``kept=False``: their
  routed output is zero and the token passes on through the residual (and the shared expert, if
  the layer has one). ``capacity_factor=None`` is dropless.
* noise during training only: multiplicative jitter ``Uniform(1-eps, 1+eps)`` (Switch §2.4;
  Megatron applies it to the router input, we apply it to the logits, which is the same for a
  bias-free linear router) and additive Gaussian noise ``noise_std * N(0, 1)`` (Shazeer et al.
  2017 noisy top-k gating). The noisy logits feed everything downstream (selection, gates, losses).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from megatron_ext import backends

Tensor = torch.Tensor

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
# the score functions whose gates are the selected scores themselves (normalised over the k
# chosen when normalize_topk and k > 1), which the aux-loss-free bias may shift
POINTWISE_SCORES = ("sigmoid", "sqrtsoftplus")
LOAD_BALANCING_TYPES = ("none", "aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                        "quantile_balancing")
DROP_POLICIES = ("probs", "position")
_AUX_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
# the balancing types that choose the experts themselves (one at most, never in a list)
_SELECTIONS = ("sinkhorn", "quantile_balancing")


def _bad(field: str, value, why: str, allowed: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {why}; use {allowed}")


@dataclasses.dataclass
class RouterConfig:
    """Router options; names follow Megatron's ``TransformerConfig.moe_*`` fields.

    Megatron equivalents: num_experts=num_moe_experts, topk=moe_router_topk,
    score_function=moe_router_score_function, pre_softmax=moe_router_pre_softmax,
    topk_scaling_factor=moe_router_topk_scaling_factor, load_balancing_type=
    moe_router_load_balancing_type, aux_loss_coeff=moe_aux_loss_coeff, z_loss_coeff=
    moe_z_loss_coeff, enable_expert_bias=moe_router_enable_expert_bias, bias_update_rate=
    moe_router_bias_update_rate, capacity_factor=moe_expert_capacity_factor, drop_policy=
    moe_token_drop_policy, pad_to_capacity=moe_pad_expert_input_to_capacity, input_jitter_eps=
    moe_input_jitter_eps, num_groups=moe_router_num_groups, group_topk=moe_router_group_topk,
    expert_parallel_size=expert_model_parallel_size, quantile_balancing_ema=
    moe_router_quantile_balancing_ema. ``normalize_topk``, ``noise_std`` and the
    ``sinkhorn_*`` knobs are ours (Megatron hard-codes them). ``load_balancing_type`` may be a
    list of aux-loss types (and "none") with ``aux_loss_coeff`` a list of the same length, one
    coefficient each, as Megatron takes them; :meth:`validate` stores lists as tuples. ``pad_to_capacity`` is validated
    here but honoured by the dispatcher (each expert's group padded to ``RoutingResult.capacity``
    rows for static shapes); :func:`route`'s output does not depend on it.
    """

    num_experts: int
    topk: int = 2
    score_function: str = "softmax"
    pre_softmax: bool = False
    topk_scaling_factor: Optional[float] = None
    normalize_topk: bool = True
    load_balancing_type: Union[str, Sequence[str]] = "none"
    aux_loss_coeff: Union[float, Sequence[float]] = 0.0
    z_loss_coeff: Optional[float] = None
    enable_expert_bias: bool = False
    bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    input_jitter_eps: Optional[float] = None
    noise_std: Optional[float] = None
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    expert_parallel_size: int = 1
    sinkhorn_iters: int = 30
    sinkhorn_eps: float = 1e-8
    quantile_balancing_ema: float = 0.0

    def balancing_types(self) -> Tuple[str, ...]:
        t = self.load_balancing_type
        return (t,) if isinstance(t, str) else tuple(t)

    def _coeffs(self) -> Tuple[float, ...]:
        c = self.aux_loss_coeff
        return (c,) if isinstance(c, (int, float)) else tuple(c)

    def aux_coeffs(self) -> Dict[str, float]:
        """The aux-loss types this router computes, each with its coefficient (> 0), in order."""
        return {t: float(v) for t, v in zip(self.balancing_types(), self._coeffs()) if t in _AUX_TYPES and v > 0}

    @property
    def selection(self) -> str:
        """How experts are chosen: "sinkhorn", "quantile_balancing" or "topk" (of the scores)."""
        t = self.load_balancing_type
        return t if isinstance(t, str) and t in _SELECTIONS else "topk"

    def validate(self) -> "RouterConfig":
        """Raise ``ValueError(f"{field}={value!r}: {why}; use {allowed}")`` on a bad combination."""
        E, k = self.num_experts, self.topk
        if not isinstance(E, int) or E < 1:
            raise _bad("num_experts", E, "must be a positive int", "num_experts >= 1")
        if not isinstance(k, int) or not 1 <= k <= E:
            raise _bad("topk", k, f"each token picks topk distinct experts out of num_experts={E}",
                       f"1 <= topk <= {E}")
        if self.score_function not in SCORE_FUNCTIONS:
            raise _bad("score_function", self.score_function, "unknown score function",
                       f"one of {list(SCORE_FUNCTIONS)}")
        if self.pre_softmax and self.score_function != "softmax":
            raise _bad("pre_softmax", self.pre_softmax, "only meaningful with "
                       f"score_function='softmax' (got {self.score_function!r})",
                       "pre_softmax=False")
        self._validate_balancing()
        if self.score_function == "softmax" and k == 1 and not self.pre_softmax \
                and self.selection != "sinkhorn":
            # softmax over a single chosen logit is always 1.0: the router gets no gradient
            raise _bad("pre_softmax", self.pre_softmax, "topk=1 with softmax after top-k gives "
                       "every token prob 1.0 (no router gradient)", "pre_softmax=True for topk=1")
        if self.topk_scaling_factor is not None and not self.topk_scaling_factor > 0:
            raise _bad("topk_scaling_factor", self.topk_scaling_factor, "must scale by a "
                       "positive number", "None or a float > 0")
        if self.z_loss_coeff is not None and not self.z_loss_coeff >= 0:
            raise _bad("z_loss_coeff", self.z_loss_coeff, "must be >= 0", "None or a float >= 0")
        if self.enable_expert_bias:
            if self.score_function not in POINTWISE_SCORES:
                # Megatron validates the same: the bias shifts per-expert scores, which are not
                # renormalised across experts, so a constant shift has a fixed meaning
                raise _bad("enable_expert_bias", True, "aux-loss-free balancing biases sigmoid or "
                           f"sqrtsoftplus scores (DeepSeek-V3); score_function={self.score_function!r}",
                           "score_function='sigmoid' or 'sqrtsoftplus', or enable_expert_bias=False")
            if self.selection != "topk":
                raise _bad("enable_expert_bias", True, f"{self.selection} already balances the selection",
                           f"enable_expert_bias=False with load_balancing_type={self.selection!r}")
        if not self.bias_update_rate > 0:
            raise _bad("bias_update_rate", self.bias_update_rate, "must be > 0", "a float > 0")
        if self.capacity_factor is not None:
            if not self.capacity_factor > 0:
                raise _bad("capacity_factor", self.capacity_factor, "an expert must hold at "
                           "least one token", "None (dropless) or a float > 0")
            if self.selection != "topk":
                raise _bad("capacity_factor", self.capacity_factor, "token dropping is not "
                           f"defined for {self.selection} routing (Megatron rejects it too)",
                           f"capacity_factor=None with load_balancing_type={self.selection!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise _bad("drop_policy", self.drop_policy, "unknown drop policy",
                       f"one of {list(DROP_POLICIES)}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise _bad("pad_to_capacity", True, "there is no capacity to pad to in dropless mode",
                       "pad_to_capacity=False or set capacity_factor")
        if self.input_jitter_eps is not None and not 0 < self.input_jitter_eps < 1:
            raise _bad("input_jitter_eps", self.input_jitter_eps, "jitter is Uniform(1-eps, "
                       "1+eps) and must keep the sign", "None or 0 < eps < 1")
        if self.noise_std is not None and not self.noise_std > 0:
            raise _bad("noise_std", self.noise_std, "must be > 0", "None or a float > 0")
        if (self.num_groups is None) != (self.group_topk is None):
            raise _bad("num_groups" if self.num_groups is not None else "group_topk",
                       self.num_groups if self.num_groups is not None else self.group_topk,
                       "group-limited routing needs both num_groups and group_topk",
                       "both set or both None")
        if self.num_groups is not None:
            G, g = self.num_groups, self.group_topk
            if not isinstance(G, int) or G < 1 or E % G:
                raise _bad("num_groups", G, f"experts are split into equal groups and "
                           f"num_experts={E} is not divisible by it",
                           f"a divisor of {E}")
            if not isinstance(g, int) or not 1 <= g <= G:
                raise _bad("group_topk", g, f"picks groups out of num_groups={G}",
                           f"1 <= group_topk <= {G}")
            if k > g * (E // G):
                raise _bad("topk", k, f"group_topk={g} groups of {E // G} experts hold only "
                           f"{g * (E // G)} experts", f"topk <= {g * (E // G)} or more groups")
            if self.selection != "topk":
                raise _bad("num_groups", G, f"group-limited selection is not defined for {self.selection}",
                           f"num_groups=None with load_balancing_type={self.selection!r}")
        if not isinstance(self.expert_parallel_size, int) or self.expert_parallel_size < 1 \
                or E % self.expert_parallel_size:
            raise _bad("expert_parallel_size", self.expert_parallel_size, f"each EP rank holds "
                       f"the same number of experts and num_experts={E} is not divisible by it",
                       f"a divisor of {E}")
        if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise _bad("sinkhorn_iters", self.sinkhorn_iters, "must be a positive int", ">= 1")
        if not self.sinkhorn_eps > 0:
            raise _bad("sinkhorn_eps", self.sinkhorn_eps, "clamps denominators", "a float > 0")
        if not 0 <= self.quantile_balancing_ema < 1:
            raise _bad("quantile_balancing_ema", self.quantile_balancing_ema, "the bias moves by "
                       "(1 - ema) of the new quantile each step", "0 <= ema < 1")
        if self.selection == "quantile_balancing" and k >= E:
            raise _bad("topk", k, "quantile balancing reads each token's (topk+1)-th logit",
                       f"topk < num_experts={E}")
        return self

    def _validate_balancing(self) -> None:
        """``load_balancing_type`` / ``aux_loss_coeff``: one type and one coefficient, or lists
        of aux-loss types with one coefficient each (stored as tuples)."""
        t, c = self.load_balancing_type, self.aux_loss_coeff
        types, coeffs = self.balancing_types(), self._coeffs()
        if isinstance(t, str):
            if t not in LOAD_BALANCING_TYPES:
                raise _bad("load_balancing_type", t, "unknown balancing type",
                           f"one of {list(LOAD_BALANCING_TYPES)}")
            if not isinstance(c, (int, float)):
                raise _bad("aux_loss_coeff", c, f"a list of coefficients needs a list of "
                           f"balancing types (got load_balancing_type={t!r})",
                           "one float, or one type per coefficient")
        else:
            combinable = _AUX_TYPES + ("none",)
            if not types or any(x not in combinable for x in types) or len(set(types)) < len(types):
                raise _bad("load_balancing_type", list(types), "a list combines distinct aux-loss "
                           "types (Megatron's router ignores sinkhorn or quantile_balancing in a list)",
                           f"distinct entries of {list(combinable)}, or one type")
            if len(coeffs) != len(types):
                raise _bad("aux_loss_coeff", c, f"one coefficient per balancing type "
                           f"({len(types)}: {list(types)})", f"a list of {len(types)} floats")
            self.load_balancing_type, self.aux_loss_coeff = types, coeffs
        for ty, co in zip(types, coeffs):
            if not co >= 0:
                raise _bad("aux_loss_coeff", c, "must be >= 0", "floats >= 0")
            if co > 0 and ty not in _AUX_TYPES:
                raise _bad("aux_loss_coeff", c, f"load_balancing_type={ty!r} computes no aux loss, "
                           "the coefficient would be silently ignored",
                           f"0 for {ty!r}, or load_balancing_type in {list(_AUX_TYPES)}")


@dataclasses.dataclass
class RoutingResult:
    """What :func:`route` returns (T tokens, k choices, E experts).

    probs [T, k] fp32 (0 where dropped), indices [T, k] int64, kept [T, k] bool,
    tokens_per_expert [E] int64 (kept pairs: what each expert computes), load [E] fp32 (pairs
    that *chose* each expert before dropping: the signal for :func:`update_expert_bias`),
    aux_loss and z_loss fp32 scalars (0 when off; they carry grad to the logits), capacity
    (None when dropless); aux_losses: each configured aux-loss type's term (coefficient
    included; they sum to aux_loss); qb_quantile [E] fp32: quantile balancing's per-expert
    estimate of the balancing bias from this batch (training only, else None).
    """

    probs: Tensor
    indices: Tensor
    kept: Tensor
    tokens_per_expert: Tensor
    load: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    capacity: Optional[int]
    aux_losses: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    qb_quantile: Optional[Tensor] = None

    @property
    def dropped_mask(self) -> Tensor:
        return ~self.kept

    @property
    def num_dropped(self) -> int:
        return int((~self.kept).sum())


def sinkhorn_balance(logits: Tensor, iters: int = 30, eps: float = 1e-8) -> Tensor:
    """Sinkhorn-Knopp on ``exp(logits)`` ``[T, E]`` -> fp32 ``[T, E]``, rows sum to 1, columns
    to T/E (after the last column step columns are exact, rows within the convergence error).

    Fixed iteration count (no data-dependent loop, no host sync, unlike Megatron's tol loop);
    the global max is subtracted before exp (the balanced result does not change) and every
    denominator is clamped at ``eps`` so an all-underflow row or column cannot divide by zero.
    """
    cost = torch.exp(logits.float() - logits.float().max())
    T, E = cost.shape
    d_row = torch.ones(T, dtype=torch.float32, device=cost.device)
    d_col = torch.ones(E, dtype=torch.float32, device=cost.device)
    for _ in range(iters):
        d_row = 1.0 / (cost @ d_col).clamp_min(eps)
        d_col = (T / E) / (d_row @ cost).clamp_min(eps)
    return d_row[:, None] * cost * d_col[None, :]


def update_expert_bias(bias: Tensor, tokens_per_expert: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3 aux-loss-free update (§2.1.2): ``b_e += rate * sign(mean_e(load) - load_e)``.

    ``tokens_per_expert`` [E] is the load summed over whatever window the caller accumulates
    (Megatron: one global batch, all-reduced over TP x CP x DP). Returns a new fp32 tensor.
    """
    load = tokens_per_expert.float()
    return (bias.float() + rate * torch.sign(load.mean() - load)).detach()


def seq_ids_for_layout(seq_length: int, batch_size: int, device=None) -> Tensor:
    """Sequence id of each token for Megatron's ``[s, b]`` layout flattened s-major: ``[s*b]``."""
    return torch.arange(batch_size, device=device).repeat(seq_length)


def seq_ids_from_lengths(seq_lengths, device=None) -> Tensor:
    """Sequence id of each token for packed sequences laid end to end: ``[sum(seq_lengths)]``."""
    lengths = torch.as_tensor(seq_lengths, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def expert_counts(ids: Tensor, num_bins: int, weights: Optional[Tensor] = None) -> Tensor:
    """``[num_bins]`` int64: how many of ``ids`` (any shape, values in ``[0, num_bins)``) fall in
    each bin, each counted ``weights`` times (int or bool, same shape) if given. Unlike
    ``torch.bincount`` (which reads the largest id on the host) and boolean indexing, it never
    waits for the GPU, so a routed step has no host sync and can be captured in a CUDA graph;
    integer sums, so the counts are exact and deterministic."""
    flat = ids.reshape(-1).long()
    w = torch.ones_like(flat) if weights is None else weights.reshape(-1).long()
    return torch.zeros(num_bins, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, w)


def ids_out_of_range(ids: Tensor, num_experts: int) -> Optional[Tuple[int, int]]:
    """``(min, max)`` of ``ids`` where a CPU tensor holds an expert id outside
    ``[0, num_experts)``, else None. CUDA ids are not read (a host sync every step)."""
    if ids.device.type != "cpu" or not ids.numel():
        return None
    lo, hi = int(ids.min()), int(ids.max())
    return (lo, hi) if lo < 0 or hi >= num_experts else None


def _group_limited_topk(scores: Tensor, k: int, num_groups: int, group_topk: int) -> Tensor:
    T, E = scores.shape
    grouped = scores.view(T, num_groups, E // num_groups)
    per_group = min(max(1, k // group_topk), E // num_groups)
    group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)            # [T, G]
    top_groups = group_scores.topk(group_topk, dim=-1).indices               # [T, g]
    allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=scores.device)
    allowed.scatter_(1, top_groups, True)
    allowed = allowed[:, :, None].expand(T, num_groups, E // num_groups).reshape(T, E)
    return scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices


def _select(scores: Tensor, cfg: RouterConfig) -> Tensor:
    if cfg.num_groups is not None:
        return _group_limited_topk(scores, cfg.topk, cfg.num_groups, cfg.group_topk)
    return scores.topk(cfg.topk, dim=-1).indices


def _capacity_keep(probs: Tensor, indices: Tensor, counts: Tensor, capacity: int,
                   policy: str) -> Tensor:
    """kept [T, k]: per expert, the first ``capacity`` pairs in policy order (ties by position);
    ``counts [E]``: the pairs that chose each expert (``expert_counts(indices, E)``)."""
    T, k = indices.shape
    flat_e = indices.reshape(-1)
    order = torch.arange(T * k, device=indices.device)
    if policy == "probs":
        # stable sort by descending prob first, so equal probs stay in position order
        order = torch.sort(probs.reshape(-1), descending=True, stable=True).indices
    order = order[torch.sort(flat_e[order], stable=True).indices]  # by expert, then policy
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat_e)
    rank[order] = torch.arange(T * k, device=indices.device) - starts[flat_e[order]]
    return (rank < capacity).view(T, k)


def _aux_scores(logits: Tensor, cfg: RouterConfig) -> Tensor:
    if cfg.score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    s = pointwise_scores(logits, cfg.score_function)
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def pointwise_scores(logits: Tensor, score_function: str) -> Tensor:
    """Per-expert scores of the ``POINTWISE_SCORES`` functions, as Megatron computes them. Where
    softplus underflows to 0 (fp32 logits below about -104) the score is 0 with gradient 0:
    ``softplus(l).sqrt()`` alone would give ``0 * inf = NaN`` there."""
    if score_function == "sigmoid":
        return torch.sigmoid(logits)
    sp = torch.nn.functional.softplus(logits)
    pos = sp > 0
    return torch.where(pos, torch.where(pos, sp, 1.0).sqrt(), 0.0)


def _gate_key(logits: Tensor, cfg: RouterConfig):
    return (str(logits.device), cfg.score_function, cfg.pre_softmax, cfg.num_groups,
            cfg.group_topk, cfg.topk, cfg.num_experts)


@functools.lru_cache(maxsize=None)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _gate_probe(logits: Tensor, cfg: RouterConfig, requested: str):
    """Whether the fused top-k gate (:mod:`.triton_router`) can do this selection: None, or why
    not (the torch expressions below then run; the backend record says why)."""
    def probe() -> Optional[str]:
        if cfg.selection == "sinkhorn":
            return "load_balancing_type='sinkhorn': selection by the balanced matrix"
        from megatron_ext.ops.moe.triton_router import MAX_EXPERTS

        if cfg.num_experts > MAX_EXPERTS:
            return f"num_experts={cfg.num_experts}: the fused gate takes up to {MAX_EXPERTS}"
        if not _have_triton():
            return "triton is not installed"
        failed = backends.failed("moe.route", _gate_key(logits, cfg))
        if failed is not None:
            return f"the fused gate did not build here for this router: {failed}"
        if logits.device.type == "cuda":
            return None
        if requested == "triton" and backends.triton_interpret_env():
            return None
        return (f"devices=['{logits.device.type}']: the fused gate runs on CUDA (on CPU only "
                f"when backend='triton' is asked for under TRITON_INTERPRET=1)")
    return probe


def _fused_selection(logits: Tensor, cfg: RouterConfig, expert_bias: Optional[Tensor],
                     backend: str, replay: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """``(probs, indices)`` from the fused top-k gate (scaling applied; ``replay``: the gates of
    those ids), or None where its kernel did not build on this device: with ``backend="auto"``
    that is logged once, recorded, and this router takes the torch lane from then on; asked for
    by name it is an error."""
    from megatron_ext.ops.moe.triton_router import GateUnavailable, topk_gate

    k = cfg.topk
    pointwise = cfg.score_function in POINTWISE_SCORES
    mode = cfg.score_function if pointwise else ("pre_softmax" if cfg.pre_softmax else "softmax")
    scale = cfg.topk_scaling_factor
    try:
        return topk_gate(logits, k, mode, expert_bias, pointwise and cfg.normalize_topk
                         and k > 1, 1.0 if scale is None else scale, cfg.num_groups,
                         cfg.group_topk, replay)
    except GateUnavailable as exc:
        backends.run_failure("moe.route", backend, "triton", _gate_key(logits, cfg),
                             "the fused gate did not build here", str(exc), "torch",
                             "backend='auto' or 'torch'")
        return None


def route(logits: Tensor, cfg: RouterConfig, *, training: bool,
          expert_bias: Optional[Tensor] = None, seq_ids: Optional[Tensor] = None,
          generator: Optional[torch.Generator] = None,
          replay_indices: Optional[Tensor] = None,
          num_seqs: Optional[int] = None, valid: Optional[Tensor] = None,
          reduce_counts: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None,
          qb_beta: Optional[Tensor] = None, backend: str = "auto") -> RoutingResult:
    """Route ``logits`` [T, E] (any float dtype) -> :class:`RoutingResult` (fp32 probs).

    ``expert_bias`` [E]: needed iff ``cfg.enable_expert_bias``; added to the sigmoid/sqrtsoftplus scores for
    selection only. ``seq_ids`` [T] int: sequence of each token, needed for ``seq_aux_loss``
    (see :func:`seq_ids_for_layout`, :func:`seq_ids_from_lengths`); ``num_seqs``: how many sequences
    ``seq_ids`` numbers (default: its largest id + 1, read on the host). ``reduce_counts(counts
    [E], num_tokens 0-d)``: for ``global_aux_loss``, called with this batch's counts of the plain
    top-k and its (valid) token count, returns the pair f_e is taken over (the layer sums them over
    the data-parallel replicas and averages the step's micro-batches, as Megatron; default: this
    batch's).
    ``qb_beta`` [E] fp32: the bias of ``quantile_balancing`` (needed iff that is the type).
    ``generator`` drives the training noise. ``replay_indices`` [T, k] int: use these
    expert ids instead of selecting (routing replay); gates, losses and capacity are computed for
    them from the current logits, so gradients flow as in the recorded run. Losses are computed whenever configured;
    the caller attaches them to the loss only in training (Megatron does the same check).
    ``valid`` [T] bool (Megatron's ``padding_mask`` inverted: True for a real token): padding
    tokens are still routed, but the load (and so the expert-bias update and the statistics), the
    aux losses and the z-loss count only the valid ones, as Megatron's router does; with
    ``seq_aux_loss`` every sequence is weighted by the batch's mean valid length, as Megatron's.
    ``backend``: the selection and gates through the fused top-k gate (``"triton"``, see
    :mod:`.triton_router`), the torch expressions below (``"torch"``, the spec), or the first that
    can run (``"auto"``: the fused gate on CUDA, except for Sinkhorn).
    """
    if logits.dim() != 2 or logits.shape[1] != cfg.num_experts:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: the router takes one row per "
                         f"token; use [T, num_experts={cfg.num_experts}]")
    if cfg.enable_expert_bias != (expert_bias is not None):
        raise ValueError(f"expert_bias={'a tensor' if expert_bias is not None else None}: "
                         f"enable_expert_bias={cfg.enable_expert_bias}; use "
                         f"{'a [num_experts] fp32 tensor' if cfg.enable_expert_bias else 'None'}")
    if (cfg.selection == "quantile_balancing") != (qb_beta is not None):
        raise ValueError(f"qb_beta={'a tensor' if qb_beta is not None else None}: load_balancing_type="
                         f"{cfg.load_balancing_type!r}; use "
                         f"{'a [num_experts] fp32 tensor' if qb_beta is None else 'None'}")
    aux = cfg.aux_coeffs()
    if "seq_aux_loss" in aux and seq_ids is None:
        raise ValueError("seq_ids=None: load_balancing_type='seq_aux_loss' needs each token's "
                         "sequence; use seq_ids_for_layout(s, b) or seq_ids_from_lengths(lengths)")
    T, E = logits.shape
    k = cfg.topk
    if replay_indices is not None:
        if tuple(replay_indices.shape) != (T, k):
            raise ValueError(f"replay_indices.shape={tuple(replay_indices.shape)}: one row of topk "
                             f"expert ids per token; use [{T}, {k}]")
        bad = ids_out_of_range(replay_indices, E)
        if bad is not None:
            raise ValueError(f"replay_indices in [{bad[0]}, {bad[1]}]: expert ids out of range for "
                             f"num_experts={E}; replay a trace recorded with {E} experts")
        replay_indices = replay_indices.to(device=logits.device, dtype=torch.int64)
    logits = logits.float()
    if training and cfg.input_jitter_eps is not None:
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        logits = logits * (1.0 - cfg.input_jitter_eps + 2.0 * cfg.input_jitter_eps * u)
    if training and cfg.noise_std is not None:
        logits = logits + cfg.noise_std * torch.randn(logits.shape, generator=generator,
                                                      device=logits.device)

    # --- selection and gate values
    qb_quantile = None
    if cfg.selection == "quantile_balancing":
        if valid is not None:
            raise ValueError("valid=a padding mask: load_balancing_type='quantile_balancing' counts "
                             "every token in its quantile (Megatron refuses the mask too); use no "
                             "padding mask, or another balancing type")
        estimate = training and torch.is_grad_enabled()   # as Megatron: only where it trains
        with torch.no_grad():
            qb_sel, qb_quantile = _quantile_balance(logits.detach(), k, qb_beta.float(), estimate)
        if replay_indices is None:
            replay_indices = qb_sel   # the gates below are the score function's at these experts
    lane = backends.resolve("moe.route", backend,
                            [("triton", _gate_probe(logits, cfg, backend)),
                             ("torch", lambda: None)])
    fused = _fused_selection(logits, cfg, expert_bias, backend, replay_indices) \
        if lane == "triton" else None
    scale = None if fused is not None else cfg.topk_scaling_factor   # the kernel applies it
    if fused is not None:
        probs, indices = fused
    elif cfg.selection == "sinkhorn":
        # Megatron: sigmoid for k=1 (a softmax gate over E would be tiny), softmax for k>1
        scores = torch.sigmoid(logits) if k == 1 else torch.softmax(logits, dim=-1)
        if replay_indices is not None:
            indices = replay_indices
        elif training:
            with torch.no_grad():
                indices = sinkhorn_balance(logits, cfg.sinkhorn_iters, cfg.sinkhorn_eps) \
                    .topk(k, dim=-1).indices
        else:
            indices = scores.topk(k, dim=-1).indices
        probs = scores.gather(1, indices)
    elif cfg.score_function == "softmax":
        if cfg.pre_softmax:
            scores = torch.softmax(logits, dim=-1)
            indices = _select(scores, cfg) if replay_indices is None else replay_indices
            probs = scores.gather(1, indices)
        else:
            indices = _select(logits, cfg) if replay_indices is None else replay_indices
            probs = torch.softmax(logits.gather(1, indices), dim=-1)
    else:
        scores = pointwise_scores(logits, cfg.score_function)
        sel = scores if expert_bias is None else scores + expert_bias.float().detach()
        indices = _select(sel, cfg) if replay_indices is None else replay_indices
        probs = scores.gather(1, indices)
        if cfg.normalize_topk and k > 1:
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
    if scale is not None:
        probs = probs * scale

    chosen = expert_counts(indices, E)   # pairs per expert before any drop
    if valid is not None:
        valid = valid.reshape(-1).to(device=logits.device, dtype=torch.bool)
        if valid.shape[0] != T:
            raise ValueError(f"valid.shape={tuple(valid.shape)}: one flag per token; use [{T}]")
        vf = valid.float()
        n_valid = vf.sum().clamp(min=1.0)
        pair_valid = valid[:, None].expand(T, k)
        load = expert_counts(indices, E, pair_valid).float()
    else:
        pair_valid = None
        load = chosen.float()

    # --- losses (fp32 scalars with grad to the logits)
    zero = logits.new_zeros(())
    aux_losses: Dict[str, Tensor] = {}
    if aux:
        s = _aux_scores(logits, cfg)
        # f_e from the plain top-k of s (see the module doc); where nothing steers the selection
        # away from it (no bias, groups, replay or balancing), that is the selection itself
        plain = expert_bias is None and cfg.num_groups is None and replay_indices is None \
            and cfg.selection == "topk"
        aux_idx = indices if plain else s.detach().topk(k, dim=-1).indices
        counts_all = load if plain else expert_counts(aux_idx, E, pair_valid).float()
        if valid is not None:
            s = s * vf[:, None]
        n_tokens = T if valid is None else n_valid
        p_mean = s.mean(0) if valid is None else s.sum(0) / n_valid   # P_e over the valid tokens
        if "aux_loss" in aux:
            aux_losses["aux_loss"] = aux["aux_loss"] * E * ((counts_all / (n_tokens * k)) * p_mean).sum()
        if "global_aux_loss" in aux:
            if reduce_counts is not None:
                n_here = vf.sum() if valid is not None else torch.full((), float(T), device=logits.device)
                g_load, g_T = reduce_counts(counts_all.detach(), n_here)
            else:
                g_load, g_T = counts_all, n_tokens
            aux_losses["global_aux_loss"] = aux["global_aux_loss"] * E * ((g_load / (g_T * k)) * p_mean).sum()
        if "seq_aux_loss" in aux:
            seq_ids = seq_ids.to(logits.device).long()
            S = num_seqs if num_seqs is not None else (int(seq_ids.max()) + 1 if T else 0)
            counts = torch.zeros(S, E, device=logits.device)
            counts.index_put_((seq_ids[:, None].expand(T, k), aux_idx),
                              torch.ones(T, k, device=logits.device) if valid is None
                              else pair_valid.float(), accumulate=True)
            prob_sum = torch.zeros(S, E, device=logits.device).index_add(0, seq_ids, s)
            if valid is not None:
                # Megatron: every sequence weighted by the batch's mean valid length
                n_tok = (n_valid / max(S, 1)).expand(S)
            else:
                n_tok = expert_counts(seq_ids, S).float()
            # mean over the sequences that have tokens (masked, not indexed: no host sync); the
            # mean valid length may be below one token, so empty sequences divide by 1, not a clamp
            present = (n_tok > 0).float()
            per_seq = E * (counts * prob_sum).sum(-1) / (k * torch.where(n_tok > 0, n_tok, 1.0) ** 2)
            aux_losses["seq_aux_loss"] = aux["seq_aux_loss"] * (per_seq * present).sum() \
                / present.sum().clamp(min=1.0)
    aux_losses = {t: aux_losses[t] for t in aux}   # in the configured order
    aux_loss = sum(aux_losses.values()) if aux_losses else zero
    z_loss = zero
    if cfg.z_loss_coeff:
        z = torch.logsumexp(logits, dim=-1).square()
        z_loss = cfg.z_loss_coeff * (z.mean() if valid is None else (z * vf).sum() / n_valid)

    # --- capacity
    capacity = None
    kept = torch.ones_like(indices, dtype=torch.bool)
    if cfg.capacity_factor is not None:
        capacity = math.ceil(T * k / E * cfg.capacity_factor)
        kept = _capacity_keep(probs.detach(), indices, chosen, capacity, cfg.drop_policy)
        probs = probs * kept
    tokens_per_expert = chosen if capacity is None else expert_counts(indices, E, kept)
    return RoutingResult(probs=probs, indices=indices, kept=kept,
                         tokens_per_expert=tokens_per_expert, load=load, aux_loss=aux_loss,
                         z_loss=z_loss, capacity=capacity, aux_losses=aux_losses,
                         qb_quantile=qb_quantile)


def _quantile_balance(logits: Tensor, k: int, beta: Tensor, estimate: bool
                      ) -> Tuple[Tensor, Optional[Tensor]]:
    """Quantile balancing on fp32 ``logits`` [T, E]: the top-k of ``logits - beta`` [T, k] and,
    when ``estimate``, the per-expert bias that would give each expert ``T*k/E`` tokens of this
    batch: the ``T*k/E + 1``-th largest over tokens of ``logits - alpha`` (``alpha_t`` the token's
    ``k+1``-th largest ``logits - beta``); see the module doc."""
    T, E = logits.shape
    top = (logits - beta).topk(k + 1, dim=1)
    indices = top.indices[:, :k]
    if not estimate:
        return indices, None
    if (T * k) % E:
        raise ValueError(f"tokens={T}: quantile balancing gives every expert tokens*topk/num_experts "
                         f"= {T}*{k}/{E} tokens, not a whole number; use a micro-batch (seq_length x "
                         f"micro_batch_size) whose tokens*topk is a multiple of {E}")
    share = T * k // E
    alpha = top.values[:, k:]
    return indices, (logits - alpha).topk(share + 1, dim=0).values[share].contiguous()


def update_qb_beta(beta: Tensor, quantile: Tensor, ema: float) -> Tensor:
    """Quantile balancing's once-per-step move: ``ema * beta + (1 - ema) * quantile`` (the
    quantile averaged over the step's micro-batches and the data-parallel ranks), re-centred to
    mean 0 (only differences between experts choose). Returns a new fp32 tensor."""
    new = ema * beta.float() + (1.0 - ema) * quantile.float()
    return (new - new.mean()).detach()
