"""torch.autograd.Function glue around the mHC Triton kernels (n = 4).

Shapes are checked by the dispatcher in ``__init__``; here tensors are made contiguous, flattened
to tokens, and handed to the launchers. Mapping gradients come back in the mapping's dtype;
static (shared) mappings get the deterministic token sum of the per-token gradients.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.mhc import triton_mix, triton_sinkhorn, triton_streams


def _tokens(streams: torch.Tensor) -> torch.Tensor:
    """``[s, b, 4, C]`` -> contiguous ``[T, 4, C]``."""
    return streams.contiguous().view(-1, streams.shape[-2], streams.shape[-1])


def _per_token_grad(g_tok: torch.Tensor, h: torch.Tensor, static: bool) -> torch.Tensor:
    g = g_tok.sum(0) if static else g_tok
    return g.reshape(h.shape).to(h.dtype)


class SinkhornFn(torch.autograd.Function):
    """``logits [..., 4, 4]`` -> fp32 doubly stochastic; backward recomputes the iterations."""

    @staticmethod
    def forward(ctx, logits, num_iters, eps):
        flat = logits.contiguous().view(-1, 4, 4)
        ctx.save_for_backward(flat)
        ctx.cfg = (num_iters, eps, logits.shape, logits.dtype)
        return triton_sinkhorn.sinkhorn_fwd(flat, num_iters, eps).view(logits.shape)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        num_iters, eps, shape, dtype = ctx.cfg
        g = grad.float().contiguous().view(-1, 4, 4)
        dl = triton_sinkhorn.sinkhorn_bwd(flat, g, num_iters, eps)
        return dl.view(shape).to(dtype), None, None


class PreFn(torch.autograd.Function):
    """``u = sum_i h_pre[i] x_i``; streams ``[s, b, 4, C]``, h_pre ``[s, b, 4]`` or ``[4]``."""

    @staticmethod
    def forward(ctx, streams, h_pre):
        x = _tokens(streams)
        static = h_pre.dim() == 1
        h = h_pre.contiguous()
        u = triton_streams.pre_fwd(x, h, 0 if static else 4)
        ctx.save_for_backward(x, h)
        ctx.static = static
        return u.view(*streams.shape[:-2], streams.shape[-1])

    @staticmethod
    def backward(ctx, gu):
        x, h = ctx.saved_tensors
        gx, gh = triton_streams.pre_bwd(x, h, 0 if ctx.static else 4,
                                        gu.contiguous().view(x.shape[0], x.shape[2]))
        s_shape = tuple(gu.shape[:-1]) + tuple(x.shape[1:])
        return gx.view(s_shape), _per_token_grad(gh, h, ctx.static)


class PostResFn(torch.autograd.Function):
    """``x'_i = sum_j h_res[i, j] x_j + h_post[i] f``; static ``[4, 4]`` / ``[4]`` mappings allowed."""

    @staticmethod
    def forward(ctx, streams, h_res, h_post, branch_out):
        x = _tokens(streams)
        f = branch_out.contiguous().view(x.shape[0], x.shape[2])
        hr, hp = h_res.contiguous(), h_post.contiguous()
        ctx.strides = (0 if h_res.dim() == 2 else 16, 0 if h_post.dim() == 1 else 4)
        out = triton_streams.post_res_fwd(x, hr, ctx.strides[0], hp, ctx.strides[1], f)
        ctx.save_for_backward(x, hr, hp, f)
        return out.view(streams.shape)

    @staticmethod
    def backward(ctx, g):
        x, hr, hp, f = ctx.saved_tensors
        sr, sp = ctx.strides
        gx, gf, ghres, ghpost = triton_streams.post_res_bwd(
            x, hr, sr, hp, sp, f, g.contiguous().view(x.shape))
        s_shape = tuple(g.shape)
        return (gx.view(s_shape), _per_token_grad(ghres, hr, sr == 0),
                _per_token_grad(ghpost, hp, sp == 0), gf.view(*s_shape[:-2], s_shape[-1]))


class MixPreFn(torch.autograd.Function):
    """Fused mappings + pre: ``streams [s, b, 4, C]``, ``phi [4C, 24]``, ``alpha [3]``,
    ``bias [24]`` (any float dtype; the kernels compute in fp32 and return each gradient in its
    parameter's dtype, so a bf16 model pays no cast kernels) -> ``(u [s, b, C], h_post [s, b, 4]
    fp32, h_res [s, b, 4, 4] fp32, streams_link)``. ``streams_link`` is a view of the streams: a
    consumer that uses it instead of the streams (the site's post/res mix) has its stream
    gradient summed into this backward's dx kernel rather than by a separate autograd add.

    ``gamma [C]`` or None: the branch's RMSNorm weight folded into the site (``u`` is then
    ``rms_norm(u) * gamma``; its gradient comes back as a fifth gradient).

    Saved for backward: the streams (already alive as the residual) and 116 B/token of fp32
    stats (z, inv_r, h_pre; 4 B more with the norm); nothing else is recomputed but the Sinkhorn
    iterations and, with the norm, u."""

    @staticmethod
    def forward(ctx, streams, phi, alpha, bias, gamma, num_iters, eps, rms_eps, norm_eps):
        ctx.set_materialize_grads(False)
        s_shape = streams.shape
        x = streams.contiguous().view(-1, s_shape[-2] * s_shape[-1])
        phi_c, alpha_c, bias_c = phi.contiguous(), alpha.contiguous(), bias.contiguous()
        gamma_c = None if gamma is None else gamma.contiguous()
        u, h_pre, h_post, h_res, z, inv_r, rstd = triton_mix.mix_pre_fwd(
            x, phi_c, alpha_c, bias_c, num_iters, eps, rms_eps, gamma_c, norm_eps)
        ctx.save_for_backward(x, phi_c, alpha_c, bias_c, z, inv_r, h_pre, gamma_c, rstd)
        ctx.cfg = (num_iters, eps, s_shape)
        lead = tuple(s_shape[:-2])
        return (u.view(*lead, s_shape[-1]), h_post.view(*lead, 4), h_res.view(*lead, 4, 4),
                streams.view_as(streams))

    @staticmethod
    def backward(ctx, gu, gh_post, gh_res, g_link):
        x, phi, alpha, bias, z, inv_r, h_pre, gamma, rstd = ctx.saved_tensors
        num_iters, eps, s_shape = ctx.cfg
        T, NC = x.shape
        f32 = dict(device=x.device, dtype=torch.float32)
        gu = (torch.zeros(T, NC // 4, device=x.device, dtype=x.dtype) if gu is None
              else gu.contiguous().view(T, NC // 4))
        gh_post = (torch.zeros(T, 4, **f32) if gh_post is None
                   else gh_post.float().contiguous().view(T, 4))
        gh_res = (torch.zeros(T, 4, 4, **f32) if gh_res is None
                  else gh_res.float().contiguous().view(T, 4, 4))
        if g_link is not None:
            g_link = g_link.contiguous().view(T, NC)
        dx, dphi, dalpha, dbias, dgamma = triton_mix.mix_pre_bwd(
            x, phi, alpha, bias, z, inv_r, h_pre, gu, gh_post, gh_res, num_iters, eps, g_link,
            gamma, rstd)
        return dx.view(s_shape), dphi, dalpha, dbias, dgamma, None, None, None, None
