"""Progress display: a tqdm bar on a terminal, plain log lines otherwise (CI, files)."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional


class Progress:
    def __init__(self, total: int, start: int, mode: str, enabled: bool, log_interval: int):
        self.total, self.log_interval, self.enabled = total, log_interval, enabled
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = start
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float, grad_norm,
               losses: Optional[Dict[str, float]] = None) -> None:
        """``losses``: further named losses of the step (the MTP depths'), shown after the loss."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if step % self.log_interval == 0 or step == self.total:
            done = step - self.start
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - step)
            gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
            more = "".join(f" | {name} {value:.4f}" for name, value in (losses or {}).items())
            self.write(f"iter {step:>6}/{self.total} | loss {loss:.4f}{more} | lr {lr:.3e} | grad norm {gn} "
                       f"| {tokens_per_s:,.0f} tok/s | ETA {eta:,.0f} s")

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
