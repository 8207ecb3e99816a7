"""``megatron-ext plan`` / ``adapt`` and the ``train --lanes`` hook, called from megatron_ext.cli."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional, Tuple

from launch.hardware import PROFILES, detect, get_profile
from launch.lanes import parse_lanes, pins_spec
from launch.plan import TARGETS, Cluster, LaunchPlan, Planner, recompute_lane
from megatron_ext.config import ConfigError, TrainConfig

# The byte-level tokenizer of megatron_ext.data (256 bytes + end-of-document + pad).
BYTE_VOCAB = 258

# TrainConfig field -> Lanes field: a flag given explicitly pins that lane.
FIELD_TO_LANE = {
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "context_parallel_size": "cp",
    "expert_model_parallel_size": "ep",
    "expert_tensor_parallel_size": "etp",
    "sequence_parallel": "sp",
    "micro_batch_size": "micro_batch_size",
    "recompute_granularity": "recompute",
    "use_torch_fsdp2": "fsdp2",
}


def pins_from(cfg: TrainConfig, explicit: Dict[str, Any]) -> Dict[str, object]:
    """The lanes ``cfg.lanes`` pins, merged with lane flags given explicitly; a lane given both ways
    with different values is an error naming both."""
    pins = parse_lanes(cfg.lanes)
    if pins.get("recompute") == "selective" and recompute_lane(cfg) == "moe":
        pins["recompute"] = "moe"   # recompute-selective in the lanes, moe among --recompute-modules
    for field, lane in FIELD_TO_LANE.items():
        if field not in explicit:
            continue
        value = explicit[field]
        if lane == "recompute":   # selective with moe among --recompute-modules is the moe lane
            value = recompute_lane(cfg)
        if lane in pins and pins[lane] != value:
            flag = "--" + field.replace("_", "-")
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            if value is False:
                shown = "--no-" + field.replace("_", "-")
            if value == "moe":
                shown = f"--recompute-granularity selective --recompute-modules {cfg.recompute_modules}"
            raise ConfigError(f"lanes={cfg.lanes!r}: pins {pins_spec({lane: pins[lane]})} but {shown} was "
                              f"also given; use one of them")
        pins.setdefault(lane, value)
    return pins


def apply_lanes(cfg: TrainConfig, explicit: Dict[str, Any], world: int, gpus_per_node: int,
                lane: str) -> Tuple[TrainConfig, LaunchPlan]:
    """``train --lanes``: plan for this launch (world size, GPUs per node, the visible GPU's profile)
    and return the config with the plan's lane fields. Deterministic, so every rank plans the same."""
    pins = pins_from(cfg, explicit)
    profile = None
    if lane == "cuda":
        import torch

        profile = detect(torch.cuda.get_device_name())
    if world % gpus_per_node:
        gpus_per_node = world
    planner = Planner(cfg, Cluster(world // gpus_per_node, gpus_per_node, profile), BYTE_VOCAB, "train")
    plan = planner.plan(spec=cfg.lanes, pins=pins)
    return plan.apply(cfg), plan


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------

def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--hardware", default="h100-80g", help=f"hardware profile: {', '.join(sorted(PROFILES))}")
    p.add_argument("--vocab-size", type=int, default=BYTE_VOCAB,
                   help=f"tokenizer vocabulary (default {BYTE_VOCAB}: the byte-level tokenizer of train)")
    p.add_argument("--target", default="train", choices=sorted(TARGETS),
                   help="train: this project's loop (no distributed optimizer, VPP, CP yet; FSDP2 at TP=PP=EP=1); "
                        "megatron: Megatron's pretrain with --use-distributed-optimizer and --spec")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace, cfg: TrainConfig, explicit: Dict[str, Any]) -> int:
    profile = get_profile(args.hardware)
    if args.vocab_size < 1:
        raise ConfigError(f"vocab_size={args.vocab_size}: must be positive; use the tokenizer's vocabulary size")
    pins = pins_from(cfg, explicit)
    planner = Planner(cfg, Cluster(args.nodes, args.gpus_per_node, profile), args.vocab_size, args.target)
    plan = planner.plan(spec=cfg.lanes, pins=pins)
    if args.json:
        json.dump(plan.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(plan.table())
    return 0


# ------------------------------------------------------------------------------------------------
# adapt
# ------------------------------------------------------------------------------------------------

def add_adapt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="ARGS_FILE",
                   help="a Megatron pretrain argument list (--flag value tokens; # comments allowed)")
    p.add_argument("--attention", choices=["sparse-mqa", "gqla"], default=None,
                   help="swap the recipe's attention for this project's")
    p.add_argument("--moe", choices=["fused"], default=None, help="swap the MoE layer for the fused one")
    p.add_argument("--mhc", type=int, default=None, metavar="N", help="mHC with N residual streams")
    p.add_argument("--out", default=None, help="adapted argument list (default: <ARGS_FILE stem>.adapted.args)")
    p.add_argument("--knobs-out", default=None,
                   help="this project's knob file (default: next to --out, .megatron_ext.yaml)")


def run_adapt(args: argparse.Namespace) -> int:
    from launch.adapt import adapt_file

    report = adapt_file(args.source, attention=args.attention, moe=args.moe, mhc=args.mhc,
                        out=args.out, knobs_out=args.knobs_out)
    print(report.render())
    return 0


def explicit_fields(args: argparse.Namespace, fields) -> Dict[str, Any]:
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def describe_for_log(plan: LaunchPlan, source: Optional[str]) -> str:
    L = plan.lanes
    return (f"megatron-ext: lanes {L.spec()} (from --lanes {source!r}; world {plan.planner.cluster.world_size})")
