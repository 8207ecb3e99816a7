"""Test-only fault injection: kill one rank of a live multi-rank run, the way a node loss does.

``MEGATRON_EXT_TEST_KILL_RANK=RANK@ITER`` makes global rank RANK SIGKILL its process group (under
torchrun: the rank and its helper processes; otherwise it ends with ``os._exit(KILLED_EXIT_CODE)``)
right after it finishes iteration ITER (after that iteration's checkpoint, if one is due): no Python
clean-up, no barrier, no final save. The other ranks then fail
in their next collective and torchrun tears the job down, so a relaunch with ``--resume`` must pick
up from the last completed save. Unset (the default), nothing happens; ``megatron-ext train`` has no
flag for it on purpose.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional, Tuple

ENV = "MEGATRON_EXT_TEST_KILL_RANK"
KILLED_EXIT_CODE = 43


def kill_point() -> Optional[Tuple[int, int]]:
    """(rank, iteration) from the environment, or None."""
    value = os.environ.get(ENV)
    if not value:
        return None
    rank, sep, iteration = value.partition("@")
    if not sep or not rank.isdigit() or not iteration.isdigit() or int(iteration) < 1:
        raise ValueError(f"{ENV}={value!r}: not RANK@ITER; use e.g. '1@7' (rank 1 dies after iteration 7)")
    return int(rank), int(iteration)


def maybe_kill(rank: int, iteration: int) -> None:
    point = kill_point()
    if point is not None and point == (rank, iteration):
        sys.stderr.write(f"{ENV}: rank {rank} killed after iteration {iteration}\n")
        sys.stderr.flush()
        if os.getpgid(0) == os.getpid():
            # torchrun starts each worker as a process-group leader: take the rank's helpers with it
            # (the checkpoint writer's forked file writers), as losing its node would. Orphaned,
            # they would hold the launcher's stdout open forever.
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(KILLED_EXIT_CODE)


class StepWatchdog:
    """``--hang-dump-seconds S``: while a step runs longer than S seconds, every thread's Python
    stack goes to stderr every S seconds (``faulthandler``, which needs no working interpreter
    lock of the stuck thread). A rank blocked in a collective or a host sync then shows where it
    waits, instead of a silent job that only the distributed timeout ends."""

    def __init__(self, seconds: Optional[float], rank: int = 0, stream=None):
        self.seconds, self.rank, self.announced = seconds, rank, False
        self.stream = stream

    def _out(self):
        if self.stream is not None:
            return self.stream
        try:
            sys.stderr.fileno()  # faulthandler writes to a file descriptor
            return sys.stderr
        except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured)
            return sys.__stderr__

    def arm(self, iteration: int) -> None:
        if not self.seconds:
            return
        import faulthandler

        out = self._out()
        if not self.announced:
            out.write(f"[rank {self.rank}] hang watchdog from iteration {iteration}: a step over "
                      f"{self.seconds:g} s dumps every thread's stack here\n")
            out.flush()
            self.announced = True
        faulthandler.dump_traceback_later(self.seconds, repeat=True, file=out)

    def disarm(self) -> None:
        if self.seconds:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
