"""Metal helpers shared by the Metal ports, and the start-up self-test that guards each of them.

UNTESTED ON DEVICE: this project has no Apple GPU to run Metal on. Every Metal kernel is a port of
its CUDA twin (same work split and arithmetic, scalar loads instead of 16-byte vectors, no FAST
masking trick) and is used only after `self_test` has compared it with the MLX reference on small
random inputs; any exception or mismatch disables it with a log line and the reference runs.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from . import backend
from .backend import relerr

HEADER = r"""
template <int BITS>
inline uint jang_field(thread const uint* w, int j) {
  const uint MASK = (1u << BITS) - 1u;
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  if (sh + BITS <= 32) return (w[wi] >> sh) & MASK;
  return ((w[wi] >> sh) | (w[wi + 1] << (32 - sh))) & MASK;
}
"""

_results: dict[str, bool] = {}


def self_test(op: str, cases: Callable[[], list[tuple[mx.array, mx.array]]], tol: float = 2e-2) -> bool:
    """Run once per op: `cases()` returns (kernel output, reference output) pairs. Returns whether
    the Metal kernel may be used; on failure the op is disabled (kernels/backend.py logs it)."""
    if op in _results:
        return _results[op]
    try:
        worst = 0.0
        for got, ref in cases():
            worst = max(worst, relerr(got, ref))
        ok = worst <= tol
        reason = f"self-test relative error {worst:.3g} > {tol}"
    except Exception as e:  # compile or launch failure: fall back, never crash the server
        ok, reason = False, f"self-test raised {type(e).__name__}: {e}"
    if not ok:
        backend.disable("metal", op, reason)
    _results[op] = ok
    return ok
