"""Timing: median (and p20/p80) of per-call timings after warm-up.

:func:`time_cuda` uses one pair of CUDA events per repetition and flushes L2 before each one by
writing a 256 MB buffer (or rotates among several input sets); :func:`time_cpu` uses
``time.perf_counter`` for the ``--cpu`` smoke mode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, List, Sequence

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current L2 (H100 50 MB, B200 126 MB)


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method): position ``(n - 1) * q / 100`` in the sorted values."""
    if not values:
        raise ValueError(f"values={list(values)!r}: empty; use at least one timing")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q!r}: outside the percentile range; use 0 <= q <= 100")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Timing:
    return Timing(median_ms=percentile(times_ms, 50), p20_ms=percentile(times_ms, 20),
                  p80_ms=percentile(times_ms, 80), min_ms=min(times_ms), reps=len(times_ms))


def _counts(estimate_ms: float, warmup_ms: float, rep_ms: float, min_reps: int, max_reps: int):
    est = max(estimate_ms, 1e-4)
    n_warmup = int(min(max(math.ceil(warmup_ms / est), 1), max_reps))
    n_rep = int(min(max(math.ceil(rep_ms / est), min_reps), max_reps))
    return n_warmup, n_rep


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 50.0, rep_ms: float = 200.0,
              rotate: Sequence[Callable[[], object]] = (), flush_l2: bool = True,
              min_reps: int = 10, max_reps: int = 1000, clocks=None) -> Timing:
    """Time ``fn`` on the current CUDA device.

    One untimed call (compilation, autotuning, allocator warm-up), a 3-call estimate, then about
    ``warmup_ms`` of warm-up calls and about ``rep_ms`` of timed calls (``min_reps``..``max_reps``).
    Each timed call is bracketed by its own ``torch.cuda.Event(enable_timing=True)`` pair; before it
    a 256 MB buffer is written (``flush_l2``) so no call finds the previous call's data in L2.
    ``rotate``: more callables doing the same work on other input sets, cycled with ``fn``.
    ``clocks``: a :class:`bench.clocks.ClockSampler`, started when the timed calls are queued (the
    GPU is still in the warm-up calls, same work) and stopped once they have run.
    """
    import torch

    fns: List[Callable[[], object]] = [fn, *rotate]
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    for f in fns:
        f()
    torch.cuda.synchronize()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(3):
        fns[i % len(fns)]()
    end.record()
    torch.cuda.synchronize()
    n_warmup, n_rep = _counts(start.elapsed_time(end) / 3, warmup_ms, rep_ms, min_reps, max_reps)

    for i in range(n_warmup):
        fns[i % len(fns)]()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    if clocks is not None:
        clocks.start()
    try:
        for i in range(n_rep):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fns[i % len(fns)]()
            ends[i].record()
        torch.cuda.synchronize()
    finally:  # a failing call must not leave the sampler's thread or process running
        if clocks is not None:
            clocks.stop()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn: Callable[[], object], *, warmup_ms: float = 10.0, rep_ms: float = 50.0,
             rotate: Sequence[Callable[[], object]] = (), min_reps: int = 3,
             max_reps: int = 100) -> Timing:
    """Wall-clock twin of :func:`time_cuda` (``time.perf_counter`` per call, no L2 flush) for the
    ``--cpu`` smoke mode; its figures exercise the harness, they are not kernel measurements."""
    fns: List[Callable[[], object]] = [fn, *rotate]
    t0 = time.perf_counter()
    for f in fns:
        f()
    first_ms = (time.perf_counter() - t0) * 1e3 / len(fns)  # an over-estimate: fewer reps, fine here
    n_warmup, n_rep = _counts(first_ms, warmup_ms, rep_ms, min_reps, max_reps)
    for i in range(n_warmup):
        fns[i % len(fns)]()
    times = []
    for i in range(n_rep):
        t = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - t) * 1e3)
    return summarize(times)
