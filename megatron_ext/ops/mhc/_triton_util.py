"""Small helpers shared by the mHC Triton files (no kernels here)."""

from __future__ import annotations

import triton

from megatron_ext import backends
from megatron_ext.ops.mhc import tilings_pinned


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
    return backends.built_for_interpreter(*kernels)


def tuned(configs, key, pin, **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU; the first config alone in the interpreter
    (benchmarking configs there would only cost time). Launches go through :class:`TunedKernel`.

    ``pin(key values as a dict) -> index into configs``: the tiling a launch takes when tilings are
    pinned (:func:`megatron_ext.ops.mhc.pin_tilings`, the deterministic mode), a function of the
    shape alone."""
    def wrap(fn):
        tuner = triton.autotune(configs=configs[:1] if interpreting() else configs, key=key,
                                **kwargs)(fn)
        return TunedKernel(tuner, key, configs, pin)
    return wrap


def by_width(*steps):
    """A pin (see :func:`tuned`) by the stream width: ``steps`` = ``(C, index)`` pairs in rising C;
    a launch takes the index of the last step whose C it reaches (the first step's below them all).
    The indices were measured at T = 8192 tokens and C = 256, 1024, 2048 and 4096 (docs/mhc.md,
    "Deterministic mode")."""
    def pin(key) -> int:
        index = steps[0][1]
        for c, i in steps:
            if key["C"] >= c:
                index = i
        return index
    return pin


class TunedKernel:
    """An autotuned kernel whose launches after the first one per key skip Triton's autotuner.

    ``Autotuner.run`` rebuilds its cache key on every launch from the key arguments plus the
    dtype of every tensor argument (tens of microseconds of host time per launch; an mHC site
    made ~14 launches then, 9 now): that made an eager site host-bound (host 1.9 ms per fwd+bwd on an H100 host,
    0.72 ms of kernels). Here the key is the key arguments' values and the first argument's dtype
    (the streams'); the first launch of a key runs the autotuner (which benchmarks the configs),
    later ones launch its choice directly, exactly as the autotuner itself launches it. A config
    tuned for one dtype of another tensor argument (e.g. a branch output in another dtype than the
    streams) is reused for the next: still correct, as Triton compiles per dtype, if perhaps not
    the fastest. ``best_config``: the config of the latest launch. Measured on an H100 host: an
    eager site's host time 1.91 -> 1.82 ms per fwd+bwd.

    With tilings pinned (:func:`megatron_ext.ops.mhc.tilings_pinned`) a launch takes
    ``configs[pin(key values)]`` and the autotuner never runs: the tiling sets the order of every
    sum in these kernels, and the autotuner's choice depends on timing noise, so two processes
    would otherwise round differently."""

    def __init__(self, tuner, key, configs, pin):
        self.tuner = tuner
        self.fn = tuner.fn
        self.best_config = None
        self.configs = list(configs)
        self.pin = pin
        names = list(tuner.arg_names)
        self._key_pos = [(names.index(k), k) for k in key]
        self._chosen = {}
        self._pinned = {}

    def pinned_config(self, **key_values):
        """The config a launch with these key values takes when tilings are pinned."""
        return self.configs[self.pin(key_values)]

    def _key(self, args, kwargs):
        vals = tuple(args[i] if i < len(args) else kwargs[k] for i, k in self._key_pos)
        first = args[0] if args else None
        return vals + (getattr(first, "dtype", None),)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = self._key(args, kwargs)
            if tilings_pinned():
                cfg = self._pinned.get(key)
                if cfg is None:
                    cfg = self._pinned[key] = self.pinned_config(
                        **{k: v for (_, k), v in zip(self._key_pos, key)})
            else:
                cfg = self._chosen.get(key)
                if cfg is None:
                    out = self.tuner[grid](*args, **kwargs)
                    self.best_config = self._chosen[key] = self.tuner.best_config
                    return out
            self.best_config = cfg
            return self.fn[grid](*args, **kwargs, **cfg.all_kwargs())
        return launch


# tl.dot precision of the fp32 projections (bf16 streams skip it where they can: the projection
# and d phi dots take x as it is with the fp32 operand split into bf16 hi + lo, see triton_mix).
# "tf32" keeps the 4C x 24 projection and its two backward GEMMs on the tensor cores (fp32 FMA
# would cost ~0.2 ms at C=2048, T=8192); the inputs lose mantissa bits below 2^-11 relative,
# which alpha ~ 0.01 scales down further before the sigmoid/Sinkhorn. The interpreter computes
# these dots in fp32 whatever this says.
DOT_PRECISION = "tf32"
