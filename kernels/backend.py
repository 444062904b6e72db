"""Which implementation runs: "cuda", "metal" or "reference" (the pure-MLX specification).

Chosen by the default device: CPU -> reference; GPU -> CUDA or Metal, whichever backend MLX has.
JANG_KERNELS=reference forces the reference everywhere (JANG_KERNELS=cuda/metal is accepted too,
but still falls back where that backend does not exist). A Metal op whose start-up self-test
failed is marked off and runs the reference (see `disable`).
"""

from __future__ import annotations

import hashlib
import logging
import os

import mlx.core as mx

log = logging.getLogger("jang_serve.kernels")

_disabled: set[tuple[str, str]] = set()    # (backend, op) pairs that failed their self-test


def relerr(a: mx.array, b: mx.array) -> float:
    """||a - b|| / ||b|| in float32 (inf when a has a non-finite value): the kernels' self-tests' measure."""
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    if not mx.all(mx.isfinite(a)).item():
        return float("inf")
    return (mx.sqrt(mx.sum((a - b) ** 2)) / mx.maximum(mx.sqrt(mx.sum(b * b)), 1e-30)).item()


def kernel_name(name: str, source: str, header: str = "") -> str:
    """name + a digest of the kernel's text. MLX keeps compiled custom kernels on disk (its PTX cache, one per MLX
    version) under the kernel's name and template arguments, across processes: a name must never stand for two
    texts (another model's defines, such as its norm eps or RoPE head count, or another release's source), or a
    later process runs the earlier one's kernel."""
    digest = hashlib.sha1((header + "\0" + source).encode()).hexdigest()[:10]
    return f"{name}_{digest}"


def cuda_kernel(name: str, source: str, header: str = "", **kw):
    """`mx.fast.cuda_kernel` under `kernel_name(name, source, header)`."""
    return mx.fast.cuda_kernel(name=kernel_name(name, source, header), source=source, header=header, **kw)


def _gpu_backend() -> str | None:
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def current() -> str:
    """The backend for the default device right now."""
    forced = os.environ.get("JANG_KERNELS", "").strip().lower()
    if forced == "reference":
        return "reference"
    if forced and forced not in ("cuda", "metal", "auto"):
        raise ValueError(f"JANG_KERNELS must be reference, cuda, metal or auto, got {forced!r}")
    if mx.default_device().type == mx.DeviceType.cpu:
        return "reference"
    gpu = _gpu_backend()
    return gpu or "reference"


def cpu_fast_paths() -> bool:
    """True when running on the CPU with the reference not forced: ops may then take CPU-specific
    routes built from MLX ops (same math as the reference, e.g. dequantize + BLAS matmul)."""
    forced = os.environ.get("JANG_KERNELS", "").strip().lower()
    return forced != "reference" and mx.default_device().type == mx.DeviceType.cpu


def for_op(op: str) -> str:
    """Backend for one op, honouring a failed self-test."""
    b = current()
    if (b, op) in _disabled:
        return "reference"
    return b


def disable(backend: str, op: str, reason: str) -> None:
    if (backend, op) not in _disabled:
        log.warning("kernels: %s %s kernel disabled, using the MLX reference (%s)", backend, op, reason)
    _disabled.add((backend, op))


def disabled() -> set[tuple[str, str]]:
    return set(_disabled)


def verdict(checked: dict, key, test, what: str) -> bool:
    """A kernel's self-test, run once per key: test() -> (ok, why); an exception (no NVRTC, a compile or launch
    error) is a failure. A failure is logged ("kernels: cuda WHAT KEY disabled (WHY)") and the caller keeps its
    other path. Evaluates arrays: call it outside traces."""
    if key not in checked:
        try:
            ok, why = test()
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile or run is a failed self-test
            ok, why = False, f"{type(e).__name__}: {str(e)[:500]}"
        if not ok:
            log.warning("kernels: cuda %s %s disabled (%s)", what, key, why)
        checked[key] = ok
    return checked[key]
