"""The end of a decoder layer's half at many rows in one kernel: split-K partial sums + residual + RMSNorm.

    qmm_add_norm(a, w, scales, biases, bits, group_size, residual, norm_weight, eps) -> (h, hn)
      h  = residual + qmm(a, w, ...)                    the residual stream
      hn = mx.fast.rms_norm(h, norm_weight, eps)        the next matmul's input

At 16-256 rows (the tiled GEMMs' rows) a quantized decoder layer ran, besides its GEMMs, two adds, two RMSNorms
and the GEMMs' split-K reduce kernels as separate GPU ops (64 sequences, Llama-3-8B shapes, H100: 293 us of
RMSNorm, 206 us of adds and 353 us of reduces per step, and MLX's host-side dispatch of each op). Where the CUDA
GEMM that `kernels.qmm` picks for the case can hand out its float32 partial sums (`qmm.partials_plan`: the
register-operand and warpgroup GEMMs and qgemm3, split or not), one kernel here finishes the job: per row, it
sums the partials, rounds to x's dtype (the GEMM's own output), adds the residual and rounds again (as
`y + residual` does), then applies the RMSNorm exactly as MLX's kernel writes it (sum of squares in float32,
`w * T(h * rsqrt(mean + eps))`). h is the same as the unfused ops'; hn may differ from MLX's in the last bit
where the two sums of squares round differently.

Everywhere else (CPU, Metal, the GEMVs' row counts, JANG_KERNELS=reference, JANG_GEMM_EPILOGUE=0, or a failed
self-test) the composition above runs: the specification. `ready` evaluates arrays: call it outside traces.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend
from .qmm import partials_plan, qmm

MAX_THREADS = 1024

SOURCE = r"""
  // One block per row, VPT chunks of 4 values per thread (h kept in registers between the two passes).
  // ws [S, M, N] float32 partial sums; r [M, N] residual; nw [N] norm weight.
  const int row = blockIdx.x, M = r_shape[0], N = r_shape[1], S = ws_shape[0];
  const float* wr = ws + (size_t)row * N;
  const T* rr = r + (size_t)row * N;
  T* hr = h + (size_t)row * N;
  float hv[VPT][4];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < VPT; ++c) {
    const int j = (c * blockDim.x + threadIdx.x) * 4;
    if (j < N) {
      float4 a = *reinterpret_cast<const float4*>(wr + j);
#pragma unroll 4
      for (int s = 1; s < S; ++s) {   // the splits in order, as qgemm_cuda's reduce kernel sums them
        const float4 b = *reinterpret_cast<const float4*>(wr + (size_t)s * M * N + j);
        a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
      }
      const float v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T x = static_cast<T>(static_cast<float>(static_cast<T>(v[i])) + static_cast<float>(rr[j + i]));
        hr[j + i] = x;
        hv[c][i] = static_cast<float>(x);
        ss += hv[c][i] * hv[c][i];
      }
    }
  }
  __shared__ float part[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  const float inv = rsqrtf(part[0] / (float)N + JANG_EPS);
  T* nr = hn + (size_t)row * N;
#pragma unroll
  for (int c = 0; c < VPT; ++c) {
    const int j = (c * blockDim.x + threadIdx.x) * 4;
    if (j < N) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T y = static_cast<T>(hv[c][i] * inv);
        nr[j + i] = static_cast<T>(static_cast<float>(nw[j + i]) * static_cast<float>(y));
      }
    }
  }
"""


def launch_shape(n: int) -> tuple[int, int]:
    """(threads per block, chunks of 4 values per thread) for rows of n values: one pass where n <= 4096."""
    threads = min(MAX_THREADS, -(-(n // 4) // 32) * 32)
    return threads, -(-n // (4 * threads))


_kernels: dict[float, object] = {}
_checked: dict[tuple, bool] = {}


def enabled() -> bool:
    return (os.environ.get("JANG_GEMM_EPILOGUE", "1") != "0" and backend.for_op("gemm_epilogue") == "cuda"
            and hasattr(mx.fast, "cuda_kernel"))


def _kernel(eps: float):
    k = _kernels.get(eps)
    if k is None:
        k = _kernels[eps] = backend.cuda_kernel(
            name=f"jang_add_norm_{len(_kernels)}", input_names=["ws", "r", "nw"], output_names=["h", "hn"],
            source=SOURCE, header=f"#define JANG_EPS {float(eps)!r}f\n")
    return k


def add_norm_reference(y, residual, norm_weight, eps):
    h = y + residual
    return h, mx.fast.rms_norm(h, norm_weight, eps)


def reduce_add_norm(ws: mx.array, residual: mx.array, norm_weight: mx.array, eps: float):
    """The kernel: ws [S, M, N] float32, residual [M, N] (bf16/fp16), norm_weight [N] -> (h, hn)."""
    m, n = residual.shape
    threads, vpt = launch_shape(n)
    return tuple(_kernel(float(eps))(inputs=[ws, residual, norm_weight],
                                     template=[("T", residual.dtype), ("VPT", vpt)], grid=(m * threads, 1, 1),
                                     threadgroup=(threads, 1, 1), output_shapes=[(m, n), (m, n)],
                                     output_dtypes=[residual.dtype] * 2))


def supported(residual: mx.array, norm_weight: mx.array) -> bool:
    n = residual.shape[-1]
    return (residual.ndim == 2 and residual.dtype in (mx.bfloat16, mx.float16) and n % 4 == 0
            and n <= 16 * 4 * MAX_THREADS and norm_weight.shape == (n,) and norm_weight.dtype == residual.dtype)


def qmm_add_norm(a, w, scales, biases, bits, group_size, residual, norm_weight, eps):
    """(residual + qmm(a), rms_norm of that): one epilogue kernel after the GEMM where it serves (module
    docstring), else the composition. a [M, K], residual [M, N]."""
    if enabled() and supported(residual, norm_weight) and _checked.get((residual.dtype, float(eps))):
        plan = partials_plan(a, w, scales, biases, bits, group_size)
        if plan is not None:
            return reduce_add_norm(plan(a, w, scales, biases), residual, norm_weight, eps)
    return add_norm_reference(qmm(a, w, scales, biases, bits, group_size), residual, norm_weight, eps)


def self_test(dtype, eps: float) -> tuple[bool, str]:
    """The kernel against the composition on random partials: 1-3 splits, N a multiple of 4 but not of 128, and
    past one chunk per thread (5000 values). h must match exactly; hn within bf16/fp16 rounding of MLX's
    rms_norm."""
    worst = 0.0
    for s, m, n in ((1, 3, 1028), (3, 5, 4096), (2, 2, 5000)):
        ws = mx.random.normal((s, m, n)) * 2.0
        r = (mx.random.normal((m, n)) * 3.0).astype(dtype)
        nw = (1.0 + 0.1 * mx.random.normal((n,))).astype(dtype)
        h, hn = reduce_add_norm(ws, r, nw, eps)
        y = ws[0]
        for i in range(1, s):
            y = y + ws[i]
        want_h, want_hn = add_norm_reference(y.astype(dtype), r, nw, eps)
        if not mx.array_equal(h, want_h).item():
            return False, f"h differs from the composition at {s} splits, {m}x{n}"
        err = backend.relerr(hn, want_hn)
        worst = max(worst, err)
        if err > 4e-3:
            return False, f"hn relative error {err:.2e} at {s} splits, {m}x{n}"
    return True, f"worst hn relative error {worst:.1e}"


def ready(dtype, eps: float) -> bool:
    """Checked once per (dtype, eps) on first use (evaluates arrays: outside traces); a failure logs and keeps
    the composition."""
    if not enabled() or dtype not in (mx.bfloat16, mx.float16):
        return False
    return backend.verdict(_checked, (dtype, float(eps)), lambda: self_test(dtype, eps), "GEMM add + RMSNorm epilogue")
