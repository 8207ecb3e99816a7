"""Shared test set-up: repo root importable, torch.compile off (the CPU lane never compiles)."""

import os
import pathlib
import sys

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
