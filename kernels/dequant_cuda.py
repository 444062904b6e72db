"""Affine dequantization on CUDA at copy speed: the weight of a prefill-sized matmul, before cuBLAS.

    dequantize(w [N, K*bits/32] uint32, scales, biases [N, K/group], bits, group, dtype) -> [N, K] dtype

The specification is `mx.dequantize` (w_hat = scale * q + bias per group); computed here in float32
with one rounding to the output dtype. From 192 activation rows kernels.qmm dequantizes the weight and
lets cuBLAS run the dense matmul; MLX's dequantize moves ~1.2 TB/s there (kernels-gemm-h100.json:
~125 us for a 14336x4096 4-bit matrix), so a prefill step of a JANG model paid ~18 ms over bf16 in
dequantization alone. One thread per 16-byte unit of packed weights (64 / 32 / 16 values at 2 / 4 / 8
bits): one 16-byte load, its group's scale and bias, and 16-byte stores of the values.
"""

from __future__ import annotations

import mlx.core as mx

from .cuda_common import HEADER

SOURCE = r"""
  constexpr int VALS = 128 / BITS;                 // values per 16-byte unit
  constexpr int NG = VALS > GS ? VALS / GS : 1;    // groups per unit
  constexpr int GV = VALS / NG;                    // values per group chunk of the unit
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int KW = w_shape[1];
  const int K = KW * 32 / BITS;
  const int upr = K / VALS;                        // units per row
  const size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t total = (size_t)w_shape[0] * upr;
  if (u >= total) return;
  const size_t n = u / upr;
  const int c = (int)(u % upr);
  const uint4 pw = __ldg(reinterpret_cast<const uint4*>(w) + u);
  const uint32_t words[4] = {pw.x, pw.y, pw.z, pw.w};
  const int ngr = K / GS;
  T* out = y + n * (size_t)K + (size_t)c * VALS;
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const int grp = (c * VALS + g * GV) / GS;
    const float sc = jang::to_f(scales[n * ngr + grp]);
    const float bi = jang::to_f(biases[n * ngr + grp]);
#pragma unroll
    for (int j0 = 0; j0 < GV; j0 += 8) {
      T v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int j = g * GV + j0 + i;             // value index within the unit
        const uint32_t q = (words[(j * BITS) / 32] >> ((j * BITS) % 32)) & MASK;
        v[i] = jang::from_f<T>(fmaf(sc, (float)q, bi));
      }
      *reinterpret_cast<uint4*>(out + g * GV + j0) = *reinterpret_cast<const uint4*>(v);
    }
  }
"""

THREADS = 256
_kernel = None


def _get():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="jang_dequant", input_names=["w", "scales", "biases"], output_names=["y"],
                                      source=SOURCE, header=HEADER)
    return _kernel


def supports(w: mx.array, bits: int, group_size: int, dtype) -> bool:
    return (bits in (2, 4, 8) and group_size in (32, 64, 128) and w.dtype == mx.uint32 and w.ndim == 2
            and dtype in (mx.bfloat16, mx.float16) and (w.shape[1] * 32 // bits) % (128 // bits) == 0)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int, dtype) -> mx.array:
    """See the module docstring; mx.dequantize where the kernel does not apply."""
    if not supports(w, bits, group_size, dtype):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(dtype)
    n, kw = w.shape
    k = kw * 32 // bits
    units = n * (k // (128 // bits))
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
