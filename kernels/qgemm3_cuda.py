"""Weight-stationary tensor-core GEMM for MLX's affine packed weights on CUDA (any row count; kernels.qmm
routes 16-191 rows here).

y[M, N] = x[M, K] @ dequant(w)[N, K].T, w uint32 [N, K*bits/32] (bits 2, 4 or 8), scales / biases
[N, K/group_size]; MLX's layout as stored. The weights are the mma's A operand ("swap AB"): a warp
owns TM tiles of 16 output features and multiplies each dequantized fragment with every 8-row tile
of x in the block (up to 64 rows), so a weight is dequantized once per 64 rows instead of once per
16, and the tensor cores see m16n8k16 tiles with no padding at any row count that is a multiple of 8.

A block of 256 threads (8 warps along the features: 128*TM features) owns XR = 8*NT rows of x and
one slice of K (split-K across blocks when there are too few feature blocks to fill the GPU). K goes
in stages of 128 values through a STAGES-deep cp.async ring in dynamic shared memory: per stage the
packed rows (4*bits bytes per lane and row; 16 bytes of padding per row at 8 bits against bank
conflicts) and x's rows (256 bytes, 16-byte chunks XOR-swizzled so one 128-bit load phase touches
every bank once). One barrier per stage.

mma K order: in an m16n8k16 step j (0..7) lane (g, t) supplies the four consecutive values 4j..4j+3
of its own 32-value span [32t, 32t+32) of the stage, for weight rows g and g+8 and for x row g. So a
lane's weights for the stage are one contiguous 4*bits-byte run, its x values for two steps are one
16-byte load, and a lane's span lies inside one quantization group (spans of 32, groups >= 32).
Dequant of a consecutive pair (q0, q1) of a byte: byte_perm puts the byte in both halves, mask-ors
place q0 and q1 in two mantissas under the magic exponent (128.0 bf16, 1024.0 fp16), q1 scaled by a
power of two where it sits (fp16 4 bits: 16 q1; bf16, whose mantissa ends at bit 6, shifts right
first: 8 q1), one packed sub removes the magic (exact) and one packed fma applies (scale, scale/16 or
/8) and the bias: one rounding, as the reference. 8 bits in bf16 goes through
fp32 (128 + q does not fit bf16's mantissa).

Split-K stores fp32 partial sums, summed and cast by qgemm_cuda's reduce kernel (2 launches).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend
from . import qgemm_cuda
from .cuda_common import launch_smem
from .qgemm_cuda import HEADER as QG_HEADER

KS, THREADS = 128, 256
TARGET_BLOCKS = 132          # one block per SM of an H100 / H200 (dynamic shared memory over 100 KB)
SMEM_MAX = 200 * 1024

HEADER = QG_HEADER + r"""
namespace jang {

// x chunk c (16 bytes, 0..15) of row r of a stage lives at chunk xsw(c, r)
__device__ __forceinline__ int xsw(int c, int r) { return c ^ (((c >> 3) & 1) << 1) ^ (r & 1); }

template <typename T> __device__ __forceinline__ uint32_t hfma_sub(uint32_t v, uint32_t mag, uint32_t s2, uint32_t b2);
template <> __device__ __forceinline__ uint32_t hfma_sub<__nv_bfloat16>(uint32_t v, uint32_t mag, uint32_t s2, uint32_t b2) {
  __nv_bfloat162 q = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<__nv_bfloat162*>(&mag));
  __nv_bfloat162 r = __hfma2(q, *reinterpret_cast<__nv_bfloat162*>(&s2), *reinterpret_cast<__nv_bfloat162*>(&b2));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t hfma_sub<__half>(uint32_t v, uint32_t mag, uint32_t s2, uint32_t b2) {
  __half2 q = __hsub2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<__half2*>(&mag));
  __half2 r = __hfma2(q, *reinterpret_cast<__half2*>(&s2), *reinterpret_cast<__half2*>(&b2));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Dequantized pairs of one lane-row for mma step j: p[0] = values (4j, 4j+1), p[1] = (4j+2, 4j+3).
// wv: the lane's BITS words of the row for the stage; s2 = (s, s/16) [4 bits], (s, s/4) and
// (s/16, s/64) [2 bits] or (s, s) [8 bits]; b2 = (b, b); sf, bf the float scale and bias.
template <typename T, int BITS>
__device__ __forceinline__ void dq_step(const uint32_t* wv, int j, uint32_t s2, uint32_t s2b, uint32_t b2,
                                        float sf, float bf, uint32_t* p) {
  constexpr uint32_t MAG = magic2<T>::value;
  constexpr bool BF = same_t<T, __nv_bfloat16>::value;  // bf16 has 7 mantissa bits: no field above bit 6
  if constexpr (BITS == 4) {
    const uint32_t w = wv[j >> 1];
    const int b0 = (j & 1) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t y = __byte_perm(w, 0u, 0x4040u | (b0 + i) | ((b0 + i) << 8));
      const uint32_t v = BF ? ((y & 0x0000000Fu) | ((y >> 1) & 0x00780000u) | MAG)   // (q0, 8 q1)
                            : ((y & 0x00F0000Fu) | MAG);                               // (q0, 16 q1)
      p[i] = hfma_sub<T>(v, MAG, s2, b2);
    }
  } else if constexpr (BITS == 2) {
    const uint32_t w = wv[j >> 2];
    const int b = j & 3;
    const uint32_t y = __byte_perm(w, 0u, 0x4040u | b | (b << 8));
    p[0] = hfma_sub<T>((y & 0x000C0003u) | MAG, MAG, s2, b2);                        // (q0, 4 q1)
    p[1] = hfma_sub<T>((BF ? ((y >> 2) & 0x0030000Cu) : (y & 0x00C00030u)) | MAG, MAG, s2b, b2);  // bf16 (4 q2, 16 q3), fp16 (16 q2, 64 q3)
  } else if constexpr (!BF) {                        // 8 bits, fp16: 1024 + q is exact
    const uint32_t w = wv[j];
    p[0] = hfma_sub<T>(__byte_perm(w, 0u, 0x4140u) | MAG, MAG, s2, b2);
    p[1] = hfma_sub<T>(__byte_perm(w, 0u, 0x4342u) | MAG, MAG, s2, b2);
  } else {                                           // 8 bits, bf16: through fp32
    const uint32_t w = wv[j];
    float f[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = fmaf(__uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 | i)) - 8388608.0f, sf, bf);
    p[0] = pack2<T>(f[0], f[1]);
    p[1] = pack2<T>(f[2], f[3]);
  }
}

}  // namespace jang
"""

SOURCE = r"""
  constexpr int TH = 256, KS = 128;
  constexpr int BF = 8 * 16 * TM;                       // output features per block
  constexpr int XR = 8 * NT;                            // rows of x per block
  constexpr int LB = 4 * BITS;                          // bytes of one weight row per lane and stage
  constexpr int LW = LB / 4;                            // ... in words
  constexpr int WRB = 16 * BITS + (BITS == 8 ? 16 : 0); // bytes per weight row per stage
  constexpr int WST = BF * WRB, XST = XR * 256, STB = WST + XST;
  extern __shared__ __align__(16) unsigned char smem[];

  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int KW = w_shape[1];
  const int NGR = K / GS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * XR;
  const int f0 = blockIdx.y * BF;
  const int kper = K / gridDim.z;
  const int kbeg = blockIdx.z * kper;
  const int nk = kper / KS;

  auto load_stage = [&](int slot, int kt) {
    unsigned char* st = smem + slot * STB;
    const int k0 = kbeg + kt * KS;
    const unsigned char* wsrc = reinterpret_cast<const unsigned char*>(w) + (size_t)k0 * BITS / 8;
#pragma unroll
    for (int i0 = 0; i0 < BF * BITS; i0 += TH) {
      const int i = i0 + tid;
      const int r = i / BITS, c = i % BITS;
      jang::cp16(st + r * WRB + c * 16, wsrc + (size_t)(f0 + r) * KW * 4 + c * 16, true);
    }
#pragma unroll
    for (int i0 = 0; i0 < XR * 16; i0 += TH) {
      const int i = i0 + tid;
      if (XR * 16 % TH == 0 || i < XR * 16) {
        const int r = i >> 4, c = i & 15;
        const bool ok = m0 + r < M;
        jang::cp16(st + WST + r * 256 + (jang::xsw(c, r) << 4), x + (ok ? (size_t)(m0 + r) * K + k0 + c * 8 : 0), ok);
      }
    }
  };

  float acc[TM][NT][4];
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][n][c] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    jang::cp_commit();
  }

  const int wrow = warp * 16 * TM;                      // this warp's first feature in the block
  // scales and biases of the lane's four rows, one stage ahead (global loads: their latency hides
  // behind a stage of mmas instead of stalling every warp right after the barrier)
  S sr[TM][2], br[TM][2];
  auto load_scales = [&](int kt) {
    const int grp = (kbeg + kt * KS + 32 * t) / GS;
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const size_t si = (size_t)(f0 + wrow + a * 16 + g + 8 * h) * NGR + grp;
        sr[a][h] = scales[si];
        br[a][h] = biases[si];
      }
  };
  load_scales(0);
  for (int kt = 0; kt < nk; ++kt) {
    jang::cp_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nx = kt + STAGES - 1;
      if (nx < nk) load_stage(nx % STAGES, nx);
      jang::cp_commit();
    }
    const unsigned char* Ws = smem + (kt % STAGES) * STB;
    const unsigned char* Xs = Ws + WST;

    uint32_t wv[TM][2][LW];                            // the lane's packed words: tile a, row g (+8 h)
    uint32_t s2[TM][2], s2b[TM][2], b2[TM][2];
    float sf[TM][2], bf[TM][2];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wrow + a * 16 + g + 8 * h;
        const unsigned char* p = Ws + r * WRB + t * LB;
#pragma unroll
        for (int u = 0; u < LW; u += (LW >= 4 ? 4 : 2)) {
          if constexpr (LW >= 4) {
            const uint4 v = *reinterpret_cast<const uint4*>(p + 4 * u);
            wv[a][h][u] = v.x; wv[a][h][u + 1] = v.y; wv[a][h][u + 2] = v.z; wv[a][h][u + 3] = v.w;
          } else {
            const uint2 v = *reinterpret_cast<const uint2*>(p + 4 * u);
            wv[a][h][u] = v.x; wv[a][h][u + 1] = v.y;
          }
        }
        const float s = jang::to_f(sr[a][h]);
        const float b = jang::to_f(br[a][h]);
        sf[a][h] = s; bf[a][h] = b;
        b2[a][h] = jang::pack2<T>(b, b);
        constexpr bool BF16 = jang::same_t<T, __nv_bfloat16>::value;   // dq_step's field positions
        if constexpr (BITS == 4) { s2[a][h] = jang::pack2<T>(s, s * (BF16 ? 0.125f : 0.0625f)); s2b[a][h] = 0; }
        else if constexpr (BITS == 2) {
          s2[a][h] = jang::pack2<T>(s, s * 0.25f);
          s2b[a][h] = BF16 ? jang::pack2<T>(s * 0.25f, s * 0.0625f) : jang::pack2<T>(s * 0.0625f, s * 0.015625f);
        }
        else { s2[a][h] = jang::pack2<T>(s, s); s2b[a][h] = 0; }
      }

    if (kt + 1 < nk) load_scales(kt + 1);

#pragma unroll
    for (int q = 0; q < 4; ++q) {                       // mma steps j = 2q, 2q + 1
      uint32_t af[TM][2][4];
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          uint32_t p0[2], p1[2];
          jang::dq_step<T, BITS>(wv[a][0], 2 * q + jj, s2[a][0], s2b[a][0], b2[a][0], sf[a][0], bf[a][0], p0);
          jang::dq_step<T, BITS>(wv[a][1], 2 * q + jj, s2[a][1], s2b[a][1], b2[a][1], sf[a][1], bf[a][1], p1);
          af[a][jj][0] = p0[0]; af[a][jj][1] = p1[0]; af[a][jj][2] = p0[1]; af[a][jj][3] = p1[1];
        }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int r = n * 8 + g;
        const uint4 xb = *reinterpret_cast<const uint4*>(Xs + r * 256 + (jang::xsw(4 * t + q, r) << 4));
#pragma unroll
        for (int a = 0; a < TM; ++a) {
          jang::mma16816<T>(acc[a][n], af[a][0], xb.x, xb.y);
          jang::mma16816<T>(acc[a][n], af[a][1], xb.z, xb.w);
        }
      }
    }
  }

  // acc[a][n] = D[feature g (+8)][x row 2t (+1)] of tile a, x tile n
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int f = f0 + wrow + a * 16 + g + 8 * (c >> 1);
        const int m = m0 + n * 8 + 2 * t + (c & 1);
        if (m < M) {
          if constexpr (SPLIT == 2) {
            reinterpret_cast<float*>(y)[((size_t)blockIdx.z * M + m) * N + f] = acc[a][n][c];
          } else {
            y[(size_t)m * N + f] = jang::from_f<T>(acc[a][n][c]);
          }
        }
      }
"""

_kernels: dict[int, object] = {}


def kernel(smem: int):
    """One compiled kernel object per dynamic shared memory size (fixed when the kernel is made)."""
    smem = launch_smem(smem)
    if smem not in _kernels:
        _kernels[smem] = backend.cuda_kernel(name="jang_qgemm3", input_names=["x", "w", "scales", "biases"],
                                             output_names=["y"], source=SOURCE, header=HEADER, shared_memory=smem)
    return _kernels[smem]


def supports(x: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    """2/4/8 bits, groups 32/64/128 (a lane's 32-value span lies in one group), bf16/fp16, K a multiple of
    128, N a multiple of 128."""
    k = x.shape[-1]
    return (x.dtype in (mx.bfloat16, mx.float16) and bits in (2, 4, 8) and group_size in (32, 64, 128)
            and k % KS == 0 and w.shape[0] % 128 == 0 and w.dtype == mx.uint32 and w.shape[-1] * 32 == k * bits)


def stage_bytes(bits: int, nt: int, tm: int) -> int:
    """Shared memory of one pipeline stage (mirrors STB in the kernel)."""
    return 128 * tm * (16 * bits + (16 if bits == 8 else 0)) + 8 * nt * 256


def row_tiles(m: int) -> int:
    """x tiles of 8 rows per block: 2 (16 rows), 4 (32) or 8 (64 and more: larger M takes more blocks)."""
    return 2 if m <= 16 else 4 if m <= 32 else 8


def default_stages(bits: int, nt: int, tm: int) -> int:
    env = os.environ.get("JANG_QGEMM3_STAGES")
    st = int(env) if env else 4
    return max(2, min(st, SMEM_MAX // stage_bytes(bits, nt, tm)))


def grid_split(m: int, n: int, k: int, nt: int, tm: int, target: int = TARGET_BLOCKS) -> int:
    """Split K (in whole stages) until the grid has about `target` blocks."""
    blocks = (n // (128 * tm)) * -(-m // (8 * nt))
    s = 1
    while blocks * s * 2 <= target and k % (KS * s * 2) == 0 and k // (s * 2) >= 2 * KS:
        s *= 2
    return s


def config(m: int, n: int, k: int, bits: int, NT: int | None = None, TM: int | None = None,
           stages: int | None = None, split: int | None = None, target: int | None = None) -> dict:
    nt = NT or row_tiles(m)
    tm = TM or (2 if n % 256 == 0 else 1)
    if n % (128 * tm):
        raise ValueError(f"qgemm3: N={n} is not a multiple of {128 * tm}")
    st = stages or default_stages(bits, nt, tm)
    if st < 2 or st * stage_bytes(bits, nt, tm) > SMEM_MAX:
        raise ValueError(f"qgemm3: {st} stages do not fit")
    tgt = target or int(os.environ.get("JANG_QGEMM3_TARGET", TARGET_BLOCKS))
    s = split or grid_split(m, n, k, nt, tm, tgt)
    if k % (KS * s):
        raise ValueError(f"qgemm3: K={k} does not split into {s} parts of whole {KS}-wide stages")
    return dict(NT=nt, TM=tm, stages=st, split=s)


def _launch(cfg, m, n, dtype, bits, group_size, partials: bool = False):
    nt, tm, st, s = cfg["NT"], cfg["TM"], cfg["stages"], cfg["split"]
    kern = kernel(st * stage_bytes(bits, nt, tm))
    grid = (-(-m // (8 * nt)) * THREADS, n // (128 * tm), s)
    tg, shp = (THREADS, 1, 1), [(m, n)]

    def tmpl(sdt, mode):
        return [("T", dtype), ("S", sdt), ("BITS", bits), ("GS", group_size), ("NT", nt), ("TM", tm),
                ("STAGES", st), ("SPLIT", mode)]

    if partials:   # the fp32 partial sums [s, m, n] themselves (kernels/gemm_epilogue.py sums them)
        pshp, f32 = [(s, m, n)], [mx.float32]
        return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype, 2), grid=grid,
                                           threadgroup=tg, output_shapes=pshp, output_dtypes=f32)[0]
    if s == 1:
        odt = [dtype]
        return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype, 0), grid=grid,
                                           threadgroup=tg, output_shapes=shp, output_dtypes=odt)[0]
    red, wshp, f32, odt = qgemm_cuda.reduce_kernel(), [(s, m, n)], [mx.float32], [dtype]
    rgrid, rtmpl = (-(-(m * n // 4) // 256) * 256, 1, 1), [("T", dtype)]

    def f(x2d, w, sc, bi):
        ws = kern(inputs=[x2d, w, sc, bi], template=tmpl(sc.dtype, 2), grid=grid, threadgroup=tg,
                  output_shapes=wshp, output_dtypes=f32)[0]
        return red(inputs=[ws], template=rtmpl, grid=rgrid, threadgroup=(256, 1, 1), output_shapes=shp,
                   output_dtypes=odt)[0]
    return f


def qgemm(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
          **overrides) -> mx.array:
    """x2d [M, K] bf16/fp16 -> [M, N] in x's dtype. overrides: NT, TM, stages, split, target (config)."""
    m, k = x2d.shape
    overrides.pop("BM", None)    # qgemm_cuda.self_test passes v2's row tile; qgemm3 derives its own
    cfg = config(m, w.shape[0], k, bits, **overrides)
    return _launch(cfg, m, w.shape[0], x2d.dtype, bits, group_size)(x2d, w, scales, biases)


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """A callable f(x2d, w, scales, biases) -> y with every launch argument computed once."""
    return _launch(config(m, n, k, bits), m, n, dtype, bits, group_size)


def plan_partials(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """f(x2d, w, scales, biases) -> fp32 partial sums [split, m, n] of plan's configuration (split may be 1)."""
    return _launch(config(m, n, k, bits), m, n, dtype, bits, group_size, partials=True)


_checked: dict[tuple, bool] = {}


def ready(dtype, sdtype, bits: int, group_size: int, m: int) -> bool:
    """First use of a template (dtype, scale dtype, bits, group, row tiles): self-test against the
    dequantized float32 matmul, split and not (qgemm_cuda.self_test); a mismatch turns it off, logged."""
    return qgemm_cuda.self_test(qgemm, _checked, dtype, sdtype, bits, group_size, m, 8 * row_tiles(m))
