"""The first tiled GEMM (qgemm v1), kept as kernels.qmm's default until its successor in kernels/qgemm_cuda.py
(v2, JANG_QGEMM_IMPL=v2) is measured on the device. Tiled dequant + tensor-core GEMM for MLX's affine packed
weights on CUDA (5-256 activation rows).

y[M, N] = x[M, K] @ dequant(w)[N, K].T, w uint32 [N, K*bits/32] (bits 2, 4 or 8), scales / biases
[N, K/group_size]. Each block owns BN=128 output features, BM rows of x (32/64/128) and one slice
of K (split-K when there are too few column blocks to fill the GPU). Per K tile of 64:
1. every thread holds the next tile's packed weights (one or two 16-byte loads), their scales and
   biases, and its share of x in registers (loaded while the previous tile computes);
2. it dequantizes its weights (`scale * q + bias` in fp32, rounded to the activation dtype) into a
   shared-memory tile Ws[128][64+8] and copies its x into Xs[BM][64+8] (rows padded by 16 bytes,
   so ldmatrix reads are free of bank conflicts);
3. 8 warps (2 along M x 4 along N) each compute (BM/2) x 32 with mma.sync m16n8k16 (bf16 or fp16
   in, fp32 accumulate), fragments loaded by ldmatrix.x4.
With split-K the fp32 partial sums are added atomically into a zero-initialised fp32 output that
the caller casts to the activation dtype; without it the block writes the activation dtype.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend
from .cuda_common import HEADER as COMMON
from .qgemm_cuda import MMA  # mma16816, pack2

HEADER = COMMON + MMA + r"""
namespace jang {

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

}  // namespace jang
"""

SOURCE = r"""
  constexpr int BN = 128, BK = 64, NT = 256, LDS = BK + 8;
  constexpr int VPW = 32 / BITS;                 // values per packed word
  constexpr int WPR = BK / VPW;                  // packed words per row of a K tile
  constexpr int U4R = WPR / 4;                   // 16-byte units per row of a K tile
  constexpr int WU4 = BN * U4R;                  // 16-byte weight units per tile
  constexpr int WLD = (WU4 + NT - 1) / NT;       // weight units per thread
  constexpr int VPU = 4 * VPW;                   // values per 16-byte unit
  constexpr int NGU = VPU > GS ? VPU / GS : 1;   // quantization groups per unit
  constexpr int GVU = VPU / NGU;                 // values per group within a unit
  constexpr int XU4 = BM * BK / 8;               // 16-byte x units per tile
  constexpr int XLD = XU4 / NT;
  constexpr int MT = BM / 32;                    // m16 tiles per warp (2 warps along M)
  constexpr uint32_t MASK = (1u << BITS) - 1u;

  __shared__ __align__(16) T Ws[BN * LDS];
  __shared__ __align__(16) T Xs[BM * LDS];

  const int M = x_shape[0];
  const int N = w_shape[0];
  const int KW = w_shape[1];
  const int K = KW * VPW;
  const int NGR = K / GS;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN;
  const int m0 = blockIdx.z * BM;
  const int kper = K / gridDim.y;
  const int kbeg = blockIdx.y * kper;
  const int nk = kper / BK;

  // STAGES register sets: the loads of STAGES-1 tiles are in flight while one tile computes.
  uint4 wreg[STAGES][WLD];
  float sreg[STAGES][WLD][NGU], breg[STAGES][WLD][NGU];
  uint4 xreg[STAGES][XLD];

#define JANG_LOAD(SL, KT)                                                                       \
  {                                                                                             \
    const int k0 = kbeg + (KT) * BK;                                                            \
    _Pragma("unroll") for (int j = 0; j < WLD; ++j) {                                           \
      const int i = tid + j * NT;                                                               \
      if (WU4 % NT == 0 || i < WU4) {                                                           \
        const int r = i / U4R, c = i % U4R;                                                     \
        const size_t n = (size_t)(n0 + r);                                                      \
        wreg[SL][j] = __ldg(reinterpret_cast<const uint4*>(w + n * KW + k0 / VPW + c * 4));     \
        _Pragma("unroll") for (int u = 0; u < NGU; ++u) {                                       \
          const int g = (k0 + c * VPU + u * GVU) / GS;                                          \
          sreg[SL][j][u] = jang::to_f(scales[n * NGR + g]);                                     \
          breg[SL][j][u] = jang::to_f(biases[n * NGR + g]);                                     \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    _Pragma("unroll") for (int j = 0; j < XLD; ++j) {                                           \
      const int i = tid + j * NT;                                                               \
      const int r = i / (BK / 8), c = i % (BK / 8);                                             \
      xreg[SL][j] = (m0 + r < M)                                                                \
          ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * K + k0 + c * 8))        \
          : make_uint4(0u, 0u, 0u, 0u);                                                         \
    }                                                                                           \
  }

#define JANG_STORE(SL)                                                                          \
  {                                                                                             \
    _Pragma("unroll") for (int j = 0; j < WLD; ++j) {                                           \
      const int i = tid + j * NT;                                                               \
      if (WU4 % NT == 0 || i < WU4) {                                                           \
        const int r = i / U4R, c = i % U4R;                                                     \
        const uint32_t wv[4] = {wreg[SL][j].x, wreg[SL][j].y, wreg[SL][j].z, wreg[SL][j].w};    \
        uint32_t o[VPU / 2];                                                                    \
        _Pragma("unroll") for (int v = 0; v < VPU; v += 2) {                                    \
          const int u = v / GVU;                                                                \
          const float q0 = jang::u2f((wv[v / VPW] >> (BITS * (v % VPW))) & MASK);               \
          const float q1 = jang::u2f((wv[(v + 1) / VPW] >> (BITS * ((v + 1) % VPW))) & MASK);   \
          o[v / 2] = jang::pack2<T>(fmaf(sreg[SL][j][u], q0, breg[SL][j][u]),                   \
                                    fmaf(sreg[SL][j][u], q1, breg[SL][j][u]));                  \
        }                                                                                       \
        uint4* dst = reinterpret_cast<uint4*>(Ws + r * LDS + c * VPU);                          \
        _Pragma("unroll") for (int q = 0; q < VPU / 8; ++q)                                     \
          dst[q] = make_uint4(o[4 * q], o[4 * q + 1], o[4 * q + 2], o[4 * q + 3]);              \
      }                                                                                         \
    }                                                                                           \
    _Pragma("unroll") for (int j = 0; j < XLD; ++j) {                                           \
      const int i = tid + j * NT;                                                               \
      const int r = i / (BK / 8), c = i % (BK / 8);                                             \
      *reinterpret_cast<uint4*>(Xs + r * LDS + c * 8) = xreg[SL][j];                            \
    }                                                                                           \
  }

  float acc[MT][4][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  const int wm = warp / 4, wn = warp % 4;
  const int arow = wm * (BM / 2) + (lane % 16);
  const int acol = (lane / 16) * 8;
  const int brow = wn * 32 + (lane % 8) + (lane / 16) * 8;
  const int bcol = ((lane / 8) % 2) * 8;

#pragma unroll
  for (int sl = 0; sl < STAGES - 1; ++sl)
    if (sl < nk) JANG_LOAD(sl, sl)

  for (int kt0 = 0; kt0 < nk; kt0 += STAGES) {
#pragma unroll
    for (int sl = 0; sl < STAGES; ++sl) {
      const int kt = kt0 + sl;
      if (kt < nk) {
        JANG_STORE(sl)
        __syncthreads();
        if (kt + STAGES - 1 < nk) JANG_LOAD((sl + STAGES - 1) % STAGES, kt + STAGES - 1)
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          uint32_t af[MT][4];
#pragma unroll
          for (int a = 0; a < MT; ++a) jang::ldsm_x4(af[a], Xs + (arow + a * 16) * LDS + kk + acol);
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t bf[4];
            jang::ldsm_x4(bf, Ws + (brow + np * 16) * LDS + kk + bcol);
#pragma unroll
            for (int a = 0; a < MT; ++a) {
              jang::mma16816<T>(acc[a][2 * np], af[a], bf[0], bf[1]);
              jang::mma16816<T>(acc[a][2 * np + 1], af[a], bf[2], bf[3]);
            }
          }
        }
        __syncthreads();
      }
    }
  }
#undef JANG_LOAD
#undef JANG_STORE

  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * (BM / 2) + a * 16 + g + h * 8;
        const int n = n0 + wn * 32 + b * 8 + 2 * t;
        if (m < M) {
          if constexpr (SPLIT) {
            float* yf = reinterpret_cast<float*>(y) + (size_t)m * N + n;
            atomicAdd(yf, acc[a][b][2 * h]);
            atomicAdd(yf + 1, acc[a][b][2 * h + 1]);
          } else {
            *reinterpret_cast<uint32_t*>(y + (size_t)m * N + n) = jang::pack2<T>(acc[a][b][2 * h], acc[a][b][2 * h + 1]);
          }
        }
      }
"""

BN, BK, THREADS = 128, 64, 256
TARGET_BLOCKS = 264            # two blocks per SM on a 132-SM H100 / H200
MIN_K_PER_SPLIT = 256

_kernel = None
_no_init_value = False


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = backend.cuda_kernel(name="jang_qgemm", input_names=["x", "w", "scales", "biases"],
                                      output_names=["y"], source=SOURCE, header=HEADER)
    return _kernel


def supports(x: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    k = x.shape[-1]
    return (x.dtype in (mx.bfloat16, mx.float16) and bits in (2, 4, 8) and group_size in (32, 64, 128)
            and k % BK == 0 and w.shape[0] % BN == 0 and w.dtype == mx.uint32 and w.shape[-1] * 32 == k * bits)


def block_rows(m: int) -> int:
    return 32 if m <= 32 else 64 if m <= 64 else 128


def default_split(m: int, n: int, k: int, bm: int | None = None) -> int:
    """Split K when there are too few column blocks to fill the GPU (grid_split); JANG_QGEMM_SPLIT=1
    turns splitting off. Nsight Compute on the H100 (bench/results/e2e-profile-h100.json): unsplit,
    the 32-block 4096x14336 down projection took 270 us of GPU time at 64 rows."""
    if os.environ.get("JANG_QGEMM_SPLIT", "grid").strip() == "1":
        return 1
    return grid_split(m, n, k, bm)


def grid_split(m: int, n: int, k: int, bm: int | None = None) -> int:
    """Split K until the grid has about TARGET_BLOCKS blocks, keeping >= MIN_K_PER_SPLIT per split."""
    bm = bm or block_rows(m)
    blocks = (n // BN) * (-(-m // bm))
    s = 1
    while (blocks * s * 2 <= TARGET_BLOCKS and k % (BK * s * 2) == 0 and k // (s * 2) >= MIN_K_PER_SPLIT):
        s *= 2
    return s


def default_stages(bm: int) -> int:
    """2 (one tile in flight): 3-4 register stages measured slower on the H100 (register pressure)."""
    return 2


def qgemm(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
          BM: int | None = None, split: int | None = None, stages: int | None = None) -> mx.array:
    """x2d [M, K] bf16/fp16 -> [M, N] in x's dtype."""
    m, k = x2d.shape
    n = w.shape[0]
    bm = BM or block_rows(m)
    st = stages or default_stages(bm)
    s = split or default_split(m, n, k, bm)
    if _no_init_value:
        s = 1
    if k % (BK * s):
        raise ValueError(f"qgemm: K={k} does not split into {s} parts of whole 64-wide tiles")
    grid = (n // BN * THREADS, s, -(-m // bm))
    tmpl = [("T", x2d.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size), ("BM", bm),
            ("SPLIT", s > 1), ("STAGES", st)]
    if s == 1:
        return kernel()(inputs=[x2d, w, scales, biases], template=tmpl, grid=grid, threadgroup=(THREADS, 1, 1),
                        output_shapes=[(m, n)], output_dtypes=[x2d.dtype])[0]
    try:
        y = kernel()(inputs=[x2d, w, scales, biases], template=tmpl, grid=grid, threadgroup=(THREADS, 1, 1),
                     output_shapes=[(m, n)], output_dtypes=[mx.float32], init_value=0.0)[0]
    except TypeError:  # an MLX without init_value for CUDA kernels: no split-K
        globals()["_no_init_value"] = True
        return qgemm(x2d, w, scales, biases, bits, group_size, BM=bm, split=1, stages=st)
    return y.astype(x2d.dtype)


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """A callable f(x2d, w, scales, biases) -> y for this shape with every launch argument computed
    once (kernels.qmm caches it per shape: less Python per call on the decode path)."""
    bm = block_rows(m)
    st = default_stages(bm)
    s = 1 if _no_init_value else default_split(m, n, k, bm)
    grid, tg, shp = (n // BN * THREADS, s, -(-m // bm)), (THREADS, 1, 1), [(m, n)]
    kern = kernel()

    def tmpl(sdt):
        return [("T", dtype), ("S", sdt), ("BITS", bits), ("GS", group_size), ("BM", bm), ("SPLIT", s > 1),
                ("STAGES", st)]

    if s == 1:
        odt = [dtype]
        return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype), grid=grid,
                                           threadgroup=tg, output_shapes=shp, output_dtypes=odt)[0]
    f32 = [mx.float32]
    return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype), grid=grid, threadgroup=tg,
                                       output_shapes=shp, output_dtypes=f32, init_value=0.0)[0].astype(dtype)


_checked: dict[tuple, bool] = {}


def ready(dtype, sdtype, bits: int, group_size: int, m: int) -> bool:
    """First use of a template: the same self-test as the current kernel's (qgemm_cuda.self_test)."""
    from .qgemm_cuda import self_test

    return self_test(qgemm, _checked, dtype, sdtype, bits, group_size, m, block_rows(m))
