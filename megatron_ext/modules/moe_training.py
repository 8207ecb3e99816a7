"""The training loop's side of the fused MoE layer: step bookkeeping, the once-per-step expert
bias update, MoE rows in metrics.jsonl (and TensorBoard when it imports) and ``receipt["moe"]``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_ext import compat
from megatron_ext.config import moe_layer_numbers
from megatron_ext.observability.files import append_jsonl
from megatron_ext.observability.moe_stats import STATE

log = logging.getLogger("megatron_ext.moe")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: its absence only skips these scalars
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class MoETrainingHooks:
    """No-op unless the model has fused MoE layers."""

    def __init__(self, cfg, tconfig, rank: int, world_size: int, model_chunks, run_dir: Path):
        moe = getattr(tconfig, "moe", None)
        self.active = moe is not None and moe.impl == "fused"
        self.chunks = model_chunks
        self.tconfig = tconfig
        self.moe = moe
        self.rank0 = rank == 0
        self.tb = None
        self.steps = 0
        if not self.active:
            return
        meta = {"format": "uint16 [micro_batch_size, seq_length, topk] per layer per micro-batch",
                "num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "topk": cfg.moe_router_topk,
                "seq_length": cfg.seq_length, "micro_batch_size": cfg.micro_batch_size,
                "world_size": world_size, "expert_model_parallel_size": cfg.expert_model_parallel_size,
                "moe_layers": moe_layer_numbers(cfg)}
        STATE.configure(moe, rank, meta)
        if self.rank0:
            self.tb = _tensorboard(run_dir)

    def begin_step(self, iteration: int) -> None:
        """``iteration``: the 1-based number of the step about to run."""
        if self.active:
            STATE.begin_step(iteration)

    def end_step(self, iteration: int, metrics_path: Path, last: bool) -> None:
        if not self.active:
            return
        from megatron_ext.modules.moe import moe_step_end

        # Megatron's finalize_model_grads (the DDP lane; FSDP2 has none) already moved the biases
        # it knows how to move
        finalized = getattr(self.tconfig, "finalize_model_grads_func", None) is not None
        layers = moe_step_end(self.chunks, compat.megatron_router_updates() if finalized else ())
        compat.clear_moe_aux_loss_tracker()
        self.steps += 1
        if not self.rank0 or not (last or iteration % self.moe.monitor_interval == 0 or iteration == 1):
            return
        append_jsonl(metrics_path, {"kind": "moe", "step": iteration, "layers": layers})
        if self.tb is not None:
            for layer, row in layers.items():
                self.tb.add_scalar(f"moe/layer{layer}/dropped_fraction", row["dropped_fraction"], iteration)
                self.tb.add_scalar(f"moe/layer{layer}/aux_loss", row["aux_loss"], iteration)
                self.tb.add_scalar(f"moe/layer{layer}/z_loss", row["z_loss"], iteration)
                load = row["load"]
                mean = sum(load) / max(len(load), 1)
                if mean > 0:
                    self.tb.add_scalar(f"moe/layer{layer}/max_over_mean_load", max(load) / mean, iteration)

    def receipt(self) -> Optional[Dict[str, Any]]:
        if not self.active:
            return None
        STATE.close()   # the run is over: traces and routing log written, writer threads ended
        if self.tb is not None:
            self.tb.close()
        from megatron_ext.modules.moe import fused_moe_layers

        mods = fused_moe_layers(self.chunks)
        first = next(iter(mods.values()), None)
        return {
            "impl": "fused", "backend_requested": self.moe.backend, "deterministic": self.moe.deterministic,
            "routing_trace_out": self.moe.routing_trace_out, "routing_replay": self.moe.routing_replay,
            "monitor_interval": self.moe.monitor_interval, "steps": self.steps,
            "router": None if first is None else {k: v for k, v in vars(first.router_cfg).items()},
            "activation": None if first is None else first.activation,
            "options": None if first is None else first.options(),
            "layers": STATE.summary(),
        }
