"""TransGQLA on a trained model: reconstruction error and validation loss vs r_kv, with and without RoPE.

Trains (once; reused when the run folder exists) a dense GQA model of the ``test`` preset on the CPU
lane, with RoPE and with learned absolute positions, converts each to GQLA at several latent ranks and
prints one markdown table (pasted into docs/gqla.md). The validation loss is measured on held-out
samples of the corpus's validation split, the same for the source and every converted model.

``--source mla`` does the same for MLA -> GQLA: it trains ``--attention-type mla`` models (with the
latent norm, and without it), converts the first at G = H, H/2, ..., 1 and the second at G = H/2 over
a range of r_kv, and fine-tunes one conversion with the printed ``train --resume`` command.

    python scripts/transgqla_report.py --out runs/transgqla [--train-iters 300] [--groups 2]
    python scripts/transgqla_report.py --source mla --out runs/mla2gqla [--train-iters 300]
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
    p.add_argument("--source", choices=("gqa", "mla"), default="gqa",
                   help="gqa: TransGQLA of dense GQA runs; mla: MLA -> GQLA of --attention-type mla runs")
    p.add_argument("--finetune-groups", type=int, default=1, help="--source mla: G of the fine-tuned conversion")
    args = p.parse_args()
    if args.source == "mla":
        return mla_report(args)

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


def _convert_finetune_losses(convert_argv: list, src_run: Path, dst_run: Path, args, load) -> tuple:
    """Convert ``src_run`` into ``dst_run`` with ``convert_argv`` (once), fine-tune it for
    ``args.finetune_iters`` steps with the resume command the conversion wrote, and return the
    validation loss of source, converted and fine-tuned model on the same held-out samples
    (``load(cfg, root, iteration)`` builds each model)."""
    import json

    from megatron_ext.cli import main as cli_main
    from megatron_ext.convert.command import cpu_world_of_one, locate, read_config, validation_tokens
    from megatron_ext.convert.transgqla import logit_change

    if not dst_run.exists():
        rc = cli_main(convert_argv + ["--load", str(src_run), "--save", str(dst_run),
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
            model = load(cfg, root, iteration)
            losses.append(logit_change(model, model, tokens, positions)["loss_src"])
    converted = json.loads((dst_run / "convert.json").read_text())["logit_change"]
    return losses[0], converted["loss_dst"], losses[1]


def _finetune(out: Path, args):
    """Convert the RoPE run through the CLI, fine-tune it with the printed command, and measure the
    validation loss of source, converted and fine-tuned model on the same held-out samples."""
    from megatron_ext.convert.command import load_dense_model

    src_run = out / f"gqa{args.source_groups}-rope"
    dst_run = out / f"gqla{args.groups}-rope-r{args.finetune_rank}-ft{args.finetune_iters}"
    return _convert_finetune_losses(["convert", "gqa-to-gqla", "--groups", str(args.groups),
                                     "--kv-lora-rank", str(args.finetune_rank)],
                                    src_run, dst_run, args, load_dense_model)


def _mla_run(out: Path, args, latent_norm: bool) -> Path:
    """An ``--attention-type mla`` run of the preset (trained once, reused afterwards)."""
    from megatron_ext.cli import main as cli_main
    from megatron_ext.training import checkpoint

    run = out / f"mla-{'norm' if latent_norm else 'nonorm'}"
    if checkpoint.latest_iteration(run / "checkpoints") is None:
        n = str(args.train_iters)
        rc = cli_main(["train", "--preset", args.preset, "--attention-type", "mla",
                       "--gqla-latent-norm" if latent_norm else "--no-gqla-latent-norm", "--train-iters", n,
                       "--save-interval", n, "--eval-interval", n, "--run-dir", str(run), "--runs-root", str(out),
                       "--progress", "log", "--device", "cpu"])
        if rc:
            raise SystemExit(rc)
    return run


def mla_report(args) -> int:
    """MLA -> GQLA on trained MLA runs: per-layer map errors and validation loss vs G and r_kv."""
    import argparse

    from megatron_ext.config import mla_config
    from megatron_ext.convert.command import (_target_config_mla, build_model, cpu_world_of_one, load_model,
                                              locate, read_config, validation_tokens)
    from megatron_ext.convert.mla import convert_mla_model_to_gqla
    from megatron_ext.convert.transgqla import logit_change

    out = Path(args.out)
    rows = []
    for latent_norm in (True, False):
        run, root, iteration = locate(str(_mla_run(out, args, latent_norm)), None)
        cfg = read_config(run)
        H, r = cfg.num_attention_heads, mla_config(cfg).kv_lora_rank
        if latent_norm:  # every divisor of H, full latent
            combos = [(g, r) for g in range(H, 0, -1) if H % g == 0]
        else:  # G = H/2 over latent widths (a narrower latent needs the norm off)
            combos = [(max(1, H // 2), int(x)) for x in args.ranks.split(",") if int(x) <= r]
        tokens, positions = validation_tokens(cfg, args.eval_samples)
        with cpu_world_of_one(cfg.seed):
            src = load_model(cfg, root, iteration)
            for groups, rank in combos:
                ns = argparse.Namespace(groups=groups, kv_lora_rank=rank, load=str(run))
                dst = build_model(_target_config_mla(cfg, ns, out / "unused"))
                reports = convert_mla_model_to_gqla(src, dst, groups, rank, backend="torch")
                change = logit_change(src, dst.eval(), tokens, positions)
                mean = lambda k: sum(getattr(x, k) for x in reports) / len(reports)  # noqa: E731
                rows.append((latent_norm, H, groups, rank, r, mean("key_rel_error"), mean("value_rel_error"),
                             mean("latent_rel_error"), change["rel_l2"], change["loss_src"], change["loss_dst"]))
                print(f"latent norm {latent_norm} G={groups} r_kv={rank}: done", file=sys.stderr, flush=True)
    finetune = None
    if args.finetune_iters:
        src_run = out / "mla-norm"
        dst_run = out / f"gqla{args.finetune_groups}-from-mla-ft{args.finetune_iters}"
        finetune = _convert_finetune_losses(["convert", "mla-to-gqla", "--groups", str(args.finetune_groups)],
                                            src_run, dst_run, args, load_model)

    print(f"\nMLA -> GQLA on trained `{args.preset}` MLA models ({args.train_iters} iterations), validation "
          f"split, {args.eval_samples} samples; errors are per-layer means\n")
    print("| latent norm | G (of H) | r_kv (MLA's) | key map rel. error | value map rel. error | latent rel. error "
          "| rel. logit change | val. loss MLA -> GQLA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for norm, H, g, rank, r, ek, ev, el, rel, ls, ld in rows:
        print(f"| {'on' if norm else 'off'} | {g} ({H}) | {rank} ({r}) | {ek:.3f} | {ev:.3f} | {el:.3f} | {rel:.2e} "
              f"| {ls:.4f} -> {ld:.4f} |")
    if finetune is not None:
        print(f"\nMLA (latent norm on) -> GQLA G={args.finetune_groups}, then `train --resume` on the converted run "
              f"for {args.finetune_iters} iterations (fresh Adam, warm-up {args.finetune_warmup}): validation loss "
              f"{finetune[0]:.4f} (MLA) -> {finetune[1]:.4f} (converted) -> {finetune[2]:.4f} (fine-tuned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
