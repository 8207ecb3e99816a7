"""Hardware profiles the lane planner sizes plans against.

Figures are per GPU, from the vendor datasheets (NVIDIA H100 Tensor Core GPU datasheet, SXM5 column;
NVIDIA H200 Tensor Core GPU datasheet, SXM column; NVIDIA DGX B200 / HGX B200 datasheets, per-GPU
share), dense (no 2:4 sparsity) rates. ``hbm_gib`` is the capacity the driver reports
(``nvidia-smi``: 81,559 MiB on H100 80GB, 143,771 MiB on H200, ~183,000 MiB on B200), which is what
allocations compete for; the datasheet's "80 GB / 141 GB / 192 GB" is the marketing figure.
Interconnect figures are per direction: NVLink 4 is 900 GB/s bidirectional per GPU (450 each way),
NVLink 5 is 1.8 TB/s (900 each way); each GPU of a DGX/HGX H100, H200 and B200 node has its own
ConnectX-7 400 Gb/s InfiniBand port (50 GB/s each way).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    hbm_gib: float  # device memory the driver exposes
    hbm_tbps: float  # HBM bandwidth, TB/s
    bf16_tflops: float  # dense
    fp8_tflops: float  # dense
    fp4: bool  # FP4 tensor-core support (NVFP4 / MXFP4)
    nvlink_gbps: float  # NVLink bandwidth per GPU, GB/s, one direction
    gpus_per_nvlink_island: int  # GPUs that share one NVLink/NVSwitch domain
    ib_gbps: float  # scale-out bandwidth per GPU, GB/s, one direction
    # What a well-tuned collective reaches of the link rate (NCCL bus bandwidth measured on DGX H100
    # is ~75-80% of NVLink line rate and ~90% of IB line rate for large messages).
    nvlink_efficiency: float = 0.75
    ib_efficiency: float = 0.85
    # Fraction of dense bf16 peak a large, well-shaped Megatron GEMM mix sustains (Megatron-LM reports
    # 40-50% MFU on H100 for 7B-175B dense GPT; the GEMM-shape factors in plan.py lower it further).
    achievable_fraction: float = 0.50

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * 2**30


PROFILES: Dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile("h100-80g", hbm_gib=79.6, hbm_tbps=3.35, bf16_tflops=989.0, fp8_tflops=1979.0,
                        fp4=False, nvlink_gbps=450.0, gpus_per_nvlink_island=8, ib_gbps=50.0),
        HardwareProfile("h200-141g", hbm_gib=140.4, hbm_tbps=4.8, bf16_tflops=989.0, fp8_tflops=1979.0,
                        fp4=False, nvlink_gbps=450.0, gpus_per_nvlink_island=8, ib_gbps=50.0),
        HardwareProfile("b200-192g", hbm_gib=179.0, hbm_tbps=8.0, bf16_tflops=2250.0, fp8_tflops=4500.0,
                        fp4=True, nvlink_gbps=900.0, gpus_per_nvlink_island=8, ib_gbps=50.0),
    )
}


def get_profile(name: str) -> HardwareProfile:
    from megatron_ext.config import ConfigError

    if name not in PROFILES:
        raise ConfigError(f"hardware={name!r}: unknown hardware profile; use one of {sorted(PROFILES)}")
    return PROFILES[name]


def detect(device_name: str) -> Optional[HardwareProfile]:
    """The profile of a CUDA device name (``torch.cuda.get_device_name()``), or None if unknown."""
    upper = device_name.upper()
    for key, profile in (("B200", "b200-192g"), ("H200", "h200-141g"), ("H100", "h100-80g")):
        if key in upper:
            return PROFILES[profile]
    return None
