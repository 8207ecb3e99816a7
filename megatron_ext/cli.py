"""``megatron-ext`` command line.

``megatron-ext train [--preset NAME] [--megatron-style-flags ...]`` trains a GPT built from this
project's layer spec. Flags follow Megatron's spelling (``--num-layers``, ``--tensor-model-parallel-size``,
``--sequence-parallel`` ...). Every input problem is reported as one line before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import typing
from typing import List, Optional

from megatron_ext.config import PRESETS, ConfigError, TrainConfig, from_preset, validate

_HELP = {
    "moe_router_load_balancing_type": "aux_loss | seq_aux_loss | global_aux_loss | sinkhorn | quantile_balancing "
                                      "| none (default: aux_loss when --moe-aux-loss-coeff > 0); several aux-loss "
                                      "types combine, one --moe-aux-loss-coeff each (Megatron's list form)",
    "moe_aux_loss_coeff": "one coefficient, or one per --moe-router-load-balancing-type entry",
    "moe_router_quantile_balancing_ema": "quantile_balancing: the bias moves to ema * bias + (1 - ema) * the "
                                         "step's quantile (default 0: replaced each step)",
    "deterministic_mode": "Megatron's: bitwise-repeatable steps (the fused MoE and mHC deterministic modes, torch's "
                          "deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8 and NCCL_ALGO=Ring unless set; "
                          "docs/training.md)",
    "mtp_num_layers": "Megatron's multi-token prediction (DeepSeek-V3): this many MTP layers after the decoder, "
                      "on the last pipeline stage, each with the last decoder layer's attention and MLP/MoE "
                      "(a plain residual under mHC); their losses are logged as mtp_N loss",
    "mtp_loss_scaling_factor": "the MTP layers' mean loss joins the LM loss times this (Megatron's default 0.1)",
    "preset": f"embedded preset: {', '.join(sorted(PRESETS))} (default tiny)",
    "data_path": "a .txt file or a Megatron .bin/.idx prefix (default: the corpus shipped in the package)",
    "run_dir": "run folder (default: <runs-root>/<preset>-<timestamp>)",
    "resume": "continue the newest checkpoint of --run-dir (default: the newest run of this preset)",
    "save_interval": "save a distributed checkpoint every N iterations (and at the end)",
    "progress": "auto: a bar on a terminal, log lines otherwise",
    "device": "auto: CUDA when visible, else CPU with gloo",
    "exit_after_iters": "stop after this iteration (as if the job were killed); resume continues it",
    "use_distributed_optimizer": "Megatron's distributed optimizer: Adam states and fp32 master weights "
                                 "sharded over data parallelism (checkpoints stay loadable at any layout)",
    "bf16": "bf16 parameters and compute with fp32 master weights (default: on for CUDA, off on CPU)",
    "sparse_attention": "sparse MQA attention in every layer (default: on when --attention-pattern is set)",
    "attention_pattern": "sparse attention per layer, one letter a layer, repeated: D dense, W window+sinks, "
                         "T top-k (e.g. WWWD)",
    "window_size": "keys each query sees in W/T layers, counting itself (1 = only itself)",
    "num_sink_tokens": "first tokens every query of a W/T layer also sees (StreamingLLM sinks)",
    "learnable_sink": "a learned per-head sink logit in every softmax denominator (gpt-oss style)",
    "sparse_topk": "keys per query the lightning indexer picks in T layers (and in every GQLA layer)",
    "sparse_attention_backend": "auto | triton | torch (auto: Triton where it can run, else torch)",
    "attention_type": "dense (Megatron SelfAttention) | gqla (GQLAttention) | mla (Megatron MLASelfAttention, "
                      "with the GQLA dim flags; docs/gqla.md)",
    "moe_routing_log": "DIR: append each token's expert ids and gates per layer to DIR/rank*.jsonl "
                       "from a background thread (docs/moe.md)",
    "moe_pad_expert_input_to_capacity": "pad each expert's tokens to capacity (--moe-impl megatron only)",
    "mhc_fp32_params": "keep the mHC mixers' weights (phi, alpha, bias) in fp32 in a --bf16/--fp16 model "
                       "instead of rounding them to the model dtype (default: off, as upstream)",
    "mhc_fold_norm": "fuse each sublayer's input RMSNorm into the mHC site's pre mix (same math and "
                     "checkpoint keys; no effect with LayerNorm); --no-mhc-fold-norm keeps separate norms",
    "mhc_deterministic": "pin the fused mHC kernels' tilings to a function of the shape instead of the "
                         "autotuner's fastest, so two runs give bitwise-equal losses (on with Megatron's "
                         "--deterministic-mode too; docs/mhc.md)",
    "recompute_modules": "with --recompute-granularity selective: what to recompute, Megatron's names comma "
                         "separated (core_attn, moe_act, layernorm, mla_up_proj, mlp, moe, shared_experts; "
                         "Megatron's default core_attn); the MoE ones in docs/moe.md",
    "moe_pregather": "Triton experts: copy each layer's token rows into expert order once and keep that "
                     "[tokens*topk, hidden] copy for backward (faster GEMMs, topk x the layer input's "
                     "activation memory); --no-moe-pregather saves the memory (default: on with the H100 tiles)",
    "moe_gradient_accumulation_fusion": "Triton experts under Megatron's DDP: the weight-gradient kernel adds "
                                        "into each expert weight's main_grad itself instead of the DDP hook's "
                                        "separate add (Megatron's gradient-accumulation fusion, for the experts; "
                                        "no apex needed); --no-moe-gradient-accumulation-fusion leaves it to "
                                        "the hook (default: on)",
    "moe_checkpoint_format": "fused MoE layers' checkpoint entries: fused (their grouped weights, the default) "
                             "or megatron (the keys and layouts of Megatron's MoELayer with SequentialMLP / "
                             "TEGroupedMLP experts, to resume from or hand over to such a checkpoint; docs/moe.md)",
}


_LISTS = ("moe_router_load_balancing_type", "moe_aux_loss_coeff")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        help_text = _HELP.get(f.name, "")
        if f.name in _LISTS:   # Megatron's nargs="+" flags: one value, or one per balancing type
            p.add_argument(_flag(f.name), dest=f.name, type=base, nargs="+", default=None,
                           metavar=base.__name__.upper(), help=help_text or "(default: from the preset)")
        elif base is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text or f"(default {getattr(defaults, f.name)})")
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=base, default=None, metavar=base.__name__.upper(),
                           help=help_text or "(default: from the preset)")
    p.add_argument("--nproc-per-node", default="auto",
                   help="processes on this node when not started by torchrun (auto: one per GPU, 1 on CPU)")


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a GPT built from this project's layer spec")
    _add_train_args(train)
    from launch.commands import add_adapt_args, add_plan_args  # launch/: lane planner, recipe adapter

    plan = sub.add_parser("plan", help="print the lane plan (TP/SP/PP/CP/EP/DP, micro-batch, recompute) "
                                       "with memory and step-time estimates; starts nothing")
    _add_train_args(plan)
    add_plan_args(plan)
    adapt = sub.add_parser("adapt", help="turn a Megatron pretrain recipe into one with this project's layers")
    add_adapt_args(adapt)
    from megatron_ext.convert.command import add_convert_args

    add_convert_args(sub)
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "preset" and getattr(args, f.name) is not None}
    for name in _LISTS:   # one value given: the plain form, as Megatron's parser leaves it
        if isinstance(overrides.get(name), list) and len(overrides[name]) == 1:
            overrides[name] = overrides[name][0]
    return from_preset(args.preset or "tiny", **overrides)


def _nproc(args, lane: str) -> int:
    if args.nproc_per_node == "auto":
        if lane == "cuda":
            import torch

            return max(1, torch.cuda.device_count())
        return 1
    try:
        n = int(args.nproc_per_node)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"nproc_per_node={args.nproc_per_node!r}: not a positive integer; "
                          "use 'auto' or an integer >= 1")
    return n


def _relaunch_with_torchrun(nproc: int, argv: List[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_ext", *argv, "--nproc-per-node", "1"]
    print(f"megatron-ext: launching {nproc} processes: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def _quiet_import_warnings() -> None:
    # megatron-core warns at import that TE / apex are missing; the run logs and records that itself.
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_import_warnings()
    args = parse(argv)
    try:
        if args.command == "adapt":
            from launch.commands import run_adapt

            return run_adapt(args)
        if args.command == "convert":
            from megatron_ext.convert.command import run_convert

            return run_convert(args)
        cfg = _config_from_args(args)
        if args.command == "plan":
            from launch.commands import FIELD_TO_LANE, explicit_fields, run_plan

            return run_plan(args, cfg, explicit_fields(args, FIELD_TO_LANE))
        from megatron_ext.training.distributed import env_local_world_size, env_world_size, pick_lane

        try:
            lane = pick_lane(cfg.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        under_torchrun = "WORLD_SIZE" in os.environ
        nproc = 1 if under_torchrun else _nproc(args, lane)
        world = env_world_size() if under_torchrun else nproc
        local = env_local_world_size() if under_torchrun else nproc
        if cfg.lanes is not None:  # plan the lanes for this launch; every rank plans the same
            from launch.commands import FIELD_TO_LANE, apply_lanes, describe_for_log, explicit_fields

            cfg, plan = apply_lanes(cfg, explicit_fields(args, FIELD_TO_LANE), world, local, lane)
            if os.environ.get("RANK", "0") == "0" and (under_torchrun or nproc == 1):
                print(describe_for_log(plan, cfg.lanes), file=sys.stderr, flush=True)
        dp = validate(cfg, world, gpus_per_node=local if lane == "cuda" else None, lane=lane)
        if not under_torchrun and nproc > 1:
            return _relaunch_with_torchrun(nproc, argv)
        from megatron_ext import compat
        from megatron_ext.training.distributed import shutdown
        from megatron_ext.training.loop import resolve_run_dir, train

        if cfg.resume:  # deterministic on every rank, so it is checked here, before any set-up
            cfg.run_dir = str(resolve_run_dir(cfg))
        failed = True
        try:
            train(cfg, dp)
            failed = False
        except ConfigError:  # raised by every rank before any collective work: a clean exit
            failed = False
            raise
        except BaseException:
            # print it now: with NCCL a failed rank's clean-up can block behind the other ranks,
            # and the error would only appear (if ever) after that
            import traceback

            rank = os.environ.get("RANK", "0")
            sys.stderr.write(f"megatron-ext: rank {rank} failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            raise
        finally:
            compat.destroy_model_parallel()
            shutdown(abort=failed)
    except ConfigError as e:
        print(f"megatron-ext: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
