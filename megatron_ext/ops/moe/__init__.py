"""Fused MoE ops: router (``routing.py``) and the expert FFN ``moe_ffn`` (one dispatcher).

``moe_ffn(x, probs, indices, w1, w2, activation, backend)``: x [T, H], probs [T, k] float,
indices [T, k] int, w1 [E, H, 2F] (gated: swiglu/geglu, [gate | up]) or [E, H, F] (plain),
w2 [E, F, H] -> [T, H] = sum_j probs[t, j] * FFN_{indices[t, j]}(x[t]).

Backends (``backend="auto" | "triton" | "grouped_mm" | "te" | "torch"``, resolved by
:func:`megatron_ext.backends.resolve`, "auto" in that order): "triton" = the fused kernels of
``triton_moe.py`` (gather fused into grouped GEMM 1 with the activation epilogue, probability in
grouped GEMM 2's epilogue, fixed-order combine; deterministic and batch-invariant; CUDA, or the CPU
interpreter when asked for by name); "grouped_mm" = permute -> ``grouped_mm(x_sorted, w1, offs)``
-> activation -> ``grouped_mm(h, w2, offs)`` -> weighted unpermute, on the CUTLASS grouped GEMM
(CUDA, bf16, sm >= 90); "te" = the same pipeline on Transformer Engine's grouped GEMM when TE is
installed (``te_grouped.py``; one host read of the expert counts per call, TE's API needs them);
"torch" = the per-expert loop in ``reference.py`` (the spec).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable, Optional

import torch

from megatron_ext import backends
from megatron_ext.ops.moe import reference
from megatron_ext.ops.moe.reference import (ACTIVATIONS, GATED_ACTIVATIONS, expert_activation,
                                            moe_ffn_reference, permute, unpermute)
from megatron_ext.ops.moe.routing import (RouterConfig, RoutingResult, expert_counts,
                                          ids_out_of_range, route, seq_ids_for_layout,
                                          seq_ids_from_lengths, sinkhorn_balance,
                                          update_expert_bias, update_qb_beta)

__all__ = ["moe_ffn", "batch_invariant", "moe_ffn_reference", "permute", "unpermute", "expert_activation",
           "RouterConfig", "RoutingResult", "route", "expert_counts", "sinkhorn_balance",
           "update_expert_bias", "update_qb_beta",
           "seq_ids_for_layout", "seq_ids_from_lengths", "ACTIVATIONS"]

Tensor = torch.Tensor


def _grouped_mm_fn() -> Optional[Callable]:
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def _one_float_dtype(x: Tensor, w1: Tensor, w2: Tensor, who: str) -> Optional[str]:
    """None when x, w1, w2 share one of bfloat16 / float16 / float32, else why not (``who``: the
    backend, e.g. "the Triton kernels take")."""
    dtypes = {t.dtype for t in (x, w1, w2)}
    if len(dtypes) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return (f"dtypes={sorted(str(d) for d in dtypes)}: {who} x, w1, w2 all bfloat16, float16 "
                f"or float32")
    return None


def _grouped_mm_probe(x: Tensor, w1: Tensor, w2: Tensor) -> Callable[[], Optional[str]]:
    def probe() -> Optional[str]:
        if _grouped_mm_fn() is None:
            return f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
        devices = {t.device.type for t in (x, w1, w2)}
        if devices != {"cuda"}:
            return f"devices={sorted(devices)}: the grouped GEMM runs on CUDA tensors only"
        dtypes = {t.dtype for t in (x, w1, w2)}
        if dtypes != {torch.bfloat16}:
            return f"dtypes={sorted(str(d) for d in dtypes)}: the grouped GEMM lane is bf16 only"
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (9, 0):
            # on sm < 90 torch falls back to a per-expert loop with host syncs (pytorch #186620)
            return f"compute capability {cap[0]}.{cap[1]}: the CUTLASS grouped GEMM needs >= 9.0"
        if any(d % 8 for d in (w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2])):
            return (f"w1.shape={tuple(w1.shape)}, w2.shape={tuple(w2.shape)}: grouped_mm needs "
                    f"every GEMM dim a multiple of 8 (16-byte rows in bf16)")
        return None
    return probe


# (device, dtype) pairs on which TE's grouped GEMM has run in this process (past its guarded first call)
_TE_RAN: set = set()


def _te_key(x: Tensor):
    return (str(x.device), x.dtype)


def _te_probe(x: Tensor, w1: Tensor, w2: Tensor) -> Callable[[], Optional[str]]:
    def probe() -> Optional[str]:
        from megatron_ext.ops.moe import te_grouped

        why = te_grouped.unavailable()
        if why:
            return why
        failed = backends.failed("moe_ffn", _te_key(x))
        if failed is not None:
            return f"TE's grouped GEMM failed here earlier in this run: {failed}"
        devices = {t.device.type for t in (x, w1, w2)}
        if devices != {"cuda"}:
            return f"devices={sorted(devices)}: Transformer Engine's grouped GEMM runs on CUDA tensors"
        return _one_float_dtype(x, w1, w2, "TE's grouped GEMM takes")
    return probe


def _moe_ffn_te(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                activation: str, requested: str, recompute_activation: bool = False) -> Optional[Tensor]:
    """The TE lane. Its first call per (device, dtype) is guarded: TE's internal API differs across
    releases, so an error there is logged once and recorded, and returns None (the caller runs
    the torch reference; "auto" skips TE from then on); asked for by name it is an error. Later
    calls are not guarded (an error then is a real one, e.g. out of memory)."""
    from megatron_ext.ops.moe.te_grouped import te_moe_ffn

    key = _te_key(x)
    if key in _TE_RAN:
        return te_moe_ffn(x, probs, indices, w1, w2, activation, recompute_activation)
    try:
        out = te_moe_ffn(x, probs, indices, w1, w2, activation, recompute_activation)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:   # any failure inside TE's extension: see the docstring
        backends.run_failure("moe_ffn", requested, "te", key, "Transformer Engine's grouped GEMM "
                             "failed here", f"{type(exc).__name__}: {exc}", "torch",
                             "backend='auto' or one of ['triton', 'grouped_mm', 'torch']")
        return None
    _TE_RAN.add(key)
    return out


def _torch_probe() -> Optional[str]:
    return None


@functools.lru_cache(maxsize=None)
def _triton_too_old() -> Optional[str]:
    """The kernels pass ``flatten=`` to ``tl.range`` (Triton >= 3.3). Cached: the probe runs on
    every ``moe_ffn`` call and the installed Triton does not change."""
    import inspect

    import triton
    import triton.language as tl

    if "flatten" not in inspect.signature(tl.range.__init__).parameters:
        return (f"triton {triton.__version__}: the MoE kernels need tl.range(flatten=...), "
                f"Triton >= 3.3 (torch >= 2.7 ships it)")
    return None


def _triton_probe(x: Tensor, w1: Tensor, w2: Tensor, requested: str) -> Callable[[], Optional[str]]:
    def probe() -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        why = _triton_too_old()
        if why:
            return why
        why = _one_float_dtype(x, w1, w2, "the Triton kernels take")
        if why:
            return why
        devices = {t.device.type for t in (x, w1, w2)}
        if devices == {"cuda"}:
            return None
        if devices != {"cpu"}:
            return f"devices={sorted(devices)}: the Triton kernels run on CUDA tensors"
        if requested != "triton":
            # the interpreter is a test lane, orders of magnitude slower than the torch loop
            return "devices=['cpu']: the CPU interpreter runs only when backend='triton' is asked for"
        if not backends.triton_interpret_env():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton CPU interpreter)"
        from megatron_ext.ops.moe import triton_moe

        if not triton_moe.interpreted():
            return ("CPU tensors: the kernels were built for the GPU because TRITON_INTERPRET=1 "
                    "was set only after triton_moe was imported")
        return None
    return probe


def batch_invariant(x: Tensor, w1: Tensor, w2: Tensor, backend: str = "auto") -> bool:
    """Whether :func:`moe_ffn` with ``backend`` runs, on these tensors, a lane whose results are
    bitwise the same across runs and whose output / ``dx`` / ``dprobs`` rows do not depend on
    the rest of the batch: the Triton kernels on CUDA (no atomics, fixed K order, tiles that do
    not depend on T; docs/moe_kernels.md). Not the interpreter (its dot is numpy's BLAS), not
    the library GEMMs (their kernel choice follows the problem size)."""
    if backend not in ("auto", "triton") or not all(t.is_cuda for t in (x, w1, w2)):
        return False
    return _triton_probe(x, w1, w2, backend)() is None


def _check(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
           activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: unknown expert activation; use one of "
                         f"{list(ACTIVATIONS)}")
    if x.dim() != 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: tokens must be flattened; use [T, H]")
    T, H = x.shape
    if indices.dim() != 2 or indices.shape[0] != T:
        raise ValueError(f"indices.shape={tuple(indices.shape)}: one row of expert ids per token "
                         f"of x [{T}, {H}]; use [{T}, k]")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices.dtype={indices.dtype}: expert ids are integers; use int64")
    if probs.shape != indices.shape or not probs.dtype.is_floating_point:
        raise ValueError(f"probs.shape={tuple(probs.shape)}, dtype={probs.dtype}: one float "
                         f"weight per (token, choice); use {tuple(indices.shape)} float")
    if w1.dim() != 3 or w1.shape[1] != H:
        raise ValueError(f"w1.shape={tuple(w1.shape)}: the first expert GEMM maps H={H}; use "
                         f"[E, {H}, 2F] (gated) or [E, {H}, F]")
    E = w1.shape[0]
    if w2.dim() != 3 or w2.shape[0] != E or w2.shape[2] != H:
        raise ValueError(f"w2.shape={tuple(w2.shape)}: the second expert GEMM maps F back to "
                         f"H={H} for E={E} experts; use [{E}, F, {H}]")
    ffn = w2.shape[1]
    want = 2 * ffn if activation in GATED_ACTIVATIONS else ffn
    if w1.shape[2] != want:
        raise ValueError(f"w1.shape={tuple(w1.shape)}: activation={activation!r} with "
                         f"w2.shape={tuple(w2.shape)} (F={ffn}) needs w1's last dim {want}"
                         f"{' ([gate | up])' if want != ffn else ''}; use [{E}, {H}, {want}]")
    bad = ids_out_of_range(indices, E)   # CPU only: on CUDA a host sync every step
    if bad is not None:
        raise ValueError(f"indices in [{bad[0]}, {bad[1]}]: expert ids "
                         f"out of range for E={E}; use 0 <= indices < {E}")


def _moe_ffn_grouped_mm(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                        activation: str, recompute_activation: bool = False) -> Tensor:
    gmm = _grouped_mm_fn()

    def grouped(tokens_per_expert: Tensor):
        # offs = end row of each group; offs[-1] == rows, so no garbage padding rows
        # (torchtitan #1237: rows past offs[-1] come back as inf/NaN)
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        return lambda rows, w: gmm(rows, w, offs=offs)

    return reference.permuted_ffn(x, probs, indices, w1, w2, activation, grouped, recompute_activation)


def _triton_config(x: Tensor, pregather: Optional[bool]):
    """The Triton backend's tiles for ``x``'s dtype, with ``pregather`` set where asked (None:
    the default tiles, returned as None)."""
    if pregather is None:
        return None
    from megatron_ext.ops.moe import triton_moe

    base = triton_moe.default_config(x.dtype)
    return base if base.pregather == bool(pregather) else \
        dataclasses.replace(base, pregather=bool(pregather))


def _unfused_accumulation(backend: str, w1: Tensor, w2: Tensor) -> None:
    """Record (in the receipt, logged once at info level) that gradient-accumulation fusion was
    asked of a backend without it, where a weight has a buffer it could have gone to: the
    option's default asks on every backend, and only the Triton kernels have it, so this is the
    expected lane on CPU runs rather than a warning."""
    from megatron_ext.ops.moe.autograd import main_grad_target

    if any(w.requires_grad and main_grad_target(w)[0] is not None for w in (w1, w2)):
        backends.note("moe_ffn.weight_grad_accumulation", "fused", "ddp_hook",
                      f"backend {backend!r} returns the weight gradients to autograd; "
                      f"Megatron's DDP hook adds them to main_grad (only the Triton "
                      f"kernels add in their epilogue)")


def moe_ffn(x: Tensor, probs: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
            activation: str = "swiglu", backend: str = "auto",
            pregather: Optional[bool] = None, recompute_activation: bool = False,
            accumulate_wgrad: bool = False) -> Tensor:
    """Routed expert FFN, see the module docstring for shapes; differentiable in x, probs,
    w1, w2 on every backend. ``pregather`` (Triton backend only; None = its tiles' choice, on
    for the H100 tiles): copy x's rows into expert order once, which speeds up the grouped
    GEMMs and keeps that ``[T*k, H]`` copy for backward instead of x (k times x's activation
    memory); False = gather inside the GEMMs and save x only. Other backends ignore it.
    ``recompute_activation`` (Megatron's ``moe_act`` recompute): keep the pre-activation
    ``[T*k, 2F]`` only and rebuild the activation's output in backward. The Triton kernels always
    work that way; the other backends do it when asked (:mod:`.recompute`).
    ``accumulate_wgrad`` (Megatron's gradient-accumulation fusion for the experts): where a weight
    carries Megatron DDP's gradient buffer (``main_grad`` + ``grad_added_to_main_grad``), the
    Triton backend's weight-gradient kernel adds the gradient into that buffer in its epilogue
    (one fp32 sum, rounded once) and hands autograd a placeholder the DDP hook skips, as
    Megatron's fused-wgrad linears do; this saves the hook's separate ``main_grad += grad`` pass
    over the expert weights. Other backends return the gradient to autograd (an info record in
    the receipt says so) and the hook adds it; weights without such a buffer are unaffected."""
    _check(x, probs, indices, w1, w2, activation)
    name = backends.resolve("moe_ffn", backend, [("triton", _triton_probe(x, w1, w2, backend)),
                                                 ("grouped_mm", _grouped_mm_probe(x, w1, w2)),
                                                 ("te", _te_probe(x, w1, w2)),
                                                 ("torch", _torch_probe)])
    if name == "triton":
        from megatron_ext.ops.moe.autograd import triton_moe_ffn

        return triton_moe_ffn(x, probs, indices, w1, w2, activation,
                              config=_triton_config(x, pregather),
                              accumulate_wgrad=accumulate_wgrad)
    if accumulate_wgrad and torch.is_grad_enabled():
        _unfused_accumulation(name, w1, w2)
    if name == "grouped_mm":
        return _moe_ffn_grouped_mm(x, probs, indices, w1, w2, activation, recompute_activation)
    if name == "te":
        out = _moe_ffn_te(x, probs, indices, w1, w2, activation, backend, recompute_activation)
        if out is not None:
            return out
    return reference.moe_ffn_reference(x, probs, indices, w1, w2, activation, recompute_activation)
