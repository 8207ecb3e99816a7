"""Registry of benchmarks: ``@register`` on a function ``fn(small: bool, device: str) -> Benchmark``.

The function's ``__name__`` is the benchmark name (the returned ``Benchmark.name`` must match). It
must be cheap: heavy work (imports of Megatron, module construction, tensors) belongs in each
``Case.setup``. Importing :mod:`bench.benchmarks` registers the built-in benchmarks.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable, Optional

_REGISTRY: Dict[str, Callable] = {}


def register(fn: Callable) -> Callable:
    name = fn.__name__
    prev = _REGISTRY.get(name)
    if prev is not None and (prev.__module__, prev.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"benchmark={name!r}: already registered by {prev.__module__}; "
                         f"use a unique function name")
    _REGISTRY[name] = fn
    return fn


def available() -> Dict[str, Callable]:
    """``{name: builder}`` of every registered benchmark, built-ins included, in registration order."""
    importlib.import_module("bench.benchmarks")
    return dict(_REGISTRY)


def select(names: Optional[Iterable[str]]) -> Dict[str, Callable]:
    """Builders for ``names`` in the order given (duplicates dropped); all benchmarks if empty."""
    known = available()
    names = list(dict.fromkeys(names or ()))
    if not names:
        return known
    for name in names:
        if name not in known:
            raise ValueError(f"benchmark={name!r}: unknown; use one of {sorted(known)}")
    return {name: known[name] for name in names}
