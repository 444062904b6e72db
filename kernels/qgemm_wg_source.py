"""CUDA source text of the warpgroup (wgmma) GEMM, kernels/qgemm_wg_cuda.py launches it (the algorithm is
described there). Self-contained: no headers, so NVRTC compiles it for sm_90a without include paths.
`source(...)` fills in the configuration and the wgmma instruction for the tile width; HELPERS are shared
by the kernel here (every warp loads, dequantizes and multiplies) and the warp-specialized one
(kernels/qgemm_wg_ws_source.py)."""

COMMON = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
struct alignas(16) v4u { u32 x, y, z, w; };
struct alignas(8) v2u { u32 x, y; };
struct alignas(8) v2f { float x, y; };
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ float as_float(u32 v) { float f; asm("mov.b32 %0, %1;" : "=f"(f) : "r"(v)); return f; }

#if IS_BF16
constexpr u32 MAGIC = 0x43004300u;              // bf16 (128, 128): (MAGIC | q) = 128 + q exactly, q < 128
#else
constexpr u32 MAGIC = 0x64006400u;              // fp16 (1024, 1024)
#endif

__device__ __forceinline__ u32 saddr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ void cp16(u32 dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d;
}
// (q - MAGIC) * s + b on a pair: the subtraction is exact, the fma rounds once (as the reference).
__device__ __forceinline__ u32 deq2(u32 v, u32 s2, u32 b2) {
  u32 q, d;
#if IS_BF16
  asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(q) : "r"(v), "r"(MAGIC));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(q), "r"(s2), "r"(b2));
#else
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(q) : "r"(v), "r"(MAGIC));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(q), "r"(s2), "r"(b2));
#endif
  return d;
}
__device__ __forceinline__ float h2f(u16 h) {
  float f;
#if IS_BF16
  asm("{ .reg .b32 t; mov.b32 t, {0, %1}; mov.b32 %0, t; }" : "=f"(f) : "h"(h));
#else
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
#endif
  return f;
}
__device__ __forceinline__ u32 pack2f(float lo, float hi) {
  u32 d;
#if IS_BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
  return d;
}

// Dequantize one 32-value unit (packed words pw, scale/bias pair s2 = (s, s), b2 = (b, b)) into 16 words
// o[0..15]: o[4c + j] = values (8c + 2j, 8c + 2j + 1), c = 0..3 (one 16-byte core-matrix row per c).
__device__ __forceinline__ void dequant_unit(const u32* pw, u32 s2, u32 b2, u32* o) {
#if BITS == 4
#pragma unroll
  for (int c = 0; c < 4; ++c) {                 // word c: values 8c..8c+7
    const u32 w = pw[c];
    u32 d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = deq2(((w >> (4 * i)) & 0x000F000Fu) | MAGIC, s2, b2);   // (i, i + 4)
    o[4 * c + 0] = prmt(d[0], d[1], 0x5410);   // (0, 1)
    o[4 * c + 1] = prmt(d[2], d[3], 0x5410);   // (2, 3)
    o[4 * c + 2] = prmt(d[0], d[1], 0x7632);   // (4, 5)
    o[4 * c + 3] = prmt(d[2], d[3], 0x7632);   // (6, 7)
  }
#elif BITS == 2
#pragma unroll
  for (int h = 0; h < 2; ++h) {                 // word h: values 16h..16h+15
    const u32 w = pw[h];
    u32 d[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) d[i] = deq2(((w >> (2 * i)) & 0x00030003u) | MAGIC, s2, b2);   // (i, i + 8)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      o[8 * h + j] = prmt(d[2 * j], d[2 * j + 1], 0x5410);       // (2j, 2j + 1)
      o[8 * h + 4 + j] = prmt(d[2 * j], d[2 * j + 1], 0x7632);   // (8 + 2j, 8 + 2j + 1)
    }
  }
#else  // 8 bits
#if IS_BF16
  // 128 + q does not fit bf16's mantissa: q to fp32 (2^23 magic), fma in fp32, one rounding to bf16.
  const float s = h2f((u16)(s2 & 0xFFFFu)), b = h2f((u16)(b2 & 0xFFFFu));
#pragma unroll
  for (int c = 0; c < 8; ++c) {                 // word c: values 4c..4c+3
    const u32 w = pw[c];
    float f[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = fmaf(as_float(prmt(w, 0x4B000000u, 0x7440u + i)) - 8388608.f, s, b);
    o[2 * c] = pack2f(f[0], f[1]);
    o[2 * c + 1] = pack2f(f[2], f[3]);
  }
#else
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const u32 w = pw[c];
    const u32 d0 = deq2((w & 0x00FF00FFu) | MAGIC, s2, b2);          // (0, 2)
    const u32 d1 = deq2(((w >> 8) & 0x00FF00FFu) | MAGIC, s2, b2);   // (1, 3)
    o[2 * c] = prmt(d0, d1, 0x5410);
    o[2 * c + 1] = prmt(d0, d1, 0x7632);
  }
#endif
#endif
}

// Byte offset of 16-byte chunk c (K values 8c..8c+7) of row r in a [rows][64] tile: rows of 128 bytes, chunks
// XOR-swizzled by the row's index within its 8-row, 1024-byte atom (the 128-byte swizzle the descriptor names).
__device__ __forceinline__ u32 toff(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }
// Shared-memory matrix descriptor of a K-major tile at addr with the 128-byte swizzle (k16 step j: addr + 32 j):
// SBO = 1024 bytes between 8-row atoms, LBO unused (1).
constexpr u32 KSTEP = 32;
__device__ __forceinline__ u64 desc(u32 addr) {
  return (u64)((addr >> 4) & 0x3FFF) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
"""

HELPERS = COMMON + r"""
constexpr int BM = 64 * WGS * MT;               // x rows (tokens) per block: 64 MT per warpgroup
constexpr int BK = 64;                          // K values per stage
constexpr int NTH = 128 * WGS;
constexpr int XST = BM * BK * 2;                // x bytes per stage
constexpr int RB = BK * BITS / 8;               // packed bytes per weight row per stage
constexpr int WQST = BN * RB;                   // packed weight bytes per stage
constexpr int WBB = BN * BK * 2;                // one dequantized weight tile (bf16 / fp16)
constexpr int UB = 32 * BITS / 8;               // packed bytes of a unit
constexpr int NACC = BN / 2;                    // fp32 accumulators per thread (m64 x BN per warpgroup)
__device__ __forceinline__ void wgmma(float* d, u64 da, u64 db) {
WGMMA_ASM
}


// One 32-value unit of a stage: row r, half h of the packed tile -> dequantized into the weight tile wt
// (K chunks 4h..4h+3 of row r). sv / bv: the unit's raw scale and bias (paired here, at use).
__device__ __forceinline__ void unit_to_tile(const unsigned char* packed, unsigned char* wt, int r, int h, u32 sv,
                                             u32 bv) {
  u32 pw[UB / 4];
  const v4u* src = reinterpret_cast<const v4u*>(packed + r * RB + h * UB);
#if BITS == 2
  const v2u v = *reinterpret_cast<const v2u*>(src);
  pw[0] = v.x; pw[1] = v.y;
#else
#pragma unroll
  for (int q = 0; q < UB / 16; ++q) {
    const v4u v = src[q];
    pw[4 * q] = v.x; pw[4 * q + 1] = v.y; pw[4 * q + 2] = v.z; pw[4 * q + 3] = v.w;
  }
#endif
  u32 o[16];
#if PROBE == 2   // timing probe: no dequant arithmetic
#pragma unroll
  for (int q = 0; q < 16; ++q) o[q] = pw[q % (UB / 4)] ^ sv ^ bv;
#else
  dequant_unit(pw, prmt(sv, sv, 0x5410), prmt(bv, bv, 0x5410), o);
#endif
#pragma unroll
  for (int c = 0; c < 4; ++c)
    *reinterpret_cast<v4u*>(wt + toff(r, 4 * h + c)) = v4u{o[4 * c], o[4 * c + 1], o[4 * c + 2], o[4 * c + 3]};
}

// The accumulators of consumer thread ct (of warpgroup wg) to y: d[mt][4i + e] is row 16 warp + g (+8 for
// e >= 2) of the warpgroup's m64 tile mt, feature 8i + 2t (+1 for odd e); fp32 partials of K slice z (SPLIT).
__device__ __forceinline__ void store_tile(const float (&d)[MT][NACC], OUT_T* __restrict__ y, int ct, int wg,
                                           int m0, int n0, int M, int N) {
  const int lane = ct & 31, g = lane >> 2, t = lane & 3, wr = (ct >> 5) & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int rbase = m0 + (wg * MT + mt) * 64 + wr * 16 + g;
#pragma unroll
    for (int i = 0; i < NACC / 4; ++i) {
      const int col = n0 + 8 * i + 2 * t;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = rbase + 8 * hh;
        if (row < M) {
#if SPLIT
          *reinterpret_cast<v2f*>(y + ((u64)blockIdx.z * M + row) * N + col) =
              v2f{d[mt][4 * i + 2 * hh], d[mt][4 * i + 2 * hh + 1]};
#else
          *reinterpret_cast<u32*>(y + (u64)row * N + col) = pack2f(d[mt][4 * i + 2 * hh], d[mt][4 * i + 2 * hh + 1]);
#endif
        }
      }
    }
  }
}
"""

KERNEL = r"""
constexpr int STB = XST + WQST;                 // one ring slot: x tile + packed weights
constexpr int UPT = BN * 2 / NTH;               // 32-value units dequantized per thread and stage

extern "C" __global__ void __launch_bounds__(128 * WGS, 1)
KNAME(const u16* __restrict__ x, const u32* __restrict__ w, const u16* __restrict__ scales,
      const u16* __restrict__ biases, OUT_T* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* ring = smem;                          // STAGES slots: [x tile | packed weights]
  unsigned char* wb = smem + STAGES * STB;             // 2 dequantized weight tiles
  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int KS = K / gridDim.z;                        // this block's K slice
  const int kbeg = blockIdx.z * KS;
  const int nk = KS / BK;
  const int NGR = K / GS;
  const u64 KB = (u64)K * BITS / 8;              // packed bytes per weight row
  const u32 ring_s = saddr(ring), wb_s = saddr(wb);

  // cp.async of stage st into its slot: x rows (zero past M), then the packed weight rows.
  auto issue = [&](int st) {
    if (st < nk) {
      const u32 slot = ring_s + (st % STAGES) * STB;
      const int k0 = kbeg + st * BK;
#pragma unroll
      for (int it = 0; it < (PROBE == 4 ? 0 : BM * 8 / NTH); ++it) {   // 16-byte chunks: row r, K chunk c
        const int ch = tid + it * NTH, r = ch >> 3, c = ch & 7;
        const int row = imin(m0 + r, M - 1);
        cp16(slot + toff(r, c), x + (u64)row * K + k0 + c * 8, m0 + r < M);
      }
      constexpr int WCH = WQST / 16;                   // packed chunks of the stage
#pragma unroll
      for (int it = 0; it < (PROBE == 5 ? 0 : (WCH + NTH - 1) / NTH); ++it) {   // (probes 4, 5: no x, no w)
        const int ch = tid + it * NTH;
        if (WCH % NTH == 0 || ch < WCH) {
          const int r = ch / (RB / 16), c = ch % (RB / 16);
          cp16(slot + XST + ch * 16,
               reinterpret_cast<const unsigned char*>(w) + (u64)(n0 + r) * KB + (u64)k0 * BITS / 8 + c * 16,
               true);
        }
      }
    }
    cp_commit();
  };
  // scale / bias of this thread's units of stage st (registers, two stages ahead)
  auto load_sb = [&](int st, u32 (&s2)[UPT], u32 (&b2)[UPT]) {
    if (st < nk) {
#pragma unroll
      for (int u = 0; u < UPT; ++u) {
        const int unit = tid + u * NTH, r = unit >> 1, h = unit & 1;
        const u64 gi = (u64)(n0 + r) * NGR + (kbeg + st * BK + h * 32) / GS;
        s2[u] = scales[gi];                            // raw: paired at use, two stages later (pairing
        b2[u] = biases[gi];                            // here would wait for the load right away)
      }
    }
  };

  float d[MT][NACC];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NACC; ++i) d[mt][i] = 0.f;
  const int wg = tid >> 7;                             // warpgroup: x rows 64 MT wg .. of the tile
  u32 sA[UPT], bA[UPT], sB[UPT], bB[UPT];

#pragma unroll
  for (int st = 0; st < STAGES - 2; ++st) issue(st);
  load_sb(0, sA, bA);
  load_sb(1, sB, bB);

  auto step = [&](int i, u32 (&s2)[UPT], u32 (&b2)[UPT]) {
    cp_wait<STAGES - 3>();
    __syncthreads();                                   // stage i landed; wgmma i-2 done in every warp
    issue(i + STAGES - 2);                             // into the slot of stage i-2
    const unsigned char* slot = ring + (i % STAGES) * STB;
    unsigned char* wt = wb + (i & 1) * WBB;
#pragma unroll
    for (int u = 0; u < UPT; ++u) {
      const int unit = tid + u * NTH;
      unit_to_tile(slot + XST, wt, unit >> 1, unit & 1, s2[u], b2[u]);
    }
#if PROBE != 1   // (timing probe 1: without the proxy fence)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
    __syncthreads();                                   // the weight tile is written
    const u32 xa = ring_s + (i % STAGES) * STB + wg * MT * 8192;
    const u32 wa = wb_s + (i & 1) * WBB;
    wg_fence();
#if PROBE != 3   // (timing probe 3: no MMAs)
#pragma unroll
    for (int j = 0; j < BK / 16; ++j)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) wgmma(d[mt], desc(xa + mt * 8192 + j * KSTEP), desc(wa + j * KSTEP));
#endif
    wg_commit();
    // Scales two stages ahead, issued after this stage's proxy fence: the fence compiles to a MEMBAR that
    // waits for the thread's outstanding global loads (before, it waited on these every stage).
    load_sb(i + 2, s2, b2);
    wg_wait<1>();
  };
  for (int i = 0; i < nk; i += 2) {
    step(i, sA, bA);
    if (i + 1 < nk) step(i + 1, sB, bB);
  }
  wg_wait<0>();

  store_tile(d, y, tid, wg, m0, n0, M, N);
}
"""


def wgmma_asm(bn: int, bf16: bool) -> str:
    """The inline-asm statement of one wgmma.m64n{bn}k16 with fp32 accumulators d[0..bn/2), both operands
    from shared memory (descriptors da, db), K-major, accumulate."""
    ab = "bf16" if bf16 else "f16"
    n = bn // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return (f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 2}, 0;\\n'
            f'wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.{ab}.{ab} {{{regs}}}, %{n}, %{n + 1}, '
            f'p, 1, 1, 0, 0;\\n}}\\n"\n'
            f'               : {outs}\n'
            f'               : "l"(da), "l"(db), "r"(1));')


def kernel_name(bits: int, gs: int, bf16: bool, bn: int, stages: int, split: bool, wgs: int = 2, mt: int = 1,
                probe: int = 0, ws: int = 0) -> str:
    return (f"jang_qgemm_wg_b{bits}_g{gs}_{'bf16' if bf16 else 'f16'}_n{bn}_s{stages}_w{wgs}_m{mt}_"
            f"{'split' if split else 'out'}" + (f"_p{probe}" if probe else "") + (f"_ws{int(ws)}" if ws else ""))


def source(bits: int, gs: int, bf16: bool, bn: int, stages: int, split: bool, wgs: int = 2, mt: int = 1,
           probe: int = 0, ws: int = 0) -> str:
    """ws: 0, or the number of producer warpgroups of the warp-specialized kernel (1 or 2; with 2, setmaxnreg
    moves registers from the producers (80) to the consumers (176))."""
    preg, creg = (80, 176) if ws == 2 else (0, 0)
    head = (f"#define BITS {bits}\n#define GS {gs}\n#define IS_BF16 {int(bf16)}\n#define BN {bn}\n"
            f"#define STAGES {stages}\n#define SPLIT {int(split)}\n#define OUT_T {'float' if split else 'u16'}\n"
            f"#define WGS {wgs}\n#define MT {mt}\n#define PROBE {probe}\n"
            f"#define PREG {preg}\n#define CREG {creg}\n#define PWG {max(int(ws), 1)}\n"
            f"#define KNAME {kernel_name(bits, gs, bf16, bn, stages, split, wgs, mt, probe, ws)}\n")
    from .qgemm_wg_ws_source import KERNEL_WS

    return head + HELPERS.replace("WGMMA_ASM", wgmma_asm(bn, bf16)) + (KERNEL_WS if ws else KERNEL)
