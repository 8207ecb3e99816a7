"""Run metadata (device, versions, date, ceilings) and the report header printed above the table."""

from __future__ import annotations

import datetime
import platform
from typing import Any, Dict, Optional

from bench.devices import Ceilings, datasheet_ceilings, device_name


def collect_meta(cpu: bool, ceilings: Ceilings, timing: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    import torch

    from megatron_ext.compat import package_versions

    versions = {"python": platform.python_version(), **package_versions()}
    meta: Dict[str, Any] = {
        "device": device_name(cpu),
        "mode": "cpu smoke (tiny shapes, wall clock)" if cpu else "cuda (CUDA events, L2 flushed)",
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "ceilings": {"source": ceilings.source, "matmul_tflops": ceilings.matmul_tflops,
                     "copy_gbs": ceilings.copy_gbs, "detail": ceilings.detail},
        "ceilings_text": ceilings.describe(),
        "timing": timing or {},
    }
    if not cpu:
        meta["cuda"] = torch.version.cuda
        meta["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        from bench.clocks import device_limits, sampler_for_device

        meta["clock_source"] = sampler_for_device()[1]
        limits = device_limits()
        if limits is not None:
            meta["max_sm_mhz"], meta["power_limit_w"] = limits
        sheet = datasheet_ceilings(meta["device"])
        if ceilings.source != "datasheet" and sheet.source == "datasheet":
            meta["datasheet_text"] = sheet.describe()
    return meta


def format_header(meta: Dict[str, Any]) -> str:
    v = meta["versions"]
    dev = meta["device"]
    if "cuda" in meta:
        dev += f" (CUDA {meta['cuda']}, {meta['capability']})"
    lines = [
        "## megatron-ext benchmarks",
        "",
        f"- device: {dev}",
        f"- mode: {meta['mode']}",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "megatron-core",
                                                           "transformer-engine", "apex") if k in v),
        f"- date: {meta['date']}",
        f"- ceilings used for % roofline: {meta['ceilings_text']}",
    ]
    if "datasheet_text" in meta:
        lines.append(f"- for reference, {meta['datasheet_text']}")
    if "clock_source" in meta:
        limits = []
        if meta.get("max_sm_mhz") is not None:
            limits.append(f"max SM clock {meta['max_sm_mhz']:.0f} MHz")
        if meta.get("power_limit_w") is not None:
            limits.append(f"power limit {meta['power_limit_w']:.0f} W")
        lines.append(f"- GPU clock: {', '.join(limits) or 'limits unknown'}; SM MHz (W) = mean SM clock "
                     f"(board power) over each case's timed calls ({meta['clock_source']}). A GPU at its "
                     "power limit runs below its maximum clock, so compare figures at like clocks")
    lines += [
        "- ms: median per call (p20–p80 spread); ratio = anchor ms / case ms (>1: faster than the "
        "anchor); % roofline = TFLOP/s / compute ceiling or GB/s / memory ceiling",
    ]
    return "\n".join(lines)
