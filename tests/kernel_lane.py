"""The Triton lane of the kernel tests: compiled on the GPU where there is one, Triton's CPU
interpreter elsewhere. Import this module first in a kernel test file, before torch or any kernel
module: ``triton.jit`` reads TRITON_INTERPRET when a kernel module is imported. Interpreting only
without a GPU matters: on a CUDA host TRITON_INTERPRET=1 would also turn the kernels of every later
test file in the same pytest process into interpreted ones."""

import importlib
import os
from typing import Optional

os.environ["TORCH_COMPILE_DISABLE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

NO_CUDA = not torch.cuda.is_available()
if NO_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if NO_CUDA else "cuda"


def triton_why_not(kernel_module: str) -> Optional[str]:
    """Why the Triton tests of ``kernel_module`` (which has ``interpreted()``) cannot run here, or None."""
    try:
        mod = importlib.import_module(kernel_module)
    except ImportError:  # pragma: no cover
        return "triton is not installed"
    if NO_CUDA and not mod.interpreted():
        return f"{kernel_module} was imported (by an earlier test file) before TRITON_INTERPRET=1 was set"
    return None


def triton_mark(kernel_module: str) -> pytest.MarkDecorator:
    """``skipif`` for Triton tests: skipped with the reason from :func:`triton_why_not`."""
    why = triton_why_not(kernel_module)
    return pytest.mark.skipif(why is not None, reason=str(why))


@pytest.fixture(autouse=True)
def clean_backend_records():
    """Each test sees only its own backend choices (import this fixture into the test module)."""
    from megatron_ext import backends

    backends.reset()
    yield
    backends.reset()
