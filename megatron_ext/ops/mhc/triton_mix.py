"""Fused mHC mappings + pre-aggregation (kernel family A), n = 4, forward and backward.

Per token t (x = the flattened streams row ``[4C]``, phi ``[4C, 24]`` fp32, columns
[pre 0:4 | post 4:8 | res 8:24]):  inv_r = rsqrt(mean(x^2) + rms_eps);  z = inv_r * (x @ phi);
l = alpha_vec * z + bias;  h_pre = sigmoid, h_post = 2 sigmoid, h_res = Sinkhorn(l_res);
u = sum_i h_pre[i] x_i.  (``reference.mhc_mappings`` + ``reference.mhc_pre`` are the spec.)

Forward, two kernels:
  ``_mix_proj_kernel``, grid = (T / BLOCK_T) x (4C / 1024 column splits): ``[BLOCK_T, BLOCK_K] @
  [BLOCK_K, 32]`` (phi's 24 columns zero-padded) plus the sum of squares, written as fp32
  partials per split. bf16 streams take the *split lane*: the x tile goes to the tensor cores as
  it is and each phi tile is split into bf16 ``hi + lo`` (two dots into one fp32 accumulator:
  exact products, ~16 mantissa bits of phi, 1.6e-5 max error at the size below vs 1.9e-3 for
  TF32). Other dtypes widen x to fp32 for a TF32 (IEEE in the interpreter) dot. Measured at
  T=8192, C=2048 (H100): split lane 58 us vs 131 us for the former TF32 kernel, whose fp32 copy
  of every x tile and 16-token tiles (phi re-read from L2 once per 16 tokens) made it slow.
  ``_mix_maps_pre_kernel`` (one token per program): partials summed in split order
  (deterministic), inv_r, sigmoid gates and 20 Sinkhorn rounds on a ``[1, 4, 4]`` register tile
  (stats z, inv_r), then u = sum_i h_pre[i] x_i over the whole row. Measured at T=8192, C=2048
  (H100): 66 us, where the mappings as a kernel of their own (32 tokens per program) and the
  pre mix took 22 + 53 us.
  HBM bytes per token: 4C*d read twice (the projection's row is gone from L2 by the time u is
  formed: 134 MB of streams vs 50 MB of L2 at the size below) + C*d written (d = dtype bytes) +
  ~0.9 KB of fp32 partials and stats. (One kernel doing all of it, re-reading its rows for u
  from L2, measured 163 us of GPU time against 131 us for the then three kernels: not kept.)

With the branch's RMSNorm folded in (``gamma``; docs/mhc.md, "Norm fold") the maps + pre kernel
writes ``rms_norm(u) * gamma`` from the fp32 u and saves its rstd, ``_pre_norm_bwd_dh_kernel``
replaces the dh kernel below and the dx kernel forms du itself (plus d gamma partials). Measured at
T=8192, C=2048 (H100, per site): maps + pre 82 vs 66 us, dh 62 vs 58 us, dx 201 vs 170 us (with the
linked gradient), against ~0.1 ms of norm kernels removed.

Backward, four kernels (the per-token reduction must finish before any dx can be written):
  ``triton_streams.pre_bwd`` (dh only): dh_pre = <x_i, du>, one whole row per program.
  ``_mix_pre_bwd_rows_kernel`` (token-major, BLOCK_T tokens): sigmoid adjoints, the Sinkhorn adjoint
  (triton_sinkhorn: the forward re-run once into an L2-resident scratch of the 20 iterates, then
  walked back), then per token G = inv_r * alpha_vec * dl (= d(x @ phi)) and
  coef = -(alpha_vec*dl . z) * inv_r^2 / 4C (the RMS term), and per-program partial sums for
  d bias and d alpha. Bytes: ~0.3 KB/token of fp32 stats (+ the scratch, from L2).
  ``_mix_pre_bwd_dx_kernel`` (grid = T / BLOCK_T x C / BLOCK_C, all four streams per program):
  dx = h_pre[stream] * du + coef * x (+ g_link) + G @ phi^T. Bytes: 4C*d (x) + C*d (du) read,
  4C*d written; with a linked stream gradient (``g_link``) one more 4C*d read, instead of a
  separate 12C*d elementwise sum.
  ``_mix_pre_bwd_dphi_kernel`` (grid = 4C / BLOCK_K column tiles x S token splits): d phi
  partial = x^T @ G over the split's tokens (split lane for bf16: G as bf16 hi + lo), written
  once per split ([S, 4C, 24] fp32, summed in torch: deterministic, no atomics). Bytes: 4C*d.
  Measured at T=8192, C=2048 (H100): dx 168 us + d phi 57 us, where the former single kernel
  (column tiles walking the tokens, forming dx and accumulating d phi in one pass) took 326 us:
  its per-program token walk kept too few loads in flight.
  Tried and not kept (H100, T=8192, C=2048):
  - handing the post/res backward's raw new-streams gradient to this dx pass (it forms
    H_res^T g itself, so no stream gradient is written and read back). Twice: first 177 -> 134 us
    for the post/res backward but dx 168 -> 205 us; then (2026-11-23) with a handoff object
    instead of an autograd edge and ten dx tilings (64x64 / 32x128 / 64x128 / 32x64, 4 or 8
    warps, the four raw tiles held or re-loaded, the 16 weights one coalesced row load): the best
    raw dx was 209-212 us against 169-179 us for the linked one at the same bytes, the site
    0.707-0.712 ms against 0.716-0.719. 6-10 us for a side channel: not kept.
  - this dx pass fused with the previous site's post/res backward (whose new-streams gradient the
    dx tiles are; 2026-11-24): 488 us at best against 200 + 163 us for the two kernels, the
    per-token dots of every tile alone ~200 us (docs/mhc.md, "Tried and dropped").
  - dh and this rows kernel as one kernel, one token per program (as the forward's maps + pre):
    110-113 us against 60 + 20 us. The Sinkhorn adjoint of one token (40 dependent rounds through
    the scratch) is exposed per program where 8 tokens per program hide it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ext.ops.mhc import tilings_pinned, triton_streams
from megatron_ext.ops.mhc._triton_util import DOT_PRECISION, by_width, interpreting, tuned
from megatron_ext.ops.mhc.triton_sinkhorn import sinkhorn_tile, sinkhorn_tile_vjp

N_STREAMS = 4
N_COLS = N_STREAMS * N_STREAMS + 2 * N_STREAMS  # 24


@triton.jit
def _load_scales(alpha_ptr, bias_ptr, i4):
    """alpha (pre, post, res) scalars and the bias split as pre ``[4]``, post ``[4]``, res ``[4, 4]``,
    in fp32 whatever the parameters' dtype."""
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    b_pre = tl.load(bias_ptr + i4).to(tl.float32)
    b_post = tl.load(bias_ptr + 4 + i4).to(tl.float32)
    b_res = tl.load(bias_ptr + 8 + i4[:, None] * 4 + i4[None, :]).to(tl.float32)
    return a_pre, a_post, a_res, b_pre, b_post, b_res


@triton.jit
def _dot_hi_lo(a, b, acc):
    """``acc + a @ b`` for a 16-bit ``a`` on the 16-bit tensor-core path. An fp32 ``b`` is split
    into ``hi + lo`` of ``a``'s dtype, two dots into the fp32 ``acc`` (exact products, ~16
    mantissa bits of ``b``); a ``b`` of ``a``'s dtype (bf16 parameters) takes one dot."""
    if b.dtype == a.dtype:
        return tl.dot(a, b, acc)
    b_hi = b.to(a.dtype)
    acc = tl.dot(a, b_hi, acc)
    return tl.dot(a, (b - b_hi.to(tl.float32)).to(a.dtype), acc)


@tuned([triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=ns)
        for bt, bk, w, ns in ((128, 64, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                              (128, 128, 8, 3), (32, 128, 4, 4))],
       key=["C", "SPLIT"], pin=by_width((0, 3), (1024, 2), (2048, 4)))
@triton.jit
def _mix_proj_kernel(x_ptr, phi_ptr, pz_ptr, pss_ptr, T, C, cols_per_split,
                     SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Partial ``x @ phi`` and sum of squares of BLOCK_T rows over one column split of ``[4C]``.

    ``SPLIT`` (bf16 streams): the x tile goes to the tensor cores as it is and phi is split per
    tile into bf16 ``hi + lo`` (two dots into one fp32 accumulator: exact products, ~16 bits of
    phi), where the TF32 lane first widens every x tile to fp32 (twice the operand bytes)."""
    NC = 4 * C
    pid_s = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    j = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_T, 32], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    k_begin = pid_s * cols_per_split
    k_end = tl.minimum(k_begin + cols_per_split, NC)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < k_end
        xt = tl.load(x_ptr + rows[:, None] * NC + kk[None, :], mask=mask_t[:, None] & mk[None, :],
                     other=0.0)
        p = tl.load(phi_ptr + kk[:, None] * 24 + j[None, :], mask=mk[:, None] & (j < 24)[None, :],
                    other=0.0)
        xf = xt.to(tl.float32)
        if SPLIT:
            acc = _dot_hi_lo(xt, p, acc)
        else:
            acc = tl.dot(xf, p.to(tl.float32), acc, input_precision=DOT_PRECISION)
        sumsq += tl.sum(xf * xf, axis=1)
    base = (pid_s.to(tl.int64) * T + rows) * 24
    tl.store(pz_ptr + base[:, None] + j[None, :], acc, mask=mask_t[:, None] & (j < 24)[None, :])
    tl.store(pss_ptr + pid_s.to(tl.int64) * T + rows, sumsq, mask=mask_t)


_MAPS_PRE_PINS = {True: by_width((0, 7), (2048, 4), (4096, 9)), False: by_width((0, 7))}


# One token per program, as the pre mix alone was (many programs keep the row loads in flight).
@tuned(triton_streams.ROW_CONFIGS, key=["C", "NORM"], pin=lambda key: _MAPS_PRE_PINS[bool(key["NORM"])](key))
@triton.jit
def _mix_maps_pre_kernel(x_ptr, pz_ptr, pss_ptr, alpha_ptr, bias_ptr, u_ptr, hpre_ptr, hpost_ptr,
                         hres_ptr, z_ptr, invr_ptr, gamma_ptr, rstd_ptr, T, C, n_splits, num_iters,
                         sk_eps, rms_eps, norm_eps, NORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """One token: sum its column-split partials in split order (deterministic), RMS scale,
    sigmoid gates, Sinkhorn on a ``[1, 4, 4]`` register tile, then u = sum_i h_pre[i] x_i over
    the whole row. (The mappings were a kernel of their own: 22 us at T=8192 for ~1 MB of
    traffic, mostly its launch and tail; here they add ~10 us to the pre mix.)"""
    t = tl.program_id(0).to(tl.int64)
    i4 = tl.arange(0, 4)
    o44 = i4[None, :, None] * 4 + i4[None, None, :]  # [1, 4, 4]
    z_pre = tl.zeros([1, 4], dtype=tl.float32)
    z_post = tl.zeros([1, 4], dtype=tl.float32)
    z_res = tl.zeros([1, 4, 4], dtype=tl.float32)
    sumsq = tl.zeros([1], dtype=tl.float32)
    for sp in range(0, n_splits):
        base = (sp * T + t) * 24
        z_pre += tl.load(pz_ptr + base + i4[None, :])
        z_post += tl.load(pz_ptr + base + 4 + i4[None, :])
        z_res += tl.load(pz_ptr + base + 8 + o44)
        sumsq += tl.load(pss_ptr + sp * T + t + tl.arange(0, 1))
    inv_r = tl.rsqrt(sumsq / (4 * C) + rms_eps)
    z_pre = z_pre * inv_r[:, None]
    z_post = z_post * inv_r[:, None]
    z_res = z_res * inv_r[:, None, None]
    tl.store(z_ptr + t * 24 + i4[None, :], z_pre)
    tl.store(z_ptr + t * 24 + 4 + i4[None, :], z_post)
    tl.store(z_ptr + t * 24 + 8 + o44, z_res)
    tl.store(invr_ptr + t + tl.arange(0, 1), inv_r)
    a_pre, a_post, a_res, b_pre, b_post, b_res = _load_scales(alpha_ptr, bias_ptr, i4)
    h_pre = tl.sigmoid(a_pre * z_pre + b_pre[None, :])
    tl.store(hpre_ptr + t * 4 + i4[None, :], h_pre)
    tl.store(hpost_ptr + t * 4 + i4[None, :], 2.0 * tl.sigmoid(a_post * z_post + b_post[None, :]))
    tl.store(hres_ptr + t * 16 + o44, sinkhorn_tile(a_res * z_res + b_res[None, :, :], num_iters,
                                                     sk_eps))
    if NORM:
        _pre_norm_row(x_ptr, u_ptr, gamma_ptr, rstd_ptr, t, tl.reshape(h_pre, (4,)), C, norm_eps,
                      BLOCK_C)
    else:
        triton_streams.pre_row(x_ptr, u_ptr, t, tl.reshape(h_pre, (4,)), C, BLOCK_C)


@triton.jit
def _pre_norm_row(x_ptr, n_ptr, gamma_ptr, rstd_ptr, t, h, C, norm_eps, BLOCK_C: tl.constexpr):
    """The branch's RMSNorm folded into the pre mix: ``n[t] = u * rstd * gamma`` with
    ``u = sum_i h[i] x_i[t]`` in fp32 and ``rstd = rsqrt(mean(u^2) + eps)`` (stored for backward).
    Two walks over the row: the sum of squares, then u again (from cache) for the output. (A
    variant holding u in registers when the row fits one tile measured 84 vs 82 us at C=2048 on
    an H100, so it was not kept.)"""
    ss = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc, mc, xs, u = triton_streams.row_tile_mix(x_ptr, t, h, C, c0, BLOCK_C)
        ss += u * u
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / C + norm_eps)
    tl.store(rstd_ptr + t, rstd)
    for c0 in range(0, C, BLOCK_C):
        cc, mc, xs, u = triton_streams.row_tile_mix(x_ptr, t, h, C, c0, BLOCK_C)
        gam = tl.load(gamma_ptr + cc, mask=mc, other=0.0).to(tl.float32)
        tl.store(n_ptr + t * C + cc, (u * rstd * gam).to(n_ptr.dtype.element_ty), mask=mc)


@tuned(triton_streams.ROW_CONFIGS, key=["C"], pin=by_width((0, 7), (4096, 4)))
@triton.jit
def _pre_norm_bwd_dh_kernel(x_ptr, h_ptr, gn_ptr, gamma_ptr, rstd_ptr, dh_ptr, k_ptr, C,
                            BLOCK_C: tl.constexpr):
    """dh_pre of the folded site, one token per program. With ``g = gamma * dn``, ``u`` the fp32
    pre mix and ``r`` its rstd: ``du = r g - k u``, ``k = r^3 <g, u> / C``, so
    ``dh_pre[i] = <x_i, du> = r <x_i, g> - k <x_i, u>``: one walk over the row accumulates
    ``<x_i, g>``, ``<x_i, u>`` and ``<g, u>``. ``k`` is stored for the dx pass."""
    t = tl.program_id(0).to(tl.int64)
    i4 = tl.arange(0, 4)
    h = tl.load(h_ptr + t * 4 + i4)
    xg = tl.zeros([4, BLOCK_C], dtype=tl.float32)
    xu = tl.zeros([4, BLOCK_C], dtype=tl.float32)
    gu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc, mc, xs, u = triton_streams.row_tile_mix(x_ptr, t, h, C, c0, BLOCK_C)
        g = tl.load(gn_ptr + t * C + cc, mask=mc, other=0.0).to(tl.float32) * tl.load(
            gamma_ptr + cc, mask=mc, other=0.0).to(tl.float32)
        xg += xs * g[None, :]
        xu += xs * u[None, :]
        gu += g * u
    r = tl.load(rstd_ptr + t)
    k = r * r * r * tl.sum(gu, axis=0) / C
    tl.store(dh_ptr + t * 4 + i4, r * tl.sum(xg, axis=1) - k * tl.sum(xu, axis=1))
    tl.store(k_ptr + t, k)


# 8 splits at C=2048: T/16 x 8 programs keep every SM streaming. Tried 2-4 splits (2026-11-23,
# H100, in the site): the maps + pre kernel sums fewer partials (66 -> 58 us) but the projection
# slows by as much (58 -> 65 us); no net change, kept 8.
PROJ_COLS_PER_SPLIT = 1024


# Fixed (the partial-sum buffers have one row per program) and small: the Sinkhorn adjoint
# (40 dependent 4x4 rounds per token) is latency-bound, so it wants many programs (T/8).
BWD_ROWS_BLOCK_T = 8


@triton.jit
def _mix_pre_bwd_rows_kernel(dh_ptr, z_ptr, invr_ptr, alpha_ptr, bias_ptr,
                             ghpost_ptr, ghres_ptr, g_ptr, coef_ptr, ppar_ptr, scratch_ptr,
                             T, C, num_iters, sk_eps, BLOCK_T: tl.constexpr):
    NC = 4 * C
    pid = tl.program_id(0)
    t_first = pid * BLOCK_T
    offs_t = t_first + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    i4 = tl.arange(0, 4)
    m2 = mask_t[:, None]
    m3 = mask_t[:, None, None]
    o44 = i4[None, :, None] * 4 + i4[None, None, :]

    dh_pre = tl.load(dh_ptr + rows[:, None] * 4 + i4[None, :], mask=m2, other=0.0)
    z_pre = tl.load(z_ptr + rows[:, None] * 24 + i4[None, :], mask=m2, other=0.0)
    z_post = tl.load(z_ptr + rows[:, None] * 24 + 4 + i4[None, :], mask=m2, other=0.0)
    z_res = tl.load(z_ptr + rows[:, None, None] * 24 + 8 + o44, mask=m3, other=0.0)
    inv_r = tl.load(invr_ptr + rows, mask=mask_t, other=0.0)
    a_pre, a_post, a_res, b_pre, b_post, b_res = _load_scales(alpha_ptr, bias_ptr, i4)
    gh_post = tl.load(ghpost_ptr + rows[:, None] * 4 + i4[None, :], mask=m2, other=0.0)
    gh_res = tl.load(ghres_ptr + rows[:, None, None] * 16 + o44, mask=m3, other=0.0)

    s_pre = tl.sigmoid(a_pre * z_pre + b_pre[None, :])
    dl_pre = dh_pre * s_pre * (1.0 - s_pre)
    s_post = tl.sigmoid(a_post * z_post + b_post[None, :])
    dl_post = gh_post * 2.0 * s_post * (1.0 - s_post)
    slot = rows[:, None, None] * num_iters * 16 + o44
    dl_res = sinkhorn_tile_vjp(a_res * z_res + b_res[None, :, :], gh_res, num_iters, sk_eps,
                               scratch_ptr, slot, m3)
    dl_res = tl.where(m3, dl_res, 0.0)

    tl.store(g_ptr + rows[:, None] * 24 + i4[None, :], inv_r[:, None] * a_pre * dl_pre, mask=m2)
    tl.store(g_ptr + rows[:, None] * 24 + 4 + i4[None, :], inv_r[:, None] * a_post * dl_post,
             mask=m2)
    tl.store(g_ptr + rows[:, None, None] * 24 + 8 + o44,
             inv_r[:, None, None] * a_res * dl_res, mask=m3)
    da_pre = tl.sum(dl_pre * z_pre, axis=1)
    da_post = tl.sum(dl_post * z_post, axis=1)
    da_res = tl.sum(tl.sum(dl_res * z_res, axis=2), axis=1)
    dzz = a_pre * da_pre + a_post * da_post + a_res * da_res
    tl.store(coef_ptr + rows, -dzz * inv_r * inv_r / NC, mask=mask_t)

    # per-program partials of d bias [24] and d alpha [3], one row of 27 (one torch sum for both)
    base = ppar_ptr + pid * 27
    tl.store(base + i4, tl.sum(dl_pre, axis=0))
    tl.store(base + 4 + i4, tl.sum(dl_post, axis=0))
    tl.store(base + 8 + i4[:, None] * 4 + i4[None, :], tl.sum(dl_res, axis=0))
    tl.store(base + 24, tl.sum(da_pre, axis=0))
    tl.store(base + 25, tl.sum(da_post, axis=0))
    tl.store(base + 26, tl.sum(da_res, axis=0))


_DX_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=w, num_stages=1)
               for bt, bc, w in ((64, 64, 8), (64, 64, 4), (32, 128, 4), (64, 128, 8))]
_DX_MIN_BLOCK_T = min(c.kwargs["BLOCK_T"] for c in _DX_CONFIGS)


@tuned(_DX_CONFIGS, key=["C", "HAS_LINK", "NORM"], pin=by_width((0, 0)))
@triton.jit
def _mix_pre_bwd_dx_kernel(x_ptr, gu_ptr, hpre_ptr, g_ptr, coef_ptr, phi_ptr, glink_ptr, gx_ptr,
                           gamma_ptr, rstd_ptr, k_ptr, pdg_ptr, T, C,
                           DOT_PRECISION: tl.constexpr, HAS_LINK: tl.constexpr,
                           NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx of BLOCK_T tokens x BLOCK_C channels of all four streams:
    ``dx_i = h_pre[i] * du + coef * x_i (+ g_link_i) + G @ phi_i^T``. Every tile is read and
    written once; du and G are loaded once for the four streams. Many small independent programs
    (T/BLOCK_T x C/BLOCK_C) keep the loads in flight: the former column-tile kernel that also
    accumulated d phi over a token walk ran at a third of this bandwidth.

    ``NORM`` (the branch's RMSNorm folded in): ``gu`` is the gradient of the normed output dn;
    the program first re-forms u from its four x tiles, then ``du = r * gamma * dn - k * u``, and
    writes its d gamma partial ``sum_t dn * r * u`` as row ``program_id(0)`` of ``pdg``; the dx
    walk loads the tiles a second time, from L2. Measured at T=8192, C=2048 (H100, one site with
    the linked gradient): 200.5 us at 64x64 / 8 warps, against 213.2 us for the best tiling that
    held the four tiles in registers for the dx walk (register pressure)."""
    NC = 4 * C
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    rows = offs_t.to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cc < C
    m2 = mt[:, None] & mc[None, :]
    j = tl.arange(0, 32)
    g = tl.load(g_ptr + rows[:, None] * 24 + j[None, :], mask=mt[:, None] & (j < 24)[None, :],
                other=0.0)
    coef = tl.load(coef_ptr + rows, mask=mt, other=0.0)
    gu = tl.load(gu_ptr + rows[:, None] * C + cc[None, :], mask=m2, other=0.0)  # used 4 times
    if NORM:
        # u needs all four stream tiles before any dx: a first walk forms it, the dx walk below
        # loads the tiles again (from L2)
        u = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(4):
            u += tl.load(hpre_ptr + rows * 4 + i, mask=mt, other=0.0)[:, None] * \
                _load_stream_tile(x_ptr, rows, cc, m2, NC, C, i).to(tl.float32)
        r = tl.load(rstd_ptr + rows, mask=mt, other=0.0)
        kt = tl.load(k_ptr + rows, mask=mt, other=0.0)
        dn = gu.to(tl.float32)
        gam = tl.load(gamma_ptr + cc, mask=mc, other=0.0).to(tl.float32)
        tl.store(pdg_ptr + pid_t.to(tl.int64) * C + cc, tl.sum(dn * (r[:, None] * u), axis=0),
                 mask=mc)
        du = r[:, None] * gam[None, :] * dn - kt[:, None] * u
    else:
        du = gu.to(tl.float32)
    for i in tl.static_range(4):
        _dx_stream_tile(_load_stream_tile(x_ptr, rows, cc, m2, NC, C, i), i, du, coef, g, rows, mt,
                        cc, mc, m2, hpre_ptr, phi_ptr, glink_ptr, gx_ptr, NC, C, DOT_PRECISION,
                        HAS_LINK)


@triton.jit
def _load_stream_tile(x_ptr, rows, cc, m2, NC, C, i: tl.constexpr):
    """Stream i's ``[BLOCK_T, BLOCK_C]`` tile in the stream dtype (the math widens it where it
    uses it)."""
    return tl.load(x_ptr + rows[:, None] * NC + (i * C + cc)[None, :], mask=m2, other=0.0)


@triton.jit
def _dx_stream_tile(xt, i: tl.constexpr, du, coef, g, rows, mt, cc, mc, m2, hpre_ptr, phi_ptr,
                    glink_ptr, gx_ptr, NC, C, DOT_PRECISION: tl.constexpr,
                    HAS_LINK: tl.constexpr):
    """``dx_i = h_pre[i] * du + coef * x_i (+ g_link_i) + G @ phi_i^T`` of one stream's tile."""
    j = tl.arange(0, 32)
    kk = i * C + cc
    hp = tl.load(hpre_ptr + rows * 4 + i, mask=mt, other=0.0)
    phiT = tl.load(phi_ptr + kk[None, :] * 24 + j[:, None], mask=(j < 24)[:, None] & mc[None, :],
                   other=0.0).to(tl.float32)
    dx = hp[:, None] * du + coef[:, None] * xt.to(tl.float32)
    if HAS_LINK:  # the streams' other gradient (the post/res mix of the same site)
        dx += tl.load(glink_ptr + rows[:, None] * NC + kk[None, :], mask=m2,
                      other=0.0).to(tl.float32)
    dx = tl.dot(g, phiT, dx, input_precision=DOT_PRECISION)
    tl.store(gx_ptr + rows[:, None] * NC + kk[None, :], dx.to(gx_ptr.dtype.element_ty), mask=m2)


@tuned([triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=ns)
        for bt, bk, w, ns in ((128, 128, 8, 2), (64, 128, 4, 3), (64, 256, 8, 3), (32, 64, 4, 3))],
       key=["C", "SPLIT"], pin=by_width((0, 1), (1024, 0), (2048, 2), (4096, 1)))
@triton.jit
def _mix_pre_bwd_dphi_kernel(x_ptr, g_ptr, pphi_ptr, T, C, tokens_per_split, SPLIT: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """Partial ``d phi = x^T @ G`` of BLOCK_K columns over one token split, written once per split
    (summed in a fixed order afterwards: deterministic). ``SPLIT`` (bf16 streams): G split per
    tile into bf16 ``hi + lo``, two dots into one fp32 accumulator, x as it is."""
    NC = 4 * C
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = kk < NC
    j = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_K, 32], dtype=tl.float32)
    t_begin = pid_s * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mt = offs_t < t_end
        rows = offs_t.to(tl.int64)
        xt = tl.load(x_ptr + rows[:, None] * NC + kk[None, :], mask=mt[:, None] & mk[None, :],
                     other=0.0)
        gt = tl.load(g_ptr + rows[:, None] * 24 + j[None, :], mask=mt[:, None] & (j < 24)[None, :],
                     other=0.0)
        if SPLIT:
            acc = _dot_hi_lo(tl.trans(xt), gt, acc)
        else:
            acc = tl.dot(tl.trans(xt.to(tl.float32)), gt, acc, input_precision=DOT_PRECISION)
    base = pphi_ptr + pid_s.to(tl.int64) * NC * 24
    tl.store(base + kk[:, None] * 24 + j[None, :], acc, mask=mk[:, None] & (j < 24)[None, :])


@triton.jit
def _column_sum(src_ptr, R, M, cols, BLOCK_R: tl.constexpr):
    """``sum_r src[r, cols]`` over the R rows of an fp32 ``[R, M]`` buffer, in row-block order
    (each ``[BLOCK_R, len(cols)]`` tile reduced by one fixed tree): deterministic."""
    mm = cols < M
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        acc += tl.sum(tl.load(src_ptr + rr.to(tl.int64)[:, None] * M + cols[None, :],
                              mask=(rr < R)[:, None] & mm[None, :], other=0.0), axis=0)
    return acc


# (rows per tile, columns per program) of the three partial buffers: d phi [splits ~ 4 per SM /
# column tiles, 4C * 24], d bias + d alpha [T / 8, 27], d gamma [T / dx BLOCK_T, C]
_FIN_PHI = (16, 1024)
_FIN_PAR = (512, 32)
_FIN_GAMMA = (64, 256)


@triton.jit
def _mix_pre_bwd_finish_kernel(pphi_ptr, dphi_ptr, phi_rows, phi_cols, ppar_ptr, dbias_ptr,
                               dalpha_ptr, par_rows, pdg_ptr, dgamma_ptr, dg_rows, C,
                               PHI_R: tl.constexpr, PHI_M: tl.constexpr, PAR_R: tl.constexpr,
                               PAR_M: tl.constexpr, DG_R: tl.constexpr, DG_M: tl.constexpr):
    """The mapping parameters' gradients from the backward's per-program partials, written in
    each parameter's dtype: one launch instead of three torch sums and up to four casts (host
    time of an eager site). Axis 1 picks the buffer: 0 d phi, 1 d bias + d alpha, 2 d gamma."""
    pid = tl.program_id(0)
    which = tl.program_id(1)
    if which == 0:
        cols = pid * PHI_M + tl.arange(0, PHI_M)
        if pid * PHI_M < phi_cols:
            acc = _column_sum(pphi_ptr, phi_rows, phi_cols, cols, PHI_R)
            tl.store(dphi_ptr + cols, acc.to(dphi_ptr.dtype.element_ty), mask=cols < phi_cols)
    elif which == 1:
        if pid == 0:
            j = tl.arange(0, PAR_M)
            acc = _column_sum(ppar_ptr, par_rows, 27, j, PAR_R)
            tl.store(dbias_ptr + j, acc.to(dbias_ptr.dtype.element_ty), mask=j < 24)
            tl.store(dalpha_ptr + j - 24, acc.to(dalpha_ptr.dtype.element_ty),
                     mask=(j >= 24) & (j < 27))
    else:
        cols = pid * DG_M + tl.arange(0, DG_M)
        if pid * DG_M < C:
            acc = _column_sum(pdg_ptr, dg_rows, C, cols, DG_R)
            tl.store(dgamma_ptr + cols, acc.to(dgamma_ptr.dtype.element_ty), mask=cols < C)


PINNED_NUM_SMS = 132  # an H100/H200 SXM's


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def dphi_splits(T: int, NC: int, device: torch.device):
    """(splits, tokens per split) of the d phi partials: ~4 programs per SM with 128-wide column
    tiles (a program walks its split's tokens serially), each split a multiple of the largest
    BLOCK_T. ~2 per SM measured 73 vs 57 us in the site (H100), although alone with a cold L2 it
    was 5 us faster; ~1 per SM matched 4. Tilings pinned (deterministic mode): the splits of a
    132-SM GPU whatever this one has, so the order of the d phi sum does not follow the SM count."""
    sms = PINNED_NUM_SMS if tilings_pinned() else _num_sms(device)
    splits = max(1, min(triton.cdiv(4 * sms, triton.cdiv(NC, 128)), triton.cdiv(T, 128)))
    return splits, triton.cdiv(triton.cdiv(max(T, 1), splits), 128) * 128


def _split_lane(x: torch.Tensor) -> bool:
    """bf16 streams on a GPU: the projections take x as it is and split the fp32 operand into
    bf16 hi + lo (the interpreter's bf16 dot is wrong, and fp16 hi/lo would underflow lo)."""
    return x.dtype == torch.bfloat16 and not interpreting()


def mix_pre_fwd(x, phi, alpha, bias, num_iters: int, eps: float, rms_eps: float, gamma=None,
                norm_eps: float = 1e-5):
    """``x [T, 4C]`` (bf16/fp16/fp32, contiguous), ``phi [4C, 24]``, ``alpha [3]``, ``bias [24]``
    (contiguous, any float dtype: the kernels widen them to fp32 as they load them) -> ``u [T, C]``
    (x dtype), fp32 ``h_pre [T, 4]``, ``h_post [T, 4]``, ``h_res [T, 4, 4]``, and the backward's
    stats ``z [T, 24]`` (= x~ @ phi), ``inv_r [T]``, and ``rstd [T]`` (None without ``gamma``).
    ``gamma [C]`` (the branch's RMSNorm weight, any float dtype): the first output is
    ``rms_norm(u) * gamma`` instead of ``u``."""
    T, NC = x.shape
    C = NC // N_STREAMS
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    h_pre, h_post = torch.empty(T, 4, **f32), torch.empty(T, 4, **f32)
    h_res, z, inv_r = torch.empty(T, 4, 4, **f32), torch.empty(T, N_COLS, **f32), torch.empty(T, **f32)
    u = torch.empty(T, C, device=dev, dtype=x.dtype)
    rstd = None if gamma is None else torch.empty(T, **f32)
    splits = triton.cdiv(NC, PROJ_COLS_PER_SPLIT)
    pz, pss = torch.empty(splits, T, N_COLS, **f32), torch.empty(splits, T, **f32)
    if T:
        _mix_proj_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), splits)](
            x, phi, pz, pss, T, C, PROJ_COLS_PER_SPLIT, SPLIT=_split_lane(x),
            DOT_PRECISION=DOT_PRECISION)
        _mix_maps_pre_kernel[(T,)](x, pz, pss, alpha, bias, u, h_pre, h_post, h_res, z, inv_r,
                                   x if gamma is None else gamma, inv_r if rstd is None else rstd,
                                   T, C, splits, num_iters, eps, rms_eps, norm_eps,
                                   NORM=gamma is not None)
    return u, h_pre, h_post, h_res, z, inv_r, rstd


def mix_pre_bwd(x, phi, alpha, bias, z, inv_r, h_pre, gu, gh_post, gh_res, num_iters: int,
                eps: float, g_link=None, gamma=None, rstd=None):
    """Adjoint of :func:`mix_pre_fwd`. ``gu [T, C]`` (any float dtype), ``gh_post [T, 4]`` and
    ``gh_res [T, 4, 4]`` fp32, all contiguous -> ``(dx [T, 4C] x dtype, dphi [4C, 24],
    dalpha [3], dbias [24], dgamma [C] or None)``, each parameter's gradient in its dtype (fp32
    sums of fp32 partials, rounded once). ``g_link [T, 4C]`` (optional): a gradient of the same
    streams from elsewhere (the site's post/res mix), added into dx in the same pass, which saves
    autograd's separate read-read-write sum of the two.
    ``gamma`` / ``rstd`` (the folded norm's weight and the forward's stats): ``gu`` is then the
    gradient of the normed output."""
    T, NC = x.shape
    C = NC // N_STREAMS
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    n_prog = max(1, triton.cdiv(T, BWD_ROWS_BLOCK_T))
    # every program writes its whole partial row, so the partial buffers need no zero fill (with
    # T = 0 the finish kernel reads no rows)
    g = torch.empty(T, N_COLS, **f32)
    coef = torch.empty(T, **f32)
    ppar = torch.empty(n_prog, N_COLS + 3, **f32)
    dx = torch.empty_like(x)
    splits, tokens_per_split = dphi_splits(T, NC, dev)
    pphi = torch.empty(splits, NC, N_COLS, **f32)
    # d gamma partials, one row per dx token block: sized for the smallest BLOCK_T the dx
    # autotuner may try; only the rows of the config that ran are summed (its autotuning runs
    # of other configs may have left rows past those)
    pdg = None if gamma is None else torch.empty(triton.cdiv(T, _DX_MIN_BLOCK_T), C, **f32)
    if T:
        # dh_pre[i] = <x_i, du>: one whole row per program
        if gamma is None:
            _, dh = triton_streams.pre_bwd(x.view(T, N_STREAMS, C), h_pre, 4, gu, want_gx=False)
        else:
            dh, k = torch.empty(T, 4, **f32), torch.empty(T, **f32)
            _pre_norm_bwd_dh_kernel[(T,)](x, h_pre, gu, gamma, rstd, dh, k, C)
        scratch = torch.empty(T, num_iters, 16, **f32)  # the Sinkhorn adjoint's iterates
        _mix_pre_bwd_rows_kernel[(n_prog,)](
            dh, z, inv_r, alpha, bias, gh_post, gh_res, g, coef, ppar, scratch,
            T, C, num_iters, eps, BLOCK_T=BWD_ROWS_BLOCK_T, num_warps=2)
        _mix_pre_bwd_dx_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),
                                             triton.cdiv(C, meta["BLOCK_C"]))](
            x, gu, h_pre, g, coef, phi, x if g_link is None else g_link, dx,
            *((x, x, x, x) if gamma is None else (gamma, rstd, k, pdg)), T, C,
            DOT_PRECISION=DOT_PRECISION, HAS_LINK=g_link is not None, NORM=gamma is not None)
        _mix_pre_bwd_dphi_kernel[lambda meta: (triton.cdiv(NC, meta["BLOCK_K"]), splits)](
            x, g, pphi, T, C, tokens_per_split, SPLIT=_split_lane(x), DOT_PRECISION=DOT_PRECISION)
    dphi = torch.empty(NC, N_COLS, device=dev, dtype=phi.dtype)
    dbias = torch.empty(N_COLS, device=dev, dtype=bias.dtype)
    dalpha = torch.empty(3, device=dev, dtype=alpha.dtype)
    dgamma = None if gamma is None else torch.empty(C, device=dev, dtype=gamma.dtype)
    # the dx config that ran wrote the first cdiv(T, its BLOCK_T) rows of pdg
    dg_rows = triton.cdiv(T, _mix_pre_bwd_dx_kernel.best_config.kwargs["BLOCK_T"]) if T else 0
    n_cols = max(triton.cdiv(NC * N_COLS, _FIN_PHI[1]), triton.cdiv(C, _FIN_GAMMA[1]))
    _mix_pre_bwd_finish_kernel[(n_cols, 2 if gamma is None else 3)](
        pphi, dphi, splits if T else 0, NC * N_COLS, ppar, dbias, dalpha, n_prog if T else 0,
        dphi if pdg is None else pdg, dphi if dgamma is None else dgamma, dg_rows, C,
        PHI_R=_FIN_PHI[0], PHI_M=_FIN_PHI[1], PAR_R=_FIN_PAR[0], PAR_M=_FIN_PAR[1],
        DG_R=_FIN_GAMMA[0], DG_M=_FIN_GAMMA[1], num_warps=8)
    return dx, dphi, dalpha, dbias, dgamma
