"""mHC stream mixers (Manifold-Constrained Hyper-Connections, arXiv 2512.24880): public entry points.

Each op takes ``backend="auto" | "triton" | "torch"``; "auto" resolves through
:func:`megatron_ext.backends.resolve` (Triton when it can run here, else the torch reference,
logged once and recorded). The Triton kernels cover n = 4 streams in bf16/fp16/fp32 on CUDA, or
on CPU under ``TRITON_INTERPRET=1`` (the test lane). ``reference.py`` is the spec of every op.

Layouts: streams ``[s, b, n, C]`` (the layer's ``[s, b, n*C]`` viewed, no copy), branch input and
output ``[s, b, C]``, dynamic mappings per token ``[s, b, n]`` / ``[s, b, n, n]``, static mappings
``[n]`` / ``[n, n]``. Mapping parameters: ``phi [n*C, n*n + 2n]``, ``alpha [3]`` (pre, post, res),
``bias [n*n + 2n]``, columns ordered [pre(n), post(n), res(n*n) row-major].
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from megatron_ext import backends
from megatron_ext.ops.mhc import reference
from megatron_ext.ops.mhc.reference import branch_mix_weights, mhc_mappings

__all__ = ["sinkhorn", "mhc_pre", "mhc_post_res", "mhc_mix_pre", "mhc_mix_pre_linked", "mhc_mappings",
           "branch_mix_weights", "pin_tilings", "tilings_pinned", "TRITON_NUM_STREAMS", "TRITON_DTYPES"]

Tensor = torch.Tensor
TRITON_NUM_STREAMS = 4
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_PIN_TILINGS = False


def pin_tilings(on: bool = True) -> bool:
    """The fused lane's deterministic mode, process-wide (as ``torch.use_deterministic_algorithms``).

    Each Triton kernel's tiling sets the order of its sums (the projection's K chunks, the row
    reductions, the partial sums of the parameter gradients). By default the autotuner picks the
    fastest tiling by timing, so two processes may pick differently and round differently from
    the first step. Pinned, every launch takes one tiling that is a function of the shape alone,
    and the backward's d phi token splits no longer follow the GPU's SM count: the same inputs
    give bitwise-equal outputs and gradients in every process on the same GPU model and software
    (within a process the kernels are bitwise reproducible either way; none uses atomics). The
    pinned tilings were measured at C = 256, 1024, 2048 and 4096: for the one-token row kernels
    the tiling with the smallest worst-case loss over an H100 and an H200, for the others the
    H100 autotuner's choice (docs/mhc.md, "Deterministic mode"). Returns the previous setting."""
    global _PIN_TILINGS
    prev, _PIN_TILINGS = _PIN_TILINGS, bool(on)
    return prev


def tilings_pinned() -> bool:
    """:func:`pin_tilings` is on, or ``torch.are_deterministic_algorithms_enabled()`` (Megatron's
    ``--deterministic-mode`` turns that on)."""
    return _PIN_TILINGS or torch.are_deterministic_algorithms_enabled()


# (device types, n, dtype, TRITON_INTERPRET) -> the Triton probe's answer: a site asks twice per
# forward, and every answer but the environment's is fixed for the process
_PROBED: Dict[Tuple, Optional[str]] = {}


def _triton_probe(tensors: Sequence[Tensor], n: int, dtype: torch.dtype) -> Callable[[], Optional[str]]:
    devices = tuple(sorted({t.device.type for t in tensors}))
    key = (devices, n, dtype, backends.triton_interpret_env())

    def probe() -> Optional[str]:
        if key not in _PROBED:
            _PROBED[key] = _probe_triton(devices, n, dtype)
        return _PROBED[key]
    return probe


def _probe_triton(devices: Tuple[str, ...], n: int, dtype: torch.dtype) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if devices == ("cpu",):
        if not backends.triton_interpret_env():
            return "tensors are on CPU and TRITON_INTERPRET is not set (the Triton CPU interpreter)"
    elif devices != ("cuda",):
        return f"devices={list(devices)}: the kernels need all tensors on one CUDA device (or CPU " \
               f"with TRITON_INTERPRET=1)"
    if n != TRITON_NUM_STREAMS:
        return f"num_streams={n}: the fused kernels are built for n={TRITON_NUM_STREAMS}"
    if dtype not in TRITON_DTYPES:
        return f"dtype={dtype}: the kernels take {[str(d) for d in TRITON_DTYPES]}"
    from megatron_ext.ops.mhc._triton_util import kernels_interpreted

    if kernels_interpreted() != (devices == ("cpu",)):
        return (f"the mHC kernels were imported {'with' if devices == ('cuda',) else 'without'} "
                f"TRITON_INTERPRET=1 (triton.jit fixes that at import), unusable for "
                f"{devices[0]} tensors; set it before the first mHC Triton call")
    return None


def _torch_probe() -> Optional[str]:
    return None


def _resolve(op: str, backend: str, tensors: Sequence[Tensor], n: int, dtype: torch.dtype) -> str:
    return backends.resolve(op, backend, [("triton", _triton_probe(tensors, n, dtype)),
                                          ("torch", _torch_probe)])


def _check_shape(field: str, tensor: Tensor, allowed: Sequence[Tuple[int, ...]], why: str) -> None:
    if tuple(tensor.shape) not in [tuple(a) for a in allowed]:
        raise ValueError(f"{field}.shape={tuple(tensor.shape)}: {why}; use one of "
                         f"{[tuple(a) for a in allowed]}")


def _check_streams(streams: Tensor) -> Tuple[int, int, int, int]:
    if streams.dim() != 4:
        raise ValueError(f"streams.shape={tuple(streams.shape)}: the streams must be 4-d; use "
                         f"[s, b, n, C] (view the layer's [s, b, n*C] tensor)")
    return tuple(streams.shape)


def sinkhorn(logits: Tensor, num_iters: int = 20, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """``logits [..., n, n]`` -> fp32 doubly stochastic ``[..., n, n]`` (see reference.sinkhorn)."""
    reference.check_num_iters(num_iters)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: Sinkhorn needs square matrices; "
                         f"use [..., n, n]")
    if _resolve("mhc_sinkhorn", backend, [logits], logits.shape[-1], logits.dtype) == "torch":
        return reference.sinkhorn(logits, num_iters, eps)
    from megatron_ext.ops.mhc.autograd import SinkhornFn

    return SinkhornFn.apply(logits, num_iters, eps)


def mhc_pre(streams: Tensor, h_pre: Tensor, backend: str = "auto") -> Tensor:
    """``u [s, b, C] = sum_i h_pre[i] x_i``; ``streams [s, b, n, C]``, ``h_pre [s, b, n]`` (dynamic)
    or ``[n]`` (static). fp32 accumulation, stream dtype out."""
    s, b, n, _ = _check_streams(streams)
    _check_shape("h_pre", h_pre, [(s, b, n), (n,)], "one weight per stream, per token or shared")
    if _resolve("mhc_pre", backend, [streams, h_pre], n, streams.dtype) == "torch":
        return reference.mhc_pre(streams, h_pre)
    from megatron_ext.ops.mhc.autograd import PreFn

    return PreFn.apply(streams, h_pre)


def mhc_post_res(streams: Tensor, h_res: Tensor, h_post: Tensor, branch_out: Tensor,
                 backend: str = "auto") -> Tensor:
    """New streams ``[s, b, n, C]``: ``x'_i = sum_j h_res[i, j] x_j + h_post[i] * branch_out``.

    ``h_res [s, b, n, n]`` or static ``[n, n]``; ``h_post [s, b, n]`` or static ``[n]``;
    ``branch_out [s, b, C]`` (its dtype may differ from the streams'; the output has the streams')."""
    s, b, n, c = _check_streams(streams)
    _check_shape("h_res", h_res, [(s, b, n, n), (n, n)], "an n x n mix per token or shared")
    _check_shape("h_post", h_post, [(s, b, n), (n,)], "one weight per stream, per token or shared")
    _check_shape("branch_out", branch_out, [(s, b, c)], "the sublayer output of the site")
    if _resolve("mhc_post_res", backend, [streams, h_res, h_post, branch_out], n,
                streams.dtype) == "torch":
        return reference.mhc_post_res(streams, h_res, h_post, branch_out)
    from megatron_ext.ops.mhc.autograd import PostResFn

    return PostResFn.apply(streams, h_res, h_post, branch_out)


def mhc_mix_pre(streams: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, num_iters: int = 20,
                eps: float = 1e-6, rms_eps: float = 1e-6, backend: str = "auto", *,
                norm_weight: Optional[Tensor] = None,
                norm_eps: float = 1e-5) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused dynamic mappings + pre-aggregation of one sublayer site.

    ``streams [s, b, n, C]``, ``phi [n*C, n*n + 2n]``, ``alpha [3]``, ``bias [n*n + 2n]`` ->
    ``(u [s, b, C] stream dtype, h_post [s, b, n] fp32, h_res [s, b, n, n] fp32)``; feed h_post /
    h_res to :func:`mhc_post_res`. Gradients flow to streams, phi, alpha and bias (fp32 math; the
    parameter grads come back in each parameter's dtype). ``eps``: Sinkhorn sum clamp;
    ``rms_eps``: inside the RMS square root.

    ``norm_weight [C]`` (the branch's RMSNorm weight; ``norm_eps`` its epsilon): the branch's
    input norm folded into the site. The first output is then ``rms_norm(u) * norm_weight``, the
    norm's input ``u`` is never written, and the norm's backward runs inside the site's (gradient
    to ``norm_weight`` included)."""
    return mhc_mix_pre_linked(streams, phi, alpha, bias, num_iters, eps, rms_eps, backend,
                              norm_weight=norm_weight, norm_eps=norm_eps)[:3]


def mhc_mix_pre_linked(streams: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor,
                       num_iters: int = 20, eps: float = 1e-6, rms_eps: float = 1e-6,
                       backend: str = "auto", *, norm_weight: Optional[Tensor] = None,
                       norm_eps: float = 1e-5) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`mhc_mix_pre` plus a fourth output, the streams to hand to :func:`mhc_post_res` of
    the same site. Same values as ``streams``; on the Triton lane it is a view whose gradient is
    summed into the mix-pre backward kernel (one pass over the stream gradient instead of
    autograd's extra add of the two)."""
    reference.check_num_iters(num_iters)
    s, b, n, c = _check_streams(streams)
    m = n * n + 2 * n
    _check_shape("phi", phi, [(n * c, m)], "the mapping projection of the flattened streams")
    _check_shape("alpha", alpha, [(3,)], "the pre, post and res gating scales")
    _check_shape("bias", bias, [(m,)], "the mapping bias, ordered [pre(n), post(n), res(n*n)]")
    tensors = [streams, phi, alpha, bias]
    if norm_weight is not None:
        _check_shape("norm_weight", norm_weight, [(c,)], "the branch's RMSNorm weight, one per channel")
        tensors.append(norm_weight)
    if _resolve("mhc_mix_pre", backend, tensors, n, streams.dtype) == "torch":
        return (*reference.mhc_mix_pre(streams, phi, alpha, bias, num_iters, eps, rms_eps,
                                       norm_weight, norm_eps), streams)
    from megatron_ext.ops.mhc.autograd import MixPreFn

    return MixPreFn.apply(streams, phi, alpha, bias, norm_weight, num_iters, eps, rms_eps,
                          norm_eps)
