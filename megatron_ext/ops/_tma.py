"""Host-side TMA tensor descriptors for the Triton kernels of every op (sm_90+), or None.

A kernel that takes a descriptor also keeps a pointer path (the CPU interpreter's lane, GPUs before
sm_90, Triton without descriptors, misaligned views); the launcher asks :func:`tensor_desc` and
passes ``desc is not None`` as the kernel's switch.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from typing import Optional, Sequence

import torch

from ..backends import fallback


@functools.lru_cache(maxsize=None)
def _descriptor_class():
    """Triton's host-side TensorDescriptor, or None (Triton < 3.4); looked up once."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


@functools.lru_cache(maxsize=None)
def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


_bound = threading.local()  # device indices whose context this thread has made sure of


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm90_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def sm90_or_later(device: torch.device) -> bool:
    """Whether the CUDA ``device`` has TMA (sm_90+); asked once per device per process."""
    return _sm90_or_later(_index(device))


def ensure_cuda_context(index: int) -> None:
    """Make the device's primary context current in this thread. Triton < 3.7 encodes host-side
    TMA descriptors with the driver API in the calling thread without making a context current
    first; autograd runs backward in its own device thread, where torch's runtime API has not
    bound one yet ("Failed to create tensor map descriptor: invalid device context"). Pure driver
    calls: no stream work, so CUDA-graph capture is unaffected."""
    done = getattr(_bound, "devices", None)
    if done is None:
        done = _bound.devices = set()
    if index in done:  # a context once current stays current in this thread
        return
    lib = _libcuda()
    if lib is None:
        return
    ctx = ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and ctx.value:
        done.add(index)
        return
    dev = ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), index) == 0 and \
            lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0 and lib.cuCtxSetCurrent(ctx) == 0:
        done.add(index)


def _unserved(t: torch.Tensor, block: Sequence[int], interpret: bool) -> Optional[str]:
    """Why TMA cannot serve ``t`` with boxes ``block`` (None: it can)."""
    esize = t.element_size()
    if t.dim() != len(block):
        return f"a {t.dim()}-d tensor for a {len(block)}-d box"
    if t.stride(-1) != 1:
        return "last dim not contiguous"
    if t.data_ptr() % 16 or any((st * esize) % 16 for st in t.stride()[:-1]) or \
            (t.shape[-1] * esize) % 16:
        return (f"shape {tuple(t.shape)} / strides {tuple(t.stride())} of {t.dtype}: base, strides "
                f"and rows must be 16-byte aligned")
    if t.device.type == "cuda":
        if not _sm90_or_later(_index(t.device)):
            return "GPU before sm_90"
    elif not interpret:
        return f"{t.device.type} tensor outside the interpreter"
    if _descriptor_class() is None:
        return "Triton without tensor descriptors (< 3.4)"
    return None


def tensor_desc(t: torch.Tensor, block: Sequence[int], interpret: bool, op: Optional[str] = None):
    """A descriptor over ``t`` as it is (its shape and strides; boxes ``block``), or None where TMA
    cannot serve it: last dim not contiguous, base or a stride not 16-byte aligned, a CUDA GPU
    before sm_90, Triton without descriptors, or a CPU tensor outside the interpreter. Boxes past
    the tensor's end read zeros. ``op``: the caller's config asked for TMA, so None is a fallback to
    pointer loads, recorded for ``op`` (logged once, listed in the run receipt)."""
    why = _unserved(t, block, interpret)
    if why is not None:
        if op is not None:
            fallback(op, "tma loads", "pointer loads", why)
        return None
    if t.device.type == "cuda":
        ensure_cuda_context(_index(t.device))
    return _descriptor_class()(t, list(t.shape), list(t.stride()), list(block))
