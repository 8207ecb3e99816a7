"""Tile sweep for the Triton ``moe_ffn`` kernels on a GPU, one kernel at a time.

    PYTHONPATH=. python scripts/tune_moe.py [--tokens 8192 --experts 64 --topk 6]
        [--apply --markdown out.md]

Each kernel (up, down, dh, dx, wgrad) is timed with every candidate tile while the others keep
the default; a variant whose output differs from the default's by more than bf16 rounding is
rejected, and one that fails to compile (shared memory, registers, a Triton without tensor
descriptors) is skipped. A candidate is (block_m, block_n, block_k, warps, stages,
programs_per_sm, tma[, flatten[, a_tma]]): per-kernel resident programs per SM of the
persistent kernels, whether the weight operand comes through a TMA tensor descriptor, whether the
persistent tile loop and K loop run as one flat pipelined loop, and whether the row operand comes
through TMA (up and dh: with ``TileConfig.pregather``, x / dout gathered into sorted rows once;
their timing includes that gather). The ``wgrad`` sweep times the
Triton weight-gradient kernel (the fallback of ``TileConfig.wgrad_grouped_mm``) and prints that
lane (row gather + ``torch._grouped_mm``) as a reference row. ``dh`` is the plain
grouped GEMM of the split backward (timed together with its row pass), ``dh_fused`` the one-kernel
variant (picked only if faster than the split), ``act`` the row pass's (rows, cols, warps),
``gather`` the pregather row copy's and ``combine`` the k-way sum's (rows, cols) per program.
``--only dh,act`` limits the sweep. Prints a table and the fastest ``TileConfig``. ``--apply``
then runs, in this process with the fastest tiles in place of ``H100_CONFIG``,
``python -m bench moe moe_32k``, the GPU tests of the MoE ops and the per-kernel breakdown (so the
tiles are measured and checked before being written into ``triton_moe.py`` by hand).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

T, F_ = True, False
# (block_m, block_n, block_k, warps, stages, programs_per_sm, tma[, flatten[, a_tma]]): the H100
# sweep; flatten = the persistent kernel's tile and K loops fused into one pipelined loop; a_tma =
# the row operand through TMA (up / dh: on rows pregathered once)
CANDIDATES = {
    "up": [(128, 128, 64, 8, 3, 1, F_), (128, 128, 64, 8, 3, 1, T), (128, 128, 64, 8, 4, 1, T),
           (128, 64, 64, 8, 3, 2, T), (128, 64, 64, 4, 3, 2, T), (64, 128, 64, 4, 3, 2, T),
           (128, 128, 64, 8, 4, 1, T, T), (128, 128, 64, 8, 3, 1, T, T),
           (128, 128, 64, 8, 4, 1, T, F_, T), (128, 128, 64, 8, 3, 1, T, F_, T),
           (128, 128, 64, 8, 4, 1, T, T, T), (128, 128, 64, 8, 3, 1, T, T, T)],
    "down": [(128, 256, 64, 8, 3, 1, F_), (128, 256, 64, 8, 3, 1, T), (128, 256, 64, 8, 4, 1, T),
             (128, 128, 64, 8, 3, 2, T), (128, 128, 64, 4, 3, 2, T),
             (128, 256, 64, 8, 3, 1, T, T), (128, 256, 64, 8, 4, 1, T, T),
             (128, 256, 64, 8, 4, 1, T, T, T), (128, 256, 64, 8, 3, 1, T, T, T)],
    # split backward d(h): the plain grouped GEMM dout[token] @ W2^T (timed with the row pass)
    "dh": [(128, 256, 64, 8, 4, 1, T), (128, 256, 64, 8, 3, 1, T), (128, 128, 64, 8, 4, 1, T),
           (128, 128, 64, 4, 4, 1, T), (128, 256, 64, 8, 3, 1, T, T),
           (128, 256, 64, 8, 3, 1, T, T, T), (128, 256, 64, 8, 4, 1, T, T, T)],
    # fused backward d(h) (activation backward in the GEMM epilogue; the earlier default)
    "dh_fused": [(128, 64, 64, 8, 4, 1, T)],
    # row pass of the split d(h): (rows, cols, warps)
    "act": [(32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 64, 4), (16, 128, 2), (64, 128, 8),
            (8, 256, 2), (16, 64, 2), (16, 64, 1), (8, 64, 1), (8, 128, 1), (32, 64, 2),
            (16, 32, 1), (32, 64, 4)],
    # the pregather lane's row gather: (rows, cols) per program step
    "gather": [(16, 512), (8, 1024), (32, 256), (4, 2048), (16, 1024), (32, 512), (64, 128),
               (64, 256), (8, 2048), (128, 64), (64, 64), (128, 128), (256, 64)],
    # the k-way combine of the pair rows: (tokens, cols) per program
    "combine": [(16, 256), (8, 512), (32, 128), (4, 1024), (8, 1024), (16, 512), (32, 256),
                (64, 64), (32, 512), (64, 256), (16, 1024), (64, 128), (128, 128)],
    "dx": [(128, 256, 64, 8, 3, 1, F_), (128, 256, 64, 8, 3, 1, T), (128, 256, 64, 8, 4, 1, T),
           (128, 128, 64, 8, 3, 2, T), (128, 128, 64, 4, 3, 2, T),
           (128, 256, 64, 8, 4, 1, T, T), (128, 256, 64, 8, 3, 1, T, T),
           (128, 256, 64, 8, 4, 1, T, T, T), (128, 256, 64, 8, 3, 1, T, T, T)],
    "wgrad": [(128, 128, 64, 8, 4, 1, F_), (128, 128, 64, 8, 4, 1, T), (128, 128, 64, 8, 3, 1, T),
              (128, 128, 64, 8, 3, 1, F_), (128, 128, 128, 8, 3, 1, T), (128, 256, 64, 8, 3, 1, T),
              (128, 128, 32, 4, 4, 1, T), (64, 128, 64, 4, 3, 1, T), (128, 256, 32, 8, 4, 1, T),
              (256, 128, 32, 8, 4, 1, T)],
}


# the memory-bound kernels' candidates set these TileConfig fields, in candidate order
ROW_KNOBS = {"act": ("act_rows", "act_cols", "act_warps"), "gather": ("gather_r", "gather_c"),
             "combine": ("combine_t", "combine_h")}


def _current(base, kernel: str):
    """``base``'s own candidate tuple for ``kernel`` (the row the sweep calls the default)."""
    if kernel in ROW_KNOBS:
        return tuple(getattr(base, f) for f in ROW_KNOBS[kernel])
    return dataclasses.astuple(getattr(base, kernel))


def _variant(base, kernel: str, c):
    """The TileConfig of one candidate (the other kernels keep ``base``)."""
    if kernel in ROW_KNOBS:
        return dataclasses.replace(base, **dict(zip(ROW_KNOBS[kernel], c)))
    if kernel == "dh_fused":
        return dataclasses.replace(base, split_dh=False, dh=tm_tile(c))
    tile = tm_tile(c)
    if kernel in ("up", "dh") and tile.a_tma:   # a TMA row operand needs the sorted rows
        return dataclasses.replace(base, pregather=True, **{kernel: tile})
    return dataclasses.replace(base, **{kernel: tile})


def tm_tile(c):
    from megatron_ext.ops.moe import triton_moe as tm

    return tm.GemmTile(*c)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--apply", action="store_true")
    p.add_argument("--markdown", default=None)
    p.add_argument("--tests", default="tests/test_ops_moe_triton.py,tests/test_ops_moe.py",
                   help="comma-separated test files run (GPU-marked tests) with --apply")
    p.add_argument("--only", default=",".join(CANDIDATES),
                   help=f"comma-separated kernels to sweep (of {', '.join(CANDIDATES)}); "
                        f"NAME=I:J sweeps that kernel's candidates I..J-1 only")
    args = p.parse_args()
    # "wgrad=6:" = that kernel's candidates from index 6 on (a re-run of the new ones only)
    only, picked = [], {}
    for item in filter(None, args.only.split(",")):
        name, _, span = item.partition("=")
        only.append(name)
        lo, _, hi = span.partition(":")
        picked[name] = slice(int(lo) if lo else None, int(hi) if hi else None)
    unknown = sorted(set(only) - set(CANDIDATES))
    if unknown:
        p.error(f"--only={args.only!r}: unknown kernels {unknown}; use {', '.join(CANDIDATES)}")

    import triton

    from bench.benchmarks.moe import Dims, _params, _route
    from megatron_ext.ops.moe import triton_moe as tm

    d = Dims(args.tokens, args.hidden, args.ffn, args.experts, args.topk)
    torch.manual_seed(0)
    x, wr, w1, w2, grad = _params(d, "cuda")
    with torch.no_grad():
        probs, idx = _route(x, wr, d.topk)
    x, w1, w2 = x.detach(), w1.detach(), w2.detach()
    base = tm.H100_CONFIG
    r0 = tm.routing_metadata(idx, probs, d.experts, base.row_tiles)
    n, H, Fd = r0.rows, d.hidden, d.ffn
    new = lambda *s: torch.empty(*s, device="cuda", dtype=x.dtype)  # noqa: E731
    a, h = new(n, 2 * Fd), new(n, Fd)
    tm.launch_up(x, w1, a, h, r0, "swiglu", base)
    da, hp, gbuf = new(n, 2 * Fd), new(n, Fd), new(n, Fd)
    dpp = torch.empty(Fd, n, device="cuda")  # enough rows for any block_n >= 1
    dpr = torch.empty(n, device="cuda")
    tm.launch_dh_gemm(grad, w2, gbuf, r0, base)
    tm.launch_act_bwd(gbuf, a, da, hp, dpr, r0, "swiglu", base)
    gemm = 2.0 * n * H * Fd
    ypairs = torch.randn(n, H, device="cuda", dtype=x.dtype)

    def runner(kernel, cfg, r):
        if kernel == "gather":
            o = new(n, H)
            return (lambda: tm.gather_rows(x, r, cfg, out=o)), o, None
        if kernel == "combine":
            o = new(d.tokens, H)
            return (lambda: tm.launch_combine(ypairs, o, d.topk, cfg)), o, None
        if kernel == "up":
            o = (new(n, 2 * Fd), new(n, Fd))
            if cfg.up.a_tma:   # the forward's pregather lane, its row gather included
                return (lambda: tm.launch_up(tm.gather_rows(x, r, cfg), w1, o[0], o[1], r,
                                             "swiglu", cfg, sorted_rows=True)), o, 2 * gemm
            return (lambda: tm.launch_up(x, w1, o[0], o[1], r, "swiglu", cfg)), o, 2 * gemm
        if kernel == "down":
            o = new(n, H)
            return (lambda: tm.launch_down(h, w2, o, r, w2.stride(), Fd, H, True, cfg.down, cfg)), o, gemm
        if kernel in ("dh", "act"):   # split: GEMM + row pass ("act": the row pass alone)
            o = (new(n, 2 * Fd), new(n, Fd))
            g = new(n, Fd)
            tm.launch_dh_gemm(grad, w2, g, r, cfg)

            def split():
                if kernel == "dh" and cfg.dh.a_tma:   # pregather lane, its row gather included
                    tm.launch_dh_gemm(tm.gather_rows(grad, r, cfg), w2, g, r, cfg,
                                      sorted_rows=True)
                elif kernel == "dh":
                    tm.launch_dh_gemm(grad, w2, g, r, cfg)
                tm.launch_act_bwd(g, a, o[0], o[1], dpr, r, "swiglu", cfg)
            return split, o, (gemm if kernel == "dh" else None)
        if kernel == "dh_fused":
            o = (new(n, 2 * Fd), new(n, Fd))
            return (lambda: tm.launch_dh(grad, w2, a, o[0], o[1], dpp, r, "swiglu", cfg)), o, gemm
        if kernel == "dx":
            o = new(n, H)
            st = (w1.stride(0), w1.stride(2), w1.stride(1))
            return (lambda: tm.launch_down(da, w1, o, r, st, 2 * Fd, H, False, cfg.dx, cfg)), o, 2 * gemm
        o = (torch.empty_like(w1), torch.empty_like(w2))
        if kernel == "wgrad_torch":   # the wgrad_grouped_mm lane, as moe_ffn's backward runs it
            lane_cfg = dataclasses.replace(cfg, wgrad_grouped_mm=True)
            if tm._wgrad_lane(x, w1, w2, lane_cfg) != "grouped_mm":
                raise RuntimeError("torch's grouped GEMM cannot run here (see the backend record)")
            return (lambda: tm.weight_grads(x, da, hp, grad, w1, w2, r, lane_cfg)), o, 3 * gemm
        if kernel == "wgrad_pre":     # the same lane on rows the pregather lane already has
            lane_cfg = dataclasses.replace(cfg, wgrad_grouped_mm=True)
            xs, ds = tm.gather_rows(x, r, cfg), tm.gather_rows(grad, r, cfg)
            return (lambda: tm.weight_grads(None, da, hp, grad, w1, w2, r, lane_cfg,
                                            x_sorted=xs, dout_sorted=ds)), o, 3 * gemm

        def both():  # dW1 (gathered x, contiguous da) and dW2 (contiguous p*h, gathered dout)
            tm.launch_wgrad(x, da, o[0], r, r.token, None, cfg)
            tm.launch_wgrad(hp, grad, o[1], r, None, r.token, cfg)
        return both, o, 3 * gemm

    best = {}
    esize = x.element_size()
    # HBM bytes of the memory-bound kernels: the row pass reads g, a (2F) and writes da (2F),
    # p*h; the gather reads x once (a token's k copies come from L2) and writes n rows; the
    # combine reads n pair rows and writes the token rows
    nbytes_of = {"act": 6.0 * n * Fd * esize, "gather": (n + d.tokens) * H * esize,
                 "combine": (n + d.tokens) * H * esize}

    def rate(kernel, flops, ms):   # TFLOP/s of a GEMM, (GB/s) of a memory-bound kernel
        return f"{flops / ms / 1e9:.0f}" if flops else f"({nbytes_of[kernel] / ms / 1e6:.0f})"
    print("| kernel | tile (bm, bn, bk, warps, stages, programs/SM, tma) | ms | TFLOP/s (GB/s) "
          "| max diff |")
    print("|---|---|---:|---:|---:|")
    for kernel in only:
        # the reference output of each kernel: the default tiles (fused d(h): the split path's)
        fn, ref, flops = runner("dh" if kernel == "dh_fused" else kernel, base, r0)
        fn()
        ref = [t.float().clone() for t in (ref if isinstance(ref, tuple) else (ref,))]
        if kernel == "wgrad":      # a reference row, not a candidate
            for lane, what in (("wgrad_torch", "gather + torch._grouped_mm"),
                               ("wgrad_pre", "torch._grouped_mm on pregathered rows")):
                try:
                    fn_t, _, fl = runner(lane, base, r0)
                    ms = triton.testing.do_bench(fn_t, warmup=50, rep=150)
                    print(f"| wgrad | wgrad_grouped_mm lane: {what} | {ms:.3f} "
                          f"| {fl / ms / 1e9:.0f} | |", flush=True)
                except Exception as e:
                    print(f"| wgrad | {lane}: {type(e).__name__}: {str(e)[:80]} | | | |")
        if kernel != "dh_fused":   # the default competes too: a subset sweep cannot pick worse
            ms = triton.testing.do_bench(fn, warmup=50, rep=150)
            c = _current(base, kernel)
            print(f"| {kernel} | {c} (default) | {ms:.3f} | {rate(kernel, flops, ms)} | 0 |",
                  flush=True)
            best[kernel] = (ms, c)
        for c in CANDIDATES[kernel][picked[kernel]]:
            cfg = _variant(base, kernel, c)
            try:
                r = tm.routing_metadata(idx, probs, d.experts, cfg.row_tiles)
                fn, out, flops = runner(kernel, cfg, r)
                fn()
                torch.cuda.synchronize()
                outs = out if isinstance(out, tuple) else (out,)
                diff = max((o.float() - f).abs().max().item() for o, f in zip(outs, ref))
                ms = triton.testing.do_bench(fn, warmup=50, rep=150)
            except Exception as e:  # out of shared memory / registers: skip the variant
                why = " ".join(str(e).split())[:100]
                print(f"| {kernel} | {c} | failed: {type(e).__name__}: {why} | | |", flush=True)
                continue
            ok = diff <= 2e-2 * max(1.0, max(f.abs().max().item() for f in ref))
            print(f"| {kernel} | {c} | {ms:.3f} | {rate(kernel, flops, ms)} | {diff:.3g} |",
                  flush=True)
            if ok and (kernel not in best or ms < best[kernel][0]):
                best[kernel] = (ms, c)
    tuned = base
    for kernel in ("up", "down", "dx", "wgrad", "act", "gather", "combine", "dh"):
        if kernel in best:
            tuned = _variant(tuned, kernel, best[kernel][1])
    # the fused d(h) replaces the split one only if it beats the split GEMM + row pass
    if "dh_fused" in best and best["dh_fused"][0] < best.get("dh", (float("inf"),))[0]:
        tuned = _variant(tuned, "dh_fused", best["dh_fused"][1])
    print(f"\nfastest: {tuned}", flush=True)
    if not args.apply:
        return 0
    tm.H100_CONFIG = tuned
    import pytest

    from bench.benchmarks.moe import breakdown
    from bench.cli import main as bench_main

    extra = ["--markdown", args.markdown] if args.markdown else []
    # the benchmark first (the numbers), then the GPU tests of these tiles, then per kernel
    brc = bench_main(["moe", "moe_32k", "--warmup-ms", "100", "--rep-ms", "100", *extra])
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", *args.tests.split(",")])
    print(breakdown(), flush=True)
    return int(rc) or int(brc or 0)


if __name__ == "__main__":
    sys.exit(main())
