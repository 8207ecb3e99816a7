"""Expert-parallel weak scaling of the fused MoE layer, and the all-to-all bandwidth it achieves.

    torchrun --nproc-per-node 4 scripts/moe_ep_scaling.py --json moe_ep_scaling.json

Tokens per GPU are fixed (default T=8192, H=2048, F=1408, E=64 experts in total, top-6, SwiGLU,
bf16). For every EP size in ``--ep-sizes`` (default: 1, 2, 4, ... up to the world size) the
script rebuilds Megatron's parallel state with that EP size (the remaining ranks are expert-data
parallel, as in training), builds one :class:`FusedMoELayer` and times its forward + backward on
each GPU with CUDA events (the slowest rank counts). EP=1 is every GPU on its own with all E
experts, so the per-GPU expert work is the same at every EP size and the time difference is the
price of expert parallelism.

The dispatch and combine all-to-alls of the timed forward passes are timed alone (CUDA events on
the compute stream around launch..wait, :class:`megatron_ext.modules.moe.CommTimer`); their
bandwidth is the bytes a rank sends to *other* ranks divided by that time, compared with
``--link-gbps`` (default 450 GB/s: one direction of an H100/H200's NVLink 4, 18 links x 25 GB/s).
The dispatch moves the token rows (model dtype) + their gates (fp32) + expert ids (int64); the
combine the weighted rows. The table is printed on rank 0 and ``--json`` gets every number.

CPU smoke test: ``torchrun --nproc-per-node 2 scripts/moe_ep_scaling.py --device cpu --tiny``
(gloo, fp32, a few tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TINY = dict(tokens_per_gpu=64, hidden=32, ffn=16, num_experts=4, topk=2, iters=2, warmup=1)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens-per-gpu", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408, help="expert FFN width F")
    p.add_argument("--num-experts", type=int, default=64, help="experts in total (all EP sizes)")
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--shared-expert", type=int, default=0,
                   help="shared expert width (0: none; with one, the dispatch time includes the "
                        "shared expert that overlaps it)")
    p.add_argument("--ep-sizes", type=str, default=None, help="comma list (default 1,2,4,..,world)")
    p.add_argument("--backend", default="auto", help="moe_ffn backend: auto | triton | grouped_mm | torch")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--link-gbps", type=float, default=450.0, help="per-direction link bandwidth to compare with")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    p.add_argument("--json", type=str, default=None, help="write the results here (rank 0)")
    p.add_argument("--route-to-last-rank", action="store_true",
                   help="worst-case imbalance: an expert bias sends every token to the last EP rank's "
                        "experts (the other ranks receive no rows)")
    p.add_argument("--verbose", action="store_true", help="every rank prints each iteration's time")
    p.add_argument("--anchor", action="store_true",
                   help="also time Megatron's MoELayer (local spec: SequentialMLP, alltoall dispatcher) "
                        "at each EP size, same shapes and dtype (column 'Megatron ms')")
    p.add_argument("--profile-dir", type=str, default=None,
                   help="CUDA: after timing each EP size, profile 3 more steps on every rank and write "
                        "the kernels by GPU time and one step's timeline (kernels in launch order, "
                        "idle gaps) to DIR/ep{EP}_rank{R}.txt; rank 0's is printed")
    p.add_argument("--hang-dump-seconds", type=float, default=None,
                   help="an iteration over this many seconds dumps every thread's stack to stderr")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


def _ep_sizes(args, world: int):
    if args.ep_sizes:
        sizes = [int(v) for v in args.ep_sizes.split(",")]
    else:
        sizes, n = [], 1
        while n <= world:
            if world % n == 0:
                sizes.append(n)
            n *= 2
    for ep in sizes:
        if ep < 1 or world % ep or args.num_experts % ep:
            raise ValueError(f"ep_sizes={args.ep_sizes!r}: EP={ep} must divide world_size={world} and "
                             f"num_experts={args.num_experts}; use divisors of both")
    return sizes


def _dims(args):
    from bench.benchmarks.moe import Dims

    return Dims(args.tokens_per_gpu, args.hidden, args.ffn, args.num_experts, args.topk)


def _set_ep(ep: int) -> None:
    """Megatron's parallel state rebuilt with this EP size (the other ranks expert-data parallel)."""
    from megatron_ext import compat

    compat.destroy_model_parallel()
    compat.initialize_model_parallel(1, 1, ep)
    compat.seed_model_parallel(1234)


def _inputs(args, env, dtype):
    """This rank's layer input (requiring grad) and output gradient, ``[T, 1, H]``."""
    g = torch.Generator(device="cpu").manual_seed(1000 + env.rank)
    x = torch.randn(args.tokens_per_gpu, 1, args.hidden, generator=g).to(env.device, dtype).requires_grad_()
    return x, torch.randn(x.shape, generator=g).to(env.device, dtype)


def _all_reduced(t, env, op=None):
    """``t`` (a CPU tensor) reduced over the world (sum, or ``op``), back on the CPU."""
    if not torch.distributed.is_initialized():
        return t
    t = t.to(env.device if env.backend == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.cpu()


def _build_layer(args, ep: int, lane: str, bf16: bool):
    from bench.benchmarks.moe import fused_moe_layer

    _set_ep(ep)
    layer = fused_moe_layer(_dims(args), lane, bf16, moe_backend=args.backend, expert_model_parallel_size=ep,
                            moe_shared_expert_intermediate_size=args.shared_expert or None,
                            **(dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
                               if args.route_to_last_rank else {}))
    if args.route_to_last_rank:  # the bias only steers the choice; the gates stay the router's
        with torch.no_grad():
            layer.router_expert_bias.fill_(-1e4)
            layer.router_expert_bias[args.num_experts - args.num_experts // ep:] = 0.0
    return layer


def _now(lane):
    if lane == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed(t0, t1) -> float:
    if isinstance(t0, float):
        return t1 - t0
    t1.synchronize()
    return t0.elapsed_time(t1) / 1e3


def measure_anchor(args, ep: int, env, bf16: bool) -> float:
    """fwd+bwd seconds (slowest rank) of Megatron's MoELayer with the local spec at this EP size."""
    from megatron.core.transformer.spec_utils import build_module

    from bench.benchmarks.moe import megatron_moe_config
    from layer_specs.gpt import stock_moe_spec

    _set_ep(ep)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = megatron_moe_config(_dims(args), expert_model_parallel_size=ep, bf16=bf16, params_dtype=dtype)
    layer = build_module(stock_moe_spec(), config=config).to(device=env.device, dtype=dtype).train()
    x, dy = _inputs(args, env, dtype)
    times = []
    for i in range(args.warmup + args.iters):
        t0 = _now(env.lane)
        out = layer(x)
        (out[0] if isinstance(out, tuple) else out).backward(dy)
        t1 = _now(env.lane)
        if i >= args.warmup:
            times.append(_elapsed(t0, t1))
        x.grad = None
        layer.zero_grad(set_to_none=True)
    mean = torch.tensor([sum(times) / len(times)], dtype=torch.float64)
    return float(_all_reduced(mean, env, torch.distributed.ReduceOp.MAX)[0])


def measure(args, ep: int, env, bf16: bool) -> dict:
    from megatron_ext.modules.moe import CommTimer
    from megatron_ext.observability.moe_stats import STATE
    from megatron_ext.training.faults import StepWatchdog

    watchdog = StepWatchdog(args.hang_dump_seconds, env.rank)
    layer = _build_layer(args, ep, env.lane, bf16)
    x, dy = _inputs(args, env, torch.bfloat16 if bf16 else torch.float32)
    times = []
    recv_rows = []  # rows this rank's experts received, per forward
    for i in range(args.warmup + args.iters):
        timed = i >= args.warmup
        layer.comm_timer = CommTimer() if timed and ep > 1 else None
        watchdog.arm(i + 1)
        t0 = _now(env.lane)
        y, _ = layer(x)
        y.backward(dy)
        t1 = _now(env.lane)
        recv_rows.append(layer.last_recv_rows if ep > 1 else x.shape[0] * args.topk)
        if args.verbose:
            print(f"[rank {env.rank}] ep={ep} iter {i + 1}: {1e3 * _elapsed(t0, t1):.2f} ms", flush=True)
        watchdog.disarm()
        if timed:
            times.append(_elapsed(t0, t1))
            if layer.comm_timer is not None:
                comm = layer.comm_timer.resolve()
                times[-1] = (times[-1], comm)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    if args.profile_dir and env.lane == "cuda":
        _profile(args, ep, env, layer, x, dy)
    STATE.begin_step(0)  # drop the statistics the layer recorded
    step = [t if isinstance(t, float) else t[0] for t in times]
    comm = {"dispatch": [0.0, 0], "combine": [0.0, 0]}
    for t in times:
        if not isinstance(t, float):
            for name, sec, nbytes in t[1]:
                comm[name][0] += sec
                comm[name][1] += nbytes
    # the slowest rank sets the pace of a step; bandwidths are averaged over ranks
    stats = torch.tensor([sum(step) / len(step), comm["dispatch"][0], comm["dispatch"][1],
                          comm["combine"][0], comm["combine"][1]], dtype=torch.float64)
    mx = _all_reduced(stats.clone(), env, torch.distributed.ReduceOp.MAX)
    sm = _all_reduced(stats.clone(), env)
    fewest = _all_reduced(torch.tensor([min(recv_rows)], dtype=torch.float64), env, torch.distributed.ReduceOp.MIN)
    n = env.world_size
    row = {"ep": ep, "gpus": n, "tokens_per_gpu": args.tokens_per_gpu, "experts": args.num_experts,
           "local_experts": args.num_experts // ep, "topk": args.topk, "hidden": args.hidden, "ffn": args.ffn,
           "dtype": "bf16" if bf16 else "fp32", "fwd_bwd_ms": 1e3 * float(mx[0]),
           "min_rows_received": int(fewest[0]), "route_to_last_rank": args.route_to_last_rank}
    for j, name in ((1, "dispatch"), (3, "combine")):
        sec, nbytes = float(sm[j]) / n, float(sm[j + 1]) / n
        row[f"{name}_ms"] = 1e3 * sec / args.iters if ep > 1 else None
        row[f"{name}_gbps"] = nbytes / sec / 1e9 if ep > 1 and sec > 0 else None
        row[f"{name}_bytes_per_rank"] = nbytes / args.iters if ep > 1 else None
    return row


def _profile(args, ep: int, env, layer, x, dy, calls: int = 3) -> None:
    """Kernels by GPU time and the middle step's timeline on this rank (see ``--profile-dir``)."""
    from bench.timeline import kernel_table, one_call, profile_calls, profiled_gpu_events

    def step():
        y, _ = layer(x)
        y.backward(dy)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    layer.comm_timer = None
    torch.distributed.barrier()
    prof = profile_calls(step, calls, warmup=1)
    kernels, total = kernel_table(prof, calls, rows=30)
    lines = [f"EP={ep} rank {env.rank}: {total / calls / 1e3:.3f} ms of GPU work per step "
             f"(all streams; NCCL kernels included)", *kernels]
    try:
        lines += ["", "the middle step in launch order:",
                  one_call(profiled_gpu_events(prof), calls).format(rows=200)]
    except ValueError as e:
        lines += ["", f"no timeline: {e}"]
    text = "\n".join(lines)
    out = Path(args.profile_dir) / f"ep{ep}_rank{env.rank}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if env.rank == 0:
        print(text, flush=True)


def table(rows, link_gbps: float) -> str:
    base = rows[0]["fwd_bwd_ms"] if rows and rows[0]["ep"] == 1 else None
    head = (f"{'EP':>3} {'GPUs':>4} {'T/GPU':>6} {'E_loc':>5} {'fwd+bwd ms':>10} {'eff':>5} "
            f"{'disp ms':>8} {'disp GB/s':>9} {'comb ms':>8} {'comb GB/s':>9} {'% link':>6}"
            f"{'Megatron ms':>12} {'x Megatron':>10}")
    out = [head, "-" * len(head)]
    for r in rows:
        eff = f"{base / r['fwd_bwd_ms']:.2f}" if base else "-"
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        bw = [v for v in (r["dispatch_gbps"], r["combine_gbps"]) if v is not None]
        pct = f"{100 * (sum(bw) / len(bw)) / link_gbps:.0f}" if bw else "-"
        out.append(f"{r['ep']:>3} {r['gpus']:>4} {r['tokens_per_gpu']:>6} {r['local_experts']:>5} "
                   f"{r['fwd_bwd_ms']:>10.2f} {eff:>5} {f(r['dispatch_ms'], '8.3f'):>8} "
                   f"{f(r['dispatch_gbps'], '9.1f'):>9} {f(r['combine_ms'], '8.3f'):>8} "
                   f"{f(r['combine_gbps'], '9.1f'):>9} {pct:>6}"
                   f"{f(r.get('megatron_ms'), '12.2f'):>12} "
                   f"{f(r.get('megatron_ms') and r['megatron_ms'] / r['fwd_bwd_ms'], '10.2f'):>10}")
    return "\n".join(out)


def main(argv=None) -> int:
    import patches
    from megatron_ext import compat
    from megatron_ext.training.distributed import init_distributed, pick_lane

    args = parse(argv)
    lane = pick_lane(args.device)
    env = init_distributed(lane)
    patches.apply_patches(lane)
    bf16 = (args.dtype or ("bf16" if lane == "cuda" else "fp32")) == "bf16"
    rows = []
    for ep in _ep_sizes(args, env.world_size):
        rows.append(measure(args, ep, env, bf16))
        rows[-1]["megatron_ms"] = 1e3 * measure_anchor(args, ep, env, bf16) if args.anchor else None
    compat.destroy_model_parallel()
    if env.rank == 0:
        print(f"fused MoE EP weak scaling: H={args.hidden} F={args.ffn} E={args.num_experts} "
              f"top-{args.topk} {'bf16' if bf16 else 'fp32'} on {env.world_size} x "
              f"{torch.cuda.get_device_name() if lane == 'cuda' else 'CPU'}; eff = EP1 time / time; "
              f"% link = mean all-to-all GB/s / {args.link_gbps:.0f} GB/s")
        print(table(rows, args.link_gbps))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
