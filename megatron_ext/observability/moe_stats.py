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

Routing log layout (``--moe-routing-log DIR``), one JSON object per line, appended by a background
thread through a bounded queue (at most ``LOG_QUEUE_SIZE`` records in flight; a full queue makes
the forward pass wait rather than drop records)::

    DIR/rank{R:05d}.jsonl
    {"iteration": I, "micro_batch": M, "layer": L, "rank": R, "batch": b, "seq": s, "topk": k,
     "expert_ids": [[[e, ...k], ...s], ...b], "probs": [[[p, ...k], ...s], ...b]}

``expert_ids[i][j]`` / ``probs[i][j]`` belong to the token at batch row i, sequence position j of
micro-batch M (the gates after normalisation and scaling, 0 for a pair dropped by capacity).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

log = logging.getLogger("megatron_ext.moe")

FP8_E4M3_MAX = 448.0
SATURATION_WARN = 1e-3


def trace_file(root, rank: int, iteration: int, micro_batch: int, layer: int) -> Path:
    return Path(root) / f"rank{rank:03d}" / f"iter{iteration:07d}" / f"layer{layer:03d}_mb{micro_batch:03d}.pt"


def fp8_saturation(t: torch.Tensor) -> torch.Tensor:
    """Fraction of entries with ``|v| > 448`` (device scalar, no host sync)."""
    return (t.detach().abs() > FP8_E4M3_MAX).float().mean()


TRACE_QUEUE_SIZE = 256
LOG_QUEUE_SIZE = 64


class _BackgroundWriter:
    """Writes host copies of device tensors on a daemon thread. ``put`` starts the device->host
    copies without waiting for them (pinned memory + an event on CUDA) and enqueues; the queue is
    bounded so a slow disk cannot pile up host memory: ``put`` then blocks until room frees."""

    def __init__(self, name: str, maxsize: int):
        self.name = name
        self.q: "queue.Queue" = queue.Queue(maxsize=maxsize)
        self._start()

    def _start(self):
        self.thread = threading.Thread(target=self._run, daemon=True, name=self.name)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            write, hosts, event = item
            try:
                if event is not None:
                    event.synchronize()
                write(*hosts)
            except Exception:  # a failed write must not kill training; it is logged
                log.exception("MoE background write failed")
            finally:
                self.q.task_done()

    def put(self, write: Callable, *tensors: torch.Tensor):
        event = None
        hosts = []
        for t in tensors:
            if t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
            else:
                host = t.clone()
            hosts.append(host)
        if any(t.is_cuda for t in tensors):
            event = torch.cuda.Event()
            event.record()
        if not self.thread.is_alive():   # closed at the run's end; a put after it starts it again
            self._start()
        self.q.put((write, hosts, event))

    def flush(self):
        self.q.join()

    def close(self):
        """Write what is queued, then end the thread (a process that trains several times, or a
        notebook, would otherwise keep one idle thread per run). A later ``put`` starts it again."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()


def _save_trace(path: Path, ids: torch.Tensor):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids.to(torch.uint16), path)


class _RoutingLog:
    """Appends routing records to ``DIR/rank{R:05d}.jsonl`` (on the writer thread only)."""

    def __init__(self, root: str, rank: int):
        self.path = Path(root) / f"rank{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    def write(self, head: dict, ids: torch.Tensor, probs: torch.Tensor):
        b, s, k = ids.shape
        row = dict(head, rank=self.rank, batch=b, seq=s, topk=k, expert_ids=ids.tolist(), probs=probs.tolist())
        with self.path.open("a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


class MoERunState:
    """Iteration bookkeeping, statistics accumulators and trace I/O of the current run."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.close()
        self.iteration = 0
        self.rank = 0
        self.trace_out: Optional[str] = None
        self.replay: Optional[str] = None
        self.monitor_interval = 10
        self._mb: Dict[int, int] = {}
        self._step: Dict[int, Dict[str, Any]] = {}
        self.run: Dict[int, Dict[str, Any]] = {}
        self.routing_log: Optional[str] = None
        self._writer: Optional[_BackgroundWriter] = None
        self._log_writer: Optional[_BackgroundWriter] = None
        self._log: Optional[_RoutingLog] = None

    # ---- run / step lifecycle (training loop)
    def configure(self, moe, rank: int, meta: Optional[dict] = None):
        self.reset()
        self.rank = rank
        self.trace_out = moe.routing_trace_out
        self.replay = moe.routing_replay
        self.monitor_interval = moe.monitor_interval
        self.routing_log = getattr(moe, "routing_log", None)
        if self.routing_log is not None:
            self._log = _RoutingLog(self.routing_log, rank)
            self._log_writer = _BackgroundWriter("moe-routing-log", LOG_QUEUE_SIZE)
        if self.trace_out is not None:
            self._writer = _BackgroundWriter("moe-trace-writer", TRACE_QUEUE_SIZE)
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
        for w in (self._writer, self._log_writer):
            if w is not None:
                w.flush()

    def close(self):
        """The run is over: write what is queued and stop the writer threads."""
        for w in (getattr(self, "_writer", None), getattr(self, "_log_writer", None)):
            if w is not None:
                w.close()

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
        self._writer.put(lambda ids: _save_trace(path, ids), ids_bsk.to(torch.int32))

    def log_routing(self, layer: int, micro_batch: int, ids_sbk: torch.Tensor, probs_sbk: torch.Tensor):
        """Enqueue one routing-log record; ``ids_sbk``/``probs_sbk`` ``[s, b, k]`` (Megatron's
        layout), written as ``[b, s, k]``."""
        head = {"iteration": self.iteration, "micro_batch": micro_batch, "layer": layer}
        self._log_writer.put(lambda ids, probs: self._log.write(head, ids, probs),
                             ids_sbk.permute(1, 0, 2).to(torch.int32), probs_sbk.permute(1, 0, 2).float())

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
            for attr, key in (("router_expert_bias", "expert_bias"), ("router_qb_beta", "qb_beta")):
                bias = getattr(mod, attr, None) if mod is not None else None
                if bias is not None:   # the aux-loss-free or the quantile-balancing bias
                    b = bias.detach().float().cpu()
                    row[key] = {"min": float(b.min()), "max": float(b.max()), "mean_abs": float(b.abs().mean())}
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
                "expert_bias": last.get("expert_bias"), "qb_beta": last.get("qb_beta"),
                "fp8_saturation": r.get("fp8"),
            }
        return layers


STATE = MoERunState()
