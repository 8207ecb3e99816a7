"""``megatron-ext train``: set up, train, checkpoint, resume, and write the run folder.

Order matters for the user: the config is validated before this module is entered; here the run
folder is created only after the process group, data and model are up, so a failure in set-up
leaves nothing half-written behind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from megatron_ext import backends, compat
from megatron_ext.config import ConfigError, TrainConfig, expert_tensor_parallel_size
from megatron_ext.observability.files import append_jsonl, read_jsonl, write_jsonl
from megatron_ext.observability.plot import plot_loss
from megatron_ext.observability.progress import Progress
from megatron_ext.observability.receipt import (
    Clock,
    build_receipt,
    device_name,
    peak_memory_bytes,
    write_json_atomic,
)
from megatron_ext.training import checkpoint, faults
from megatron_ext.training.distributed import DistEnv, barrier, init_distributed
from megatron_ext.training.model import build_gpt, count_parameters, transformer_config

log = logging.getLogger("megatron_ext.train")


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """The folder of this run: explicit, the newest of this preset when resuming, or a new one."""
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    root = Path(cfg.runs_root)
    if cfg.resume:
        candidates = sorted(p for p in root.glob(f"{cfg.preset}-*")
                            if checkpoint.latest_iteration(p / "checkpoints") is not None)
        if candidates:
            return candidates[-1]
        raise ConfigError(f"resume=True: no run of preset {cfg.preset!r} with a checkpoint under "
                         f"{str(root)!r}; run without --resume first, or pass --run-dir")
    return root / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _broadcast_str(value: str) -> str:
    obj = [value]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


class _Batches:
    """Moves micro-batches to the device and accounts the time spent waiting for data."""

    def __init__(self, it: Iterator[Dict[str, torch.Tensor]], device: torch.device):
        self.it, self.device = it, device
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.it)
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.seconds += time.perf_counter() - t0
        return out


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss = (per_token_loss.reshape(-1).float() * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the micro-batch count
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    # loss_mask: the MTP layers' losses (--mtp-num-layers) mask the same tokens as the LM loss
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, functools.partial(_loss_func, batch["loss_mask"])


def _reduce_loss(losses: List[dict], env: DistEnv) -> float:
    """Mean lm loss over micro-batches and data-parallel replicas, visible on every rank."""
    from megatron.core import parallel_state as ps

    value = torch.zeros(2, dtype=torch.float64, device=env.device)
    reporter = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_context_parallel_rank() == 0)
    if reporter and losses:
        value[0] = torch.stack([d["lm loss"].double() for d in losses]).mean()
        value[1] = 1.0
    torch.distributed.all_reduce(value)
    return float(value[0] / value[1].clamp(min=1))


def _reduce_mtp_losses(depths: int, num_micro: int, env: DistEnv) -> List[float]:
    """The step's loss of each MTP depth (a micro-batch's mean token loss, averaged over
    micro-batches and data-parallel replicas; unscaled, as Megatron logs ``mtp_N loss``), visible
    on every rank. Every rank calls it: the MTP layers live on the last pipeline stage, whose
    tensor-parallel rank 0s contribute. Empties Megatron's MTP tracker for the next step."""
    from megatron.core import parallel_state as ps

    value = torch.zeros(depths + 1, dtype=torch.float64, device=env.device)
    mine = compat.take_mtp_losses()
    if mine is not None and ps.get_tensor_model_parallel_rank() == 0:
        value[:depths] = mine.to(value.device) / num_micro
        value[depths] = 1.0
    torch.distributed.all_reduce(value)
    return (value[:depths] / value[depths].clamp(min=1)).tolist()


def train(cfg: TrainConfig, dp_size: int) -> Dict[str, Any]:
    """One training run (every rank calls it). With ``deterministic_mode`` torch's deterministic
    algorithms and the determinism environment hold for the run and are put back after it, so a
    later run in the same process (tests) starts as it would in a fresh one."""
    if not cfg.deterministic_mode:
        return _train(cfg, dp_size)
    from megatron_ext.config import DETERMINISM_ENV

    saved_env = {name: os.environ.get(name) for name in DETERMINISM_ENV}
    saved_mode = torch.are_deterministic_algorithms_enabled()
    for name, allowed in DETERMINISM_ENV.items():   # before cuBLAS / NCCL start in this process
        os.environ.setdefault(name, allowed[0])
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, dp_size)
    finally:
        torch.use_deterministic_algorithms(saved_mode)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _train(cfg: TrainConfig, dp_size: int) -> Dict[str, Any]:
    clock = Clock()
    startup = time.perf_counter()
    backends.reset()  # the receipt lists this run's choices, not an earlier run's in this process
    from megatron_ext.training.distributed import pick_lane

    lane = pick_lane(cfg.device)
    env = init_distributed(lane)
    rank0 = env.rank == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Megatron logs every parameter and the whole optimizer config at INFO; keep its warnings.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for name, present in (("Transformer Engine", compat.HAVE_TE), ("apex", compat.HAVE_APEX)):
        log.info("%s: %s", name, "present, used where the spec asks for it" if present
                 else "absent; the layer spec uses its own norm and SDPA attention")

    import patches

    patches.apply_patches(lane)
    compat.check_mcore_supported()
    compat.initialize_model_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                     cfg.expert_model_parallel_size, cfg.context_parallel_size,
                                     etp=cfg.expert_tensor_parallel_size)
    compat.seed_model_parallel(cfg.seed)
    torch.manual_seed(cfg.seed)

    from megatron.core import parallel_state as ps

    run_dir = Path(_broadcast_str(str(resolve_run_dir(cfg))))
    bf16 = cfg.bf16 if cfg.bf16 is not None else lane == "cuda"

    # Data through Megatron's pipeline (IndexedDataset .bin/.idx -> GPTDataset).
    from megatron_ext import data as mdata

    with clock.phase("data"):
        tokenizer = mdata.ByteTokenizer()
        cache_dir = Path(cfg.data_cache_dir or Path(cfg.runs_root) / ".data-cache")
        prefix = mdata.resolve_data(cfg.data_path, cache_dir, tokenizer)
        train_samples = cfg.train_iters * cfg.global_batch_size
        eval_rounds = cfg.train_iters // cfg.eval_interval + 1
        valid_samples = max(1, eval_rounds * cfg.eval_iters * cfg.global_batch_size)
        train_ds, valid_ds = mdata.build_gpt_datasets(
            prefix, tokenizer, cfg.seq_length, cfg.seed, train_samples, valid_samples, cache_dir)

    tconfig = transformer_config(cfg, lane, bf16)
    fsdp2 = cfg.use_torch_fsdp2
    if fsdp2:  # the fp32 shards are the master weights; FSDP2 gathers bf16 copies to compute
        tconfig.params_dtype = torch.float32
    model = build_gpt(cfg, tconfig, tokenizer.vocab_size)
    if lane == "cuda":
        model.cuda(env.device)
    n_params = count_parameters(model)

    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    module = model
    if fsdp2:  # sharded grads are reduce-scattered by FSDP2 itself: no finalize step
        from megatron_ext.training import fsdp

        ddp = fsdp.FullyShardedGPT(model, bf16, lane)
        optimizer = fsdp.ShardedAdam(ddp, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), clip_grad=cfg.clip_grad)
    else:
        if bf16:
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(tconfig, model)
        ddp = DistributedDataParallel(
            tconfig, compat.ddp_config(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                       use_distributed_optimizer=cfg.use_distributed_optimizer), module)
        tconfig.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            compat.optimizer_config(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                                    weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
                                    adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad, bf16=bf16,
                                    params_dtype=tconfig.params_dtype,
                                    use_distributed_optimizer=cfg.use_distributed_optimizer),
            [ddp])
    ckpt_model = ddp if fsdp2 else ddp.module  # FSDP2 writes its shards in the DDP lane's layout
    gbs = cfg.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gbs, lr_decay_steps=cfg.train_iters * gbs,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gbs, wd_incr_style="constant")
    fwd_bwd = get_forward_backward_func()
    num_micro = gbs // (cfg.micro_batch_size * dp_size)

    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    start_iter, consumed = 0, 0
    if cfg.resume:
        with clock.phase("checkpoint"):
            loaded = checkpoint.load(ckpt_root, ckpt_model, optimizer, scheduler,
                                     distributed_optimizer=cfg.use_distributed_optimizer)
        if loaded is None:
            raise ConfigError(f"resume=True: no checkpoint in {str(ckpt_root)!r}; "
                             "run without --resume to start fresh")
        start_iter, extra = loaded
        consumed = int(extra["consumed_samples"])
        if int(extra["global_batch_size"]) != gbs or int(extra["seq_length"]) != cfg.seq_length:
            raise ConfigError(f"global_batch_size={gbs}, seq_length={cfg.seq_length}: differ from the "
                             f"checkpoint's {extra['global_batch_size']}, {extra['seq_length']}; "
                             "resume with the same batch and sequence length")

    dp_rank = ps.get_data_parallel_rank()
    train_it = _Batches(mdata.make_data_iterator(train_ds, cfg.micro_batch_size, dp_rank, dp_size,
                                                 consumed), env.device)

    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:  # keep the curve up to the resumed iteration; later points are re-made
            rows = [r for r in read_jsonl(metrics_path) if r["step"] <= start_iter]
            write_jsonl(metrics_path, rows)
        elif metrics_path.exists():
            metrics_path.unlink()
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    barrier()
    clock.add("startup", time.perf_counter() - startup - clock.phases.get("data", 0.0)
              - clock.phases.get("checkpoint", 0.0))

    from megatron_ext.modules.moe_training import MoETrainingHooks

    # Megatron's MTP and MoE aux-loss trackers are class-level, sized by the first model that logs
    # into them: start them afresh for this run's layer count (an earlier run in this process may
    # have had fewer layers, or no MTP layers)
    compat.take_mtp_losses(drop=True)
    compat.clear_moe_aux_loss_tracker(drop=True)
    moe_hooks = MoETrainingHooks(cfg, tconfig, env.rank, env.world_size, [ddp.module], run_dir)
    from megatron_ext.modules import indexer as indexer_hooks  # top-k layers: warm-up step + KL log
    tokens_per_step = gbs * cfg.seq_length
    progress = Progress(cfg.train_iters, start_iter, cfg.progress, rank0, cfg.log_interval)
    progress.write(f"megatron-ext train | preset {cfg.preset} | {n_params / 1e6:.2f}M params on this rank "
                   f"| lane tp={cfg.tensor_model_parallel_size} pp={cfg.pipeline_model_parallel_size} "
                   f"ep={cfg.expert_model_parallel_size}"
                   f"{f' etp={expert_tensor_parallel_size(cfg)}' if cfg.num_experts else ''} "
                   f"dp={dp_size}{' (fsdp2)' if fsdp2 else ''} sp={cfg.sequence_parallel} "
                   f"| {env.lane} ({device_name(env.lane)}) | {'bf16' if bf16 else 'fp32'} "
                   f"| run folder {run_dir}")
    if cfg.resume:
        progress.write(f"resumed from iteration {start_iter} ({consumed} samples consumed)")

    step_times: List[float] = []
    first_loss: Optional[float] = None
    loss = float("nan")
    mtp_losses: List[float] = []
    eval_loss: Optional[float] = None
    stop_at = cfg.train_iters if cfg.exit_after_iters is None else min(cfg.train_iters, cfg.exit_after_iters)
    iteration = start_iter
    watchdog = faults.StepWatchdog(cfg.hang_dump_seconds, env.rank)
    from megatron_ext.training.profiling import StepProfiler

    profiler = StepProfiler(cfg.profile, cfg.profile_step_start, cfg.profile_step_end,
                            cfg.use_pytorch_profiler, env.rank, run_dir, lane == "cuda")
    while iteration < stop_at:
        watchdog.arm(iteration + 1)
        profiler.begin(iteration + 1)
        t0 = time.perf_counter()
        data_before = train_it.seconds
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        moe_hooks.begin_step(iteration + 1)
        indexer_hooks.begin_step(iteration + 1, num_micro)
        losses = fwd_bwd(forward_step_func=_forward_step, data_iterator=train_it, model=[ddp],
                         num_microbatches=num_micro, seq_length=cfg.seq_length,
                         micro_batch_size=cfg.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        moe_hooks.end_step(iteration + 1, metrics_path, last=iteration + 1 == stop_at)
        indexer_hooks.end_step(iteration + 1, metrics_path if rank0 else None)
        scheduler.step(increment=gbs)
        loss = _reduce_loss(losses, env)
        mtp_losses = _reduce_mtp_losses(cfg.mtp_num_layers, num_micro, env) if cfg.mtp_num_layers else []
        mtp_named = {f"mtp_{d} loss": v for d, v in enumerate(mtp_losses, 1)}   # Megatron's names
        watchdog.disarm()
        iteration += 1
        consumed += gbs
        dt = time.perf_counter() - t0
        data_dt = train_it.seconds - data_before
        clock.add("data", data_dt)
        clock.add("train", dt - data_dt)
        step_times.append(dt)
        profiler.end(iteration)  # after the step's clock: writing the trace is not step time
        first_loss = loss if first_loss is None else first_loss
        lr = optimizer.param_groups[0]["lr"]
        if rank0:
            append_jsonl(metrics_path, {"kind": "train", "step": iteration, "loss": loss, "lr": lr,
                                         "grad_norm": grad_norm, "step_s": dt, **mtp_named})
        progress.update(iteration, loss, tokens_per_step / dt, lr, grad_norm, mtp_named)
        if cfg.eval_iters and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters):
            with clock.phase("eval"):
                eval_loss = _evaluate(cfg, ddp, fwd_bwd, valid_ds, env, dp_rank, dp_size, num_micro)
            if rank0:
                append_jsonl(metrics_path, {"kind": "eval", "step": iteration, "loss": eval_loss})
            progress.write(f"iter {iteration:>6} | validation loss {eval_loss:.4f}")
        if iteration % cfg.save_interval == 0 or iteration == cfg.train_iters:
            with clock.phase("checkpoint"):
                checkpoint.save(ckpt_root, iteration, ckpt_model, optimizer, scheduler,
                                {"consumed_samples": consumed, "global_batch_size": gbs,
                                 "seq_length": cfg.seq_length, "preset": cfg.preset,
                                 checkpoint.DISTRIBUTED_OPTIMIZER: cfg.use_distributed_optimizer})
            progress.write(f"iter {iteration:>6} | saved checkpoint {checkpoint.iteration_dir(ckpt_root, iteration)}")
        faults.maybe_kill(env.rank, iteration)  # test-only (MEGATRON_EXT_TEST_KILL_RANK); no-op unset
    progress.close()
    # The first step pays one-time costs (kernel selection, lazy init, any torch.compile of
    # Megatron's fused helpers): count its excess over the median step as compile/warm-up badput.
    if len(step_times) > 1:
        excess = max(0.0, step_times[0] - sorted(step_times)[len(step_times) // 2])
        clock.add("train", -excess)
        clock.add("compile_warmup", excess)

    receipt = build_receipt(
        config=dataclasses.asdict(cfg),
        versions=compat.package_versions(),
        runtime={**compat.runtime_flags(), "python": _python_version(),
                 "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                 "parameters_on_rank0": n_params, "dtype": "bf16" if bf16 else "fp32"},
        device=device_name(env.lane),
        lane={"tp": cfg.tensor_model_parallel_size, "pp": cfg.pipeline_model_parallel_size,
              "cp": cfg.context_parallel_size, "ep": cfg.expert_model_parallel_size,
              "etp": expert_tensor_parallel_size(cfg) if cfg.num_experts else None, "dp": dp_size, "fsdp2": fsdp2,
              "sp": cfg.sequence_parallel, "world_size": env.world_size, "backend": env.backend,
              "device_lane": env.lane},
        backends=backends.records(),
        patches=patches.applied(),
        clock=clock,
        step_times=step_times,
        tokens_per_step=tokens_per_step,
        losses={"first": first_loss, "final": loss, "final_validation": eval_loss,
                "start_iteration": start_iter, "final_iteration": iteration,
                **({"final_mtp": mtp_losses} if cfg.mtp_num_layers else {})},
        memory=peak_memory_bytes(env.lane),
    )
    moe_receipt = moe_hooks.receipt()
    if moe_receipt is not None:
        receipt["moe"] = moe_receipt
    if rank0:
        plot_loss(metrics_path, run_dir / "loss.png",
                  f"{cfg.preset}: byte-level GPT, {n_params / 1e6:.2f}M params ({env.lane})")
        write_json_atomic(run_dir / "receipt.json", receipt)
        progress.write(f"done: loss {first_loss if first_loss is not None else float('nan'):.4f} -> "
                       f"{loss:.4f} | {receipt['throughput']['tokens_per_s'] or 0:,.0f} tok/s | goodput "
                       f"{receipt['goodput']['goodput_fraction']:.0%} | wrote {run_dir / 'receipt.json'}, "
                       f"{run_dir / 'loss.png'}")
    receipt["run_dir"] = str(run_dir)
    return receipt


def _evaluate(cfg, ddp, fwd_bwd, valid_ds, env, dp_rank, dp_size, num_micro) -> float:
    from megatron_ext import data as mdata

    # Every evaluation reads the same validation samples so the curve is comparable across steps.
    it = _Batches(mdata.make_data_iterator(valid_ds, cfg.micro_batch_size, dp_rank, dp_size, 0),
                  env.device)
    ddp.eval()
    values = []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            losses = fwd_bwd(forward_step_func=_forward_step, data_iterator=it, model=[ddp],
                             num_microbatches=num_micro, seq_length=cfg.seq_length,
                             micro_batch_size=cfg.micro_batch_size, forward_only=True)
            values.append(_reduce_loss(losses, env))
    ddp.train()
    return sum(values) / len(values)


def _python_version() -> str:
    import platform

    return platform.python_version()
