"""``python -m bench [NAMES...] [--list] [--cpu] [--json OUT] [--markdown OUT]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from bench.devices import CEILING_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time this project's layers/kernels ('ours') against their anchors in one "
                    "process and print one Markdown table. Needs CUDA unless --cpu.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="benchmarks to run (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--cpu", action="store_true",
                   help="CPU smoke mode: tiny shapes, wall-clock timing; checks the harness only")
    p.add_argument("--json", metavar="OUT", help="also write header + rows as JSON to OUT")
    p.add_argument("--markdown", metavar="OUT", help="also write header + table as Markdown to OUT")
    p.add_argument("--ceilings", choices=CEILING_MODES, default="measured",
                   help="roofline ceilings: measured on this device first (default) or datasheet")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per case")
    p.add_argument("--rep-ms", type=float, default=None, help="timed time per case (median of reps)")
    p.add_argument("--seed", type=int, default=1234, help="seed for inputs and Megatron init")
    return p


def _write(path: str, text: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def _list(builders) -> str:
    lines = []
    for name, build in builders.items():
        b = build(small=False, device="cuda")
        lines.append(f"{name}: {b.description}\n    shape: {b.shape}\n    cases: "
                     + "; ".join(c.label for c in b.cases))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bench import harness
    from bench.parallel import shutdown
    from bench.report import collect_meta, format_header

    try:
        builders = harness.select(args.names)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print(_list(builders))
        return 0
    if not args.cpu:
        try:
            harness.require_cuda()
        except harness.NoCudaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        import torch

        torch.set_num_threads(1)  # smoke figures mean nothing; one thread stays quick on busy hosts
    ceilings = harness.resolve_ceilings(args.ceilings, cpu=args.cpu)
    timing = harness.timing_config(args.cpu, args.warmup_ms, args.rep_ms)
    try:
        rows = harness.run(list(builders), cpu=args.cpu, ceilings=ceilings, seed=args.seed, **timing)
    finally:
        shutdown()

    meta = collect_meta(args.cpu, ceilings, timing)
    benches = {n: build(small=args.cpu, device=device) for n, build in builders.items()}
    meta["benchmarks"] = {n: {"description": b.description, "shape": b.shape} for n, b in benches.items()}
    shapes = "\n".join(f"- {n}: {b.shape}" for n, b in benches.items())
    text = f"{format_header(meta)}\n\n{harness.format_table(rows)}\n\nShapes:\n\n{shapes}\n"
    print(text)
    if args.markdown:
        _write(args.markdown, text)
    if args.json:
        _write(args.json, harness.to_json(rows, meta))
    return 0
