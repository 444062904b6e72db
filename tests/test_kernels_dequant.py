"""kernels/dequant_cuda.py on the CPU: a NumPy port of the kernel's work split (one thread per 8
output values, its packed bits and group, the field extraction) against mx.dequantize; and the
fallback route.
The CUDA kernel itself runs on the device (its first-use self-test, and bench/decode_kernels.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from jang_serve.kernels import dequant_cuda


def port(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, gs: int) -> np.ndarray:
    """The kernel's work split: thread e makes 8 consecutive values of one row from 8*bits packed bits."""
    mask = (1 << bits) - 1
    n, kw = w.shape
    k = kw * 32 // bits
    per_row = k // 8
    out = np.zeros((n, k), np.float32)
    for e in range(n * per_row):
        row, k0 = e // per_row, (e % per_row) * 8
        wr = w[row]
        if bits == 8:
            lo, hi = int(wr[k0 // 4]), int(wr[k0 // 4 + 1])
        else:
            lo, hi = int(wr[(k0 * bits) // 32]) >> ((k0 * bits) % 32), 0
        grp = k0 // gs
        sc, bi = np.float32(scales[row, grp]), np.float32(biases[row, grp])
        for i in range(8):
            q = ((lo if i < 4 else hi) >> (8 * (i % 4))) & mask if bits == 8 else (lo >> (bits * i)) & mask
            out[row, k0 + i] = sc * np.float32(q) + bi
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
