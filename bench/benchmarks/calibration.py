"""``calibration``: the device's achievable ceilings as ref rows (no anchor, ratio blank).

bf16 ``torch.matmul`` [n, n] @ [n, n] (n = 8192; compute bound) and a device-to-device copy of a
1 GiB fp32 tensor (memory bound; bytes = read + written = 2 GiB). :func:`bench.devices.calibrate`
times the same two cases to get the "measured" ceilings.
"""

from __future__ import annotations

from bench.cases import Benchmark, Case
from bench.flops import matmul_flops
from bench.registry import register

MATMUL_N, MATMUL_N_SMALL = 8192, 128
COPY_BYTES, COPY_BYTES_SMALL = 1 << 30, 4 << 20


def matmul_case(small: bool = False, device: str = "cuda") -> Case:
    n = MATMUL_N_SMALL if small else MATMUL_N
    return Case(name="matmul", label=f"ref: torch.matmul bf16 {n}x{n}x{n}", role="ref",
                setup=lambda: _matmul_setup(n, device), flops=matmul_flops(n, n, n), bound="compute")


def _matmul_setup(n: int, device: str):
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return lambda: torch.matmul(a, b)


def copy_case(small: bool = False, device: str = "cuda") -> Case:
    nbytes = COPY_BYTES_SMALL if small else COPY_BYTES
    return Case(name="copy", label=f"ref: device copy {nbytes >> 20} MiB (read + write)", role="ref",
                setup=lambda: _copy_setup(nbytes, device), bytes=2.0 * nbytes, bound="memory")


def _copy_setup(nbytes: int, device: str):
    import torch

    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@register
def calibration(small: bool = False, device: str = "cuda") -> Benchmark:
    mm, cp = matmul_case(small, device), copy_case(small, device)
    return Benchmark(
        name="calibration",
        description="achievable ceilings: bf16 matmul TFLOP/s and device copy GB/s (ref only)",
        shape=f"{mm.label.split(': ', 1)[1]}; {cp.label.split(': ', 1)[1]}",
        cases=[mm, cp])
