"""Give MLX's CPU backend a fast BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles the netlib reference BLAS, whose float32 GEMM runs at a few
GFLOP/s; a system OpenBLAS loaded into the global symbol scope *before* MLX is first imported is
picked up instead (measured here: 1024^3 float32 matmul 3.3 -> 48 GFLOP/s on one core). Nothing
changes where OpenBLAS is absent (Debian: apt-get install libopenblas0-pthread), on macOS, or when
JANG_SERVE_NO_OPENBLAS=1 is set.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None


def preload() -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL if possible; returns its path, or None."""
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get("JANG_SERVE_NO_OPENBLAS"):
        return loaded
    if "mlx.core" in sys.modules:  # too late: MLX has already bound its BLAS symbols
        return None
    for path in CANDIDATES:
        if os.path.exists(path):
            # One thread per process by default: the server's engine loop and the tests share few cores.
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
