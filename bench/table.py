"""Result rows and their derived figures (TFLOP/s, GB/s, ratio vs anchor, % roofline), rendered as
a Markdown table or JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence

from bench.cases import Benchmark
from bench.clocks import ClockStats
from bench.devices import Ceilings
from bench.timing import Timing

RATIO_HEADER = "ratio vs anchor (anchor ms / ms; >1 = faster than anchor)"
COLUMNS = ("benchmark", "case", "ms (median)", "p20–p80 ms", "TFLOP/s", "GB/s", RATIO_HEADER,
           "% roofline")
CLOCK_HEADER = "SM MHz (W), mean"  # only in tables where some row was sampled (bench.clocks)


@dataclasses.dataclass
class Row:
    benchmark: str
    case: str
    label: str
    role: str
    bound: str
    ms: Optional[float]  # None: the case was skipped (its label says why)
    p20_ms: Optional[float]
    p80_ms: Optional[float]
    reps: int
    flops: Optional[float]
    bytes: Optional[float]
    tflops: Optional[float]
    gbs: Optional[float]
    ratio: Optional[float]  # anchor_ms / ms; None when the benchmark has no anchor
    roofline_pct: Optional[float]  # achieved / ceiling of ``bound`` x 100
    sm_mhz: Optional[float] = None  # mean SM clock over the timed calls (None: not sampled)
    power_w: Optional[float] = None  # mean board power over the timed calls


def roofline_pct(bound: str, tflops: Optional[float], gbs: Optional[float],
                 ceilings: Optional[Ceilings]) -> Optional[float]:
    """compute: TFLOP/s / matmul ceiling; memory: GB/s / copy ceiling; in percent."""
    if ceilings is None:
        return None
    achieved, ceiling = (tflops, ceilings.matmul_tflops) if bound == "compute" else (gbs, ceilings.copy_gbs)
    if achieved is None or not ceiling:
        return None
    return 100.0 * achieved / ceiling


def make_rows(bench: Benchmark, timings: Sequence[Optional[Timing]], ceilings: Optional[Ceilings],
              skipped: Optional[Dict[str, str]] = None,
              clocks: Optional[Sequence[Optional[ClockStats]]] = None) -> List[Row]:
    """One row per case of ``bench`` (``timings`` in case order). A None timing is a skipped case:
    its row has no figures and its label ends with ``skipped[case.name]``, the reason. ``clocks``:
    the GPU's clock and power while each case was timed (aligned with the cases; None: none)."""
    if len(timings) != len(bench.cases):
        raise ValueError(f"timings={len(timings)}: need one per case of {bench.name!r} "
                         f"({len(bench.cases)}); use a list aligned with bench.cases")
    clocks = list(clocks) if clocks is not None else [None] * len(timings)
    if len(clocks) != len(timings):
        raise ValueError(f"clocks={len(clocks)}: need one per case of {bench.name!r} "
                         f"({len(bench.cases)}); use a list aligned with bench.cases")
    skipped = skipped or {}
    anchor = bench.anchor
    anchor_t = timings[bench.cases.index(anchor)] if anchor is not None else None
    anchor_ms = anchor_t.median_ms if anchor_t is not None else None
    rows = []
    for case, t, clk in zip(bench.cases, timings, clocks):
        if t is None:
            why = skipped.get(case.name, "not timed")
            rows.append(Row(benchmark=bench.name, case=case.name, label=f"{case.label} (skipped: {why})",
                            role=case.role, bound=case.bound, ms=None, p20_ms=None, p80_ms=None, reps=0,
                            flops=case.flops, bytes=case.bytes, tflops=None, gbs=None, ratio=None,
                            roofline_pct=None))
            continue
        sec = t.median_ms * 1e-3
        tflops = case.flops / sec / 1e12 if case.flops else None
        gbs = case.bytes / sec / 1e9 if case.bytes else None
        rows.append(Row(
            benchmark=bench.name, case=case.name, label=case.label, role=case.role, bound=case.bound,
            ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, flops=case.flops,
            bytes=case.bytes, tflops=tflops, gbs=gbs,
            ratio=anchor_ms / t.median_ms if anchor_ms is not None else None,
            roofline_pct=roofline_pct(case.bound, tflops, gbs, ceilings),
            sm_mhz=clk.sm_mhz if clk is not None else None,
            power_w=clk.power_w if clk is not None else None))
    return rows


def _fmt(x: Optional[float], decimals: int) -> str:
    """Fixed ``decimals`` for |x| >= 1 (and 0), 3 significant digits (zeros kept) below 1; "" for None."""
    if x is None:
        return ""
    if x == 0 or abs(x) >= 1:
        return f"{x:.{decimals}f}"
    return f"{x:#.3g}"


def format_clock(r: Row) -> str:
    """``"1560 (690 W)"``; ``"1560"`` without power; ``""`` when not sampled."""
    if r.sm_mhz is None:
        return ""
    return f"{r.sm_mhz:.0f}" + ("" if r.power_w is None else f" ({r.power_w:.0f} W)")


def format_row(r: Row, clock: bool = False) -> List[str]:
    roof = "" if r.roofline_pct is None else f"{_fmt(r.roofline_pct, 1)} ({r.bound})"
    spread = "" if r.ms is None else f"{_fmt(r.p20_ms, 3)}–{_fmt(r.p80_ms, 3)}"
    cells = [r.benchmark, r.label, _fmt(r.ms, 3), spread,
             _fmt(r.tflops, 1), _fmt(r.gbs, 0), _fmt(r.ratio, 2), roof]
    return cells + [format_clock(r)] if clock else cells


def format_table(rows: Sequence[Row]) -> str:
    """The Markdown table; the clock column appears when some row was sampled."""
    clock = any(r.sm_mhz is not None for r in rows)
    columns = COLUMNS + ((CLOCK_HEADER,) if clock else ())
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in format_row(r, clock)) + " |")
    return "\n".join(lines)


def to_json(rows: Sequence[Row], meta: Optional[Dict[str, Any]] = None) -> str:
    """``{"meta": {...}, "rows": [Row as dict, ...]}`` as indented JSON text."""
    return json.dumps({"meta": meta or {}, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2)
