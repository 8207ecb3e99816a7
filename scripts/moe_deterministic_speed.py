"""Fused MoE layer fwd+bwd with and without --moe-deterministic, and the deterministic mode's
chunked lanes (every GEMM on zero-padded 16-row chunks: what the mode ran everywhere before the
Triton lanes, and still runs on CPU), at the MoE benchmark's shape. CUDA only.

    PYTHONPATH=. python scripts/moe_deterministic_speed.py [--chunked-steps 3]
"""

from __future__ import annotations

import argparse

import torch


def _median_ms(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chunked-steps", type=int, default=3, help="the chunked lanes take ~1 s a step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_deterministic_speed: needs a CUDA device")
    from bench.benchmarks import moe as bm
    from megatron_ext.modules import moe as layer_module
    from megatron_ext.ops.moe import invariant_mm

    d = bm.Dims(tokens=8192, hidden=2048, ffn=1408, experts=64, topk=6)
    rows = [("FusedMoELayer", _median_ms(bm._ours_layer_setup(d, "cuda"), args.steps)),
            ("FusedMoELayer --moe-deterministic (Triton experts, fixed-tiling GEMMs)",
             _median_ms(bm._ours_layer_setup(d, "cuda", deterministic=True), args.steps))]
    # the chunked lanes, as on CPU: neither Triton lane is offered to the layer
    layer_module.batch_invariant = lambda *a, **k: False
    invariant_mm.usable = lambda a: False
    rows.append(("FusedMoELayer --moe-deterministic, chunked lanes",
                 _median_ms(bm._ours_layer_setup(d, "cuda", deterministic=True), args.chunked_steps)))
    print(f"T={d.tokens} H={d.hidden} F={d.ffn} E={d.experts} top-{d.topk} bf16 fwd+bwd, "
          f"{torch.cuda.get_device_name()}, CUDA-event median")
    print("| layer | ms | x plain |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
