"""The first tiled GEMM (kernels/qgemm_v1_cuda.py, kernels.qmm's default "qgemm" until v2 is measured on
the device) on the CPU: a NumPy port of its per-tile algorithm (16-byte units of packed words, the group
of each value, dequantize in fp32 and round to bf16, fp32 accumulation over K tiles, split-K partial
sums) checked against mx.quantized_matmul, and its grid-filling split-K rule."""

import numpy as np
import pytest

import mlx.core as mx

from jang_serve.kernels import qgemm_v1_cuda

BN, BK = qgemm_v1_cuda.BN, qgemm_v1_cuda.BK


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and back, as __floats2bfloat162_rn does."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def qgemm_port(x, wq, scales, biases, bits, gs, split):
    """x [M, K] (bf16 values), wq uint32 [N, K*bits/32]: the kernel's tile loop, one output tile
    column block at a time, in NumPy."""
    m, k = x.shape
    n = wq.shape[0]
    vpw = 32 // bits
    vpu = 4 * vpw                      # values per 16-byte unit
    ngu = vpu // gs if vpu > gs else 1  # groups per unit
    gvu = vpu // ngu
    mask = (1 << bits) - 1
    kper = k // split
    y = np.zeros((m, n), dtype=np.float32)
    for s in range(split):
        part = np.zeros((m, n), dtype=np.float32)
        for kt in range(kper // BK):
            k0 = s * kper + kt * BK
            wt = np.zeros((n, BK), dtype=np.float32)
            for c in range(BK // vpu):          # the tile's 16-byte units of each row
                words = wq[:, k0 // vpw + 4 * c: k0 // vpw + 4 * c + 4]  # [N, 4]
                for v in range(vpu):
                    u = v // gvu
                    g = (k0 + c * vpu + u * gvu) // gs
                    q = (words[:, v // vpw] >> np.uint32(bits * (v % vpw))) & np.uint32(mask)
                    wt[:, c * vpu + v] = scales[:, g] * q.astype(np.float32) + biases[:, g]
            wt = _bf16(wt)                      # the shared-memory tile holds bf16
            part += x[:, k0:k0 + BK] @ wt.T     # mma: bf16 products, fp32 accumulation
        y += part                               # split-K: atomic adds into fp32
    return y


@pytest.mark.parametrize("bits,gs", [(4, 64), (4, 32), (4, 128), (2, 32), (2, 64), (8, 64), (8, 128)])
@pytest.mark.parametrize("split", [1, 2])
def test_port_matches_quantized_matmul(bits, gs, split):
    n, k, m = BN, 4 * BK, 5
    mx.random.seed(bits * 10 + gs + split)
    w = mx.random.normal((n, k)) * 0.05
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    x = mx.random.normal((m, k)).astype(mx.bfloat16).astype(mx.float32)
    ref = np.array(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits), dtype=np.float64)
    y = qgemm_port(np.array(x), np.array(wq), np.array(s), np.array(b), bits, gs, split)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < 5e-3, err        # bf16 rounding of the dequantized weights only
    # a wrong group or field mapping would be far off: check the port can tell
    wrong = qgemm_port(np.array(x), np.array(wq), np.array(s)[:, ::-1].copy(), np.array(b), bits, gs, split)
    assert np.linalg.norm(wrong - ref) / np.linalg.norm(ref) > 1e-2 or k // gs == 1


def test_block_rows_and_splits():
    assert [qgemm_v1_cuda.block_rows(m) for m in (5, 32, 33, 64, 65, 256)] == [32, 32, 64, 64, 128, 128]
    assert qgemm_v1_cuda.default_split(64, 14336, 4096) == qgemm_v1_cuda.grid_split(64, 14336, 4096) == 2
    assert qgemm_v1_cuda.grid_split(64, 4096, 14336) == 8      # 32 column blocks -> 256 blocks
    # the grid-filling split keeps whole 64-wide tiles and >= 256 of K per split
    for m, n, k in ((64, 4096, 14336), (64, 1024, 4096), (16, 14336, 4096)):
        s = qgemm_v1_cuda.grid_split(m, n, k)
        assert k % (BK * s) == 0 and k // s >= qgemm_v1_cuda.MIN_K_PER_SPLIT
