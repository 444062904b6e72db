"""The CUDA tiled GEMM (kernels/qgemm_cuda.py) on the CPU: a NumPy port of its per-tile algorithm
(16-byte units of packed words, the group of each value, dequantize in fp32 and round to bf16,
fp32 accumulation over K tiles, split-K partial sums) checked against mx.quantized_matmul, and the
CUDA routing of kernels.qmm by rows / bits (a pure decision, no GPU needed)."""

import importlib

import numpy as np
import pytest

import mlx.core as mx

from jang_serve.kernels import qgemm_cuda
qmm_mod = importlib.import_module("jang_serve.kernels.qmm")

BN, BK = qgemm_cuda.BN, qgemm_cuda.BK


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
    assert [qgemm_cuda.block_rows(m) for m in (5, 32, 33, 64, 65, 256)] == [32, 32, 64, 64, 128, 128]
    assert qgemm_cuda.default_split(64, 14336, 4096) == qgemm_cuda.grid_split(64, 14336, 4096) == 2
    assert qgemm_cuda.grid_split(64, 4096, 14336) == 8      # 32 column blocks -> 256 blocks
    # the grid-filling split keeps whole 64-wide tiles and >= 256 of K per split
    for m, n, k in ((64, 4096, 14336), (64, 1024, 4096), (16, 14336, 4096)):
        s = qgemm_cuda.grid_split(m, n, k)
        assert k % (BK * s) == 0 and k // s >= qgemm_cuda.MIN_K_PER_SPLIT


def _args(m, n, k, bits, dtype=mx.bfloat16):
    x = mx.zeros((m, k), dtype=dtype)
    w = mx.zeros((n, k * bits // 32), dtype=mx.uint32)
    return x, w


@pytest.mark.parametrize("m,bits,n,want", [
    (1, 4, 4096, "gemv"), (4, 8, 4096, "gemv"),
    (8, 4, 4096, "reference"),           # <= 16 rows: MLX's quantized_matmul
    (17, 4, 4096, "qgemm"), (64, 4, 14336, "qgemm"), (191, 2, 4096, "qgemm"),
    (64, 8, 4096, "qgemm"), (64, 8, 1024, "qgemm"),
    (64, 3, 4096, "reference"),          # the tiled GEMM serves 2 and 4 bits only
    (64, 4, 1000, "reference"),          # N not a multiple of 128
    (192, 4, 4096, "dequant"), (300, 8, 4096, "reference"), (384, 8, 4096, "dequant"),
])
def test_cuda_route(m, bits, n, want, monkeypatch):
    monkeypatch.delenv("JANG_QGEMM", raising=False)
    x, w = _args(m, n, 512, bits)
    assert qmm_mod._cuda_route(m, x, w, bits, 64) == want


def test_cuda_route_qgemm_off(monkeypatch):
    monkeypatch.setenv("JANG_QGEMM", "0")
    x, w = _args(64, 4096, 512, 4)
    assert qmm_mod._cuda_route(64, x, w, 4, 64) == "reference"
    monkeypatch.setenv("JANG_QGEMM", "1")
    monkeypatch.setenv("JANG_QGEMM_BITS", "2,4")
    x, w = _args(64, 4096, 512, 8)
    assert qmm_mod._cuda_route(64, x, w, 8, 64) == "reference"


def test_split_env(monkeypatch):
    monkeypatch.setenv("JANG_QGEMM_SPLIT", "1")
    assert qgemm_cuda.default_split(64, 4096, 14336) == 1


def test_route_cache_still_checks_new_shapes():
    """The per-shape route cache must not skip argument checks for a shape it has not seen."""
    wq, s, b = mx.quantize(mx.random.normal((32, 128)), group_size=64, bits=4)
    qmm_mod.qmm(mx.zeros((2, 128)), wq, s, b, 4, 64)
    with pytest.raises(ValueError, match="input features"):
        qmm_mod.qmm(mx.zeros((2, 64)), wq, s, b, 4, 64)
