"""The harness API: run named benchmarks in this process and tabulate them.

Re-exports the pieces (``Case``, ``Benchmark``, ``register``, ``available``, ``time_cuda``,
``time_cpu``, ``DEVICE_PROFILES``, ``calibrate``, ``Row``, ``format_table``, ``to_json``) so
benchmark modules and callers need only ``from bench.harness import ...``.
"""

from __future__ import annotations

import functools
import gc
import sys
from typing import Callable, Dict, Iterable, List, Optional, Union

from bench.cases import BOUNDS, ROLES, Benchmark, Case, CaseUnavailable, cuda_graph  # noqa: F401
from bench.clocks import ClockSampler, ClockStats, sampler_for_device  # noqa: F401
from bench.devices import (  # noqa: F401
    CEILING_MODES, DEVICE_PROFILES, Ceilings, DeviceProfile, calibrate, datasheet_ceilings,
    device_name, profile_for, resolve_ceilings)
from bench.registry import available, register, select  # noqa: F401
from bench.table import Row, format_table, make_rows, roofline_pct, to_json  # noqa: F401
from bench.timing import Timing, percentile, summarize, time_cpu, time_cuda  # noqa: F401

# GPU warm-up >= ~0.3 s: an H100 coming out of idle runs an 8192^3 bf16 matmul ~5-8 % faster for
# its first ~0.25 s of load than at its sustained clocks, which every real benchmark runs at.
GPU_TIMING = {"warmup_ms": 300.0, "rep_ms": 200.0}
CPU_TIMING = {"warmup_ms": 5.0, "rep_ms": 30.0}


class NoCudaError(RuntimeError):
    pass


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(
            f"no CUDA device is available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); run on a GPU machine, or pass --cpu for the CPU smoke mode "
            f"(tiny shapes; checks the harness, measures nothing)")


def timing_config(cpu: bool, warmup_ms: Optional[float] = None,
                  rep_ms: Optional[float] = None) -> Dict[str, float]:
    """``{"warmup_ms", "rep_ms"}`` passed to the timer: the lane's defaults unless given."""
    timing = dict(CPU_TIMING if cpu else GPU_TIMING)
    timing.update({k: v for k, v in (("warmup_ms", warmup_ms), ("rep_ms", rep_ms)) if v is not None})
    return timing


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(names: Optional[Iterable[str]] = None, cpu: bool = False,
        ceilings: Union[None, str, Ceilings] = None, warmup_ms: Optional[float] = None,
        rep_ms: Optional[float] = None, seed: int = 1234,
        progress: Optional[Callable[[str], None]] = _stderr) -> List[Row]:
    """Time every case of the named benchmarks (all if empty), one case at a time.

    ``cpu``: tiny shapes (``small=True``) on the CPU with :func:`time_cpu`; otherwise full shapes on
    CUDA with :func:`time_cuda`. ``ceilings``: a :class:`Ceilings`, or "measured" (default:
    :func:`calibrate` first) / "datasheet". Inputs are re-seeded with ``seed`` before each setup.
    """
    import torch

    builders = select(names)
    if not cpu:
        require_cuda()
    if ceilings is None or isinstance(ceilings, str):
        ceilings = resolve_ceilings(ceilings or "measured", cpu=cpu)
    timing = timing_config(cpu, warmup_ms, rep_ms)
    timer = time_cpu if cpu else time_cuda
    device = "cpu" if cpu else "cuda"
    # the GPU's clock and power during each case's timed calls (see bench.clocks)
    sampler = None if cpu else sampler_for_device()[0]
    if sampler is not None:
        timer = functools.partial(time_cuda, clocks=sampler)

    rows: List[Row] = []
    for name, build in builders.items():
        bench = build(small=cpu, device=device)
        if bench.name != name:
            raise ValueError(f"Benchmark.name={bench.name!r}: differs from its registered name; "
                             f"use {name!r}")
        timings, skipped, clocks = [], {}, []
        for case in bench.cases:
            torch.manual_seed(seed)
            try:
                fn = case.setup()
            except CaseUnavailable as e:
                skipped[case.name] = str(e)
                timings.append(None)
                clocks.append(None)
                if progress is not None:
                    progress(f"[bench] {name} / {case.label}: skipped: {e}")
                continue
            t = timer(fn, **timing)
            del fn
            gc.collect()
            if not cpu:
                torch.cuda.empty_cache()
            timings.append(t)
            clk = sampler.stats() if sampler is not None else None
            clocks.append(clk)
            if progress is not None:
                at = "" if clk is None else f", SM {clk.sm_mhz:.0f} MHz"
                progress(f"[bench] {name} / {case.label}: {t.median_ms:.3f} ms "
                         f"(p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f}, {t.reps} reps{at})")
        rows.extend(make_rows(bench, timings, ceilings, skipped, clocks))
    return rows
