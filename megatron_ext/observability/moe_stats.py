"""MoE run state: per-layer routing statistics, FP8 saturation, routing traces and their replay.

One process-wide :class:`MoERunState` (``STATE``) is fed by every fused MoE layer's forward and
read by the training loop once per optimizer step, so the layers never sync the host for it.

Statistics (per layer, summed over the micro-batches of a step and over the run):

* ``load``: (token, choice) pairs that chose each expert (before capacity dropping);
* ``dropped_fraction``: pairs dropped by the capacity limit / all pairs;
* ``aux_loss``, ``z_loss``: mean per micro-batch, including their coefficients;
* ``fp8_saturation``: fraction of router logits / expert weights with ``|v| > 448``, the largest
  finite FP8 E4M3 value (OCP FP8 spec); above 0.1% a per-tensor scaled FP8 recipe clips often
  enough to matter, so a warning is logged.

Routing trace layout (``--moe-routing-trace-out DIR``)::

    DIR/meta.json                                    shapes and lane of the traced run
    DIR/rank{R:03d}/iter{I:07d}/layer{L:03d}_mb{M:03d}.pt
        uint16 tensor [micro_batch_size, seq_length, topk]: expert ids of each token of
        micro-batch M of training iteration I (1-based) at global layer L on global rank R

Files are written by a background thread (the device->host copy is asynchronous), so the forward
pass only enqueues. ``--moe-routing-replay DIR`` reads the same files back.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import torch

log = logging.getLogger("megatron_ext.moe")

FP8_E4M3_MAX = 448.0
SATURATION_WARN = 1e-3


def trace_file(root, rank: int, iteration: int, micro_batch: int, layer: int) -> Path:
    return Path(root) / f"rank{rank:03d}" / f"iter{iteration:07d}" / f"layer{layer:03d}_mb{micro_batch:03d}.pt"


def fp8_saturation(t: torch.Tensor) -> torch.Tensor:
    """Fraction of entries with ``|v| > 448`` (device scalar, no host sync)."""
    return (t.detach().abs() > FP8_E4M3_MAX).float().mean()


class _TraceWriter:
    def __init__(self):
        self.q: "queue.Queue" = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="moe-trace-writer")
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            path, host, event = item
            try:
                if event is not None:
                    event.synchronize()
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(host.to(torch.uint16), path)
            except Exception:  # a failed trace write must not kill training; it is logged
                log.exception("writing routing trace %s failed", path)
            finally:
                self.q.task_done()

    def put(self, path: Path, ids: torch.Tensor):
        if ids.is_cuda:
            host = torch.empty(ids.shape, dtype=torch.int32, pin_memory=True)
            host.copy_(ids.to(torch.int32), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = ids.to(torch.int32).clone(), None
        self.q.put((path, host, event))

    def flush(self):
        self.q.join()


class MoERunState:
    """Iteration bookkeeping, statistics accumulators and trace I/O of the current run."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.iteration = 0
        self.rank = 0
        self.trace_out: Optional[str] = None
        self.replay: Optional[str] = None
        self.monitor_interval = 10
        self._mb: Dict[int, int] = {}
        self._step: Dict[int, Dict[str, Any]] = {}
        self.run: Dict[int, Dict[str, Any]] = {}
        self._writer: Optional[_TraceWriter] = None

    # ---- run / step lifecycle (training loop)
    def configure(self, moe, rank: int, meta: Optional[dict] = None):
        self.reset()
        self.rank = rank
        self.trace_out = moe.routing_trace_out
        self.replay = moe.routing_replay
        self.monitor_interval = moe.monitor_interval
        if self.trace_out is not None:
            self._writer = _TraceWriter()
            if rank == 0 and meta is not None:
                Path(self.trace_out).mkdir(parents=True, exist_ok=True)
                (Path(self.trace_out) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def begin_step(self, iteration: int):
        """``iteration``: the 1-based number of the training step about to run."""
        self.iteration = iteration
        self._mb.clear()
        self._step.clear()

    @property
    def monitor_now(self) -> bool:
        return self.iteration > 0 and self.iteration % self.monitor_interval == 0

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    # ---- per-layer calls from the forward pass
    def micro_batch(self, layer: int, advance: bool) -> int:
        """Index of the current micro-batch at ``layer`` this step. ``advance=False`` peeks (the
        no-grad first pass of activation recompute sees the same micro-batch as its re-run)."""
        m = self._mb.get(layer, 0)
        if advance:
            self._mb[layer] = m + 1
        return m

    def write_trace(self, layer: int, micro_batch: int, ids_bsk: torch.Tensor):
        path = trace_file(self.trace_out, self.rank, self.iteration, micro_batch, layer)
        self._writer.put(path, ids_bsk)

    def read_trace(self, layer: int, micro_batch: int, shape) -> torch.Tensor:
        path = trace_file(self.replay, self.rank, self.iteration, micro_batch, layer)
        if not path.is_file():
            raise ValueError(f"moe_routing_replay={self.replay!r}: no trace for iteration "
                             f"{self.iteration}, micro-batch {micro_batch}, layer {layer} ({path}); "
                             "use a trace of at least as many iterations as this run")
        ids = torch.load(path)
        if tuple(ids.shape) != tuple(shape):
            raise ValueError(f"moe_routing_replay={self.replay!r}: {path.name} holds shape "
                             f"{tuple(ids.shape)}; this run needs {tuple(shape)} ([batch, seq, topk])")
        return ids.to(torch.int64)

    def record(self, layer: int, load: torch.Tensor, dropped: torch.Tensor, pairs: int,
               aux_loss: torch.Tensor, z_loss: torch.Tensor,
               logits_saturation: Optional[torch.Tensor] = None):
        s = self._step.get(layer)
        if s is None:
            s = self._step[layer] = {"load": torch.zeros_like(load), "dropped": 0, "pairs": 0,
                                     "aux_loss": 0, "z_loss": 0, "n": 0, "logits_sat": None}
        s["load"] = s["load"] + load.detach()
        s["dropped"] = s["dropped"] + dropped.detach()
        s["pairs"] += pairs
        s["aux_loss"] = s["aux_loss"] + aux_loss.detach()
        s["z_loss"] = s["z_loss"] + z_loss.detach()
        s["n"] += 1
        if logits_saturation is not None:
            s["logits_sat"] = logits_saturation if s["logits_sat"] is None else \
                torch.maximum(s["logits_sat"], logits_saturation)

    # ---- step end (training loop): host values, once per step
    def end_step(self, layers: Dict[int, Any]) -> Dict[str, Any]:
        """Summarise this step. ``layers``: global layer number -> fused MoE layer (for the bias
        and the expert weights). Returns a JSON-able row for metrics.jsonl."""
        out: Dict[str, Any] = {}
        for layer, s in sorted(self._step.items()):
            n = max(s["n"], 1)
            load = s["load"].float().cpu()
            row = {"load": [round(float(v), 1) for v in load],
                   "dropped_fraction": float(s["dropped"]) / max(s["pairs"], 1),
                   "aux_loss": float(s["aux_loss"]) / n, "z_loss": float(s["z_loss"]) / n}
            mod = layers.get(layer)
            bias = getattr(mod, "router_expert_bias", None) if mod is not None else None
            if bias is not None:
                b = bias.detach().float().cpu()
                row["expert_bias"] = {"min": float(b.min()), "max": float(b.max()),
                                      "mean_abs": float(b.abs().mean())}
            if s["logits_sat"] is not None or (self.monitor_now and mod is not None):
                sat = {}
                if s["logits_sat"] is not None:
                    sat["router_logits"] = float(s["logits_sat"])
                if mod is not None:
                    sat.update({name: float(fp8_saturation(w)) for name, w in mod.expert_weights().items()})
                row["fp8_saturation"] = sat
                for name, frac in sat.items():
                    if frac > SATURATION_WARN:
                        log.warning("MoE layer %d: %.3f%% of %s exceed the FP8 E4M3 range (|v| > 448) "
                                    "at iteration %d", layer, 100 * frac, name, self.iteration)
            out[str(layer)] = row
            self._accumulate_run(layer, load, row, s["pairs"], float(s["dropped"]))
        self._step.clear()
        return out

    def _accumulate_run(self, layer: int, load: torch.Tensor, row: dict, pairs: int, dropped: float):
        r = self.run.setdefault(layer, {"load": torch.zeros_like(load), "pairs": 0, "dropped": 0.0})
        r["load"] += load
        r["pairs"] += pairs
        r["dropped"] += dropped
        r["last"] = row
        if "fp8_saturation" in row:
            r["fp8"] = row["fp8_saturation"]

    def summary(self) -> Dict[str, Any]:
        """``receipt["moe"]["layers"]``: run-total load histogram, dropped fraction, the last
        step's losses, bias state and FP8 saturation per layer."""
        layers = {}
        for layer, r in sorted(self.run.items()):
            load = r["load"]
            total = float(load.sum()) or 1.0
            last = r.get("last", {})
            layers[str(layer)] = {
                "load": [round(float(v), 1) for v in load],
                "load_fraction": [round(float(v) / total, 4) for v in load],
                "max_over_mean_load": float(load.max() / load.mean()) if float(load.mean()) > 0 else None,
                "dropped_fraction": r["dropped"] / max(r["pairs"], 1),
                "aux_loss": last.get("aux_loss"), "z_loss": last.get("z_loss"),
                "expert_bias": last.get("expert_bias"), "fp8_saturation": r.get("fp8"),
            }
        return layers


STATE = MoERunState()
