"""What the GPU ran at while a case was timed: its SM clock and board power, sampled in the background.

A GPU at its power limit lowers its clock: on an H100 SXM (700 W) the fused MoE step times at
1365-1680 MHz sustained against the 1980 MHz it boosts to for a short burst, and its kernels take
about 10 % longer. So the same kernels time apart between a burst and a sustained run, and between
two machines. Each row therefore carries the mean SM clock and power over its timed calls, and the
report header the device's maximum SM clock and power limit.

Sources, in order: NVML through ``pynvml`` (the ``nvidia-ml-py`` package) when it imports, else one
``nvidia-smi --query-gpu=clocks.sm,power.draw.instant --format=csv,noheader,nounits -lms N``
process read line by line. Power is the instantaneous reading: the averaged one (about a second)
lags a 0.2 s timed window. With neither the rows leave the column blank and the header says why.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
import threading
from typing import Callable, List, Optional, Sequence, Tuple

Sample = Tuple[float, Optional[float]]  # (SM clock MHz, board power W or None)
INTERVAL_MS = 50


@dataclasses.dataclass(frozen=True)
class ClockStats:
    sm_mhz: float  # mean SM clock over the samples
    sm_mhz_min: float
    power_w: Optional[float]  # mean board power; None when the source does not report it
    samples: int


def summarize_samples(samples: Sequence[Sample]) -> Optional[ClockStats]:
    """Mean / min SM clock and mean power of ``samples``; None for no samples."""
    if not samples:
        return None
    mhz = [s[0] for s in samples]
    watts = [s[1] for s in samples if s[1] is not None]
    return ClockStats(sm_mhz=sum(mhz) / len(mhz), sm_mhz_min=min(mhz),
                      power_w=sum(watts) / len(watts) if watts else None, samples=len(samples))


def _number(text: str) -> Optional[float]:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]", "[Not Supported]", ""
        return None


def parse_smi_line(line: str) -> Optional[Sample]:
    """``"1365, 675.72"`` -> ``(1365.0, 675.72)``; power ``[N/A]`` -> None; no clock -> None."""
    fields = line.split(",")
    mhz = _number(fields[0]) if fields else None
    if mhz is None:
        return None
    return mhz, _number(fields[1]) if len(fields) > 1 else None


def device_selector(index: Optional[int] = None) -> str:
    """The CUDA device as NVML / nvidia-smi name it: ``GPU-<uuid>`` (CUDA and NVML number devices
    differently), else the index."""
    import torch

    index = torch.cuda.current_device() if index is None else index
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError):
        return str(index)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _nvml_handle(selector: str):
    import pynvml

    pynvml.nvmlInit()
    if selector.startswith("GPU-"):
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(selector.encode())
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(selector))


def nvml_query(selector: str) -> Optional[Callable[[], Optional[Sample]]]:
    """A function reading (SM MHz, W) through NVML, or None when pynvml is missing or fails."""
    try:
        nvml, handle = _nvml_handle(selector)
    except Exception:  # noqa: BLE001 - no pynvml, no driver library, unknown device: no NVML source
        return None

    field = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)

    def instant_watts() -> Optional[float]:
        # nvmlDeviceGetPowerUsage averages over about a second, which lags a 0.2 s timed window
        # (it reads the idle set-up before it): only the instantaneous field is reported
        if field is None:
            return None
        try:
            value = nvml.nvmlDeviceGetFieldValues(handle, [field])[0]
        except nvml.NVMLError:
            return None
        return value.value.uiVal / 1000.0 if value.nvmlReturn == nvml.NVML_SUCCESS else None

    def query() -> Optional[Sample]:
        return float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)), instant_watts()

    return query


def smi_command(selector: str, interval_ms: int = INTERVAL_MS) -> Optional[List[str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    # power.draw.instant, not power.draw (an average over about a second)
    return [exe, "-i", selector, "--query-gpu=clocks.sm,power.draw.instant", "--format=csv,noheader,nounits",
            "-lms", str(interval_ms)]


class ClockSampler:
    """Collects samples between :meth:`start` and :meth:`stop` from ``query`` (polled every
    ``interval_ms`` in a thread) or from ``command`` (a process printing one sample per line).
    ``stats()`` summarises what was collected since the last start."""

    def __init__(self, query: Optional[Callable[[], Optional[Sample]]] = None,
                 command: Optional[Sequence[str]] = None, interval_ms: int = INTERVAL_MS):
        if (query is None) == (command is None):
            raise ValueError("ClockSampler: give exactly one of query= (a polled function) or "
                             "command= (a process printing samples)")
        self.query, self.command, self.interval_s = query, command, interval_ms / 1e3
        self._samples: List[Sample] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._proc: Optional[subprocess.Popen] = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.query()
            except Exception:  # noqa: BLE001 - a failed read is a missing sample, not a failed run
                sample = None
            if sample is not None:
                self._samples.append(sample)
            self._stop.wait(self.interval_s)

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_smi_line(line)
            if sample is not None:
                self._samples.append(sample)

    def start(self) -> "ClockSampler":
        self.stop()
        self._samples = []
        self._stop.clear()
        if self.command is not None:
            self._proc = subprocess.Popen(list(self.command), stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
        else:
            self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Optional[ClockStats]:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        return self.stats()

    def stats(self) -> Optional[ClockStats]:
        return summarize_samples(list(self._samples))


@functools.lru_cache(maxsize=None)
def sampler_for_device(index: Optional[int] = None) -> Tuple[Optional[ClockSampler], str]:
    """(sampler, description) for a CUDA device: NVML, else nvidia-smi, else (None, why not).
    One per device and process: the report's header and the harness share it (``start`` resets
    its samples)."""
    selector = device_selector(index)
    query = nvml_query(selector)
    if query is not None:
        return ClockSampler(query=query), f"NVML, every {INTERVAL_MS} ms"
    command = smi_command(selector)
    if command is not None:
        return ClockSampler(command=command), f"nvidia-smi, every {INTERVAL_MS} ms"
    return None, "not sampled: neither pynvml (nvidia-ml-py) nor nvidia-smi is available"


def device_limits(index: Optional[int] = None) -> Optional[Tuple[Optional[float], Optional[float]]]:
    """(maximum SM clock MHz, enforced power limit W) of a CUDA device, or None if unknown."""
    selector = device_selector(index)
    try:
        nvml, handle = _nvml_handle(selector)
        mhz = float(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))
        watts = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
        return mhz, watts
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-i", selector, "--query-gpu=clocks.max.sm,power.limit",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    sample = parse_smi_line(out.strip().splitlines()[0]) if out.strip() else None
    return sample
