"""Version-guarded runtime patches of Megatron-Core.

Every patch is a small function registered with :func:`patch`, carrying the reason it exists, the
megatron-core versions it is for and the lane it applies to (``"cpu"`` or ``"any"``). Applying is
idempotent: :func:`apply_patches` runs each patch at most once per process and returns the names
applied so the run receipt can list them.

Nothing outside this package monkeypatches Megatron.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List

from packaging.version import Version

log = logging.getLogger("megatron_ext.patches")


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    reason: str
    lane: str  # "cpu": only when no CUDA device is used; "any": every lane
    min_version: str
    max_version: str  # exclusive
    fn: Callable[[], None]

    def wanted(self, mcore_version: Version, lane: str) -> bool:
        if self.lane != "any" and self.lane != lane:
            return False
        return Version(self.min_version) <= mcore_version < Version(self.max_version)


_REGISTRY: Dict[str, Patch] = {}
_APPLIED: List[str] = []


def patch(name: str, *, reason: str, lane: str, min_version: str = "0.16.0", max_version: str = "0.21"):
    """Register ``fn`` as a patch. ``lane`` is "cpu" or "any"."""
    if lane not in ("cpu", "any"):
        raise ValueError(f"lane={lane!r}: unknown patch lane; use 'cpu' or 'any'")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"patch name={name!r} registered twice")
        _REGISTRY[name] = Patch(name, reason, lane, min_version, max_version, fn)
        return fn

    return deco


def after_init(cls, fix: Callable[[object], None]) -> None:
    """Make ``cls.__init__`` run ``fix(self)`` after the original (for patches that correct the
    state a constructor leaves)."""
    import functools

    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        fix(self)

    cls.__init__ = __init__


def registered() -> Dict[str, Patch]:
    _load_all()
    return dict(_REGISTRY)


def applied() -> List[str]:
    return list(_APPLIED)


def _load_all():
    # Importing registers the patches; the modules import megatron lazily inside each patch.
    from patches import cpu_lane, grad_buffers, mcore_bugs, pretrain_cli  # noqa: F401


def apply_patches(lane: str) -> List[str]:
    """Apply every registered patch wanted for this megatron-core version and ``lane``.

    Returns the names applied by this call (earlier calls' patches are not repeated).
    """
    from megatron_ext.compat import import_megatron_core

    import_megatron_core()
    from megatron.core import package_info

    _load_all()
    version = Version(package_info.__version__)
    done = []
    for p in _REGISTRY.values():
        if p.name in _APPLIED or not p.wanted(version, lane):
            continue
        p.fn()
        _APPLIED.append(p.name)
        done.append(p.name)
        log.debug("patch %s applied: %s", p.name, p.reason)
    return done
