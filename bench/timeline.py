"""The GPU work of one call in launch order: each kernel (or memset/copy), its duration and the
idle gap before it, from a ``torch.profiler`` Chrome trace of several identical calls.

Used by ``scripts/profile_bench.py --timeline``. It answers "is the step busy or waiting?": a span
much longer than its kernels means gaps (launch overhead, a host sync, a stream wait). A span
equal to its kernels means the kernels themselves are the time. :func:`profile_calls` (the
profiler run shared by the profiling scripts) needs CUDA; the rest is data handling.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

GPU_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    dur_us: float
    gap_us: float  # idle time between the previous slot's end and this one's start (0 for the first)


@dataclasses.dataclass(frozen=True)
class Timeline:
    slots: List[Slot]
    span_us: float  # first start to last end
    busy_us: float  # sum of the durations (more than the span where streams ran side by side)

    @property
    def gaps_us(self) -> float:
        return self.span_us - self.busy_us

    def format(self, rows: int = 60, width: int = 100) -> str:
        lines = [f"{len(self.slots)} kernels, span {self.span_us / 1e3:.3f} ms, kernels "
                 f"{self.busy_us / 1e3:.3f} ms, gaps {self.gaps_us / 1e3:.3f} ms",
                 f"{'us':>9} {'gap us':>8}  kernel"]
        shown = self.slots if len(self.slots) <= rows else self.slots[:rows]
        lines += [f"{s.dur_us:9.1f} {s.gap_us:8.1f}  {s.name[:width]}" for s in shown]
        if len(shown) < len(self.slots):
            lines.append(f"... {len(self.slots) - len(shown)} more")
        return "\n".join(lines)


def profile_calls(call: Callable[[], object], calls: int, warmup: int = 3):
    """``warmup`` untimed calls, then ``calls`` calls under ``torch.profiler`` (CUDA activity);
    returns the profiler (``key_averages()``, ``export_chrome_trace()``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return prof


def kernel_averages(prof):
    """(events with GPU time, longest first; their total GPU time in us) of a finished profiler's
    ``key_averages()``."""
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                    key=lambda e: -e.device_time_total)
    return events, sum(e.device_time_total for e in events)


def kernel_table(prof, calls: int, rows: int) -> Tuple[List[str], float]:
    """(a column header and the ``rows`` longest kernels of a finished profiler, per call: ms, share
    of all GPU time, launches; that total GPU time in us) for ``calls`` profiled calls."""
    events, total = kernel_averages(prof)
    lines = [f"{'ms/call':>9} {'share':>6} {'calls':>6}  kernel"]
    lines += [f"{e.device_time_total / calls / 1e3:9.3f} {e.device_time_total / total:6.1%} "
              f"{e.count // calls:6d}  {e.key[:110]}" for e in events[:rows]]
    return lines, total


def profiled_gpu_events(prof) -> List[Dict]:
    """The GPU-side events of a finished profiler, by start time (via its Chrome trace)."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return gpu_events(json.load(f))


def gpu_events(trace: Dict) -> List[Dict]:
    """The GPU-side events (kernels, memsets, copies) of a Chrome trace dict, by start time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    return sorted(events, key=lambda e: float(e["ts"]))


def one_call(events: Sequence[Dict], calls: int, which: int = -1) -> Timeline:
    """The timeline of call ``which`` (default: the middle one) of ``calls`` identical calls whose
    GPU events are ``events`` in start order."""
    if calls < 1:
        raise ValueError(f"calls={calls}: need at least one profiled call")
    if not events or len(events) % calls:
        raise ValueError(f"{len(events)} GPU events for calls={calls}: not the same work per call; "
                         "profile identical calls (warm up first: autotuning adds kernels)")
    per_call = len(events) // calls
    which = calls // 2 if which < 0 else which
    if not 0 <= which < calls:
        raise ValueError(f"which={which}: outside 0..{calls - 1}")
    chunk = list(events[which * per_call:(which + 1) * per_call])
    return timeline_of(chunk)


def timeline_of(events: Iterable[Dict]) -> Timeline:
    slots, end, start = [], None, None
    busy = 0.0
    for e in events:
        ts, dur = float(e["ts"]), float(e["dur"])
        slots.append(Slot(name=str(e.get("name", "?")), dur_us=dur,
                          gap_us=0.0 if end is None else max(0.0, ts - end)))
        start = ts if start is None else start
        end = ts + dur if end is None else max(end, ts + dur)
        busy += dur
    if start is None:
        raise ValueError("no GPU events: nothing ran on the GPU in the profiled calls")
    return Timeline(slots=slots, span_us=end - start, busy_us=busy)
