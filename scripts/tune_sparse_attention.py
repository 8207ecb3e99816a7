"""Tile sweep for the window + sink attention kernels on a GPU: forward and backward timed apart.

    PYTHONPATH=. python scripts/tune_sparse_attention.py [--s 16384] [--d 128] [--json out.json] \
        [--jobs 8] [--profile]

Each variant changes one kernel's tiles (or the dk/dv work split / atomics) around the current
default for the head dim, and only the pass it changes is timed, so the table says which kernel
holds the time and which tile moves it. Correctness of every variant is checked
against the default config's output before timing (max abs difference printed).

``--jobs N`` compiles the variants first in N worker processes (Triton's on-disk cache is shared),
so the timed process only loads them: compiling ~30 variants one after another takes minutes.
``--profile`` prints the default config's per-kernel GPU time of one forward + backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _tiles(base, part, bm, bn, w, st):
    """A variant with kernel ``part``'s tiles (block_m x block_n, warps, stages) changed."""
    cfg = dataclasses.replace(base, **{f"{part}_block_m": bm, f"{part}_block_n": bn,
                                       f"{part}_warps": w, f"{part}_stages": st})
    return f"{part} {bm}x{bn} w{w} s{st}", cfg, "fwd" if part == "fwd" else "bwd"


def variants(base, groups=("fwd", "dq", "dkdv", "sched"), pointer=None):
    """``(name, config, part)``: ``part`` is the pass the variant changes ("fwd" or "bwd"), so only
    that pass is timed for it (the default config times both). ``pointer``: the head dim's
    pointer-load config (what GPUs without TMA get), the "tma" group's baseline."""
    out = [("default", base, "both")]
    if "fwd" in groups:
        for bm, bn, w, st in [(128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2),
                              (128, 128, 8, 3), (256, 64, 8, 2), (256, 32, 8, 3), (64, 64, 4, 3),
                              (64, 128, 4, 2), (128, 32, 4, 3)]:
            out.append(_tiles(base, "fwd", bm, bn, w, st))
    if "dq" in groups:
        for bm, bn, w, st in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 4, 3),
                              (64, 64, 4, 3), (256, 32, 8, 2), (64, 32, 4, 3), (128, 16, 8, 3)]:
            out.append(_tiles(base, "dq", bm, bn, w, st))
    if "dkdv" in groups:
        for bm, bn, w, st in [(64, 128, 8, 3), (64, 128, 8, 1), (128, 64, 8, 2), (128, 64, 8, 3),
                              (32, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 1)]:
            out.append(_tiles(base, "dkdv", bm, bn, w, st))
    if "wide" in groups:  # 16 warps: a tile's fp32 accumulators spread over twice the registers
        for part, bm, bn, w, st in [("dkdv", 64, 128, 16, 2), ("dkdv", 64, 128, 16, 3),
                                    ("dkdv", 128, 128, 16, 1), ("dkdv", 128, 128, 16, 2),
                                    ("dkdv", 128, 64, 16, 2), ("dkdv", 64, 256, 16, 1),
                                    ("fwd", 128, 64, 16, 3), ("fwd", 128, 128, 16, 2),
                                    ("fwd", 256, 64, 16, 2), ("dq", 128, 64, 16, 3),
                                    ("dq", 256, 64, 16, 2), ("dq", 128, 128, 16, 2)]:
            out.append(_tiles(base, part, bm, bn, w, st))
    if "tma" in groups:  # TMA descriptor loads vs pointer loads, and the tiles that moved with them
        pointer = pointer or dataclasses.replace(base, tma=False)
        out.append(("pointer loads, old tiles", pointer, "both"))
        out.append(("tma, old tiles", dataclasses.replace(pointer, tma=True), "both"))
        out.append(("pointer loads", dataclasses.replace(base, tma=False), "both"))
        for part, bm, bn, w, st in [("fwd", 64, 64, 4, 2), ("fwd", 64, 64, 4, 3), ("fwd", 128, 64, 4, 3),
                                    ("dq", 64, 32, 4, 3), ("dq", 128, 64, 8, 3), ("dq", 32, 64, 4, 3),
                                    ("dkdv", 64, 64, 4, 1), ("dkdv", 32, 64, 4, 2), ("dkdv", 64, 32, 4, 2),
                                    ("dkdv", 128, 64, 4, 2), ("dkdv", 64, 128, 8, 2)]:
            out.append(_tiles(base, part, bm, bn, w, st))
    if "sched" in groups:  # dk/dv work split and the non-deterministic atomic variants
        for chunk in (512, 2048):
            out.append((f"dkdv chunk {chunk}", dataclasses.replace(base, dkdv_chunk=chunk), "bwd"))
        out.append(("dkdv atomic", dataclasses.replace(base, dkdv_atomic=True), "bwd"))
        out.append(("fused dq (atomic)", dataclasses.replace(base, fused_dq=True), "bwd"))
        flip = dataclasses.replace(base, heavy_first=not base.heavy_first)
        out.append((f"heavy_first={flip.heavy_first} (fwd)", flip, "fwd"))
        out.append((f"heavy_first={flip.heavy_first} (bwd)", flip, "bwd"))
    return out


def _profile(run, iters=10):
    """Per-kernel GPU ms of one ``run()`` (mean over ``iters`` calls), largest first."""
    from bench.timeline import kernel_averages, profile_calls

    events, total = kernel_averages(profile_calls(run, iters))
    print(f"per-kernel GPU time of the default fwd + bwd: {total / iters / 1e3:.3f} ms per call")
    for e in events:
        print(f"  {e.device_time_total / iters / 1e3:8.3f} ms  x{e.count // iters:<3d} {e.key[:90]}")


def _kernel_stats(tw, seen):
    """Registers / spills / shared memory of the compiled kernels not reported yet (best effort:
    the compiled-kernel cache layout is Triton's)."""
    lines = []
    for fn in (tw._fwd_kernel, tw._bwd_dq_kernel, tw._bwd_dkdv_kernel):
        try:
            for cache in fn.device_caches.values():
                for key, k in cache[0].items():
                    if (fn.__name__, key) in seen:
                        continue
                    seen.add((fn.__name__, key))
                    if hasattr(k, "_init_handles"):
                        k._init_handles()
                    md = k.metadata
                    lines.append(f"{fn.__name__}: warps {md.num_warps} stages {md.num_stages} "
                                 f"regs {k.n_regs} spills {k.n_spills} shared {md.shared}")
        except Exception as e:  # noqa: BLE001 - diagnostics only
            lines.append(f"{getattr(fn, '__name__', fn)}: no stats ({type(e).__name__})")
    return "; ".join(lines)


def _compile_all(args) -> None:
    """Compile every variant in ``args.jobs`` worker processes before the timed process runs."""
    import subprocess

    argv = [sys.executable, __file__, "--compile-only", "--s", str(args.s), "--d", str(args.d),
            "--hq", str(args.hq), "--hkv", str(args.hkv), "--window", str(args.window),
            "--sinks", str(args.sinks), "--groups", args.groups]
    procs = [subprocess.Popen(argv + ["--shard", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
    for p in procs:
        p.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--s", type=int, default=16384)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--hq", type=int, default=16)
    p.add_argument("--hkv", type=int, default=1)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--groups", default="fwd,dq,dkdv,sched",
                   help="comma list of variant groups: fwd, dq, dkdv (tiles), wide (16-warp tiles), "
                        "tma (TMA descriptor loads, with tiles), sched (dk/dv chunking, atomics)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench timed ms")
    p.add_argument("--jobs", type=int, default=0, help="compile the variants first in this many processes")
    p.add_argument("--profile", action="store_true",
                   help="per-kernel GPU time of every variant that changes both passes (the default first)")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    import triton.testing

    from megatron_ext.ops.sparse_attention import triton_window as tw

    g = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (1, args.s, args.hq, args.d), (1, args.s, args.hkv, args.d)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = args.d ** -0.5
    base = tw.default_config(args.d, torch.bfloat16, False)
    all_variants = variants(base, tuple(args.groups.split(",")), tw.POINTER_CONFIGS.get(args.d))
    if args.compile_only:  # a worker of --jobs: run its share of the variants once
        i, n = (int(x) for x in args.shard.split("/"))
        for name, cfg, _ in all_variants[i::n]:
            try:
                out, lse = tw.window_attention_fwd(q, k, v, None, args.window, args.sinks, scale, cfg)
                tw.window_attention_bwd(do, q, k, v, out, lse, None, args.window, args.sinks, scale, cfg)
            except Exception:  # reported by the timed process
                pass
        torch.cuda.synchronize()
        return 0
    if args.jobs > 0:
        _compile_all(args)
    ref_out, ref_lse = tw.window_attention_fwd(q, k, v, None, args.window, args.sinks, scale, base)
    ref_grads = tw.window_attention_bwd(do, q, k, v, ref_out, ref_lse, None, args.window, args.sinks, scale, base)
    if args.profile:
        for name, cfg, part in all_variants:
            if part == "both":
                print(f"profile: {name}")
                try:
                    _profile(lambda: tw.window_attention_bwd(do, q, k, v, *tw.window_attention_fwd(
                        q, k, v, None, args.window, args.sinks, scale, cfg), None, args.window,
                        args.sinks, scale, cfg))
                except Exception as e:  # reported again in the table
                    print(f"  failed: {type(e).__name__}: {str(e)[:200]}")
    rows = []
    seen = set()
    for name, cfg, part in all_variants:
        try:
            out, lse = tw.window_attention_fwd(q, k, v, None, args.window, args.sinks, scale, cfg)
            grads = tw.window_attention_bwd(do, q, k, v, out, lse, None, args.window, args.sinks, scale, cfg)
            err = max(float((out.float() - ref_out.float()).abs().max()),
                      *(float((a.float() - b.float()).abs().max()) for a, b in zip(grads[:3], ref_grads[:3])))
            row = {"variant": name, "max_abs_diff": err}
            stats = _kernel_stats(tw, seen)
            if stats:
                row["kernels"] = stats
            if part in ("fwd", "both"):
                row["fwd_ms"] = triton.testing.do_bench(lambda: tw.window_attention_fwd(
                    q, k, v, None, args.window, args.sinks, scale, cfg), warmup=args.warmup, rep=args.rep)
            if part in ("bwd", "both"):
                row["bwd_ms"] = triton.testing.do_bench(lambda: tw.window_attention_bwd(
                    do, q, k, v, out, lse, None, args.window, args.sinks, scale, cfg),
                    warmup=args.warmup, rep=args.rep)
            rows.append(row)
        except Exception as e:  # a tile that does not fit shared memory is a result, not a crash
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        print(rows[-1], flush=True)
    base_fwd = rows[0].get("fwd_ms", float("nan"))
    base_bwd = rows[0].get("bwd_ms", float("nan"))
    for r in rows:  # the pass a variant does not change is the default's
        if "error" not in r:
            r["total_ms"] = r.get("fwd_ms", base_fwd) + r.get("bwd_ms", base_bwd)
    print(f"S={args.s} d={args.d} hq={args.hq} hkv={args.hkv} window={args.window} sinks={args.sinks} bf16, "
          f"{torch.cuda.get_device_name()}")
    print("| variant | fwd ms | bwd ms | total ms | max abs diff vs default |\n|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} | | | |")
        else:
            fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "(default)"
            bwd = f"{r['bwd_ms']:.3f}" if "bwd_ms" in r else "(default)"
            print(f"| {r['variant']} | {fwd} | {bwd} | {r['total_ms']:.3f} | {r['max_abs_diff']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
