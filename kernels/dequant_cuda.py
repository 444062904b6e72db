"""Affine dequantization on CUDA at copy speed: the weight of a prefill-sized matmul, before cuBLAS.

    dequantize(w [N, K*bits/32] uint32, scales, biases [N, K/group], bits, group, dtype) -> [N, K] dtype

The specification is `mx.dequantize` (w_hat = scale * q + bias per group); computed here in float32
with one rounding to the output dtype. From 192 activation rows kernels.qmm dequantizes the weight and
lets cuBLAS run the dense matmul; MLX's dequantize moves ~1.2 TB/s there (kernels-gemm-h100.json:
~125 us for a 14336x4096 4-bit matrix), and a JANG_4M prefill step of an 8B model took ~18 ms longer
than bf16's (e2e-h100.json timelines). One thread per 8 output values: one 16-byte store (a warp
writes 512 contiguous bytes), 8 x bits of packed weights (a warp reads 64 / 128 / 256 contiguous
bytes at 2 / 4 / 8 bits), its group's scale and bias from L1. (A first version with one thread per
16-byte unit of packed weights wrote 64-128 bytes per thread and was slower than MLX at 2 bits.)
"""

from __future__ import annotations

import mlx.core as mx

from . import backend
from .cuda_common import HEADER

SOURCE = r"""
  // thread e: 8 consecutive output values (one 16-byte store; a warp writes 512 contiguous bytes) from
  // 8 * BITS bits of packed weights (2, 4 or 8 bytes, never across a word pair) and one group's scale/bias
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int KW = w_shape[1];
  const int K = KW * 32 / BITS;
  const int per_row = K / 8;
  const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= (size_t)w_shape[0] * per_row) return;
  const size_t n = e / per_row;
  const int k0 = (int)(e % per_row) * 8;
  const uint32_t* wr = w + n * (size_t)KW;
  uint32_t lo, hi = 0u;
  if constexpr (BITS == 8) {
    const uint2 p = __ldg(reinterpret_cast<const uint2*>(wr + k0 / 4));
    lo = p.x; hi = p.y;
  } else {
    lo = __ldg(wr + (k0 * BITS) / 32) >> ((k0 * BITS) % 32);
  }
  const int grp = k0 / GS;
  const float sc = jang::to_f(scales[n * (size_t)(K / GS) + grp]);
  const float bi = jang::to_f(biases[n * (size_t)(K / GS) + grp]);
  T v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t q = BITS == 8 ? (((i < 4 ? lo : hi) >> (8 * (i % 4))) & MASK) : ((lo >> (BITS * i)) & MASK);
    v[i] = jang::from_f<T>(fmaf(sc, (float)q, bi));
  }
  *reinterpret_cast<uint4*>(y + n * (size_t)K + k0) = *reinterpret_cast<const uint4*>(v);
"""

THREADS = 256
_kernel = None


def _get():
    global _kernel
    if _kernel is None:
        _kernel = backend.cuda_kernel(name="jang_dequant", input_names=["w", "scales", "biases"], output_names=["y"],
                                      source=SOURCE, header=HEADER)
    return _kernel


def supports(w: mx.array, bits: int, group_size: int, dtype) -> bool:
    return (bits in (2, 4, 8) and group_size in (32, 64, 128) and w.dtype == mx.uint32 and w.ndim == 2
            and dtype in (mx.bfloat16, mx.float16) and (w.shape[1] * 32 // bits) % group_size == 0)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int, dtype) -> mx.array:
    """See the module docstring; mx.dequantize where the kernel does not apply."""
    if not supports(w, bits, group_size, dtype):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(dtype)
    n, kw = w.shape
    k = kw * 32 // bits
    units = n * (k // 8)
    return _get()(inputs=[w, scales, biases],
                  template=[("T", dtype), ("BITS", bits), ("GS", group_size)],
                  grid=(-(-units // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                  output_shapes=[(n, k)], output_dtypes=[dtype])[0]


_ready: dict[tuple, bool] = {}


def ready(bits: int, group_size: int, dtype, scale_dtype) -> bool:
    """First use per template: the kernel against mx.dequantize on a small matrix (values within one
    rounding of the output dtype); a mismatch or error keeps mx.dequantize for it, with a log line.
    Evaluates arrays: called on the first call with new shapes, before any trace (kernels.qmm)."""
    key = (bits, group_size, dtype, scale_dtype)
    if key not in _ready:
        from . import backend

        try:
            wf = mx.random.normal((48, 512))
            wq, s, b = mx.quantize(wf.astype(dtype), group_size=group_size, bits=bits)
            s, b = s.astype(scale_dtype), b.astype(scale_dtype)
            want = mx.dequantize(wq, s, b, group_size=group_size, bits=bits).astype(mx.float32)
            got = dequantize(wq, s, b, bits, group_size, dtype).astype(mx.float32)
            tol = (mx.abs(want) * (2.0 ** -7 if dtype == mx.bfloat16 else 2.0 ** -10) + 1e-6)
            _ready[key] = bool(mx.all(mx.abs(got - want) <= tol).item())
            if not _ready[key]:
                backend.disable("cuda", f"dequant{bits}_{group_size}", "self-test mismatch")
        except Exception as e:
            _ready[key] = False
            backend.disable("cuda", f"dequant{bits}_{group_size}", repr(e)[:200])
    return _ready[key]
