"""What Megatron's selective recompute of MoE parts costs and saves in the fused layer.

    python scripts/moe_recompute.py [--backend triton] [--shared-expert 2816] [--json out.json]

One :class:`FusedMoELayer` (default T=8192 tokens, H=2048, F=1408, E=64, top-6, SwiGLU, bf16, EP=1)
per ``--recompute-modules`` setting: none, moe_act, shared_experts (with a shared expert), moe.
For each: forward + backward time (CUDA events, median of ``--iters``), the activation memory the
forward leaves for backward (allocated after the forward minus before it, the layer's output
included) and the peak over the step above the memory before it. On CPU (``--tiny``) the times
are wall clock and the memory columns are empty. ``--check``: every setting starts from the same
weights and input, and its first step's output and gradients must equal the run without
recompute bit for bit (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SETTINGS = ("", "moe_act", "shared_experts", "moe")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--shared-expert", type=int, default=2816,
                   help="shared expert width (0: none, and no shared_experts row)")
    p.add_argument("--backend", default="auto", help="moe_ffn backend: auto | triton | grouped_mm | torch")
    p.add_argument("--deterministic", action="store_true", help="--moe-deterministic")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    p.add_argument("--check", action="store_true",
                   help="compare each setting's output and gradients with no recompute, bitwise")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.hidden, args.ffn, args.num_experts, args.topk = 64, 32, 16, 4, 2
        args.shared_expert, args.iters, args.warmup = min(args.shared_expert, 32), 3, 1
    return args


def build(args, modules: str, device: str):
    from bench.benchmarks.moe import Dims, fused_moe_layer
    from megatron_ext.observability.moe_stats import STATE

    extra = dict(recompute_granularity="selective", recompute_modules=modules) if modules else {}
    STATE.reset()
    layer = fused_moe_layer(Dims(args.tokens, args.hidden, args.ffn, args.num_experts, args.topk),
                            "cuda" if device == "cuda" else "cpu", device == "cuda", moe_backend=args.backend,
                            moe_deterministic=args.deterministic,
                            moe_shared_expert_intermediate_size=args.shared_expert or None, **extra)
    return layer.to(device)


def measure(args, modules: str, device: str, state=None) -> dict:
    """One setting's row; with ``state`` (the first layer's weights) the layer starts from it, and
    the row carries the first step's output and gradients (``"result"``)."""
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    layer = build(args, modules, device)
    if state is not None:
        layer.load_state_dict(state)
    result = None
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(args.tokens, 1, args.hidden, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(device, dtype)
    times, held, peak = [], None, None
    for i in range(args.warmup + args.iters):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
        else:
            t0 = time.perf_counter()
        y, _ = layer(x)
        if cuda and i == args.warmup:
            held = torch.cuda.memory_allocated() - before
        y.backward(dy)
        if i == 0:
            result = (y.detach().clone(), x.grad.clone(),
                      {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
        del y
        if cuda:
            t1.record()
            t1.synchronize()
            if i >= args.warmup:
                times.append(t0.elapsed_time(t1))
            if i == args.warmup:
                peak = torch.cuda.max_memory_allocated() - before
        elif i >= args.warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return {"recompute_modules": modules or "(none)", "fwd_bwd_ms": statistics.median(times),
            "held_after_forward_mib": None if held is None else held / 2 ** 20,
            "peak_mib": None if peak is None else peak / 2 ** 20, "result": result,
            "state": {k: v.clone() for k, v in layer.state_dict().items()}}


def differences(base: dict, row: dict) -> list:
    """Names of the tensors of ``row``'s first step that differ from ``base``'s (bitwise)."""
    (y0, dx0, g0), (y1, dx1, g1) = base["result"], row["result"]
    bad = [n for n, a, b in (("output", y0, y1), ("input grad", dx0, dx1)) if not torch.equal(a, b)]
    bad += [n for n in g0 if n not in g1 or not torch.equal(g0[n], g1[n])]
    return bad


def main(argv=None) -> int:
    from bench.parallel import ensure_model_parallel, shutdown

    args = parse(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    ensure_model_parallel(cpu=device == "cpu")
    try:
        rows = [measure(args, "", device)]
        rows += [measure(args, m, device, rows[0]["state"]) for m in SETTINGS[1:]
                 if m != "shared_experts" or args.shared_expert]
    finally:
        shutdown()
    base = rows[0]
    failed = False
    for r in rows[1:]:
        bad = differences(base, r)
        r["equal_to_no_recompute"] = not bad
        if args.check and bad:
            failed = True
            print(f"check failed: --recompute-modules {r['recompute_modules']}: {', '.join(bad)} differ "
                  "from the run without recompute", file=sys.stderr)
    for r in rows:
        r.pop("result"), r.pop("state")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"fused MoE layer, selective recompute: T={args.tokens} H={args.hidden} F={args.ffn} "
          f"E={args.num_experts} top-{args.topk} shared={args.shared_expert} backend={args.backend}"
          f"{' deterministic' if args.deterministic else ''}, {name}")
    print("| --recompute-modules | fwd+bwd ms | x time | held after fwd MiB | x held | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    f = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        ratio = r["held_after_forward_mib"] / base["held_after_forward_mib"] \
            if r["held_after_forward_mib"] is not None and base["held_after_forward_mib"] else None
        print(f"| {r['recompute_modules']} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f} | "
              f"{f(r['held_after_forward_mib'], '.0f')} | {f(ratio, '.2f')} | {f(r['peak_mib'], '.0f')} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": name, "rows": rows}, indent=2) + "\n")
    if args.check and not failed:
        print("check: every setting's output and gradients equal the run without recompute, bit for bit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
