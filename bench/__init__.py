"""Benchmark harness: times this project's kernels/layers ("ours") against an "anchor" (the
Megatron or torch path they replace) in one process and prints one Markdown table.

Run ``python -m bench --list``; see ``docs/benchmarks.md``. The API lives in :mod:`bench.harness`;
benchmarks live in :mod:`bench.benchmarks` and register themselves on import.
"""
