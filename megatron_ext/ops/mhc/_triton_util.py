"""Small helpers shared by the mHC Triton files (no kernels here)."""

from __future__ import annotations

import triton

from megatron_ext import backends


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, or
    another value Triton accepts).

    Read when a kernel module is imported, as ``triton.jit`` itself does."""
    return backends.triton_interpret_env()


def kernels_interpreted() -> bool:
    """Whether this package's kernels were built for the interpreter (``triton.jit`` decides when
    the kernel module is first imported, from the environment at that moment)."""
    from megatron_ext.ops.mhc import triton_mix, triton_sinkhorn, triton_streams

    kernels = (triton_mix._mix_proj_kernel, triton_streams._pre_fwd_kernel,
               triton_sinkhorn._sinkhorn_fwd_kernel)
    return all(type(getattr(k, "fn", k)).__name__ == "InterpretedFunction" for k in kernels)


def tuned(configs, key, **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU; the first config alone in the interpreter
    (benchmarking configs there would only cost time)."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **kwargs)


# tl.dot precision of the fp32 projections (bf16 streams skip it where they can: the projection
# and d phi dots take x as it is with the fp32 operand split into bf16 hi + lo, see triton_mix).
# "tf32" keeps the 4C x 24 projection and its two backward GEMMs on the tensor cores (fp32 FMA
# would cost ~0.2 ms at C=2048, T=8192); the inputs lose mantissa bits below 2^-11 relative,
# which alpha ~ 0.01 scales down further before the sigmoid/Sinkhorn. The interpreter computes
# these dots in fp32 whatever this says.
DOT_PRECISION = "tf32"
