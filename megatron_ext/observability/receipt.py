"""Goodput accounting and the run receipt (``receipt.json``).

Wall time is split into named phases. ``train`` (forward, backward and optimizer step) is goodput;
everything else (startup, data, checkpoint, eval, compile) is badput, reported by phase.
"""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_ext.observability.files import write_text_atomic

GOODPUT_PHASES = ("train",)


class Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.phases: Dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def summary(self) -> Dict[str, Any]:
        wall = time.perf_counter() - self.start
        good = sum(self.phases.get(p, 0.0) for p in GOODPUT_PHASES)
        badput = {k: round(v, 4) for k, v in self.phases.items() if k not in GOODPUT_PHASES}
        badput["other"] = round(max(0.0, wall - sum(self.phases.values())), 4)
        return {
            "wall_s": round(wall, 4),
            "goodput_s": round(good, 4),
            "goodput_fraction": round(good / wall, 4) if wall > 0 else 0.0,
            "badput_s": badput,
        }


def percentiles(values: List[float], qs=(50, 90, 99)) -> Dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for q in qs:
        # nearest-rank percentile: no interpolation, so p50 of [a, b] is a
        idx = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
        out[f"p{q}"] = ordered[idx]
    out["mean"] = statistics.fmean(ordered)
    return out


def device_name(lane: str) -> str:
    if lane == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def peak_memory_bytes(lane: str) -> Dict[str, int]:
    out = {"host_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if lane == "cuda" and torch.cuda.is_available():
        out["device_max_allocated"] = torch.cuda.max_memory_allocated()
        out["device_max_reserved"] = torch.cuda.max_memory_reserved()
    return out


def write_json_atomic(path: Path, payload: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def build_receipt(*, config: Dict[str, Any], versions: Dict[str, str], runtime: Dict[str, Any],
                  device: str, lane: Dict[str, Any], backends: List[dict], patches: List[str],
                  clock: Clock, step_times: List[float], tokens_per_step: int,
                  losses: Dict[str, Optional[float]], memory: Dict[str, int],
                  extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    step_stats = percentiles(step_times)
    train_s = clock.phases.get("train", 0.0)
    steps = len(step_times)
    receipt = {
        "schema": "megatron-ext/receipt/v1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "runtime": runtime,
        "device": device,
        "lane": lane,
        "backends": backends,
        "patches": patches,
        "throughput": {
            "steps_this_run": steps,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": round(tokens_per_step * steps / train_s, 2) if train_s > 0 else None,
            "tokens_per_s_wall": round(tokens_per_step * steps / clock.summary()["wall_s"], 2),
            "step_time_s": {k: round(v, 5) for k, v in step_stats.items()},
        },
        "goodput": clock.summary(),
        "memory_bytes": memory,
        "loss": losses,
        "config": config,
    }
    if extra:
        receipt.update(extra)
    return receipt
