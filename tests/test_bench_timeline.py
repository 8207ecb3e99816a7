"""bench.timeline: one call's GPU work in launch order, from a profiler's Chrome trace."""

import pytest

from bench.timeline import gpu_events, one_call, timeline_of


def _trace(calls):
    """``calls`` identical calls: kernel a (10 us), a 2 us gap, memset b (5 us), kernel c (20 us)
    overlapping b's end by 1 us (another stream), then 100 us of host time before the next call;
    plus CPU-side events that must be ignored."""
    events, t = [], 1000.0
    for _ in range(calls):
        events += [{"cat": "kernel", "name": "a", "ts": t, "dur": 10.0},
                   {"cat": "gpu_memset", "name": "b", "ts": t + 12.0, "dur": 5.0},
                   {"cat": "kernel", "name": "c", "ts": t + 16.0, "dur": 20.0},
                   {"cat": "cpu_op", "name": "aten::mm", "ts": t, "dur": 3.0},
                   {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t + 1, "dur": 2.0}]
        t += 136.0
    return {"traceEvents": list(reversed(events))}  # out of order on purpose


def test_one_call_of_three_in_launch_order_with_gaps():
    events = gpu_events(_trace(3))
    assert [e["name"] for e in events] == ["a", "b", "c"] * 3
    tl = one_call(events, 3)
    assert [(s.name, s.dur_us, s.gap_us) for s in tl.slots] == [("a", 10.0, 0.0), ("b", 5.0, 2.0),
                                                                 ("c", 20.0, 0.0)]
    assert tl.span_us == 36.0 and tl.busy_us == 35.0 and tl.gaps_us == 1.0
    assert one_call(events, 3, which=0).slots == tl.slots
    text = tl.format(rows=2)
    assert text.splitlines()[0] == "3 kernels, span 0.036 ms, kernels 0.035 ms, gaps 0.001 ms"
    assert "    10.0      0.0  a" in text and text.endswith("... 1 more")


def test_errors_name_the_problem():
    events = gpu_events(_trace(3))
    with pytest.raises(ValueError, match=r"8 GPU events for calls=3: not the same work per call"):
        one_call(events[:-1], 3)
    with pytest.raises(ValueError, match=r"calls=0: need at least one"):
        one_call(events, 0)
    with pytest.raises(ValueError, match=r"which=3: outside 0..2"):
        one_call(events, 3, which=3)
    with pytest.raises(ValueError, match="no GPU events"):
        timeline_of([])
