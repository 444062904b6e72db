"""Move a host-made array to the GPU before its first use (CUDA): `to_gpu(arr)`.

MLX 0.32 on CUDA keeps an array made from host data (`mx.array(numpy)`) in managed memory, resident on
the host; the first kernel that reads it faults its pages over to the GPU, 100-170 us of GPU time
(bench/results/small-pool-h100.json). A decode step's inputs are such an array (engine/step_arrays.py),
built while the GPU still runs the step before, so asking the driver to migrate it right away
(cuMemPrefetchAsync on a stream of our own) takes that wait off the GPU's path. Unified memory stays
coherent whatever the timing: a kernel that comes first faults as before.

Only managed pointers are prefetched (the driver is asked what the pointer is). Returns False, doing
nothing, off CUDA, with JANG_PREFETCH=0, or when the driver lacks the calls (logged once).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import mlx.core as mx
import numpy as np

from . import backend

log = logging.getLogger("jang_serve.kernels")

_IS_MANAGED = 8                 # CU_POINTER_ATTRIBUTE_IS_MANAGED
_LOC_DEVICE = 1                 # CU_MEM_LOCATION_TYPE_DEVICE
_STREAM_NON_BLOCKING = 1


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Driver:
    """The few CUDA driver calls we need, bound once; a context and a stream per calling thread."""

    def __init__(self, device: int):
        lib = ctypes.CDLL("libcuda.so.1")
        self.device = device
        self.retain, self.set_current = lib.cuDevicePrimaryCtxRetain, lib.cuCtxSetCurrent
        self.retain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        self.set_current.argtypes = [ctypes.c_void_p]
        self.stream_create = lib.cuStreamCreate
        self.stream_create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        self.attr = lib.cuPointerGetAttribute
        self.attr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        self.prefetch = lib.cuMemPrefetchAsync_v2     # (ptr, bytes, location, flags, stream)
        self.prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _Location, ctypes.c_uint, ctypes.c_void_p]
        self.local = threading.local()

    def stream(self) -> ctypes.c_void_p:
        s = getattr(self.local, "stream", None)
        if s is None:
            ctx, s = ctypes.c_void_p(), ctypes.c_void_p()
            _check(self.retain(ctypes.byref(ctx), self.device), "cuDevicePrimaryCtxRetain")
            _check(self.set_current(ctx), "cuCtxSetCurrent")
            _check(self.stream_create(ctypes.byref(s), _STREAM_NON_BLOCKING), "cuStreamCreate")
            self.local.stream = s
        return s

    def managed(self, ptr: int) -> bool:
        flag = ctypes.c_uint(0)
        return self.attr(ctypes.byref(flag), _IS_MANAGED, ptr) == 0 and flag.value == 1

    def to_device(self, ptr: int, nbytes: int) -> None:
        _check(self.prefetch(ptr, nbytes, _Location(_LOC_DEVICE, self.device), 0, self.stream()),
               "cuMemPrefetchAsync")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} returned CUDA error {rc}")


_driver: _Driver | None = None
_failed = False


def enabled() -> bool:
    return os.environ.get("JANG_PREFETCH", "1").strip() not in ("0", "false", "off") and not _failed \
        and backend.current() == "cuda"


def to_gpu(arr: mx.array) -> bool:
    """Start moving an evaluated, host-made array's bytes to the GPU; True when a prefetch was queued."""
    global _driver, _failed
    if not enabled():
        return False
    try:
        if _driver is None:
            _driver = _Driver(0)   # MLX uses the first visible GPU (tensor-parallel ranks: CUDA_VISIBLE_DEVICES)
        view = np.asarray(arr)           # MLX's buffer protocol: the array's own (unified) memory, no copy
        ptr = view.__array_interface__["data"][0]
        if not _driver.managed(ptr):
            return False
        _driver.to_device(ptr, view.nbytes)
        return True
    except (OSError, AttributeError, RuntimeError) as e:   # no libcuda, an old driver, a failed call
        _failed = True
        log.warning("kernels: prefetch of step inputs off (%s)", e)
        return False
