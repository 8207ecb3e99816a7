"""Tile and split sweep of the Triton split-KV decode kernel at the GQLA benchmark shapes (GPU).

    python scripts/tune_triton_decode.py [--quick]

For each layout (absorb: keys [latent 512 | rope 64], values = latent, 32 heads on 1 KV head; GQA:
keys [128 | shared rope 64], values 128, G groups) and context, times every (BLOCK_N, num_warps,
num_stages) candidate at the default split count, then the best tile at other split counts, and
prints ms and GB/s of the cache read. The defaults in ``triton_decode._tile_config`` /
``default_num_splits`` come from this table (docs/gqla.md).
"""

from __future__ import annotations

import argparse
import itertools


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer candidates")
    args = p.parse_args(argv)

    import torch
    import triton.testing

    from megatron_ext.ops.sparse_attention import triton_decode as td

    bf = dict(device="cuda", dtype=torch.bfloat16)
    b, H = 64, 32
    tiles = list(itertools.product((32, 64) if args.quick else (16, 32, 64, 128), (4, 8), (2, 3)))
    for layout, T, G in (("absorb", 8192, 1), ("absorb", 32768, 1), ("gqa", 8192, 4), ("gqa", 32768, 8)):
        k_rope = torch.randn(b, 1, T, 64, **bf)
        q_rope = torch.randn(b, H, 64, **bf)
        if layout == "absorb":
            q, k, v = torch.randn(b, H, 512, **bf), torch.randn(b, 1, T, 512, **bf), None
            nbytes = 2 * b * T * 576
        else:
            q, k, v = torch.randn(b, H, 128, **bf), torch.randn(b, G, T, 128, **bf), torch.randn(b, G, T, 128, **bf)
            nbytes = 2 * b * T * (G * 256 + 64)

        def run(cfg, splits, q=q, k=k, v=v, q_rope=q_rope, k_rope=k_rope):
            return lambda: td.decode_attention(q, k, v, q_rope=q_rope, k_rope=k_rope, config=cfg, num_splits=splits)

        ref = td.decode_attention_reference(q, k, v, q_rope=q_rope, k_rope=k_rope).float()
        default_splits = td.default_num_splits(b * (G if layout == "gqa" else 1), T, q.device)
        results = []
        for cfg in [None] + tiles:
            try:
                out = run(cfg, None)().float()
                err = (out - ref).abs().max().item()
                ms = triton.testing.do_bench(run(cfg, None), warmup=25, rep=60)
            except Exception as e:  # noqa: BLE001  (out of shared memory / registers: skip the tile)
                print(f"{layout} T={T} G={G} tile={cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            results.append((ms, cfg))
            print(f"{layout} T={T} G={G} tile={cfg or 'default'} splits={default_splits}: {ms:.4f} ms "
                  f"{nbytes / ms / 1e6:.0f} GB/s  max|err|={err:.3g}", flush=True)
        best_ms, best = min(results, key=lambda r: r[0])
        for splits in sorted({max(1, default_splits // 2), default_splits * 2, default_splits * 4, 1}):
            ms = triton.testing.do_bench(run(best, splits), warmup=25, rep=60)
            print(f"{layout} T={T} G={G} tile={best or 'default'} splits={splits}: {ms:.4f} ms "
                  f"{nbytes / ms / 1e6:.0f} GB/s", flush=True)
        print(f"== {layout} T={T} G={G}: best tile {best or 'default'} {best_ms:.4f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
