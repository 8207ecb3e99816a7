"""mHC stream mixers: the torch reference, which is the spec of every kernel in this package.

Manifold-Constrained Hyper-Connections (DeepSeek, arXiv 2512.24880, Eq. 14-19; Megatron design
issue #2919). The residual state of a layer is n streams ``x [s, b, n, C]``; one sublayer site is

    x' = H_res x + H_post^T F(H_pre x)

with per-token mappings computed from the flattened state ``x_flat [T, n*C]`` (T = s*b tokens):

    x~     = x_flat / r,             r = sqrt(mean(x_flat^2) + rms_eps)   (RMSNorm, no weight)
    z      = x~ @ phi                phi [n*C, n*n + 2n], columns ordered [pre(n), post(n), res(n*n)]
    l      = alpha_vec * z + bias    alpha_vec = [alpha[0]]*n + [alpha[1]]*n + [alpha[2]]*n*n
    H_pre  = sigmoid(l_pre)          [T, n]
    H_post = 2 * sigmoid(l_post)     [T, n]
    H_res  = Sinkhorn(l_res)         [T, n, n], doubly stochastic (num_iters rounds, fp32)

and ``x'_i = sum_j H_res[i, j] x_j + H_post[i] f`` (H_res applied as ``H_res @ x``; Megatron's
module applies ``H_res^T @ x``: the same family, since the transpose of a doubly stochastic matrix
is doubly stochastic, but a checkpoint moved between the two must transpose the res block).

All mapping math is fp32 (fp64 when given fp64, which the tests use as the exact reference). The
stream ops keep the stream dtype on the way out and accumulate in fp32.
"""

from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def _math_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (the exact reference of the tests)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_num_iters(num_iters: int) -> None:
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters={num_iters!r}: Sinkhorn needs at least one row+column "
                         f"normalisation round (the row-max shift is only exact after one); "
                         f"use an integer >= 1")


def sinkhorn(logits: Tensor, num_iters: int = 20, eps: float = 1e-6) -> Tensor:
    """``logits [..., n, n]`` -> doubly stochastic ``[..., n, n]`` (fp32, or fp64 for fp64 input).

    ``M = exp(logits - rowmax)``, then ``num_iters`` rounds of (row, column) normalisation with each
    sum clamped to >= ``eps``. The row-max shift is exact (the first row normalisation removes it,
    the shifted row sums are >= 1 so the clamp never fires there), so it is detached. Columns sum
    to 1 exactly after the last round, rows to within the finite-iteration error.
    """
    check_num_iters(num_iters)
    logits = logits.to(_math_dtype(logits))
    m = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())
    for _ in range(num_iters):
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(eps)
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(eps)
    return m


def mhc_mappings(x_flat: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, n: int,
                 num_iters: int = 20, eps: float = 1e-6,
                 rms_eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """Dynamic mappings of ``x_flat [T, n*C]`` -> ``(h_pre [T, n], h_post [T, n], h_res [T, n, n])``.

    ``phi [n*C, n*n + 2n]``, ``alpha [3]`` (pre, post, res), ``bias [n*n + 2n]``; phi/bias columns
    ordered [pre(n), post(n), res(n*n)], res row-major (``res[i*n + j] -> H_res[i, j]``). Outputs
    fp32. ``eps``: Sinkhorn sum clamp; ``rms_eps``: inside the RMS square root.
    """
    dt = _math_dtype(x_flat, phi)
    x = x_flat.to(dt)
    x_tilde = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + rms_eps)
    z = x_tilde @ phi.to(dt)
    a = alpha.to(dt)
    alpha_vec = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    logits = z * alpha_vec + bias.to(dt)
    h_pre = torch.sigmoid(logits[:, :n])
    h_post = 2.0 * torch.sigmoid(logits[:, n:2 * n])
    h_res = sinkhorn(logits[:, 2 * n:].reshape(-1, n, n), num_iters, eps)
    return h_pre, h_post, h_res


def mhc_pre(streams: Tensor, h_pre: Tensor) -> Tensor:
    """``streams [s, b, n, C]``, ``h_pre [s, b, n]`` (dynamic) or ``[n]`` (static) -> ``u [s, b, C]``.

    ``u = sum_i h_pre[i] x_i`` in fp32, returned in the stream dtype.
    """
    return _pre_mix(streams, h_pre).to(streams.dtype)


def _pre_mix(streams: Tensor, h_pre: Tensor, *others: Tensor) -> Tensor:
    """``sum_i h_pre[i] x_i`` in the math dtype of the inputs and ``others`` (fp32, or fp64 when
    any is fp64), not rounded."""
    dt = _math_dtype(streams, h_pre, *others)
    return (h_pre.to(dt).unsqueeze(-1) * streams.to(dt)).sum(dim=-2)


def mhc_post_res(streams: Tensor, h_res: Tensor, h_post: Tensor, branch_out: Tensor) -> Tensor:
    """New streams ``[s, b, n, C]``: ``x'_i = sum_j h_res[i, j] x_j + h_post[i] * f``.

    ``streams [s, b, n, C]``; ``h_res [s, b, n, n]`` or static ``[n, n]``; ``h_post [s, b, n]`` or
    static ``[n]``; ``branch_out f [s, b, C]``. fp32 math, stream dtype out.
    """
    dt = _math_dtype(streams, h_res, h_post, branch_out)
    mixed = torch.matmul(h_res.to(dt), streams.to(dt))
    out = mixed + h_post.to(dt).unsqueeze(-1) * branch_out.to(dt).unsqueeze(-2)
    return out.to(streams.dtype)


def mhc_mix_pre(streams: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, num_iters: int = 20,
                eps: float = 1e-6, rms_eps: float = 1e-6, norm_weight: Tensor | None = None,
                norm_eps: float = 1e-5) -> Tuple[Tensor, Tensor, Tensor]:
    """Mappings + pre-aggregation of ``streams [s, b, n, C]`` -> ``(u [s, b, C],
    h_post [s, b, n] fp32, h_res [s, b, n, n] fp32)``.

    ``norm_weight [C]`` (the branch's RMSNorm weight, folded into the site): the first output is
    the branch's normed input ``rms_norm(u) * norm_weight`` instead of ``u``, with ``u`` kept in
    fp32 between the two (the unfolded layer rounds ``u`` to the stream dtype first)."""
    s, b, n, c = streams.shape
    h_pre, h_post, h_res = mhc_mappings(streams.reshape(s * b, n * c), phi, alpha, bias, n,
                                        num_iters, eps, rms_eps)
    if norm_weight is None:
        u = mhc_pre(streams, h_pre.view(s, b, n))
    else:
        u = _pre_mix(streams, h_pre.view(s, b, n), norm_weight)
        u = rms_norm(u, norm_weight, norm_eps).to(streams.dtype)
    return u, h_post.view(s, b, n), h_res.view(s, b, n, n)


def rms_norm(u: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``u * rsqrt(mean(u^2) + eps) * weight`` over the last dim; ``u`` fp32 or fp64 (its dtype
    out)."""
    return u * torch.rsqrt(u.square().mean(dim=-1, keepdim=True) + eps) * weight.to(u.dtype)


def branch_mix_weights(logits: Tensor, temperature: float = 1.0, blend_alpha: float = 1.0,
                       num_iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Branch-mixer weights (the MegaCpp mHC branch mixer, seed 001): ``logits [..., n, n]`` ->
    ``[..., n, n]`` fp32 with every row on the simplex.

    1. ``n == 2``: the seed's short-circuit, a plain row softmax of ``logits / temperature``. A 2x2
       doubly stochastic matrix has one degree of freedom, so the seed skips Sinkhorn there; the
       result is row-stochastic only (columns are not balanced).
       ``n != 2``: ``sinkhorn(logits / temperature)`` (fp32, sums clamped by ``eps``).
    2. Renormalise each row onto the simplex (``w / max(sum_j w, eps)``; a no-op up to rounding).
    3. Blend with uniform: ``blend_alpha * w + (1 - blend_alpha) / n``. The seed says only that
       blend_alpha "blends the learned weights with uniform" and is ramped; here ``blend_alpha`` is
       the weight of the learned matrix: 1.0 (default) = no blend, 0.0 = uniform, ramp 0 -> 1 as
       the training signal firms up. The blend keeps rows (and, for n != 2, columns) stochastic.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: softmax/Sinkhorn temperature must be "
                         f"positive; use a float > 0")
    if not 0.0 <= blend_alpha <= 1.0:
        raise ValueError(f"blend_alpha={blend_alpha!r}: weight of the learned matrix in the blend "
                         f"with uniform; use a float in [0, 1]")
    n = logits.shape[-1]
    if logits.dim() < 2 or logits.shape[-2] != n:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: branch affinities must be square; "
                         f"use [..., n, n]")
    scaled = logits.to(_math_dtype(logits)) / temperature
    if n == 2:
        w = torch.softmax(scaled, dim=-1)
    else:
        w = sinkhorn(scaled, num_iters, eps)
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(eps)
    return blend_alpha * w + (1.0 - blend_alpha) / n
