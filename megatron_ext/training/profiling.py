"""``--profile``: profile a range of training steps, the way Megatron's flags do.

``--profile --profile-step-start A --profile-step-end B`` covers steps A..B-1 (1-based, as the
progress lines count them). With ``--use-pytorch-profiler`` each rank writes a Chrome trace
(``<run folder>/profile/rank<R>.json``, open it in Perfetto) and a table of the most expensive
operators (``rank<R>_top.txt``, sorted by device time on GPU and by CPU time on CPU). Without it the
range is marked with ``cudaProfilerStart/Stop``, for ``nsys profile --capture-range=cudaProfilerApi``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, enabled: bool, start: int, end: int, pytorch: bool, rank: int, run_dir: Path,
                 cuda: bool):
        self.enabled, self.first, self.stop = enabled, start, end
        self.pytorch, self.rank, self.cuda = pytorch, rank, cuda
        self.out = Path(run_dir) / "profile"
        self._prof: Optional[torch.profiler.profile] = None
        self._on = False

    def begin(self, step: int) -> None:
        """Before 1-based ``step`` runs."""
        if not self.enabled or step != self.first:
            return
        self._on = True
        if self.pytorch:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self._prof.__enter__()
        elif self.cuda:
            torch.cuda.profiler.start()
        log.info("profiling steps %d..%d (%s)", self.first, self.stop - 1,
                 "torch profiler" if self.pytorch else "cudaProfilerStart/Stop range")

    def end(self, step: int) -> Optional[Path]:
        """After 1-based ``step`` ran; returns the trace path when the range closes here."""
        if not self._on or step != self.stop - 1:
            return None
        self._on = False
        if self.cuda:
            torch.cuda.synchronize()
        if not self.pytorch:
            if self.cuda:
                torch.cuda.profiler.stop()
            return None
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        (self.out / f"rank{self.rank}_top.txt").write_text(
            f"steps {self.first}..{self.stop - 1}, sorted by {key}\n{table}\n")
        log.info("profile of steps %d..%d written to %s", self.first, self.stop - 1, self.out)
        return trace
