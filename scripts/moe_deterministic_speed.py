"""Fused MoE layer fwd+bwd with and without --moe-deterministic, and the deterministic mode's
chunked lanes (every GEMM on zero-padded 16-row chunks: what the mode ran everywhere before the
Triton lanes, and still runs on CPU), at the MoE benchmark's shape; then one EP=8 rank's expert
compute after the dispatch (its 8 local experts on the rows of 8 ranks of 8192 tokens, top-6),
deterministic, through the Triton experts (the lane now) and through one fixed-tiling GEMM per
expert (the lane before). CUDA only.

    PYTHONPATH=. python scripts/moe_deterministic_speed.py [--chunked-steps 3]
"""

from __future__ import annotations

import argparse

import torch


def _median_ms(step, steps: int) -> float:
    """The bench harness's CUDA-event median (L2 flushed before each call) over ``steps`` calls."""
    from bench.timing import time_cuda

    return time_cuda(step, min_reps=steps, max_reps=steps).median_ms


def _print_table(header: str, rows) -> None:
    """``rows`` of (name, ms) as a markdown table, each against the first row."""
    print(f"| {header} | ms | x first |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / rows[0][1]:.2f} |")


def _ep_rank_rows(steps: int):
    """(name, ms) of one EP=8 rank's deterministic expert compute, fwd+bwd, both lanes."""
    from megatron_ext.modules.moe import _ffn_rows_deterministic
    from megatron_ext.ops.moe import moe_ffn

    H, F, E_local, n = 2048, 1408, 8, 8 * 8192 * 6 // 8
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, H, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
    local = torch.sort(torch.randint(0, E_local, (n,), generator=g, device="cuda")).values
    p = torch.rand(n, generator=g, device="cuda").requires_grad_()
    w1 = (torch.randn(E_local, H, 2 * F, generator=g, device="cuda") * H ** -0.5).to(**dev).requires_grad_()
    w2 = (torch.randn(E_local, F, H, generator=g, device="cuda") * F ** -0.5).to(**dev).requires_grad_()
    dy = torch.randn(n, H, generator=g, device="cuda").to(torch.bfloat16)

    def triton_lane():
        moe_ffn(x, p[:, None], local[:, None], w1, w2, "swiglu").backward(dy)

    def per_expert_lane():
        _ffn_rows_deterministic(x, local, p, w1, w2, "swiglu").backward(dy.float())

    return [(f"EP=8 rank's experts ({n} rows, {E_local} experts), Triton experts (now)",
             _median_ms(triton_lane, steps)),
            ("the same, one fixed-tiling GEMM per expert (before)", _median_ms(per_expert_lane, steps))]


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
    invariant_bi, usable = layer_module.batch_invariant, invariant_mm.usable
    layer_module.batch_invariant = lambda *a, **k: False
    invariant_mm.usable = lambda a: False
    rows.append(("FusedMoELayer --moe-deterministic, chunked lanes",
                 _median_ms(bm._ours_layer_setup(d, "cuda", deterministic=True), args.chunked_steps)))
    print(f"T={d.tokens} H={d.hidden} F={d.ffn} E={d.experts} top-{d.topk} bf16 fwd+bwd, "
          f"{torch.cuda.get_device_name()}, CUDA-event median, L2 flushed before each call")
    _print_table("layer", rows)
    layer_module.batch_invariant, invariant_mm.usable = invariant_bi, usable
    ep = _ep_rank_rows(args.steps)
    print()
    _print_table("one EP=8 rank, deterministic, after the dispatch", ep)


if __name__ == "__main__":
    main()
