"""Quantized matmul entry point: y = x @ dequant(w).T for MLX's affine packed weights.

  x [..., K] (bf16 / fp16 / fp32), w uint32 [N, K*bits/32], scales / biases [N, K/group_size]
  bits 2, 3, 4, 5, 6, 8; group_size 32, 64, 128.

Paths by backend (kernels/backend.py) and by activation rows M = prod(x.shape[:-1]):
  reference    mx.quantized_matmul (the specification)
  cpu, M<16    the reference
  cpu, M>=16   dequantize, then the dense float32 matmul (BLAS): MLX's CPU quantized_matmul does
               ~1 GFLOP/s, dense float32 with OpenBLAS ~45 (bench/results/qmm-cpu.json)
  cuda, M<=4   fused dequant + GEMV kernel (kernels/qmm_cuda.py)
  cuda, M<=QGEMM_ROWS  tiled dequant + tensor-core GEMM (kernels/qgemm_cuda.py; bits 2/4/8, N % 128 == 0),
               checked once per template against the reference at first use (off on a mismatch)
  cuda, else   mx.quantized_matmul below DEQUANT_ROWS rows, else dequantize once to the activation
               dtype and run the dense (cuBLAS) matmul; thresholds from bench/results/kernels-h100.json
               (JANG_QGEMM=0 turns the tiled GEMM off)
  metal, M<=8  the Metal port of the GEMV kernel (kernels/qmm_metal.py), self-tested at first use
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend

# From the H100 run (bench/results/kernels-h100.json): the fused GEMV wins up to 4 rows; from 5 rows
# MLX's tensor-core quantized_matmul is faster; dequantize + dense matmul only pays for large prefills.
GEMV_ROWS = 4
QGEMM_ROWS = 256
DEQUANT_ROWS = 192
# CPU: from this many rows, dequantize + dense matmul beats mx.quantized_matmul for every SmolLM2 shape
# (bench/qmm_cpu.py: small matrices win from 4 rows, the 49152x576 tied lm_head only from ~16).
CPU_DEQUANT_ROWS = 16


def qgemm_on() -> bool:
    return os.environ.get("JANG_QGEMM", "1").strip() not in ("0", "false", "off")


def qmm_reference(x, w, scales, biases, bits, group_size):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def qmm_dequant_matmul(x, w, scales, biases, bits, group_size):
    """Same math as the reference: dequantize the weight, then a dense matmul (in float32 on the CPU,
    where MLX has no fast half-precision matmul), result in x's dtype."""
    wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    return (x.astype(mx.float32) @ wd.T).astype(x.dtype)


def _check(x, w, scales, biases, bits, group_size):
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"qmm: bits must be 2, 3, 4, 5, 6 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"qmm: group_size must be 32, 64 or 128, got {group_size}")
    if w.ndim != 2 or w.dtype != mx.uint32:
        raise ValueError(f"qmm: w must be a 2-D uint32 array, got {w.dtype} {tuple(w.shape)}")
    k = w.shape[1] * 32 // bits
    if x.shape[-1] != k:
        raise ValueError(f"qmm: x has {x.shape[-1]} input features but w packs {k} at {bits} bits")
    if scales.shape != (w.shape[0], k // group_size) or biases.shape != scales.shape:
        raise ValueError(f"qmm: scales/biases must be {(w.shape[0], k // group_size)}, got "
                         f"{tuple(scales.shape)} / {tuple(biases.shape)}")


def qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """x: [..., K] activations; w: [N, K*bits/32] uint32 packed; scales/biases: [N, K/group_size].

    Returns [..., N] in x's dtype."""
    _check(x, w, scales, biases, bits, group_size)
    b = backend.for_op("qmm")
    lead = x.shape[:-1]
    m = 1
    for d in lead:
        m *= d
    k = x.shape[-1]
    if b == "reference":
        if m >= CPU_DEQUANT_ROWS and backend.cpu_fast_paths():
            return qmm_dequant_matmul(x, w, scales, biases, bits, group_size)
        return qmm_reference(x, w, scales, biases, bits, group_size)
    if b == "cuda":
        from . import qgemm_cuda, qmm_cuda

        if m <= GEMV_ROWS and qmm_cuda.supports(x, w, bits, group_size):
            y = qmm_cuda.qgemv(x.reshape(m, k), w, scales, biases, bits, group_size)
            return y.reshape(*lead, w.shape[0])
        if m <= QGEMM_ROWS and qgemm_on() and qgemm_cuda.supports(x, w, bits, group_size) \
                and qgemm_cuda.ready(x.dtype, scales.dtype, bits, group_size, m):
            y = qgemm_cuda.qgemm(x.reshape(m, k), w, scales, biases, bits, group_size)
            return y.reshape(*lead, w.shape[0])
        if m >= DEQUANT_ROWS and x.dtype in (mx.bfloat16, mx.float16):
            wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(x.dtype)
            return x @ wd.T
        return qmm_reference(x, w, scales, biases, bits, group_size)
    if b == "metal":
        from . import qmm_metal

        if m <= qmm_metal.MAX_ROWS and qmm_metal.supports(x, w, bits, group_size) and qmm_metal.ready():
            y = qmm_metal.qgemv(x.reshape(m, k), w, scales, biases, bits, group_size)
            return y.reshape(*lead, w.shape[0])
    return qmm_reference(x, w, scales, biases, bits, group_size)
