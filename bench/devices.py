"""Roofline ceilings: datasheet peaks per device, or ceilings measured on the device itself.

``DEVICE_PROFILES`` is keyed by a substring of ``torch.cuda.get_device_name()``; the longest
matching key wins (so "H100 PCIe" beats "H100"). :func:`calibrate` measures the achievable
ceilings: an 8192^3 bf16 ``torch.matmul`` (TFLOP/s) and a 1 GiB device-to-device copy (GB/s,
counting bytes read + written), using the same workloads as the ``calibration`` benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from typing import Dict, Optional

CEILING_MODES = ("measured", "datasheet")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    bf16_tflops: float  # dense (no 2:4 sparsity), datasheet
    hbm_gbs: float  # memory bandwidth, datasheet, GB/s (1e9 B/s)


# Datasheet figures. H100 SXM reports itself as e.g. "NVIDIA H100 80GB HBM3".
DEVICE_PROFILES: Dict[str, DeviceProfile] = {
    "H100": DeviceProfile("H100 SXM", 989.0, 3350.0),
    "H100 PCIe": DeviceProfile("H100 PCIe", 756.0, 2000.0),
    "H100 NVL": DeviceProfile("H100 NVL", 835.0, 3900.0),
    "H200": DeviceProfile("H200 SXM", 989.0, 4800.0),
    "B200": DeviceProfile("B200", 2250.0, 8000.0),
}


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """What % roofline divides by. ``source``: "measured", "datasheet" or "none"."""

    device: str
    source: str
    matmul_tflops: Optional[float]
    copy_gbs: Optional[float]
    detail: str = ""

    def describe(self) -> str:
        if self.source == "none":
            return f"none ({self.detail}); % roofline left blank"
        mm = "n/a" if self.matmul_tflops is None else f"{_num(self.matmul_tflops, 1)} TFLOP/s"
        cp = "n/a" if self.copy_gbs is None else f"{_num(self.copy_gbs, 0)} GB/s"
        return f"{self.source} ({self.detail}): compute {mm}, memory {cp}"


def _num(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}" if abs(x) >= 1 else f"{x:#.3g}"


def device_name(cpu: bool = False) -> str:
    if cpu:
        return f"cpu ({platform.machine() or 'unknown'})"
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())


def profile_for(name: str) -> Optional[DeviceProfile]:
    """Datasheet profile whose key is the longest case-insensitive substring of ``name``."""
    hits = [k for k in DEVICE_PROFILES if k.lower() in name.lower()]
    return DEVICE_PROFILES[max(hits, key=len)] if hits else None


def datasheet_ceilings(name: str) -> Ceilings:
    prof = profile_for(name)
    if prof is None:
        return Ceilings(name, "none", None, None,
                        f"no datasheet profile matches {name!r}; known: {sorted(DEVICE_PROFILES)}")
    return Ceilings(name, "datasheet", prof.bf16_tflops, prof.hbm_gbs,
                    f"{prof.name}: bf16 dense matmul, HBM bandwidth")


def calibrate(cpu: bool = False, timer=None) -> Ceilings:
    """Measure the ceilings here: bf16 matmul n^3 and a device copy (n=8192, 1 GiB; on CPU the
    small sizes of the ``calibration`` benchmark). ``timer`` defaults to time_cuda / time_cpu."""
    from bench.benchmarks.calibration import copy_case, matmul_case
    from bench.timing import time_cpu, time_cuda

    if timer is None:
        # 1 s of warm-up: measure at sustained clocks (GPUs boost for a fraction of a second).
        timer = time_cpu if cpu else functools.partial(time_cuda, warmup_ms=1000.0, rep_ms=300.0)
    device = "cpu" if cpu else "cuda"
    mm, cp = matmul_case(small=cpu, device=device), copy_case(small=cpu, device=device)
    results = {}
    for case in (mm, cp):
        fn = case.setup()
        results[case.name] = timer(fn).median_ms
        del fn
    tflops = mm.flops / (results[mm.name] * 1e-3) / 1e12
    gbs = cp.bytes / (results[cp.name] * 1e-3) / 1e9
    return Ceilings(device_name(cpu), "measured", tflops, gbs,
                    f"on this device: {mm.label.split(': ', 1)[-1]}; {cp.label.split(': ', 1)[-1]}")


def resolve_ceilings(mode: str, cpu: bool = False) -> Ceilings:
    if mode not in CEILING_MODES:
        raise ValueError(f"ceilings={mode!r}: unknown; use one of {list(CEILING_MODES)}")
    if mode == "measured":
        return calibrate(cpu=cpu)
    return datasheet_ceilings(device_name(cpu))
