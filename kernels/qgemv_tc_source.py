"""CUDA source text of the tensor-core GEMV (kernels/qgemv_tc_cuda.py launches it; the algorithm is
described there): mma / load helpers (HEADER) and the kernel body with its fused epilogues (SOURCE)."""

from .cuda_common import HEADER as COMMON

HEADER = COMMON + r"""
namespace jang {

// d = a * b (+ c): mma.sync m16n8k16, fp32 accumulate; A fragment a[4], B fragment b0, b1.
template <typename T>
__device__ __forceinline__ void tc_mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void tc_mma<__nv_bfloat16>(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                                      uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void tc_mma<__half>(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (magic | q) is magic + q exactly; ONE2 is the pair (1, 1).
template <typename T> struct tc_const;
template <> struct tc_const<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u; static constexpr float OFF = 128.f;
  static constexpr uint32_t ONE2 = 0x3F803F80u;
};
template <> struct tc_const<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u; static constexpr float OFF = 1024.f;
  static constexpr uint32_t ONE2 = 0x3C003C00u;
};

template <typename T> __device__ __forceinline__ uint32_t tc_mul2(uint32_t a, uint32_t b);
template <> __device__ __forceinline__ uint32_t tc_mul2<__nv_bfloat16>(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t tc_mul2<__half>(uint32_t a, uint32_t b) {
  __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// N consecutive 32-bit words (N in 1, 2, 4, 8; p aligned to min(N, 4) * 4 bytes): read-only global loads
// (__ldg), or plain loads (shared memory, NC = false).
template <bool NC>
__device__ __forceinline__ uint4 tc_ld4(const uint32_t* p) {
  if constexpr (NC) return __ldg(reinterpret_cast<const uint4*>(p));
  else return *reinterpret_cast<const uint4*>(p);
}
template <int N, bool NC = true>
__device__ __forceinline__ void tc_ldw(const uint32_t* p, uint32_t* r) {
  if constexpr (N >= 4) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const uint4 v = tc_ld4<NC>(p + i);
      r[i] = v.x; r[i + 1] = v.y; r[i + 2] = v.z; r[i + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    const uint2 v = NC ? __ldg(reinterpret_cast<const uint2*>(p)) : *reinterpret_cast<const uint2*>(p);
    r[0] = v.x; r[1] = v.y;
  } else {
    r[0] = NC ? __ldg(p) : *p;
  }
}

}  // namespace jang
"""

SOURCE = r"""
#ifndef JANG_EPI
#define JANG_EPI 0      // 0 plain, 1 + residual `res`, 2 silu(gate) * up of row pairs, 3 RoPE (JANG_HD, JANG_NROT)
#endif
#ifndef JANG_NORM
#define JANG_NORM 0     // 1: x is RMS-normalised with weight `nw` (and JANG_EPS) on the fly
#endif
  constexpr int KL = GS / 4;                        // K values per lane per group
  constexpr int WL = KL * BITS / 32;                // packed words per lane, row and group
  constexpr int XL = KL / 2;                        // x registers (value pairs) per lane and group
  constexpr int VPW = 32 / BITS;                    // K values per word
  constexpr int SPW = BITS == 8 ? 1 : VPW / 4;      // mma k-steps per word (per nibble plane at 8 bits)
  constexpr int DX = BITS == 8 ? 1 : VPW / 4;       // distance of a B pair's two x registers
  constexpr int NP = BITS == 8 ? 2 : 1;             // nibble planes
  constexpr int FB = BITS == 8 ? 4 : BITS;          // bits per field placed in a mantissa
  constexpr uint32_t MASK2 = ((1u << FB) - 1u) * 0x00010001u;
  constexpr uint32_t MAGIC = jang::tc_const<T>::MAGIC;
  constexpr float OFF = jang::tc_const<T>::OFF * (BITS == 8 ? 17.f : 1.f);
  constexpr int NT = 32 * NWARP;
  static_assert(WL >= 1 && KL % 8 == 0, "qgemv_tc: group too small for this bit width");

  const int M = x_shape[0];
  const int N = w_shape[0];
  const int KW = w_shape[1];
  const int K = KW * VPW;
  const int NGR = K / GS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

#if JANG_EPI == 2 || JANG_EPI == 3
  const int NO = N / 2;                             // output pairs: a tile holds 8 (rows g and g+8)
#else
  const int NO = N;
#endif
#if JANG_EPI == 3
  constexpr int HH = JANG_HD / 2;
#endif

  // Row of tile `tile` held by lane group gg (r = 0: A row gg, r = 1: A row gg + 8).
  auto row_of = [&](int tile, int gg, int r) -> int {
#if JANG_EPI == 2
    return min(tile * 8 + gg, NO - 1) + r * NO;
#elif JANG_EPI == 3
    const int o = min(tile * 8 + gg, NO - 1);
    return (o / HH) * JANG_HD + o % HH + r * HH;
#else
    return min(tile * 16 + gg + 8 * r, N - 1);
#endif
  };
  // This lane's two weight rows of each tile.
  const uint32_t* wr[TT][2];
  const S* sr[TT][2];
  const S* br[TT][2];
#pragma unroll
  for (int a = 0; a < TT; ++a)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int n = row_of(blockIdx.x * TT + a, g, r);
      wr[a][r] = w + (size_t)n * KW + t * WL;
      sr[a][r] = scales + (size_t)n * NGR;
      br[a][r] = biases + (size_t)n * NGR;
    }
  const T* xr = x + (size_t)min(g, M - 1) * K + t * KL;   // B column g = x row g

  float acc[TT][4];
#pragma unroll
  for (int a = 0; a < TT; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[a][c] = 0.f;
  float ssd[4] = {0.f, 0.f, 0.f, 0.f};              // JANG_NORM: x x^T, its diagonal is sum x^2

  const int nch = NGR / U;
  // 2. per group: mmas into fresh sums, then the group's scale and bias (g0: the chunk's first group)
  // nwp (JANG_NORM): this lane's norm-weight words of the chunk's first group (global or staged);
  // group u's are nwp + u * GS / 2.
  auto compute_chunk = [&](int g0, const uint32_t (&wq)[U][TT][2][WL], uint32_t (&xv)[U][XL],
                           const S (&sv)[U][TT][2], const S (&bv)[U][TT][2], const uint32_t* nwp) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#if JANG_NORM
      {
        uint32_t nv[XL];
        jang::tc_ldw<XL, false>(nwp + u * (GS / 2), nv);
#pragma unroll
        for (int i = 0; i < XL; i += 2)     // sum x^2: A = B = raw x, the diagonal of the product
          jang::tc_mma<T>(ssd, xv[u][i], xv[u][i], xv[u][i + 1], xv[u][i + 1], xv[u][i], xv[u][i + 1]);
#pragma unroll
        for (int i = 0; i < XL; ++i) xv[u][i] = jang::tc_mul2<T>(xv[u][i], nv[i]);
      }
#endif
      float sx[4] = {0.f, 0.f, 0.f, 0.f};
      float d[TT][NP][4];
#pragma unroll
      for (int a = 0; a < TT; ++a)
#pragma unroll
        for (int p = 0; p < NP; ++p)
#pragma unroll
          for (int c = 0; c < 4; ++c) d[a][p][c] = 0.f;
#pragma unroll
      for (int i = 0; i < WL; ++i) {
#pragma unroll
        for (int s = 0; s < SPW; ++s) {
          const int xi = BITS == 8 ? 2 * i : i * (VPW / 2) + s;
          const uint32_t b0 = __byte_perm(xv[u][xi], xv[u][xi + DX], 0x5410);
          const uint32_t b1 = __byte_perm(xv[u][xi], xv[u][xi + DX], 0x7632);
          constexpr uint32_t ONE2 = jang::tc_const<T>::ONE2;
          jang::tc_mma<T>(sx, ONE2, ONE2, ONE2, ONE2, b0, b1);
#pragma unroll
          for (int a = 0; a < TT; ++a) {
#pragma unroll
            for (int p = 0; p < NP; ++p) {
              // pairs (field j, field j + VPW/2) of the word; 8 bits: nibble planes p (shift 4p, 4p + 8)
              const int sh0 = BITS == 8 ? 4 * p : BITS * 2 * s;
              const int sh1 = BITS == 8 ? 4 * p + 8 : BITS * (2 * s + 1);
              const uint32_t w0 = wq[u][a][0][i], w1 = wq[u][a][1][i];
              jang::tc_mma<T>(d[a][p], ((w0 >> sh0) & MASK2) | MAGIC, ((w1 >> sh0) & MASK2) | MAGIC,
                              ((w0 >> sh1) & MASK2) | MAGIC, ((w1 >> sh1) & MASK2) | MAGIC, b0, b1);
            }
          }
        }
      }
#pragma unroll
      for (int a = 0; a < TT; ++a)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float sc = jang::to_f(sv[u][a][r]);
          const float bb = fmaf(-OFF, sc, jang::to_f(bv[u][a][r]));
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float v = fmaf(bb, sx[c], acc[a][2 * r + c]);
            v = fmaf(sc, d[a][0][2 * r + c], v);
            if constexpr (NP == 2) v = fmaf(16.f * sc, d[a][NP - 1][2 * r + c], v);
            acc[a][2 * r + c] = v;
          }
        }
    }
  };

  if constexpr (PIPE == 0) {
    for (int ch = warp; ch < nch; ch += NWARP) {
      const int g0 = ch * U;
      // 1. every load of the chunk first: weights, x, scales and biases
      uint32_t wq[U][TT][2][WL];
      uint32_t xv[U][XL];
      S sv[U][TT][2], bv[U][TT][2];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int grp = g0 + u;
#pragma unroll
        for (int a = 0; a < TT; ++a)
#pragma unroll
          for (int r = 0; r < 2; ++r) jang::tc_ldw<WL>(wr[a][r] + (size_t)grp * (GS * BITS / 32), wq[u][a][r]);
        jang::tc_ldw<XL>(reinterpret_cast<const uint32_t*>(xr + (size_t)grp * GS), xv[u]);
#pragma unroll
        for (int a = 0; a < TT; ++a)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            sv[u][a][r] = sr[a][r][grp];
            bv[u][a][r] = br[a][r][grp];
          }
      }
#if JANG_NORM
      compute_chunk(g0, wq, xv, sv, bv, reinterpret_cast<const uint32_t*>(nw + (size_t)g0 * GS + t * KL));
#else
      compute_chunk(g0, wq, xv, sv, bv, nullptr);
#endif
    }
  } else {
    // PIPE stages of this warp's chunks in flight through a cp.async ring in dynamic shared memory (no
    // registers held by loads in flight). A stage: weights [u][16 rows][GB bytes] (a lane's A words for
    // rows g and g + 8 are then one contiguous, conflict-free 256-byte span per u), x [MM rows][U*GS],
    // scales [16 rows][U], biases [16 rows][U], the norm weight [U*GS] (JANG_NORM).
    static_assert(PIPE == 0 || TT == 1, "qgemv_tc: the pipelined loads take one tile per warp");
    constexpr int GB = GS * BITS / 8;               // bytes of one row's group
    constexpr int PG = GB / 16;                     // 16-byte pieces per row and group
    constexpr int WB = U * 16 * GB;
    constexpr int XR = U * GS * (int)sizeof(T);     // bytes of one x row's chunk
    constexpr int XB = MM * XR;
    constexpr int SB = 16 * U * (int)sizeof(S);
    constexpr int NB = JANG_NORM ? U * GS * (int)sizeof(T) : 0;   // the norm weight's chunk (JANG_NORM)
    constexpr int STG = WB + XB + 2 * SB + NB;
    // (the kernel body is no template: this branch is compiled at PIPE == 0 too, so the checks name PIPE)
    constexpr int SCP = U * (int)sizeof(S) < 4 ? 4 : U * (int)sizeof(S) > 16 ? 16 : U * (int)sizeof(S);
    static_assert(PIPE == 0 || (GB % 16 == 0 && XR % 16 == 0 && SB % 16 == 0), "qgemv_tc: stage pieces");
    static_assert(PIPE == 0 || SCP == U * (int)sizeof(S), "qgemv_tc: scale copy size");
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* ring = smem + warp * PIPE * STG;
    const int tile = blockIdx.x;
    auto issue = [&](int ch, unsigned char* st) {
      const int g0 = ch * U;
      for (int p = lane; p < U * 16 * PG; p += 32) {
        const int h = p % PG, rr = (p / PG) % 16, u = p / (PG * 16);
        const int n = row_of(tile, rr & 7, rr >> 3);
        jang::cp16(st + p * 16, w + (size_t)n * KW + (size_t)(g0 + u) * (GB / 4) + h * 4, true);
      }
      for (int q = lane; q < XB / 16; q += 32) {
        const int m = q / (XR / 16), c = q % (XR / 16);
        jang::cp16(st + WB + q * 16, x + (size_t)min(m, M - 1) * K + (size_t)g0 * GS + c * (16 / (int)sizeof(T)),
                   true);
      }
      {
        const int rr = lane & 15;
        const int n = row_of(tile, rr & 7, rr >> 3);
        const S* src = (lane < 16 ? scales : biases) + (size_t)n * NGR + g0;
        jang::cpn<SCP>(st + WB + XB + (lane < 16 ? 0 : SB) + rr * U * sizeof(S), src);
      }
#if JANG_NORM
      for (int q = lane; q < NB / 16; q += 32)
        jang::cp16(st + WB + XB + 2 * SB + q * 16, nw + (size_t)g0 * GS + q * (16 / (int)sizeof(T)), true);
#endif
    };
    const int nmine = nch > warp ? (nch - warp + NWARP - 1) / NWARP : 0;   // chunks warp, warp + NWARP, ...
#pragma unroll
    for (int s = 0; s < PIPE - 1; ++s) {
      if (s < nmine) issue(warp + s * NWARP, ring + s * STG);
      jang::cp_commit();
    }
    const int xrow = min(g, MM - 1);
    for (int j = 0; j < nmine; ++j) {
      {
        const int nx = j + PIPE - 1;
        if (nx < nmine) issue(warp + nx * NWARP, ring + (nx % PIPE) * STG);
        jang::cp_commit();
      }
      jang::cp_wait<PIPE - 1>();
      __syncwarp();
      const unsigned char* st = ring + (j % PIPE) * STG;
      uint32_t wq[U][TT][2][WL];
      uint32_t xv[U][XL];
      S sv[U][TT][2], bv[U][TT][2];
      const S* ss = reinterpret_cast<const S*>(st + WB + XB);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          jang::tc_ldw<WL, false>(reinterpret_cast<const uint32_t*>(st + (u * 16 + g + 8 * r) * GB) + t * WL, wq[u][0][r]);
          sv[u][0][r] = ss[(g + 8 * r) * U + u];
          bv[u][0][r] = ss[16 * U + (g + 8 * r) * U + u];
        }
        jang::tc_ldw<XL, false>(reinterpret_cast<const uint32_t*>(st + WB + xrow * XR + u * GS * (int)sizeof(T)) + t * XL,
                         xv[u]);
      }
      compute_chunk((warp + j * NWARP) * U, wq, xv, sv, bv,
                    reinterpret_cast<const uint32_t*>(st + WB + XB + 2 * SB) + t * XL);
      __syncwarp();
    }
  }

  // 3. add the NWARP warps' sums (lane-major: conflict-free), then emit from TT*32 threads.
  __shared__ float red[NWARP][TT * 4][32];
  __shared__ float ssr[NWARP][8];
#pragma unroll
  for (int a = 0; a < TT; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][a * 4 + c][lane] = acc[a][c];
  if (JANG_NORM && t == (g >> 1)) ssr[warp][g] = (g & 1) ? ssd[1] : ssd[0];   // D[g][g] sits in lane (g, g/2)
  __syncthreads();
  for (int j = tid; j < TT * 32; j += NT) {
    const int a = j >> 5, l = j & 31, gg = l >> 2, tt = l & 3;
    if (2 * tt >= M) continue;
    float v[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      v[c] = 0.f;
#pragma unroll
      for (int k = 0; k < NWARP; ++k) v[c] += red[k][a * 4 + c][l];
    }
    const int tile = blockIdx.x * TT + a;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int m = 2 * tt + c;
      if (m >= M) continue;
      float inv = 1.f;
#if JANG_NORM
      {
        float s2 = 0.f;
#pragma unroll
        for (int k = 0; k < NWARP; ++k) s2 += ssr[k][m];
        inv = rsqrtf(s2 / (float)K + JANG_EPS);
      }
#endif
      const float v0 = v[c] * inv, v1 = v[2 + c] * inv;   // rows g and g + 8 of the tile
#if JANG_EPI == 2
      const int o = tile * 8 + gg;
      if (o < NO) y[(size_t)m * NO + o] = jang::from_f<T>(v0 / (1.f + __expf(-v0)) * v1);
#elif JANG_EPI == 3
      const int o = tile * 8 + gg;
      if (o < NO) {
        const int h = o / HH, jj = o % HH;
        float a0 = v0, a1 = v1;
        if (h < JANG_NROT) {
          float sn, cs;
          sincosf((float)rpos[m] * rfreq[jj], &sn, &cs);
          a0 = v0 * cs - v1 * sn;
          a1 = v0 * sn + v1 * cs;
        }
        y[(size_t)m * N + h * JANG_HD + jj] = jang::from_f<T>(a0);
        y[(size_t)m * N + h * JANG_HD + jj + HH] = jang::from_f<T>(a1);
      }
#else
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int n = tile * 16 + gg + 8 * r;
        if (n < N) {
#if JANG_EPI == 1
          y[(size_t)m * N + n] = jang::from_f<T>((r ? v1 : v0) + jang::to_f(res[(size_t)m * N + n]));
#else
          y[(size_t)m * N + n] = jang::from_f<T>(r ? v1 : v0);
#endif
        }
      }
#endif
    }
  }
"""
