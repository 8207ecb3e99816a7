"""mHC stream mixers as a Megatron TransformerLayer (Manifold-Constrained Hyper-Connections,
DeepSeek, arXiv 2512.24880, eqs. 14-19).

The residual stream is widened to ``n`` streams of width ``C = config.hidden_size``. Around each
sublayer F (attention, then MLP/MoE), per token:

    u   = sum_i H_pre[i] x_i                      (branch input; F applies its own norm)
    x'_i = sum_j H_res[i, j] x_j + H_post[i] F(u)  (H_res doubly stochastic via Sinkhorn)

With an RMSNorm model and ``mhc.fold_norm`` (the default) the sublayer's input norm is folded
into the site: the spec builds it as :class:`MHCFoldedNorm` (same ``weight`` parameter and
checkpoint key, an identity in the stock forward) and the mixer's fused pre mix writes
``rms_norm(u) * weight`` directly, so ``u`` is never written or read back and the norm's backward
runs inside the site's kernels.

Between layers the streams travel as one ``[s, b, n*C]`` tensor, so Megatron's block, sequence
parallel, recompute and pipeline p2p (with the shape patch in ``patches/``) carry them unchanged.
The first layer of the model expands ``[s, b, C]`` into ``n`` copies; :class:`MHCFinalNorm`
averages the streams before the final norm.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_ext import backends
from megatron_ext.config import MHCConfig
from megatron_ext.modules.norm import Norm
from megatron_ext.modules.param_hooks import run_forward_pre_hooks
from megatron_ext.ops import mhc as mhc_ops


def no_residual_bda(training: bool, fused: bool):
    """Bias-dropout without the residual add: the mixer does the residual itself.

    A plain function on purpose: Megatron's build_module returns functions uncalled.
    """

    def bda(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return torch.nn.functional.dropout(x, p=prob, training=training)

    return bda


def pin_mixer_tilings(mhc: MHCConfig, config) -> bool:
    """Pin the fused kernels' tilings (:func:`megatron_ext.ops.mhc.pin_tilings`, process-wide) when
    ``mhc.deterministic`` or Megatron's ``config.deterministic_mode`` asks; recorded in the receipt
    either way. Returns whether they are pinned."""
    megatron = bool(getattr(config, "deterministic_mode", False))
    asked = mhc.deterministic or megatron
    if asked:
        mhc_ops.pin_tilings(True)
    pinned = mhc_ops.tilings_pinned()
    if mhc.deterministic:
        why = "mhc deterministic is on"
    elif megatron:
        why = "Megatron's deterministic_mode is on"
    elif pinned:
        why = "pinned elsewhere in this process (pin_tilings or torch.use_deterministic_algorithms)"
    else:
        why = "the autotuner's fastest tiling per shape (runs may differ in the last bits)"
    backends.note("mhc_tilings", "pinned" if asked else "autotuned",
                  "pinned" if pinned else "autotuned", why)
    return pinned


class StreamMixer(torch.nn.Module):
    """The mappings of one mHC site: phi ``[n*C, n*n + 2n]``, alpha ``[3]`` and bias
    ``[n*n + 2n]`` ordered [pre (n), post (n), res (n*n)].

    Initialisation: alpha small (the mappings start nearly token-independent); bias gives
    H_pre = 1/n (the branch sees the stream mean), H_post = 1, and H_res ~ 0.95 on the diagonal
    after Sinkhorn (identity-like, doubly stochastic).
    """

    def __init__(self, config, mhc: MHCConfig):
        super().__init__()
        n, c = mhc.num_streams, config.hidden_size
        self.mhc, self.n, self.c = mhc, n, c
        width = n * n + 2 * n
        bias = torch.zeros(width)
        if n > 1:
            bias[:n] = math.log(1.0 / (n - 1))  # sigmoid(b) = 1/n
        bias[2 * n:] = (4.0 * torch.eye(n)).reshape(-1)
        self.bias = torch.nn.Parameter(bias)
        if mhc.mode == "dynamic":
            phi = torch.empty(n * c, width)
            torch.nn.init.xavier_uniform_(phi)
            self.phi = torch.nn.Parameter(phi)
            self.alpha = torch.nn.Parameter(torch.full((3,), float(mhc.alpha_init)))
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)
        for p in self.parameters():
            # Under sequence parallel each TP rank mixes different tokens: all-reduce the grads.
            p.sequence_parallel = bool(config.sequence_parallel)

    def _apply(self, fn, recurse=True):
        """With ``mhc.fp32_params``, a precision cast of the model (Megatron's Float16Module calls
        ``.bfloat16()`` / ``.half()``) leaves this mixer's fp32 weights in fp32; device moves
        still apply. The weights are taken from their fp32 values, not from the rounded copy."""
        if not self.mhc.fp32_params:
            return super()._apply(fn, recurse)

        def keep_fp32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in (torch.bfloat16, torch.float16):
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, streams: torch.Tensor, norm: "MHCFoldedNorm | None" = None):
        """The pre mix, called through the module (``mixer(streams, norm)``) so that its forward
        pre-hooks run before its weights are read: Megatron's DDP with --overlap-param-gather
        waits there for the all-gather of a module's own parameters.

        streams ``[s, b, n, C]`` -> (u ``[s, b, C]``, h_post, h_res, streams for :meth:`post`)
        (mappings per token or static). With ``norm`` (the sublayer's folded input norm) the
        first output is the normed branch input, fused into the pre mix on the dynamic lane; the
        norm's forward pre-hooks run first, for the same reason."""
        m = self.mhc
        if norm is not None:
            run_forward_pre_hooks(norm)
        if m.mode == "dynamic":
            fold = {} if norm is None else dict(norm_weight=norm.effective_weight(), norm_eps=norm.eps)
            return mhc_ops.mhc_mix_pre_linked(streams, self.phi, self.alpha, self.bias,
                                              num_iters=m.sinkhorn_iters, eps=m.eps, backend=m.backend,
                                              **fold)
        n = self.n
        b = self.bias.to(torch.promote_types(self.bias.dtype, torch.float32))  # fp32 math, fp64 kept
        h_pre = torch.sigmoid(b[:n])
        h_post = 2.0 * torch.sigmoid(b[n:2 * n])
        h_res = mhc_ops.sinkhorn(b[2 * n:].view(n, n), num_iters=m.sinkhorn_iters, eps=m.eps, backend="torch")
        u = mhc_ops.mhc_pre(streams, h_pre, backend=m.backend)
        return (u if norm is None else norm.normalize(u)), h_post, h_res, streams

    def post(self, streams, h_res, h_post, branch_out):
        return mhc_ops.mhc_post_res(streams, h_res, h_post, branch_out, backend=self.mhc.backend)


class MHCTransformerLayer(TransformerLayer):
    """TransformerLayer whose two residual connections are mHC stream mixers.

    The stock ``_forward_attention`` / ``_forward_mlp`` run unchanged on the branch input ``u``
    (with a no-residual bda from the spec); this class adds the mixing around them.
    """

    def __init__(self, config, submodules, layer_number: int = 1, mhc: MHCConfig | None = None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.mhc = mhc or MHCConfig()
        self.mhc.validate(config.hidden_size)
        pin_mixer_tilings(self.mhc, config)
        self.attn_mixer = StreamMixer(config, self.mhc)
        self.mlp_mixer = StreamMixer(config, self.mhc)

    def _streams(self, hidden_states: torch.Tensor) -> torch.Tensor:
        s, b, width = hidden_states.shape
        n, c = self.mhc.num_streams, self.config.hidden_size
        if width == c:  # first layer of the model: expand the embedding into n copies
            return hidden_states.unsqueeze(2).expand(s, b, n, c).contiguous()
        if width != n * c:
            raise ValueError(f"hidden_states width={width}: expected hidden_size={c} (first layer) or "
                             f"num_streams*hidden_size={n * c}; use the mHC block spec for every layer")
        return hidden_states.view(s, b, n, c)

    def _mix(self, mixer: StreamMixer, norm, streams, branch, *args, **kwargs):
        u, h_post, h_res, streams = mixer(streams, norm if isinstance(norm, MHCFoldedNorm) else None)
        out = branch(u, *args, **kwargs)
        extra = None
        if isinstance(out, tuple):
            out, extra = out
        s, b, n, c = streams.shape
        new = mixer.post(streams, h_res, h_post, out).reshape(s, b, n * c)
        # Pipeline stages deallocate their outputs and require them not to be views.
        new = make_viewless_tensor(inp=new, requires_grad=new.requires_grad, keep_graph=True)
        return new, extra

    def _forward_attention(self, hidden_states, *args, **kwargs):
        streams = self._streams(hidden_states)
        return self._mix(self.attn_mixer, self.input_layernorm, streams, super()._forward_attention,
                         *args, **kwargs)

    def _forward_mlp(self, hidden_states, *args, **kwargs):
        streams = self._streams(hidden_states)
        out, _ = self._mix(self.mlp_mixer, self.pre_mlp_layernorm, streams, super()._forward_mlp,
                           *args, **kwargs)
        return out


class MHCFinalNorm(Norm):
    """The block's final norm: average the n streams (``[s, b, n*C]`` -> ``[s, b, C]``), then norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            s, b, width = x.shape
            x = x.view(s, b, width // self.hidden_size, self.hidden_size).mean(dim=2)
        return super().forward(x)


class MHCFoldedNorm(Norm, IdentityOp):
    """A sublayer's input RMSNorm folded into the mHC site before it: it keeps the norm's
    ``weight`` (same parameter, same checkpoint key, interchangeable with :class:`Norm`) and is
    an identity where Megatron's layer calls it (an ``IdentityOp``, so Megatron neither
    recomputes nor offloads it); :class:`MHCTransformerLayer` hands it to the site's mixer, whose
    pre mix applies it."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(config, hidden_size, eps, **kwargs)
        if self.kind != "RMSNorm":
            raise ValueError(f"normalization={self.kind!r}: the mHC sites fold only an RMSNorm into "
                             f"their pre mix; use normalization='RMSNorm', or mhc fold_norm=false "
                             f"(--no-mhc-fold-norm) to keep a separate {self.kind}")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm itself (for a site without the fused lane)."""
        return Norm.forward(self, x)
