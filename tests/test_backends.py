"""backends.resolve: requested -> observed with the reason, fallback logged once, errors name the field."""

import logging

import pytest

from megatron_ext import backends


@pytest.fixture(autouse=True)
def _clean():
    backends.reset()
    yield
    backends.reset()


def _ok():
    return None


def _no_triton():
    return "triton is not installed"


def test_auto_falls_back_with_reason_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="megatron_ext.backends")
    cands = [("triton", _no_triton), ("torch", _ok)]
    assert backends.resolve("mhc_pre", "auto", cands) == "torch"
    assert backends.resolve("mhc_pre", "auto", cands) == "torch"
    recs = backends.records()
    assert recs == [{"op": "mhc_pre", "requested": "auto", "observed": "torch",
                     "reason": "triton: triton is not installed", "count": 2}]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "requested 'auto', using 'torch'" in warnings[0].getMessage()


def test_auto_takes_the_first_usable_silently(caplog):
    caplog.set_level(logging.INFO, logger="megatron_ext.backends")
    assert backends.resolve("op", "auto", [("triton", _ok), ("torch", _ok)]) == "triton"
    assert backends.records()[0]["reason"] == "first usable"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_named_backend_that_cannot_run_is_an_error():
    with pytest.raises(backends.BackendUnavailable, match=r"backend='triton' for op: not usable here \(triton is not installed\)"):
        backends.resolve("op", "triton", [("triton", _no_triton), ("torch", _ok)])


def test_unknown_backend_name_lists_the_allowed():
    with pytest.raises(backends.BackendUnavailable, match=r"backend='cuda' for op: unknown; use one of \['auto', 'triton', 'torch'\]"):
        backends.resolve("op", "cuda", [("triton", _ok), ("torch", _ok)])


def test_a_run_failure_is_remembered_under_auto_and_an_error_by_name(caplog):
    """A backend that passed its probe but failed when run: by name an error naming the op, the
    failure and what to use; under auto a fallback logged once and recorded with its cause, and
    remembered for that key (and no other) until reset."""
    caplog.set_level(logging.INFO, logger="megatron_ext.backends")
    with pytest.raises(backends.BackendUnavailable,
                       match=r"^backend='fast' for op: it broke \(cause\); use backend='auto'$"):
        backends.run_failure("op", "fast", "fast", "cuda:0", "it broke", "cause", "slow", "backend='auto'")
    assert backends.failed("op", "cuda:0") is None and backends.records() == []
    backends.run_failure("op", "auto", "fast", "cuda:0", "it broke", "cause", "slow", "backend='auto'")
    assert backends.failed("op", "cuda:0") == "cause"
    assert backends.failed("op", "cuda:1") is None and backends.failed("other", "cuda:0") is None
    assert backends.records() == [{"op": "op", "requested": "fast", "observed": "slow",
                                   "reason": "it broke: cause", "count": 1}]
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    backends.reset()
    assert backends.failed("op", "cuda:0") is None
