"""Shared test set-up: repo root importable, torch.compile off (the CPU lane never compiles), and
megatron-core imported the way the CPU lane imports it (``compat.import_megatron_core``), whichever
test module imports it first."""

import os
import pathlib
import sys

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Triton builds its own language helpers (tl.zeros, ...) for the interpreter or the compiler when it
# is imported, and megatron-core imports Triton: the kernel tests' lane (TRITON_INTERPRET=1 where
# there is no GPU) is set before megatron-core is imported.
import tests.kernel_lane  # noqa: E402,F401

try:
    from megatron_ext.compat import import_megatron_core

    import_megatron_core()
except ImportError:   # the kernel tests run without megatron-core
    pass
