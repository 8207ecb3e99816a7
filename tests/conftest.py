"""Shared test set-up: repo root importable, torch.compile off (the CPU lane never compiles), and
megatron-core imported the way the CPU lane imports it (``compat.import_megatron_core``), whichever
test module imports it first."""

import os
import pathlib
import sys

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

try:
    from megatron_ext.compat import import_megatron_core

    import_megatron_core()
except ImportError:   # the kernel tests run without megatron-core
    pass
