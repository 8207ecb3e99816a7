"""TransGQLA on a trained model: reconstruction error and validation loss vs r_kv, with and without RoPE.

Trains (once; reused when the run folder exists) a dense GQA model of the ``test`` preset on the CPU
lane, with RoPE and with learned absolute positions, converts each to GQLA at several latent ranks and
prints one markdown table (pasted into docs/gqla.md). The validation loss is measured on held-out
samples of the corpus's validation split, the same for the source and every converted model.

    python scripts/transgqla_report.py --out runs/transgqla [--train-iters 300] [--groups 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/transgqla", help="folder of the two source runs")
    p.add_argument("--preset", default="test", help="preset of the source runs (test: 2 layers, hidden 64)")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--source-groups", type=int, default=2, help="KV heads of the trained GQA source")
    p.add_argument("--groups", type=int, default=2, help="GQLA groups of the converted model")
    p.add_argument("--ranks", default="4,8,16,32,48,64", help="r_kv values, comma-separated (test: full rank 64)")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--finetune-iters", type=int, default=60, help="fine-tune the converted RoPE model (0: skip)")
    p.add_argument("--finetune-rank", type=int, default=32)
    p.add_argument("--finetune-warmup", type=int, default=5)
    args = p.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    from megatron_ext.cli import main as cli_main
    from megatron_ext.convert.command import (cpu_world_of_one, load_dense_model, locate, read_config,
                                              validation_tokens)
    from megatron_ext.convert.transgqla import convert_gqa_to_gqla, logit_change
    from megatron_ext.training import checkpoint

    out = Path(args.out)
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    for position in ("learned_absolute", "rope"):
        run = out / f"gqa{args.source_groups}-{position}"
        if checkpoint.latest_iteration(run / "checkpoints") is None:
            rc = cli_main(["train", "--preset", args.preset, "--num-query-groups", str(args.source_groups),
                           "--position-embedding-type", position, "--train-iters", str(args.train_iters),
                           "--save-interval", str(args.train_iters), "--eval-interval", str(args.train_iters),
                           "--run-dir", str(run),
                           "--runs-root", str(out), "--progress", "log", "--device", "cpu"])
            if rc:
                return rc
        run, root, iteration = locate(str(run), None)
        cfg = read_config(run)
        tokens, positions = validation_tokens(cfg, args.eval_samples)
        with cpu_world_of_one(cfg.seed):
            src = load_dense_model(cfg, root, iteration)
            for rank in ranks:
                dst, report = convert_gqa_to_gqla(src, args.groups, rank, backend="torch")
                change = logit_change(src, dst, tokens, positions)
                errors = [r.kv_rel_error for r in report.layers]
                rope_moved = [r.rope_rel_residual for r in report.layers]
                rows.append((position, rank, report.full_rank, sum(errors) / len(errors), max(errors),
                             sum(rope_moved) / len(rope_moved), change["rel_l2"], change["loss_src"],
                             change["loss_dst"]))
                print(f"{position} r_kv={rank}: done", file=sys.stderr, flush=True)
    finetune = _finetune(out, args) if args.finetune_iters else None
    print(f"\nTransGQLA on a trained `{args.preset}` model ({args.train_iters} iterations, KV heads "
          f"{args.source_groups} -> G={args.groups}), validation split, {args.eval_samples} samples\n")
    print("| positions | r_kv (full) | K/V rel. error mean / max | key share out of RoPE | rel. logit change "
          "| val. loss source -> GQLA |")
    print("|---|---:|---:|---:|---:|---:|")
    for pos, rank, full, mean, worst, moved, rel, ls, ld in rows:
        print(f"| {pos} | {rank} ({full}) | {mean:.3f} / {worst:.3f} | {moved:.3f} | {rel:.3f} "
              f"| {ls:.4f} -> {ld:.4f} |")
    if finetune is not None:
        print(f"\nRoPE source, G={args.groups}, r_kv={args.finetune_rank}, then `train --resume` on the converted "
              f"run for {args.finetune_iters} iterations (fresh Adam, warm-up {args.finetune_warmup}): "
              f"validation loss {finetune[0]:.4f} (source) -> {finetune[1]:.4f} (converted) -> "
              f"{finetune[2]:.4f} (fine-tuned)")
    return 0


def _finetune(out: Path, args):
    """Convert the RoPE run through the CLI, fine-tune it with the printed command, and measure the
    validation loss of source, converted and fine-tuned model on the same held-out samples."""
    import json

    from megatron_ext.cli import main as cli_main
    from megatron_ext.convert.command import (cpu_world_of_one, load_dense_model, locate, read_config,
                                              validation_tokens)
    from megatron_ext.convert.transgqla import logit_change

    src_run = out / f"gqa{args.source_groups}-rope"
    dst_run = out / f"gqla{args.groups}-rope-r{args.finetune_rank}-ft{args.finetune_iters}"
    if not dst_run.exists():
        rc = cli_main(["convert", "gqa-to-gqla", "--load", str(src_run), "--save", str(dst_run), "--groups",
                       str(args.groups), "--kv-lora-rank", str(args.finetune_rank),
                       "--eval-samples", str(args.eval_samples)])
        if rc:
            raise SystemExit(rc)
        command = json.loads((dst_run / "convert.json").read_text())["resume_command"]
        n = str(args.finetune_iters)
        rc = cli_main(command[1:] + ["--train-iters", n, "--lr-warmup-iters", str(args.finetune_warmup),
                                     "--save-interval", n, "--eval-interval", n])
        if rc:
            raise SystemExit(rc)
    losses = []
    for run_dir in (src_run, dst_run):
        run, root, iteration = locate(str(run_dir), None)
        cfg = read_config(run)
        tokens, positions = validation_tokens(cfg, args.eval_samples)
        with cpu_world_of_one(cfg.seed):
            model = load_dense_model(cfg, root, iteration)
            losses.append(logit_change(model, model, tokens, positions)["loss_src"])
    converted = json.loads((dst_run / "convert.json").read_text())["logit_change"]
    return losses[0], converted["loss_dst"], losses[1]


if __name__ == "__main__":
    sys.exit(main())
