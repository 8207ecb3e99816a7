"""Where the time of one benchmark case goes: per-kernel GPU time under torch.profiler.

    python scripts/profile_bench.py mhc ours [--iters 10] [--rows 25] [--graph] [--timeline] [--host]

Builds the case exactly as ``python -m bench`` does (same shapes, same setup), warms it up, then
profiles ``--iters`` calls and prints the kernels sorted by total device time, with their share of
the whole. Use it before tuning: the table says which kernel to work on. ``--graph`` also times
the call back to back (no L2 flush) eagerly and replayed from a CUDA graph: where the graph is
much faster, launch overhead (the host) is part of the time; where it is not, the kernels are.
``--timeline`` prints the GPU work of one call in launch order (each kernel, its time and the idle
gap before it), replayed from a CUDA graph when the call can be captured: where span and kernel
time agree, the step has no gaps to close. ``--host`` measures the host side alone: the calls are
queued behind a long GPU sleep, so the host never waits for the GPU, and the script prints the
host milliseconds per call and the Python functions that take them (cProfile, by own time). Where
the host time per call exceeds the kernel time, an eager step is host-bound. (A short burst like
this runs at the boost clock; the benchmark's sustained figure can be slower on a GPU at its power
limit, see bench/clocks.py.)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmark", help="a benchmark name (python -m bench --list)")
    p.add_argument("case", help="a case name of that benchmark (e.g. ours, anchor)")
    p.add_argument("--iters", type=int, default=10, help="profiled calls (after 5 warm-up calls)")
    p.add_argument("--rows", type=int, default=25, help="kernels to print")
    p.add_argument("--graph", action="store_true",
                   help="also time the call eagerly and as a CUDA graph replay, back to back")
    p.add_argument("--timeline", action="store_true",
                   help="also print one call's kernels in launch order with the gaps between them")
    p.add_argument("--host", action="store_true",
                   help="also measure the host time per call (calls queued behind a GPU sleep) and "
                        "where it goes (cProfile)")
    args = p.parse_args(argv)

    from bench import harness
    from bench.timeline import kernel_table, profile_calls

    bench = harness.select([args.benchmark])[args.benchmark](small=False, device="cuda")
    cases = {c.name: c for c in bench.cases}
    if args.case not in cases:
        print(f"error: case={args.case!r}: not in benchmark {args.benchmark!r}; use one of "
              f"{sorted(cases)}", file=sys.stderr)
        return 2
    fn = cases[args.case].setup()
    prof = profile_calls(fn, args.iters, warmup=5)
    lines, total = kernel_table(prof, args.iters, args.rows)
    print(f"{bench.name} / {args.case}: {total / args.iters / 1e3:.3f} ms of kernels per call "
          f"({bench.shape})")
    print("\n".join(lines))
    if args.graph:
        _eager_vs_graph(fn, args.iters)
    if args.timeline:
        _timeline(fn, rows=max(args.rows, 60))
    if args.host:
        _host(fn, args.iters, args.rows)
    return 0


def _timeline(fn, rows: int, calls: int = 3) -> None:
    from bench.cases import CaseUnavailable, cuda_graph
    from bench.timeline import one_call, profile_calls, profiled_gpu_events

    how = "replayed from a CUDA graph"
    try:
        call = cuda_graph(fn)
    except CaseUnavailable as e:
        call, how = fn, f"eager (cannot be captured: {' '.join(str(e).split())[:120]})"
    events = profiled_gpu_events(profile_calls(call, calls))
    print(f"timeline of one call ({how}, the middle of {calls}):")
    print(one_call(events, calls).format(rows=rows))


def _queued_host_seconds(fn, iters: int, profiler=None) -> float:
    """Host seconds for ``iters`` calls queued behind a GPU sleep long enough that none of them
    waits for the GPU (checked: the sleep must still be running when the last call returns)."""
    import time

    import torch

    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)   # ~2 s at the boost clock
    asleep = torch.cuda.Event()
    asleep.record()
    if profiler is not None:
        profiler.enable()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    waited = asleep.query()
    torch.cuda.synchronize()
    if waited:
        raise RuntimeError("the GPU sleep ended before the queued calls did; the host time includes "
                           "waits for the GPU: use fewer --iters")
    return seconds


def _host(fn, iters: int, rows: int) -> None:
    import cProfile
    import io
    import pstats

    fn()
    plain = min(_queued_host_seconds(fn, iters) for _ in range(3))
    print(f"host time, {iters} calls queued behind a GPU sleep (best of 3): "
          f"{plain / iters * 1e3:.3f} ms per call")
    prof = cProfile.Profile()
    profiled = _queued_host_seconds(fn, iters, prof)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    print(f"under cProfile ({profiled / iters * 1e3:.3f} ms per call, inflated by the profiler), "
          f"by own time, totals over {iters} calls:")
    print("\n".join(line for line in out.getvalue().splitlines()
                    if line.strip() and "Ordered by" not in line and "function calls" not in line))


def _per_call_ms(fn, iters: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _eager_vs_graph(fn, iters: int) -> None:
    import torch

    from bench.cases import CaseUnavailable, cuda_graph

    print(f"eager, back to back: {_per_call_ms(fn, iters):.3f} ms per call")
    try:
        replay = cuda_graph(fn)
    except CaseUnavailable as e:   # a case with a host sync cannot be captured: say so, do not fail
        print(f"CUDA graph: the call cannot be captured ({' '.join(str(e).split())[:200]})")
        return
    replay()
    torch.cuda.synchronize()
    print(f"CUDA graph replay, back to back: {_per_call_ms(replay, iters):.3f} ms per call")


if __name__ == "__main__":
    sys.exit(main())
