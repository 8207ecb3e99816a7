"""``megatron-ext convert gqa-to-gqla`` / ``mla-to-gqla``: TransGQLA and MLA -> GQLA over a run
folder's distributed checkpoint.

Reads ``<run>/config.json`` and a checkpoint of ``megatron-ext train``, rebuilds the model (dense GQA,
or MLA from ``--attention-type mla``) on the CPU (world size 1; Megatron's distributed checkpoints
reshard, so a checkpoint saved under TP/PP loads here), converts it with
:func:`megatron_ext.convert.convert_gqa_to_gqla` or :func:`megatron_ext.convert.convert_mla_model_to_gqla`,
prints the per-layer reconstruction error and the logit change on the validation split, and writes a new run
folder: ``config.json`` with ``attention_type="gqla"`` and the converted dims, and a weights-only
checkpoint at iteration 0 that ``megatron-ext train --resume --run-dir OUT`` fine-tunes from with a
fresh optimizer and LR schedule (Megatron's ``--finetune`` semantics; docs/gqla.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from megatron_ext.config import ConfigError, TrainConfig, from_preset, gqla_config, mla_config
from megatron_ext.training import checkpoint

CONVERSIONS = ("gqa-to-gqla", "mla-to-gqla")


def add_convert_args(sub) -> None:
    """The ``convert`` subcommand and its conversions (one sub-subcommand each)."""
    convert = sub.add_parser("convert", help="convert a trained run's checkpoint to another attention type")
    kinds = convert.add_subparsers(dest="conversion", required=True)
    gqa = kinds.add_parser("gqa-to-gqla", help="TransGQLA: dense GQA attention -> GQLA (SVD of the K/V weights)")
    mla = kinds.add_parser("mla-to-gqla", help="MLA (--attention-type mla) -> GQLA: one K/V up-projection "
                                                "block per group of heads (shared-subspace SVD)")
    for p in (gqa, mla):
        p.add_argument("--load", required=True, metavar="PATH",
                       help="a run folder, its checkpoints/ folder, or one iter_NNNNNNN checkpoint")
        p.add_argument("--save", required=True, metavar="OUT_RUN_DIR", help="new run folder (must not exist)")
    gqa.add_argument("--groups", required=True, type=int, metavar="G",
                     help="GQLA groups (num_query_groups): a divisor or multiple of the source's KV heads")
    gqa.add_argument("--kv-lora-rank", required=True, type=int, metavar="R", help="latent width r_kv")
    mla.add_argument("--groups", required=True, type=int, metavar="G",
                     help="GQLA groups (num_query_groups): a divisor of the head count (= heads: exact)")
    mla.add_argument("--kv-lora-rank", type=int, default=None, metavar="R",
                     help="latent width r_kv (default: the MLA's; smaller only without the latent norm)")
    for p in (gqa, mla):
        p.add_argument("--iteration", type=int, default=None, metavar="N",
                       help="checkpoint iteration to convert (default: the newest)")
        p.add_argument("--eval-samples", type=int, default=16, metavar="N",
                       help="validation-split samples the logit change is measured on (default 16)")


def locate(load: str, iteration: Optional[int]) -> Tuple[Path, Path, int]:
    """``--load`` -> (run folder, checkpoints root, iteration)."""
    path = Path(load)
    if not path.exists():
        raise ConfigError(f"load={load!r}: no such file or folder; use a run folder of megatron-ext train")
    if path.name.startswith("iter_") and path.is_dir():
        root, from_name = path.parent, int(path.name[len("iter_"):])
        if iteration is not None and iteration != from_name:
            raise ConfigError(f"iteration={iteration}: --load names iteration {from_name}; "
                              "drop --iteration or load the run folder")
        iteration = from_name
    elif (path / checkpoint.TRACKER).is_file():
        root = path
    else:
        root = path / "checkpoints"
    run = root.parent
    if iteration is None:
        iteration = checkpoint.latest_iteration(root)
        if iteration is None:
            raise ConfigError(f"load={load!r}: no checkpoint tracker in {str(root)!r}; "
                              "use a run folder that saved a checkpoint")
    if not checkpoint.iteration_dir(root, iteration).is_dir():
        raise ConfigError(f"iteration={iteration}: {str(checkpoint.iteration_dir(root, iteration))!r} does "
                          "not exist; use an iteration the run saved (see its checkpoints/ folder)")
    if not (run / "config.json").is_file():
        raise ConfigError(f"load={load!r}: no config.json in the run folder {str(run)!r}; "
                          "use a run folder written by megatron-ext train")
    return run, root, iteration


def read_config(run: Path) -> TrainConfig:
    values = json.loads((run / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    # Fields another version wrote but this one does not know cannot shape the model: skip them.
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def _source_dtype(cfg: TrainConfig, run: Path) -> torch.dtype:
    if cfg.bf16 is not None:
        return torch.bfloat16 if cfg.bf16 else torch.float32
    receipt = run / "receipt.json"
    if receipt.is_file():
        dtype = json.loads(receipt.read_text()).get("runtime", {}).get("dtype")
        return torch.bfloat16 if dtype == "bf16" else torch.float32
    return torch.float32


def resume_command(cfg: TrainConfig) -> List[str]:
    """``megatron-ext train`` arguments that rebuild ``cfg`` (the fields that differ from its preset)."""
    base = from_preset(cfg.preset)
    args = ["megatron-ext", "train", "--preset", cfg.preset]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("preset", "resume", "run_dir") or value == getattr(base, f.name) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args + ["--run-dir", str(cfg.run_dir), "--resume"]


def validation_tokens(cfg: TrainConfig, samples: int):
    """``tokens, position_ids [samples, seq_length]`` of the run's validation split (held out from training)."""
    from megatron_ext import data as mdata

    tokenizer = mdata.ByteTokenizer()
    cache_dir = Path(cfg.data_cache_dir or Path(cfg.runs_root) / ".data-cache")
    prefix = mdata.resolve_data(cfg.data_path, cache_dir, tokenizer)
    _, valid = mdata.build_gpt_datasets(prefix, tokenizer, cfg.seq_length, cfg.seed, cfg.global_batch_size,
                                        samples, cache_dir)
    rows = [valid[i] for i in range(samples)]
    return torch.stack([r["tokens"] for r in rows]), torch.stack([r["position_ids"] for r in rows])


def run_convert(args: argparse.Namespace) -> int:
    """Entry point of ``megatron-ext convert``; raises ConfigError on bad input."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: convert runs in one process; "
                          "run it without torchrun")
    if args.eval_samples < 1:
        raise ConfigError(f"eval_samples={args.eval_samples}: must be positive; use an integer >= 1")
    run, root, iteration = locate(args.load, args.iteration)
    out = Path(args.save)
    if out.exists():
        raise ConfigError(f"save={args.save!r}: already exists; use a new run folder")
    cfg = read_config(run)
    want = "mla" if args.conversion == "mla-to-gqla" else "dense"
    if cfg.attention_type != want or cfg.mhc_num_streams or cfg.sparse_attention or cfg.attention_pattern:
        what = ("MLA runs (megatron-ext train --attention-type mla, no mHC)" if want == "mla" else
                "dense GQA runs (attention_type 'dense', no mHC, no sparse MQA)")
        raise ConfigError(f"load={args.load!r}: the run has attention_type={cfg.attention_type!r}, "
                          f"mhc_num_streams={cfg.mhc_num_streams}, attention_pattern={cfg.attention_pattern!r}; "
                          f"{args.conversion} converts {what}")
    if want == "mla":
        out_cfg = _target_config_mla(cfg, args, out)
        convert = _convert_mla
    else:
        out_cfg = _target_config(cfg, args, out)
        convert = _convert

    with cpu_world_of_one(cfg.seed):
        return convert(cfg, out_cfg, root, iteration, run, args)


@contextlib.contextmanager
def cpu_world_of_one(seed: int):
    """A gloo world of one process with TP = PP = 1 (the process group is left as found)."""
    import patches
    from megatron_ext import compat
    from megatron_ext.training.distributed import init_distributed, shutdown

    created = not torch.distributed.is_initialized()
    init_distributed("cpu")
    try:
        patches.apply_patches("cpu")
        compat.initialize_model_parallel(1, 1, 1, 1)
        compat.seed_model_parallel(seed)
        yield
    finally:
        compat.destroy_model_parallel()
        if created:
            shutdown()


def build_model(cfg: TrainConfig):
    """The run's GPTModel on this rank (inside :func:`cpu_world_of_one`), fp32, freshly initialised.
    The vocab padding and embedding tying follow the run's TP/PP (build_gpt reads them from cfg), so
    every checkpoint tensor keeps its shape; the model itself is built without parallel lanes."""
    from megatron_ext import data as mdata
    from megatron_ext.training.model import build_gpt, transformer_config

    single = dataclasses.replace(cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 context_parallel_size=1, expert_model_parallel_size=1,
                                 sequence_parallel=False, lanes=None, bf16=False, device="cpu")
    return build_gpt(cfg, transformer_config(single, "cpu", False), mdata.ByteTokenizer().vocab_size)


def load_model(cfg: TrainConfig, root: Path, iteration: int):
    """:func:`build_model` with the weights of checkpoint ``iteration`` under ``root``, in eval mode."""
    from megatron.core import dist_checkpointing

    model = build_model(cfg)
    path = checkpoint.iteration_dir(root, iteration)
    loaded = dist_checkpointing.load({"model": checkpoint.model_state(model)}, str(path))
    model.load_state_dict(loaded["model"])
    return model.eval()


load_dense_model = load_model  # the name the TransGQLA report script uses


def _target_config(cfg: TrainConfig, args, out: Path) -> TrainConfig:
    """The converted run's config (its dims come from the conversion's rules; checked before any work)."""
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    Gs = cfg.num_query_groups or H
    G = args.groups
    if G < 1 or H % G or (Gs % G and G % Gs):
        raise ConfigError(f"groups={G}: must divide num_attention_heads={H} and divide, or be a multiple of, "
                          f"the source's num_query_groups={Gs}; use a divisor of {H} related to {Gs}")
    if args.kv_lora_rank < 1:
        raise ConfigError(f"kv_lora_rank={args.kv_lora_rank}: must be positive; use an integer >= 1")
    m = max(1, Gs // G)
    rope = cfg.position_embedding_type == "rope"
    out_cfg = dataclasses.replace(
        cfg, attention_type="gqla", num_query_groups=G, kv_lora_rank=args.kv_lora_rank, q_lora_rank=None,
        qk_head_dim=m * d, qk_pos_emb_head_dim=d if rope else 0, v_head_dim=m * d, gqla_latent_norm=False,
        run_dir=str(out), resume=False)
    gqla_config(out_cfg).validate(H, out_cfg.tensor_model_parallel_size)
    return out_cfg


def _target_config_mla(cfg: TrainConfig, args, out: Path) -> TrainConfig:
    """The GQLA run an MLA run converts to: the MLA dims, G groups, r_kv (checked before any work)."""
    H = cfg.num_attention_heads
    G = args.groups
    if G < 1 or H % G:
        raise ConfigError(f"groups={G}: must divide num_attention_heads={H}; use a divisor of {H} "
                          f"({H}: one group per head, exact)")
    mla = mla_config(cfg)
    r = mla.kv_lora_rank
    R = r if args.kv_lora_rank is None else args.kv_lora_rank
    if not 1 <= R <= r:
        raise ConfigError(f"kv_lora_rank={R}: the GQLA latent is a subspace of the MLA's kv_lora_rank={r}; "
                          f"use 1 <= R <= {r} (default {r})")
    if R < r and mla.latent_norm:
        raise ConfigError(f"kv_lora_rank={R}: the MLA run normalises its {r}-dim latent (gqla_latent_norm), "
                          f"which no narrower linear latent reproduces; use {r} (the default), or a source "
                          "trained with --no-gqla-latent-norm")
    if mla.q_lora_rank is not None and not mla.latent_norm:
        raise ConfigError(f"load={args.load!r}: the MLA run has q_lora_rank={mla.q_lora_rank} without a "
                          "q_layernorm, and GQLA's q-LoRA always normalises its latent; use an MLA run "
                          "trained with --gqla-latent-norm")
    out_cfg = dataclasses.replace(
        cfg, attention_type="gqla", num_query_groups=G, kv_lora_rank=R, q_lora_rank=mla.q_lora_rank,
        qk_head_dim=mla.qk_head_dim, qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim, v_head_dim=mla.v_head_dim,
        gqla_latent_norm=mla.latent_norm, run_dir=str(out), resume=False)
    gqla_config(out_cfg).validate(H, out_cfg.tensor_model_parallel_size)
    return out_cfg


def _convert(cfg: TrainConfig, out_cfg: TrainConfig, root: Path, iteration: int, run: Path, args) -> int:
    from megatron_ext.convert.transgqla import convert_gqa_to_gqla

    tokens, positions = validation_tokens(cfg, args.eval_samples)
    src = load_model(cfg, root, iteration)
    path = checkpoint.iteration_dir(root, iteration)
    print(f"megatron-ext convert gqa-to-gqla: loaded {path} (H={cfg.num_attention_heads}, "
          f"KV heads {cfg.num_query_groups or cfg.num_attention_heads}, {cfg.position_embedding_type})", flush=True)

    dst, report = convert_gqa_to_gqla(src, args.groups, args.kv_lora_rank)
    for line in report.lines():
        print(line)
    return _finish(cfg, out_cfg, root, iteration, run, args, src, dst, tokens, positions,
                   {"full_rank": report.full_rank, "layers": [dataclasses.asdict(r) for r in report.layers]})


def _convert_mla(cfg: TrainConfig, out_cfg: TrainConfig, root: Path, iteration: int, run: Path, args) -> int:
    from megatron_ext.convert.mla import convert_mla_model_to_gqla

    tokens, positions = validation_tokens(cfg, args.eval_samples)
    src = load_model(cfg, root, iteration)
    path = checkpoint.iteration_dir(root, iteration)
    mla = mla_config(cfg)
    print(f"megatron-ext convert mla-to-gqla: loaded {path} (H={cfg.num_attention_heads}, "
          f"kv_lora_rank={mla.kv_lora_rank}, d_nope={mla.qk_head_dim}, d_rope={mla.qk_pos_emb_head_dim}, "
          f"d_v={mla.v_head_dim})", flush=True)
    dst = build_model(out_cfg)
    reports = convert_mla_model_to_gqla(src, dst, args.groups, out_cfg.kv_lora_rank)
    dst.eval()
    print(f"MLA -> GQLA: G={args.groups} (of H={cfg.num_attention_heads}) r_kv={out_cfg.kv_lora_rank}; "
          "relative error of the heads' shared key/value maps per layer (0 at G = H)")
    for r in reports:
        print(r.layer_line())
    return _finish(cfg, out_cfg, root, iteration, run, args, src, dst, tokens, positions,
                   {"layers": [dataclasses.asdict(r) for r in reports]})


def _finish(cfg: TrainConfig, out_cfg: TrainConfig, root: Path, iteration: int, run: Path, args, src, dst,
            tokens, positions, report: dict) -> int:
    """Logit change on held-out text, then the weights-only checkpoint, config and manifest of ``out_cfg``."""
    from megatron_ext.convert.transgqla import logit_change

    path = checkpoint.iteration_dir(root, iteration)
    change = logit_change(src, dst, tokens, positions)
    print(f"held-out logits ({args.eval_samples} validation samples x {cfg.seq_length} tokens): relative L2 "
          f"change {change['rel_l2']:.3e}, max |change| {change['max_abs']:.3e}; "
          f"loss {change['loss_src']:.4f} -> {change['loss_dst']:.4f}")

    out = Path(out_cfg.run_dir)
    dtype = _source_dtype(cfg, run)
    dst = dst.to(dtype)
    extra = {"consumed_samples": 0, "global_batch_size": out_cfg.global_batch_size,
             "seq_length": out_cfg.seq_length, "preset": out_cfg.preset,
             "converted_from": str(checkpoint.iteration_dir(root, iteration)), "source_iteration": iteration}
    checkpoint.save_weights_only(out / "checkpoints", 0, dst, extra)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(out_cfg), indent=2) + "\n")
    command = resume_command(out_cfg)
    manifest = {"conversion": args.conversion, "source": str(path), "groups": args.groups,
                "kv_lora_rank": out_cfg.kv_lora_rank, **report, "logit_change": change,
                "resume_command": command}
    (out / "convert.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out} (weights-only checkpoint at iteration 0, {str(dtype).replace('torch.', '')}); "
          f"fine-tune it with a fresh optimizer:\n  {' '.join(command)}")
    return 0
