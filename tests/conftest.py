"""Shared test set-up: repo root importable, torch.compile off (the CPU lane never compiles), and
megatron-core imported the way the CPU lane imports it (``compat.import_megatron_core``), whichever
test module imports it first."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(ROOT))
# megatron-core 0.19's CheckpointWithoutOutput (the 'layernorm' recompute entry among others)
# builds a small C++ extension with torch's load_inline on first use, ~20-27 s on two cores. Its
# build files name this checkout's interpreter, so two checkouts sharing torch's default cache
# directory rebuild it in turn; one directory per checkout (git-ignored) builds it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

# Triton builds its own language helpers (tl.zeros, ...) for the interpreter or the compiler when it
# is imported, and megatron-core imports Triton: the kernel tests' lane (TRITON_INTERPRET=1 where
# there is no GPU) is set before megatron-core is imported.
import tests.kernel_lane  # noqa: E402,F401

try:
    from megatron_ext.compat import import_megatron_core

    import_megatron_core()
except ImportError:   # the kernel tests run without megatron-core
    pass
