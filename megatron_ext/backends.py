"""One dispatcher for every op's backend: requested -> observed, with the reason.

An op asks :func:`resolve` with what the user requested (``"auto"`` or a name) and its candidates in
preference order, each with a probe that returns ``None`` when usable or a reason string when not.
The choice is recorded (the run receipt lists every record) and a fallback is logged once.

A backend requested by name that cannot run is an error, not a fallback: the user asked for it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

log = logging.getLogger("megatron_ext.backends")

Probe = Callable[[], Optional[str]]


@dataclasses.dataclass
class BackendRecord:
    op: str
    requested: str
    observed: str
    reason: str
    count: int = 1


_RECORDS: Dict[Tuple[str, str, str], BackendRecord] = {}


class BackendUnavailable(ValueError):
    pass


def triton_interpret_env() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton CPU interpreter (the values Triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def built_for_interpreter(*kernels) -> bool:
    """Whether these ``triton.jit`` kernels (or autotuners around them) were built for the Triton
    CPU interpreter: ``triton.jit`` decides when the kernel's module is first imported, from
    TRITON_INTERPRET at that moment, so this can differ from :func:`triton_interpret_env` now."""
    def interpreted(k) -> bool:
        return type(k).__name__ == "InterpretedFunction"

    # an autotuner (or this project's TunedKernel) holds its kernel as ``fn``; a kernel's own
    # ``fn`` is the Python function, so look at the object first
    return all(interpreted(k) or interpreted(getattr(k, "fn", None)) for k in kernels)


def resolve(op: str, requested: str, candidates: Sequence[Tuple[str, Probe]]) -> str:
    """Pick the backend for ``op``.

    ``candidates`` is ``[(name, probe), ...]`` in preference order for ``"auto"``; a probe returns
    ``None`` if the backend can run here, else why not.
    """
    names = [name for name, _ in candidates]
    if requested != "auto" and requested not in names:
        raise BackendUnavailable(f"backend={requested!r} for {op}: unknown; use one of {['auto'] + names}")
    reasons = []
    for name, probe in candidates:
        if requested != "auto" and name != requested:
            continue
        why = probe()
        if why is None:
            reason = "requested" if requested == name else (
                "first usable" if not reasons else "; ".join(reasons))
            _record(op, requested, name, reason, fallback=bool(reasons))
            return name
        if requested != "auto":
            raise BackendUnavailable(f"backend={requested!r} for {op}: not usable here ({why}); "
                                     f"use backend='auto' or one of {names}")
        reasons.append(f"{name}: {why}")
    raise BackendUnavailable(f"no backend for {op} can run here: {'; '.join(reasons)}")


def _record(op: str, requested: str, observed: str, reason: str, fallback: bool) -> None:
    key = (op, requested, observed)
    rec = _RECORDS.get(key)
    if rec is not None:
        rec.count += 1
        return
    _RECORDS[key] = BackendRecord(op, requested, observed, reason)
    if fallback:
        log.warning("backend for %s: requested %r, using %r (%s)", op, requested, observed, reason)
    else:
        log.info("backend for %s: requested %r, using %r", op, requested, observed)


def fallback(op: str, requested: str, observed: str, reason: str) -> None:
    """Record a fallback chosen inside an op (e.g. a load path its tensors cannot take): logged
    once per (op, requested, observed), listed in the run receipt with its first reason."""
    _record(op, requested, observed, reason, fallback=True)


def note(op: str, requested: str, observed: str, reason: str) -> None:
    """Record a choice made outside :func:`resolve` (e.g. what a layer spec fixes)."""
    _record(op, requested, observed, reason, fallback=False)


# (op, key) -> what went wrong: a backend that passed its probe but failed when run on ``key`` (a
# device, a dtype, a configuration); probes ask :func:`failed` and skip it from then on
_FAILED: Dict[Tuple[str, Hashable], str] = {}


def failed(op: str, key: Hashable) -> Optional[str]:
    """What made ``op``'s backend fail at run time on ``key`` earlier in this process, or None."""
    return _FAILED.get((op, key))


def run_failure(op: str, requested: str, name: str, key: Hashable, what: str, detail: str,
                fallback_to: str, use: str) -> None:
    """Backend ``name`` of ``op`` passed its probe but failed when run on ``key`` (``what``: the
    failure in words, ``detail``: its cause). Asked for by name: :class:`BackendUnavailable`,
    ``use`` saying what to ask for instead. Under "auto": remembered for ``key`` (its probe asks
    :func:`failed`), logged once and recorded as a fallback to ``fallback_to``."""
    if requested == name:
        raise BackendUnavailable(f"backend={name!r} for {op}: {what} ({detail}); use {use}")
    _FAILED[(op, key)] = detail
    fallback(op, name, fallback_to, f"{what}: {detail}")


def records() -> List[dict]:
    return [dataclasses.asdict(r) for r in _RECORDS.values()]


def reset() -> None:
    _RECORDS.clear()
    _FAILED.clear()
