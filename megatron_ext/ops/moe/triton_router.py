"""Fused top-k gate (Triton): the selection and gate values of :func:`routing.route` in one pass
over the fp32 logits, and their adjoint in one pass back.

Per token (a row of ``E`` logits ``l``), ``mode``:

* ``"softmax"`` (Megatron's default, top-k then softmax): select the ``k`` largest ``l``, gates =
  softmax over the selected logits.
* ``"pre_softmax"``: ``s = softmax(l)`` over all experts, select the ``k`` largest ``s``, gates =
  the selected ``s``.
* ``"sigmoid"`` (DeepSeek-V3): ``s = sigmoid(l)``, select on ``s + bias`` (the aux-loss-free
  bias, selection only), gates = the selected ``s``, divided by their sum + 1e-20 when
  ``normalize``.
* ``"sqrtsoftplus"`` (Megatron >= 0.19): as ``"sigmoid"`` with ``s = sqrt(softplus(l))``.

Any mode may select group-limited (DeepSeek-V2/V3): the experts of the ``group_topk`` groups whose
top ``max(1, k // group_topk)`` selection values sum highest. Routing replay passes the ids
instead: no selection, the same gates for them.

Gates are then multiplied by ``scale`` (the top-k scaling factor). Selection is ``k`` rounds of a
row max: among equal values the lowest expert id wins (``torch.topk`` leaves ties unspecified),
ids come out in descending order of the selection value and NaN ranks first, as in
``torch.topk``. The torch expressions in ``route()`` are the spec; the tests hold both lanes to
them.

The backward writes the whole ``[T, E]`` logit gradient (zeros off the selection, except for
``pre_softmax`` whose softmax couples every expert): one kernel where autograd would run the
softmax / sigmoid adjoint, a gather's adjoint (zero fill + scatter) and the normalisation's ops.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MODES = {"softmax": 0, "pre_softmax": 1, "sigmoid": 2, "sqrtsoftplus": 3}
# the modes whose gates are per-expert scores (MODES >= 2), which the expert bias may shift
POINTWISE_MODES = ("sigmoid", "sqrtsoftplus")


class GateUnavailable(RuntimeError):
    """The fused gate's kernel did not build for this configuration on this device (raised by
    the first launch of a specialization only; ``route()`` then falls back to torch, logged)."""


# kernel specialisations that have launched in this process (a later failure is not a build's)
_BUILT: set = set()
# the [BLOCK_T, E_PAD] row tile stays at 4K fp32 values per program
MAX_EXPERTS = 1024


def _blocks(num_experts: int) -> Tuple[int, int]:
    e_pad = max(16, triton.next_power_of_2(num_experts))
    return max(1, 4096 // e_pad), e_pad


@triton.jit
def _take_max(vals, free, idx, PAD: tl.constexpr):
    """Per row: the largest of ``vals`` where ``free``, and the lowest ``idx`` holding it (``PAD``
    past the last index); a row of ``-inf`` still yields a free index."""
    cand = tl.where(free, vals, float("-inf"))
    best = tl.max(cand, 1)
    pick = tl.min(tl.where(free & (cand == best[:, None]), idx[None, :], PAD), 1)
    return best, pick


@triton.jit
def _col(x, kk, j):
    """Column ``j`` of a ``[BLOCK_T, K_PAD]`` tile (``kk`` = its column indices)."""
    return tl.sum(tl.where(kk[None, :] == j, x, 0), 1)


@triton.jit
def _to_experts(vals, ids, kk, ex, K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """``[BLOCK_T, E_PAD]`` fp32: each row's ``vals[:, j]`` at expert column ``ids[:, j]``,
    zeros elsewhere (the adjoint of gathering the k chosen experts)."""
    out = tl.zeros([BLOCK_T, E_PAD], tl.float32)
    for j in tl.static_range(K):
        out = tl.where(ex[None, :] == _col(ids, kk, j)[:, None], _col(vals, kk, j)[:, None], out)
    return out


@triton.jit
def _group_allowed(sel, free, ex, E, G: tl.constexpr, G_PAD: tl.constexpr,
                   PER_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr, BLOCK_T: tl.constexpr,
                   E_PAD: tl.constexpr):
    """Group-limited routing: experts split into ``G`` equal groups of consecutive ids; a group
    scores the sum of its ``PER_GROUP`` largest ``sel``; the experts of the ``GROUP_TOPK`` best
    groups (lowest group first among equals) stay allowed."""
    grp = ex // (E // G)                                  # padding columns: grp >= G, no group
    gi = tl.arange(0, G_PAD)
    gscore = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        left = free & (grp == g)[None, :]
        total = tl.zeros([BLOCK_T], tl.float32)
        for _ in tl.static_range(PER_GROUP):
            best, pick = _take_max(sel, left, ex, E_PAD)
            total += best
            left = left & (ex[None, :] != pick[:, None])
        gscore = tl.where(gi[None, :] == g, total[:, None], gscore)
    gfree = (gi < G)[None, :] & (tl.sum(free.to(tl.int32), 1) >= 0)[:, None]   # [BLOCK_T, G_PAD]
    allowed = free & (ex < 0)[None, :]
    for _ in tl.static_range(GROUP_TOPK):
        _, gpick = _take_max(gscore, gfree, gi, G_PAD)
        gfree = gfree & (gi[None, :] != gpick[:, None])
        allowed = allowed | (grp[None, :] == gpick[:, None])
    return free & allowed


@triton.jit
def _sqrt_softplus(l):
    """``sqrt(softplus(l))`` for fp32 ``l`` (``-inf`` -> 0): ``softplus(l) = max(l, 0) +
    log1p(exp(-|l|))``, with ``log1p(x) = log(u) * x / (u - 1)``, ``u = 1 + x`` (exact to a few
    ulps where ``log(1 + x)`` alone would lose the small ``x`` of large ``|l|``)."""
    x = tl.exp(-tl.abs(l))
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.sqrt(tl.maximum(l, 0.0) + log1p)


@triton.jit
def _topk_gate_fwd_kernel(L, BIAS, GIVEN_IDX, IDX, PROBS, T, E, stride_l, scale,
                          K: tl.constexpr, K_PAD: tl.constexpr, MODE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GIVEN: tl.constexpr,
                          G: tl.constexpr, G_PAD: tl.constexpr, PER_GROUP: tl.constexpr,
                          GROUP_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """``GIVEN``: the ids come from ``GIVEN_IDX [T, K]`` (routing replay) instead of the
    selection; the gates are computed for them as for selected ones."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    ex = tl.arange(0, E_PAD)
    em = ex < E
    l = tl.load(L + rows.to(tl.int64)[:, None] * stride_l + ex[None, :],
                mask=rm[:, None] & em[None, :], other=0.0)
    l = tl.where(em[None, :], l, float("-inf"))
    if MODE == 1:
        p = tl.exp(l - tl.max(l, 1)[:, None])
        src = p / tl.sum(p, 1)[:, None]
        sel = src
    elif MODE >= 2:
        if MODE == 2:
            src = tl.sigmoid(l)
        else:
            src = _sqrt_softplus(l)
        sel = src
        if HAS_BIAS:
            sel = sel + tl.load(BIAS + ex, mask=em, other=0.0)[None, :]
    else:
        src = l
        sel = l
    # NaN ranks above every number, as in torch.topk (ids stay distinct and in range; the gates
    # come out NaN, as the torch lane's do)
    sel = tl.where(sel != sel, float("inf"), sel)
    kk = tl.arange(0, K_PAD)
    km = kk[None, :] < K
    out = rows.to(tl.int64)[:, None] * K + kk[None, :]
    m2 = rm[:, None] & km
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    vals = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    # [BLOCK_T, E_PAD]: experts not selected yet (the row term only broadcasts to 2-D)
    free = em[None, :] & (rows[:, None] >= 0)
    if GIVEN:
        given = tl.load(GIVEN_IDX + out, mask=m2, other=0).to(tl.int32)
    elif G > 0:
        free = _group_allowed(sel, free, ex, E, G, G_PAD, PER_GROUP, GROUP_TOPK, BLOCK_T,
                              E_PAD)
    for j in tl.static_range(K):
        if GIVEN:
            pick = _col(given, kk, j)
        else:
            _, pick = _take_max(sel, free, ex, E_PAD)   # k <= the allowed experts: free ids
        hit = ex[None, :] == pick[:, None]
        v = tl.sum(tl.where(hit, src, 0.0), 1)
        ids = tl.where(kk[None, :] == j, pick[:, None], ids)
        vals = tl.where(kk[None, :] == j, v[:, None], vals)
        free = free & (~hit)
    if MODE == 0:
        v = tl.where(km, vals, float("-inf"))
        e = tl.exp(v - tl.max(v, 1)[:, None])
        gates = e / tl.sum(e, 1)[:, None]
    else:
        gates = vals
        if NORMALIZE:
            gates = gates / (tl.sum(tl.where(km, gates, 0.0), 1)[:, None] + 1e-20)
    tl.store(IDX + out, ids.to(tl.int64), mask=m2)
    tl.store(PROBS + out, gates * scale, mask=m2)


@triton.jit
def _topk_gate_bwd_kernel(L, IDX, DP, DL, T, E, stride_l, scale,
                          K: tl.constexpr, K_PAD: tl.constexpr, MODE: tl.constexpr,
                          NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    r64 = rows.to(tl.int64)
    ex = tl.arange(0, E_PAD)
    em = ex < E
    kk = tl.arange(0, K_PAD)
    k_ok = kk[None, :] < K
    km = rm[:, None] & k_ok
    ids = tl.load(IDX + r64[:, None] * K + kk[None, :], mask=km, other=0).to(tl.int32)
    g = tl.load(DP + r64[:, None] * K + kk[None, :], mask=km, other=0.0) * scale
    l_sel = tl.load(L + r64[:, None] * stride_l + ids, mask=km, other=0.0)
    if MODE == 1:
        l = tl.load(L + r64[:, None] * stride_l + ex[None, :], mask=rm[:, None] & em[None, :],
                    other=0.0)
        l = tl.where(em[None, :], l, float("-inf"))
        mx = tl.max(l, 1)
        p = tl.exp(l - mx[:, None])
        z = tl.sum(p, 1)
        s = p / z[:, None]
        s_sel = tl.where(km, tl.exp(l_sel - mx[:, None]) / z[:, None], 0.0)
        # ds = g scattered to the selected ids; dl = s * (ds - <s, ds>)
        ds = _to_experts(g, ids, kk, ex, K, BLOCK_T, E_PAD)
        dl = s * (ds - tl.sum(s_sel * g, 1)[:, None])
    else:
        if MODE == 0:
            v = tl.where(k_ok, l_sel, float("-inf"))   # rows past T: l_sel = 0, no inf - inf
            e = tl.exp(v - tl.max(v, 1)[:, None])
            p = tl.where(km, e / tl.sum(e, 1)[:, None], 0.0)
            d_sel = p * (g - tl.sum(p * g, 1)[:, None])
        else:
            sig = tl.sigmoid(l_sel)
            if MODE == 2:
                s = tl.where(km, sig, 0.0)
                ds_dl = s * (1.0 - s)
            else:
                # d sqrt(softplus(l)) / dl = sigmoid(l) / (2 sqrt(softplus(l))); 0 where it underflows
                s = tl.where(km, _sqrt_softplus(l_sel), 0.0)
                ds_dl = tl.where(s > 0.0, sig / (2.0 * tl.where(s > 0.0, s, 1.0)), 0.0)
            ds = g
            if NORMALIZE:
                den = tl.sum(s, 1)[:, None] + 1e-20
                ds = g / den - tl.sum(g * s, 1)[:, None] / (den * den)
            d_sel = tl.where(km, ds * ds_dl, 0.0)
        dl = _to_experts(d_sel, ids, kk, ex, K, BLOCK_T, E_PAD)
    tl.store(DL + r64[:, None] * E + ex[None, :], dl, mask=rm[:, None] & em[None, :])


class _TopKGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, bias: Optional[Tensor], k: int, mode: str, normalize: bool,
                scale: float, groups: Tuple[int, int, int], given: Optional[Tensor]):
        T, E = logits.shape
        block_t, e_pad = _blocks(E)
        idx = torch.empty(T, k, dtype=torch.int64, device=logits.device)
        probs = torch.empty(T, k, dtype=torch.float32, device=logits.device)
        if T:
            meta = dict(K=k, K_PAD=triton.next_power_of_2(k), MODE=MODES[mode],
                        HAS_BIAS=bias is not None, NORMALIZE=normalize, GIVEN=given is not None,
                        G=groups[0],
                        G_PAD=triton.next_power_of_2(max(groups[0], 1)), PER_GROUP=groups[1],
                        GROUP_TOPK=groups[2], BLOCK_T=block_t, E_PAD=e_pad)
            key = (str(logits.device), tuple(sorted(meta.items())))
            try:
                _topk_gate_fwd_kernel[(triton.cdiv(T, block_t),)](
                    logits, bias if bias is not None else logits,
                    given if given is not None else idx, idx, probs, T, E, logits.stride(0),
                    float(scale), **meta)
            except Exception as exc:   # a build failure surfaces at the first launch only
                if key in _BUILT:
                    raise
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise GateUnavailable(f"{type(exc).__name__}: {first}") from exc
            _BUILT.add(key)
        ctx.save_for_backward(logits, idx)
        ctx.cfg = (k, mode, normalize, scale)
        ctx.mark_non_differentiable(idx)
        return probs, idx

    @staticmethod
    def backward(ctx, dprobs: Tensor, _didx):
        logits, idx = ctx.saved_tensors
        k, mode, normalize, scale = ctx.cfg
        T, E = logits.shape
        block_t, e_pad = _blocks(E)
        dl = torch.empty(T, E, dtype=torch.float32, device=logits.device)
        if T:
            _topk_gate_bwd_kernel[(triton.cdiv(T, block_t),)](
                logits, idx, dprobs.float().contiguous(), dl, T, E, logits.stride(0),
                float(scale), K=k, K_PAD=triton.next_power_of_2(k), MODE=MODES[mode],
                NORMALIZE=normalize, BLOCK_T=block_t, E_PAD=e_pad)
        return dl, None, None, None, None, None, None, None


def topk_gate(logits: Tensor, k: int, mode: str, bias: Optional[Tensor] = None,
              normalize: bool = False, scale: float = 1.0, num_groups: Optional[int] = None,
              group_topk: Optional[int] = None,
              indices: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(probs [T, k] fp32, indices [T, k] int64)`` for fp32 ``logits [T, E]`` (see the module
    docstring; ``bias`` [E] fp32 is used for the selection of ``mode="sigmoid"`` or
    ``"sqrtsoftplus"`` only, no gradient).
    ``num_groups`` / ``group_topk``: group-limited selection as ``routing.route`` does it (the
    sum of each group's top ``max(1, k // group_topk)`` selection values ranks the groups, the k
    experts come from the ``group_topk`` best). ``indices [T, k]`` (routing replay): no
    selection, the gates of these ids (which the caller has checked to lie in ``[0, E)``)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: unknown gate; use one of {sorted(MODES)}")
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits: {tuple(logits.shape)} {logits.dtype}; use [T, E] float32")
    T, E = logits.shape
    if not 1 <= k <= E or E > MAX_EXPERTS:
        raise ValueError(f"k={k}, E={E}: the fused gate takes 1 <= k <= E <= {MAX_EXPERTS}")
    groups = (0, 0, 0)
    if num_groups is not None:
        G, g = num_groups, group_topk
        if g is None or G < 1 or E % G or not 1 <= g <= G or k > g * (E // G):
            raise ValueError(f"num_groups={G}, group_topk={g}: use a divisor of E={E} and "
                             f"1 <= group_topk <= num_groups with k={k} <= group_topk * E / "
                             f"num_groups")
        groups = (G, min(max(1, k // g), E // G), g)
    if bias is not None and mode not in POINTWISE_MODES:
        raise ValueError(f"bias given with mode={mode!r}: the expert bias steers the selection "
                         f"of per-expert scores only; use mode in {list(POINTWISE_MODES)} or bias=None")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bias is not None:
        bias = bias.detach().float().contiguous()
    if indices is not None:
        if tuple(indices.shape) != (T, k):
            raise ValueError(f"indices.shape={tuple(indices.shape)}: one row of k ids per token; "
                             f"use [{T}, {k}]")
        indices = indices.to(device=logits.device, dtype=torch.int64).contiguous()
    return _TopKGate.apply(logits, bias, k, mode, normalize, scale, groups, indices)
