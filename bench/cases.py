"""What a benchmark is: named :class:`Case` s (one timed callable each) grouped in a :class:`Benchmark`."""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

ROLES = ("ours", "anchor", "ref")
BOUNDS = ("compute", "memory")


class CaseUnavailable(RuntimeError):
    """Raised by a :class:`Case`'s ``setup()`` when the case cannot run here (say a CUDA graph
    capture the step refuses). The harness leaves the case untimed, prints the reason, and shows it
    in the case's row; the other cases still run."""


def cuda_graph(step: Callable[[], object], warmup_calls: int = 3) -> Callable[[], None]:
    """``step`` captured once as a CUDA graph; returns its replay. The warm-up calls (autotuning,
    first-call logging, lazy allocations) run on a side stream before the capture. A step that
    cannot be captured (a host synchronisation, a CPU tensor) raises :class:`CaseUnavailable`
    naming the error."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    rng = generator.clone_state()  # a copy outside capture mode, same seed and offset
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as e:  # noqa: BLE001 - any capture failure makes the case unavailable
        # A capture that fails leaves the process as it was mid-capture: torch.cuda.graph's
        # capture stream still current and the default CUDA generator in capture mode, so every
        # later random op on the GPU (the next case's inputs) fails with "Offset increment
        # outside graph capture encountered unexpectedly". Put both back.
        torch.cuda.set_stream(stream)
        generator.graphsafe_set_state(rng)
        torch.cuda.synchronize()
        raise CaseUnavailable(f"CUDA graph capture failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    return graph.replay


@dataclasses.dataclass
class Case:
    """One timed variant.

    ``setup()`` builds modules and FRESH random inputs (``torch.randn``, never zeros) on the target
    device and returns the zero-argument callable that is timed; it is called once per case, right
    before timing, so only one case's tensors are alive at a time. ``flops`` / ``bytes`` are the work
    of ONE call of that callable (``None`` = not meaningful), used for TFLOP/s and GB/s. ``bound``
    picks the ceiling for % roofline: "compute" -> bf16 matmul TFLOP/s, "memory" -> copy GB/s.
    """

    name: str
    label: str
    role: str
    setup: Callable[[], Callable[[], object]]
    flops: Optional[float] = None
    bytes: Optional[float] = None
    bound: str = "compute"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}: unknown case role; use one of {list(ROLES)}")
        if self.bound not in BOUNDS:
            raise ValueError(f"bound={self.bound!r}: unknown roofline bound; use one of {list(BOUNDS)}")
        for field in ("flops", "bytes"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"{field}={value!r}: work per call must be positive; use a float > 0 or None")
        if not callable(self.setup):
            raise ValueError(f"setup={self.setup!r}: not callable; use a function returning the timed callable")


@dataclasses.dataclass
class Benchmark:
    """A named comparison. ``shape`` is a human-readable string of the problem size (e.g.
    ``"x[s=4096, b=2, h=2048] bf16"``). The first case with role "anchor" is the ratio baseline."""

    name: str
    description: str
    shape: str
    cases: List[Case]

    def __post_init__(self):
        if not self.cases:
            raise ValueError(f"cases={self.cases!r}: a benchmark needs at least one case; use a list of Case")
        names = [c.name for c in self.cases]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"case names={dupes!r}: duplicated in benchmark {self.name!r}; use unique names")

    @property
    def anchor(self) -> Optional[Case]:
        return next((c for c in self.cases if c.role == "anchor"), None)
