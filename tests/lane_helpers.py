"""Bit-level helpers shared by the lane emulations of the CUDA kernels (tests/test_kernels_qgemm.py,
tests/test_kernels_qgemv_tc.py): __byte_perm."""

from __future__ import annotations

import numpy as np


def bperm(x, y, sel):
    """__byte_perm(x, y, sel) for selector nibbles 0-7 (x and y uint32 arrays)."""
    b = [(x >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)] + \
        [(y >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
    out = np.zeros_like(x)
    for n in range(4):
        out |= b[(sel >> (4 * n)) & 7] << np.uint32(8 * n)
    return out
