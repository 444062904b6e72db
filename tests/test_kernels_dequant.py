"""kernels/dequant_cuda.py on the CPU: a NumPy port of the kernel's work split (one thread per
16-byte unit, its group(s), the field extraction) against mx.dequantize; and the fallback route.
The CUDA kernel itself runs on the device (its first-use self-test, and bench/decode_kernels.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.kernels import dequant_cuda


def port(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, gs: int) -> np.ndarray:
    vals = 128 // bits
    ng = vals // gs if vals > gs else 1
    gv = vals // ng
    mask = (1 << bits) - 1
    n, kw = w.shape
    k = kw * 32 // bits
    upr = k // vals
    out = np.zeros((n, k), np.float32)
    units = w.reshape(n * upr, 4)               # one 16-byte unit per thread
    for u in range(n * upr):
        row, c = divmod(u, upr)
        words = units[u]
        for g in range(ng):
            grp = (c * vals + g * gv) // gs
            sc, bi = scales[row, grp], biases[row, grp]
            for j in range(g * gv, (g + 1) * gv):
                q = (int(words[(j * bits) // 32]) >> ((j * bits) % 32)) & mask
                out[row, c * vals + j] = np.float32(sc) * np.float32(q) + np.float32(bi)
    return out


@pytest.mark.parametrize("bits,gs", [(2, 32), (2, 128), (4, 32), (4, 64), (8, 64), (8, 128)])
def test_port_matches_mx_dequantize(bits, gs):
    mx.random.seed(bits * 100 + gs)
    wq, s, b = mx.quantize(mx.random.normal((6, 256)), group_size=gs, bits=bits)
    want = np.array(mx.dequantize(wq, s, b, group_size=gs, bits=bits))
    got = port(np.array(wq), np.array(s), np.array(b), bits, gs)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6)
    # a wrong field position is caught
    bad = port(np.array(wq), np.array(s), np.array(b)[:, ::-1].copy(), bits, gs)
    assert not np.allclose(bad, want, rtol=1e-3, atol=1e-3)


def test_cpu_falls_back_to_mx_dequantize():
    wq, s, b = mx.quantize(mx.random.normal((8, 96)), group_size=32, bits=3)   # 3 bits: no kernel
    assert not dequant_cuda.supports(wq, 3, 32, mx.bfloat16)
    got = dequant_cuda.dequantize(wq, s, b, 3, 32, mx.float32)
    assert mx.allclose(got, mx.dequantize(wq, s, b, group_size=32, bits=3)).item()
