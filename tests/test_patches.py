"""Runtime patches: registered with a reason and a version range, idempotent, lane-scoped."""

import pytest
from packaging.version import Version

import patches
from megatron_ext import compat


def test_every_patch_says_why_and_for_which_versions():
    reg = patches.registered()
    assert {"cpu_rng_tracker", "cpu_current_device", "cpu_clip_grads", "moe_te_general_gemm_name"} <= set(reg)
    for p in reg.values():
        assert len(p.reason) > 30 and p.lane in ("cpu", "any")
        assert Version(p.min_version) < Version(p.max_version)


def test_apply_is_idempotent_and_lane_scoped():
    first = patches.apply_patches("cpu")
    assert patches.apply_patches("cpu") == []
    assert set(first) <= set(patches.applied())
    version = compat.mcore_version()
    for name in patches.applied():
        assert patches.registered()[name].wanted(version, "cpu")
    # a CUDA lane never gets CPU patches
    assert not any(p.wanted(version, "cuda") for p in patches.registered().values() if p.lane == "cpu")


def test_version_guard_excludes_unsupported_versions():
    p = patches.registered()["cpu_rng_tracker"]
    assert p.wanted(Version("0.16.1"), "cpu") and p.wanted(Version("0.19.2"), "cpu")
    assert not p.wanted(Version("0.15.0"), "cpu") and not p.wanted(Version("0.21.0"), "cpu")


def test_bad_registration_is_rejected():
    with pytest.raises(ValueError, match="lane='gpu'"):
        patches.patch("x", reason="r", lane="gpu")
    with pytest.raises(ValueError, match="registered twice"):
        patches.patch("cpu_rng_tracker", reason="r", lane="cpu")(lambda: None)


def test_cpu_rng_tracker_forks_reproducibly():
    patches.apply_patches("cpu")
    from megatron.core.tensor_parallel import random as mr

    tracker = mr.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 7)
    outer = __import__("torch").get_rng_state()
    with tracker.fork("a"):
        x = __import__("torch").rand(4)
    with tracker.fork("a"):
        y = __import__("torch").rand(4)
    import torch

    assert torch.equal(torch.get_rng_state(), outer), "fork must restore the outer RNG state"
    assert not torch.equal(x, y), "the forked stream must advance"
    tracker.reset()
    tracker.add("a", 7)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(4), x)


def test_the_megatron_core_under_test_is_the_one_asked_for():
    """The second CI lane (``scripts/mcore_overlay.py``) puts a newer megatron-core first on the path
    and names it in MEGATRON_EXT_EXPECT_MCORE; if the overlay did not take, every test of that lane
    would silently test the installed release again."""
    import os

    import megatron.core

    expected = os.environ.get("MEGATRON_EXT_EXPECT_MCORE")
    version = compat.mcore_version()
    lo, hi = compat.SUPPORTED_MCORE
    assert lo <= version < hi
    if expected:
        assert version == Version(expected), f"imported megatron-core {version} from {megatron.core.__file__}"
        assert compat.package_versions().get("megatron-core") == expected
