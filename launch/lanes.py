"""Lane specs: the text form of a parallel layout, e.g. ``tp2,sp,pp2,vpp2,ep4,etp1,dp2,mbs1,recompute-full``.

Each comma-separated token pins one lane; lanes a spec leaves out are chosen by the planner.
``auto`` (or an empty spec) pins nothing. ``fsdp2`` means the data-parallel lane shards parameters,
gradients and optimizer states with FSDP2 (its size is what the other lanes leave); ``dp`` keeps
replicated data parallelism, ``dpN`` also pins its size.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional

from megatron_ext.config import ConfigError

# token prefix -> Lanes field (sized lanes take an integer suffix)
_SIZED = {"tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "ep": "ep", "etp": "etp", "dp": "dp",
          "mbs": "micro_batch_size"}
_RECOMPUTE = {"recompute-none": None, "recompute-selective": "selective", "recompute-moe": "moe",
              "recompute-full": "full"}
GRAMMAR = ("comma-separated tokens: tpN, sp|nosp, ppN, vppN, cpN, epN, etpN, dp|dpN|fsdp2, mbsN, "
           "recompute-none|recompute-selective|recompute-moe|recompute-full (or 'auto')")


@dataclasses.dataclass(frozen=True)
class Lanes:
    """One complete parallel layout. ``dp`` is the data-parallel size, sharded by FSDP2 if ``fsdp2``."""

    tp: int = 1
    sp: bool = False
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    fsdp2: bool = False
    micro_batch_size: int = 1
    # None | "selective" (attention core) | "moe" (the MoE blocks: Megatron's selective recompute
    # with --recompute-modules moe) | "full"
    recompute: Optional[str] = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def spec(self) -> str:
        parts = [f"tp{self.tp}"] + (["sp"] if self.sp else []) + [f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        parts += [f"cp{self.cp}", f"ep{self.ep}", f"etp{self.etp}",
                  "fsdp2" if self.fsdp2 else f"dp{self.dp}", f"mbs{self.micro_batch_size}",
                  f"recompute-{self.recompute or 'none'}"]
        return ",".join(parts)


def parse_lanes(spec: Optional[str]) -> Dict[str, object]:
    """``spec`` -> the pinned Lanes fields. Raises ConfigError naming the bad token."""
    if spec is None or spec.strip().lower() in ("", "auto"):
        return {}
    pins: Dict[str, object] = {}

    def pin(field: str, value: object, token: str) -> None:
        if field in pins and pins[field] != value:
            raise ConfigError(f"lanes={spec!r}: token {token!r} contradicts an earlier token for the same "
                              f"lane; use each lane once ({GRAMMAR})")
        pins[field] = value

    for raw in spec.split(","):
        token = raw.strip().lower()
        if not token:
            continue
        if token == "auto":
            raise ConfigError(f"lanes={spec!r}: 'auto' cannot be mixed with pinned lanes; "
                              f"use 'auto' alone or only pinned lanes ({GRAMMAR})")
        if token in ("sp", "nosp"):
            pin("sp", token == "sp", token)
        elif token == "fsdp2":
            pin("fsdp2", True, token)
        elif token == "dp":
            pin("fsdp2", False, token)
        elif token in _RECOMPUTE:
            pin("recompute", _RECOMPUTE[token], token)
        else:
            m = re.fullmatch(r"(tp|pp|vpp|cp|ep|etp|dp|mbs)(\d+)", token)
            if m is None:
                raise ConfigError(f"lanes={spec!r}: unknown token {token!r}; use {GRAMMAR}")
            value = int(m.group(2))
            if value < 1:
                raise ConfigError(f"lanes={spec!r}: {token!r} must be at least 1; use {m.group(1)}1 or more")
            pin(_SIZED[m.group(1)], value, token)
            if m.group(1) == "dp":
                pin("fsdp2", False, token)
    return pins


def pins_spec(pins: Dict[str, object]) -> str:
    """The spec text of a set of pins (for messages)."""
    out = []
    for field, value in pins.items():
        if field == "sp":
            out.append("sp" if value else "nosp")
        elif field == "fsdp2":
            if value:
                out.append("fsdp2")
            elif "dp" not in pins:
                out.append("dp")
        elif field == "recompute":
            out.append(f"recompute-{value or 'none'}")
        elif field == "micro_batch_size":
            out.append(f"mbs{value}")
        else:
            out.append(f"{field}{value}")
    return ",".join(out) or "auto"
