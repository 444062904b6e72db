"""Tiled dequant + tensor-core GEMM for MLX's affine packed weights on CUDA (16-256 activation rows).

y[M, N] = x[M, K] @ dequant(w)[N, K].T, w uint32 [N, K*bits/32] (bits 2, 4 or 8), scales / biases
[N, K/group_size]. MLX's weight layout is used as stored (no repacking).

A block of 256 threads (8 warps, WM along M x 8/WM along N) owns BN=128 output features, BM rows of
x (16/32/64/128) and one slice of K (split-K when there are too few column blocks to fill the GPU).
K goes in tiles of BK=64 through a STAGES-deep cp.async pipeline in shared memory (one barrier per
tile): per stage the packed weight rows (rows padded to an odd number of 16-byte units, so ldmatrix
is free of bank conflicts), x's rows (16-byte chunks XOR-swizzled by row, conflict-free reads), and
the scale and bias pairs of the tile's group(s).

Per tile a warp reads its packed weights with ldmatrix (no dequantized shared tile): in a 16-byte
chunk of a weight row, lane t of a quad gets word t, i.e. V = 32/bits consecutive K values. The
mma's K order within each thread's slots is free as long as x uses the same order, so a word is
turned into bf16/fp16 pairs (value i, value i + V/2) with one mask-or into a float's mantissa
(magic 128 + q for bf16, 1024 + q for fp16; 8-bit bf16 goes through fp32), then `(v - magic) *
scale + bias` as one packed sub and one packed fma (single rounding, as the reference's dequantize).
x's matching values are read from shared memory with plain 16-byte loads and paired by byte_perm.
mma.sync m16n8k16, fp32 accumulators. Split-K partial sums go by atomicAdd into a zero-initialised
fp32 output (`init_value`), cast to the activation dtype after.
"""

from __future__ import annotations

import mlx.core as mx

from . import backend
from .backend import relerr
from .cuda_common import HEADER as COMMON
from .qgemm_config import (BK, BN, MAX_STAGES, MIN_K_PER_SPLIT, SMEM_LIMIT, TARGET_BLOCKS,  # noqa: F401 (re-exported)
                           THREADS, block_rows, config, default_reduce, default_split, default_stages,
                           default_warps_m, grid_split, max_stages, stage_bytes, supports)
from . import qgemm_config

# mma.sync m16n8k16 (fp32 accumulate) and float pairs packed to bf16x2/fp16x2; also the v1 kernel's
MMA = r"""
namespace jang {

template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace jang
"""

HEADER = COMMON + MMA + r"""
namespace jang {

template <typename A, typename B> struct same_t { static constexpr bool value = false; };
template <typename A> struct same_t<A, A> { static constexpr bool value = true; };

__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm_x2(uint32_t* r, uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}

// A pair of small integers q placed in the mantissas (v = magic | q) -> (q * s + b) as a packed
// pair: the subtraction is exact, the fma rounds once. Magic: 128.0 in bf16, 1024.0 in fp16.
template <typename T> struct magic2;
template <> struct magic2<__nv_bfloat16> { static constexpr uint32_t value = 0x43004300u; };
template <> struct magic2<__half> { static constexpr uint32_t value = 0x64006400u; };

template <typename T> __device__ __forceinline__ uint32_t dq2(uint32_t v, uint32_t s2, uint32_t b2);
template <> __device__ __forceinline__ uint32_t dq2<__nv_bfloat16>(uint32_t v, uint32_t s2, uint32_t b2) {
  const uint32_t m = magic2<__nv_bfloat16>::value;
  __nv_bfloat162 q = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<const __nv_bfloat162*>(&m));
  __nv_bfloat162 r = __hfma2(q, *reinterpret_cast<__nv_bfloat162*>(&s2), *reinterpret_cast<__nv_bfloat162*>(&b2));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t dq2<__half>(uint32_t v, uint32_t s2, uint32_t b2) {
  const uint32_t m = magic2<__half>::value;
  __half2 q = __hsub2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<const __half2*>(&m));
  __half2 r = __hfma2(q, *reinterpret_cast<__half2*>(&s2), *reinterpret_cast<__half2*>(&b2));
  return *reinterpret_cast<uint32_t*>(&r);
}

}  // namespace jang
"""

SOURCE = r"""
  constexpr int BN = 128, BK = 64, NT = 256;
  constexpr int WN = 8 / WM;                     // warps along N
  constexpr int NT8 = BN / WN / 8;               // n8 tiles per warp
  constexpr int MT = BM / WM / 16;               // m16 tiles per warp
  constexpr int V = 32 / BITS;                   // values per packed word (one lane's share of a chunk)
  constexpr int H = V / 2;                       // a pair holds values i and i + H of a word
  constexpr int CH = BK * BITS / 128;            // 16-byte chunks of a packed row per K tile
  constexpr int CHK = 4 * V;                     // K values per chunk
  constexpr int WROW = 16 * (CH % 2 ? CH : CH + 1);  // odd number of 16-byte units: ldmatrix conflict-free
  constexpr int XROW = BK * 2;                   // bytes per x row (16-byte chunks swizzled by row)
  constexpr int SP = 2 * (int)sizeof(S);         // a pair of scales (or biases): groups 2j, 2j+1
  constexpr int WST = BN * WROW, XST = BM * XROW, SST = BN * SP;
  constexpr int STB = WST + XST + 2 * SST;       // bytes per pipeline stage
  constexpr bool F32DQ = BITS == 8 && jang::same_t<T, __nv_bfloat16>::value;  // 128 + q does not fit bf16
  constexpr uint32_t MASK2 = ((1u << BITS) - 1u) * 0x00010001u;
  constexpr uint32_t MAGIC = jang::magic2<T>::value;
  constexpr int NM = NT8 * CH;                   // 8x8 ldmatrix tiles of packed words per warp and K tile
  static_assert(WM * WN == 8 && MT >= 1 && NT8 >= 1 && (NM == 2 || NM % 4 == 0), "qgemm warp layout");
  static_assert(STAGES * STB <= 48 * 1024, "qgemm shared memory");

  __shared__ __align__(128) unsigned char smem[STAGES * STB];

  const int M = x_shape[0];
  const int N = w_shape[0];
  const int KW = w_shape[1];
  const int K = KW * V;
  const int NGR = K / GS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.z * BN;
  const int kper = K / gridDim.y;
  const int kbeg = blockIdx.y * kper;
  const int nk = kper / BK;
  (void)N;

// x row r's 16-byte chunk c lives at chunk c ^ XSW(r): the rows a load phase touches hit distinct banks
#define XSW(r) (BITS == 4 ? (((r) & 1) << 2) : BITS == 8 ? (((r) & 3) << 1) : ((r) & 1))

  auto load_stage = [&](int slot, int kt) {
    unsigned char* st = smem + slot * STB;
    const int k0 = kbeg + kt * BK;
#pragma unroll
    for (int i0 = 0; i0 < BN * CH; i0 += NT) {
      const int i = i0 + tid;
      if (BN * CH % NT == 0 || i < BN * CH) {
        const int r = i / CH, c = i % CH;
        jang::cp16(st + r * WROW + c * 16, w + (size_t)(n0 + r) * KW + k0 / V + c * 4, true);
      }
    }
#pragma unroll
    for (int i0 = 0; i0 < BM * 8; i0 += NT) {
      const int i = i0 + tid;
      if (BM * 8 % NT == 0 || i < BM * 8) {
        const int r = i >> 3, c = i & 7;
        const bool ok = m0 + r < M;
        jang::cp16(st + WST + r * XROW + ((c ^ XSW(r)) << 4), x + (ok ? (size_t)(m0 + r) * K + k0 + c * 8 : 0), ok);
      }
    }
    {
      const int r = tid & (BN - 1);
      const int pb = (k0 / GS) & ~1;
      const S* src = (tid < BN ? scales : biases) + (size_t)(n0 + r) * NGR + pb;
      jang::cpn<SP>(st + WST + XST + (tid < BN ? 0 : SST) + r * SP, src);
    }
  };

  float acc[MT][NT8][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int j = 0; j < NT8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][j][c] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    jang::cp_commit();
  }

  const int wrow0 = wn * NT8 * 8;
  for (int kt = 0; kt < nk; ++kt) {
    jang::cp_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nt = kt + STAGES - 1;
      if (nt < nk) load_stage(nt % STAGES, nt);
      jang::cp_commit();
    }
    const unsigned char* Ws = smem + (kt % STAGES) * STB;
    const unsigned char* Xs = Ws + WST;
    const S* Ss = reinterpret_cast<const S*>(Xs + XST);
    const S* Bs = reinterpret_cast<const S*>(Xs + XST + SST);
    const int k0 = kbeg + kt * BK;

    // packed words: wv[j * CH + c] = word t of row g of (n8 tile j, chunk c)
    uint32_t wv[NM];
    if constexpr (NM >= 4) {
#pragma unroll
      for (int q = 0; q < NM / 4; ++q) {
        const int i = 4 * q + (lane >> 3);
        jang::ldsm_x4(wv + 4 * q, jang::smem_u32(Ws + (wrow0 + (i / CH) * 8 + (lane & 7)) * WROW + (i % CH) * 16));
      }
    } else {
      const int i = (lane >> 3) & 1;
      jang::ldsm_x2(wv, jang::smem_u32(Ws + (wrow0 + (i / CH) * 8 + (lane & 7)) * WROW + (i % CH) * 16));
    }

#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int kin = c * CHK + t * V;              // this lane's first K value of the chunk
      const int pidx = ((k0 / GS) & 1) + kin / GS;  // its group within the stage's pair
      uint32_t bw[NT8][H];                          // B fragments: pairs (i, i + H) of the word
#pragma unroll
      for (int j = 0; j < NT8; ++j) {
        const int fr = wrow0 + j * 8 + g;
        const float sf = jang::to_f(Ss[fr * 2 + pidx]);
        const float bf = jang::to_f(Bs[fr * 2 + pidx]);
        const uint32_t wd = wv[j * CH + c];
        if constexpr (F32DQ) {
          float f[V];
#pragma unroll
          for (int m = 0; m < V; ++m)
            f[m] = fmaf(sf, __uint_as_float(__byte_perm(wd, 0x4B000000u, 0x7540 | m)) - 8388608.0f, bf);
#pragma unroll
          for (int i = 0; i < H; ++i) bw[j][i] = jang::pack2<T>(f[i], f[i + H]);
        } else {
          const uint32_t s2 = jang::pack2<T>(sf, sf), b2 = jang::pack2<T>(bf, bf);
#pragma unroll
          for (int i = 0; i < H; ++i) {
            uint32_t v;
            if constexpr (BITS == 8) v = __byte_perm(wd, 0x64646464u, i | 0x40 | ((i + 2) << 8) | 0x4000);
            else v = ((wd >> (BITS * i)) & MASK2) | MAGIC;
            bw[j][i] = jang::dq2<T>(v, s2, b2);
          }
        }
      }
#pragma unroll
      for (int a = 0; a < MT; ++a) {
        const int r0 = wm * (BM / WM) + a * 16 + g;   // rows r0 and r0 + 8 (same swizzle)
        uint32_t xa[H], xb[H];                        // this lane's V values of x in each row
        const int o = kin * 2;                        // byte offset in the row
        const unsigned char* ra = Xs + r0 * XROW;
        const unsigned char* rb = ra + 8 * XROW;
        if constexpr (V == 4) {
          const int off = ((((o >> 4) ^ XSW(r0)) << 4) | (o & 15));
          const uint2 va = *reinterpret_cast<const uint2*>(ra + off);
          const uint2 vb = *reinterpret_cast<const uint2*>(rb + off);
          xa[0] = va.x; xa[1] = va.y; xb[0] = vb.x; xb[1] = vb.y;
        } else {
#pragma unroll
          for (int p = 0; p < V / 8; ++p) {
            const int off = (((o >> 4) + p) ^ XSW(r0)) << 4;
            const uint4 va = *reinterpret_cast<const uint4*>(ra + off);
            const uint4 vb = *reinterpret_cast<const uint4*>(rb + off);
            xa[4 * p] = va.x; xa[4 * p + 1] = va.y; xa[4 * p + 2] = va.z; xa[4 * p + 3] = va.w;
            xb[4 * p] = vb.x; xb[4 * p + 1] = vb.y; xb[4 * p + 2] = vb.z; xb[4 * p + 3] = vb.w;
          }
        }
        uint32_t pa[H], pb[H];                        // A pairs (x_i, x_{i+H}), matching bw
#pragma unroll
        for (int i = 0; i < H; ++i) {
          pa[i] = __byte_perm(xa[i / 2], xa[(i + H) / 2], (i & 1) ? 0x7632 : 0x5410);
          pb[i] = __byte_perm(xb[i / 2], xb[(i + H) / 2], (i & 1) ? 0x7632 : 0x5410);
        }
#pragma unroll
        for (int s = 0; s < V / 4; ++s) {
          const uint32_t af[4] = {pa[2 * s], pb[2 * s], pa[2 * s + 1], pb[2 * s + 1]};
#pragma unroll
          for (int j = 0; j < NT8; ++j) jang::mma16816<T>(acc[a][j], af, bw[j][2 * s], bw[j][2 * s + 1]);
        }
      }
    }
  }
#undef XSW

#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int j = 0; j < NT8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * (BM / WM) + a * 16 + g + h * 8;
        const int n = n0 + wrow0 + j * 8 + 2 * t;
        if (m < M) {
          if constexpr (SPLIT == 1) {         // atomics into a zero-initialised fp32 output
            float* yf = reinterpret_cast<float*>(y) + (size_t)m * N + n;
            atomicAdd(yf, acc[a][j][2 * h]);
            atomicAdd(yf + 1, acc[a][j][2 * h + 1]);
          } else if constexpr (SPLIT == 2) {  // this split's fp32 partial sums, summed by jang_qgemm2_reduce
            float* yf = reinterpret_cast<float*>(y) + ((size_t)blockIdx.y * M + m) * N + n;
            *reinterpret_cast<float2*>(yf) = make_float2(acc[a][j][2 * h], acc[a][j][2 * h + 1]);
          } else {
            *reinterpret_cast<uint32_t*>(y + (size_t)m * N + n) = jang::pack2<T>(acc[a][j][2 * h], acc[a][j][2 * h + 1]);
          }
        }
      }
"""

REDUCE_SOURCE = r"""
  // y[M, N] (x's dtype) = sum over the splits of ws[S, M, N] (fp32), four values per thread
  const int S = ws_shape[0];
  const size_t MN = (size_t)ws_shape[1] * ws_shape[2];
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (i < MN) {
    float4 a = *reinterpret_cast<const float4*>(ws + i);
    for (int s = 1; s < S; ++s) {
      const float4 v = *reinterpret_cast<const float4*>(ws + s * MN + i);
      a.x += v.x; a.y += v.y; a.z += v.z; a.w += v.w;
    }
    *reinterpret_cast<uint2*>(y + i) = make_uint2(jang::pack2<T>(a.x, a.y), jang::pack2<T>(a.z, a.w));
  }
"""

_kernel = None
_reduce_kernel = None


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = backend.cuda_kernel(name="jang_qgemm2", input_names=["x", "w", "scales", "biases"],
                                      output_names=["y"], source=SOURCE, header=HEADER)
    return _kernel


def reduce_kernel():
    global _reduce_kernel
    if _reduce_kernel is None:
        _reduce_kernel = backend.cuda_kernel(name="jang_qgemm2_reduce", input_names=["ws"], output_names=["y"],
                                             source=REDUCE_SOURCE, header=HEADER)
    return _reduce_kernel


def _launch(kern, cfg, m, n, dtype, bits, group_size):
    bm, s = cfg["BM"], cfg["split"]
    mode = 0 if s == 1 else 1 if cfg["reduce"] == "atomic" else 2
    grid, tg, shp = (-(-m // bm) * THREADS, s, n // BN), (THREADS, 1, 1), [(m, n)]

    def tmpl(sdt):
        return [("T", dtype), ("S", sdt), ("BITS", bits), ("GS", group_size), ("BM", bm), ("WM", cfg["WM"]),
                ("SPLIT", mode), ("STAGES", cfg["stages"])]

    if mode == 0:
        odt = [dtype]
        return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype), grid=grid,
                                           threadgroup=tg, output_shapes=shp, output_dtypes=odt)[0]
    f32 = [mx.float32]
    if mode == 1:
        return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype), grid=grid,
                                           threadgroup=tg, output_shapes=shp, output_dtypes=f32,
                                           init_value=0.0)[0].astype(dtype)
    red, wshp, odt = reduce_kernel(), [(s, m, n)], [dtype]
    rgrid, rtmpl = (-(-(m * n // 4) // 256) * 256, 1, 1), [("T", dtype)]

    def f(x2d, w, sc, bi):
        ws = kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype), grid=grid, threadgroup=tg,
                  output_shapes=wshp, output_dtypes=f32)[0]
        return red(inputs=[ws], template=rtmpl, grid=rgrid, threadgroup=(256, 1, 1), output_shapes=shp,
                   output_dtypes=odt)[0]
    return f


def qgemm(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
          BM: int | None = None, WM: int | None = None, split: int | None = None,
          stages: int | None = None, reduce: str | None = None) -> mx.array:
    """x2d [M, K] bf16/fp16 -> [M, N] in x's dtype."""
    m, k = x2d.shape
    n = w.shape[0]
    cfg = config(m, n, k, bits, scales.itemsize, BM, WM, split, stages, reduce)
    f = _launch(kernel(), cfg, m, n, x2d.dtype, bits, group_size)
    if cfg["split"] == 1 or cfg["reduce"] == "kernel":
        return f(x2d, w, scales, biases)
    try:
        return f(x2d, w, scales, biases)
    except TypeError:  # an MLX without init_value for CUDA kernels: no split-K
        qgemm_config.no_init_value = True
        return qgemm(x2d, w, scales, biases, bits, group_size, BM=BM, WM=WM, split=1, stages=stages)


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int, scale_bytes: int = 2):
    """A callable f(x2d, w, scales, biases) -> y for this shape with every launch argument computed
    once (kernels.qmm caches it per shape: less Python per call on the decode path)."""
    return _launch(kernel(), config(m, n, k, bits, scale_bytes), m, n, dtype, bits, group_size)


_checked: dict[tuple, bool] = {}


def ready(dtype, sdtype, bits: int, group_size: int, m: int) -> bool:
    """First use of a template (dtype, scale dtype, bits, group, BM): run it on a small random case,
    split and not, against the dequantized float32 matmul; a mismatch turns that template off (logged)."""
    sbytes = mx.zeros((1,), dtype=sdtype).itemsize
    bm = block_rows(m, bits, sbytes)
    return self_test(qgemm, _checked, dtype, sdtype, bits, group_size, m, bm)


def self_test(fn, checked: dict, dtype, sdtype, bits: int, group_size: int, m: int, bm: int) -> bool:
    """Run `fn` (a qgemm) once per template key on 256 x 1024 random weights, split 1 and 2, against the
    dequantized float32 matmul; remember the verdict in `checked` (also the v1 kernel's check)."""
    key = (dtype, sdtype, bits, group_size, bm)
    if key not in checked:
        ok, why = True, ""
        try:
            for split in (1, 2):
                n, k = 256, 1024
                wf = mx.random.normal((n, k)).astype(dtype) * 0.05
                wq, s, b = mx.quantize(wf, group_size=group_size, bits=bits)
                s, b = s.astype(sdtype), b.astype(sdtype)
                x = mx.random.normal((min(m, bm), k)).astype(dtype)
                wd = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
                ref = x.astype(mx.float32) @ wd.T   # no quantized_matmul: that would JIT MLX's fp32 kernels
                err = relerr(fn(x, wq, s, b, bits, group_size, BM=bm, split=split), ref)
                if not err < 2e-2:
                    ok, why = False, f"relative error {err:.3g} with split={split}"
                    break
        except Exception as e:  # a compile or launch error: keep serving through the reference
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            import logging

            logging.getLogger("jang_serve.kernels").warning(
                "kernels: cuda qgemm %s disabled, using the MLX reference (%s)", key, why)
        checked[key] = ok
    return checked[key]
