"""CUDA source of the register-operand warpgroup GEMM (RS); kernels/qgemm_rs_cuda.py launches it and describes
the algorithm. Self-contained (no headers) like kernels/qgemm_wg_source.py, whose COMMON helpers it shares
(cp.async, the magic dequant of a pair, the 128-byte swizzle, descriptors, wgmma fences)."""

from .qgemm_wg_source import COMMON

KERNEL_RS_HELPERS = r"""
constexpr int BK = 64;                          // K values per stage
constexpr int BF = 64 * CW;                     // output features per block: 64 per warpgroup (the wgmma's m)
constexpr int NTH = 128 * CW;
constexpr int XST = R * BK * 2;                 // x bytes per stage: R rows (the wgmma's n)
constexpr int RB = BK * BITS / 8;               // packed bytes per weight row and stage (16, 32, 64)
constexpr int WQST = BF * RB;
constexpr int STB = XST + WQST;                 // one ring slot: x tile | packed weight rows
constexpr int NACC = R / 2;                     // fp32 accumulators per thread (m64 x R per warpgroup)
constexpr int NGS = BK / GS > 0 ? BK / GS : 1;  // scale groups per stage and row
constexpr int RCH = RB / 16;                    // 16-byte chunks of a packed row's stage
constexpr int RPL = 128 / RB;                   // packed rows per 128-byte line
static_assert(R % 32 == 0 && R <= 256 && STB % 1024 == 0, "qgemm_rs: tile");

// Chunk c of packed row r: chunks XOR-permuted across the rows of a 128-byte line, so the same chunk of 8
// consecutive rows (one load of a warp: lanes g = 0..7) falls in distinct banks.
__device__ __forceinline__ u32 woff(int r, int c) { return r * RB + ((c ^ ((r / RPL) & (RCH - 1))) << 4); }

// (a & m) | MAGIC as one lop3 (C's & and | with two constants compile to two).
__device__ __forceinline__ u32 mask_magic(u32 a, u32 m) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(MAGIC));
  return d;
}
__device__ __forceinline__ float shfl4(float v) {   // the value of lane ^ 4 (g ^ 1)
  float r;
  asm volatile("shfl.sync.bfly.b32 %0, %1, 4, 0x1f, 0xffffffff;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ void wgmma_rs(float* d, const u32 (&a)[4], u64 db) {
WGMMA_RS_ASM
}

// The A fragments of one stage for thread (g, c): a[j] = k16 step j of rows f (a[j][0], a[j][2]: K pairs
// (2c, 2c+1) and (2c+8, 2c+9)) and f + 8 (a[j][1], a[j][3]). Packed words keep K in order, so thread c takes
// the fields of K 2c, 2c+1 (and 2c+8, 2c+9) of each word it reads: byte c of a 4-bit word pair, bits 4c..
// of a 2-bit word, bytes 2(c&1).. of two 8-bit words. sv / bv: raw scale / bias per row half and group.
__device__ __forceinline__ void frag_stage(const unsigned char* wq, int f, int c, const u32 (&sv)[2][NGS],
                                           const u32 (&bv)[2][NGS], u32 (&a)[4][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = f + 8 * h;
#if BITS == 4
    const v4u q0 = *reinterpret_cast<const v4u*>(wq + woff(r, 0));
    const v4u q1 = *reinterpret_cast<const v4u*>(wq + woff(r, 1));
    const u32 wd[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
    const u32 sel = c | (c << 4) | ((4 + c) << 8) | ((4 + c) << 12);   // byte c of both words -> bytes 0, 2
#elif BITS == 2
    const v4u q0 = *reinterpret_cast<const v4u*>(wq + woff(r, 0));
    const u32 wd[4] = {q0.x, q0.y, q0.z, q0.w};
#endif
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gi = NGS == 2 ? j >> 1 : 0;
#if BITS == 8 && IS_BF16
      const float s = h2f((u16)sv[h][gi]), b = h2f((u16)bv[h][gi]);
#else
      const u32 s2 = prmt(sv[h][gi], sv[h][gi], 0x5410), b2 = prmt(bv[h][gi], bv[h][gi], 0x5410);
#endif
#if BITS == 4
      const u32 t = prmt(wd[2 * j], wd[2 * j + 1], sel);               // (K 2c | 2c+1, K 2c+8 | 2c+9) nibbles
      const u32 lo = deq2(mask_magic(t, 0x000F000Fu), s2, b2);          // (2c, 2c+8)
      const u32 hi = deq2(mask_magic(t >> 4, 0x000F000Fu), s2, b2);   // (2c+1, 2c+9)
#elif BITS == 2
      const u32 t = wd[j] >> (4 * c);                                  // word j: K 16j..16j+15
      const u32 lo = deq2(mask_magic(t, 0x00030003u), s2, b2);
      const u32 hi = deq2(mask_magic(t >> 2, 0x00030003u), s2, b2);
#else   // 8 bits: chunk j = words 4j..4j+3 (K 16j..); K 2c.. in word c/2, K 2c+8.. in word 2 + c/2
      const v4u q = *reinterpret_cast<const v4u*>(wq + woff(r, j));
      const u32 w0 = (c >> 1) ? q.y : q.x, w1 = (c >> 1) ? q.w : q.z;
      const int e = 2 * (c & 1);
#if IS_BF16
      auto qf = [](u32 wv, int byte) { return as_float(prmt(wv, 0x4B000000u, 0x7440u + byte)) - 8388608.f; };
      a[j][h] = pack2f(fmaf(qf(w0, e), s, b), fmaf(qf(w0, e + 1), s, b));
      a[j][2 + h] = pack2f(fmaf(qf(w1, e), s, b), fmaf(qf(w1, e + 1), s, b));
      continue;
#else
      const u32 lo = deq2(mask_magic(prmt(w0, w1, e | (e << 4) | ((4 + e) << 8) | ((4 + e) << 12)), 0x00FF00FFu),
                          s2, b2);
      const u32 hi = deq2(mask_magic(prmt(w0, w1, (e + 1) | ((e + 1) << 4) | ((5 + e) << 8) | ((5 + e) << 12)),
                                     0x00FF00FFu), s2, b2);
#endif
#endif
#if !(BITS == 8 && IS_BF16)
      a[j][h] = prmt(lo, hi, 0x5410);       // (2c, 2c+1)
      a[j][2 + h] = prmt(lo, hi, 0x7632);   // (2c+8, 2c+9)
#endif
    }
  }
}

constexpr int XCH = R * 8 / NTH;                 // x chunks per thread and stage
constexpr int WCH = WQST / 16;                   // packed weight chunks per stage
constexpr int WPT = (WCH + NTH - 1) / NTH;       // ... per thread

// Thread t's share of every stage's cp.async, computed once (per stage only K and the slot move): x chunk it
// is row r0 + it * NTH/8 (rows past M clamped, their copies zero-filled), chunk column cc; the rows of a
// thread's chunks are 32 apart, so their swizzled shared offsets are 4096 apart.
struct StageLoads {
  u32 xo[XCH];                                   // element offset at K 0: row * K + 8 cc
  u32 xin;                                       // bit it: the row is below M
  u32 xs;                                        // shared offset of chunk 0 in a slot
  u64 wo[WPT];                                   // byte offset of packed chunk it at K 0
  u32 ws[WPT];                                   // its shared offset (after the x tile)
};

__device__ __forceinline__ StageLoads stage_loads(int t, int m0, int n0, int M, int K) {
  StageLoads L;
  const int r0 = t >> 3, cc = t & 7;
  L.xin = 0;
#pragma unroll
  for (int it = 0; it < XCH; ++it) {
    const int r = m0 + r0 + it * (NTH / 8);
    L.xo[it] = (u32)imin(r, M - 1) * (u32)K + cc * 8;
    L.xin |= (r < M ? 1u : 0u) << it;
  }
  L.xs = toff(r0, cc);
  const u64 KB = (u64)K * BITS / 8;
#pragma unroll
  for (int it = 0; it < WPT; ++it) {
    const int ch = imin(t + it * NTH, WCH - 1), r = ch / RCH, c = ch % RCH;
    L.wo[it] = (u64)(n0 + r) * KB + c * 16;
    L.ws[it] = XST + woff(r, c);
  }
  return L;
}

// cp.async of one stage (K from k0) into the ring slot at shared address slot. One commit group per call.
__device__ __forceinline__ void load_stage(const StageLoads& L, u32 slot, const u16* __restrict__ x,
                                           const u32* __restrict__ w, int t, int k0, bool live) {
  if (live) {
#pragma unroll
    for (int it = 0; it < XCH; ++it)
      cp16(slot + L.xs + it * (NTH / 8) * 128, x + L.xo[it] + k0, (L.xin >> it) & 1);
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w) + (u64)k0 * BITS / 8;
#pragma unroll
    for (int it = 0; it < WPT; ++it)
      if (WCH % NTH == 0 || t + it * NTH < WCH) cp16(slot + L.ws[it], wb + L.wo[it], true);
  }
  cp_commit();
}

// Raw scale / bias of this thread's rows (sp / bp: their group-0 entries; row + 8 at + 8 NGR) for the stage
// at K k0 (paired at use, a stage or two later).
__device__ __forceinline__ void load_sb(const u16* sp, const u16* bp, u32 NGR, u32 k0, u32 (&sv)[2][NGS],
                                        u32 (&bv)[2][NGS]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (u32 q = 0; q < NGS; ++q) {
      const u32 gi = h * 8 * NGR + (k0 + q * GS) / GS;
      sv[h][q] = sp[gi];
      bv[h][q] = bp[gi];
    }
}

// A registers stay live until the wait that retires their wgmmas: otherwise the register allocator may reuse
// them while the asynchronous MMA still reads them.
__device__ __forceinline__ void keep(u32 (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) asm volatile("" : "+r"(a[j][q]) :: "memory");
}

__device__ __forceinline__ void mma_stage(float* d, u32 (&a)[4][4], u32 xa) {
  keep(a);                                             // A is complete before the fence
  wg_fence();
#pragma unroll
  for (int j = 0; j < BK / 16; ++j) wgmma_rs(d, a[j], desc(xa + j * KSTEP));
  wg_commit();
}

// d[4i + e]: feature f (+8 for e >= 2), x row 8i + 2c (+1 for odd e). Lanes g, g^1 swap halves so each
// stores two adjacent features of one row: even g row 8i + 2c, odd g row 8i + 2c + 1.
__device__ __forceinline__ void store_rs(const float* d, OUT_T* __restrict__ y, int fb, int odd, int c, int m0,
                                         int M, int N) {
#pragma unroll
  for (int i = 0; i < NACC / 4; ++i) {
    const float v0 = d[4 * i], v1 = d[4 * i + 1], v2 = d[4 * i + 2], v3 = d[4 * i + 3];
    const float r0 = shfl4(odd ? v0 : v1), r1 = shfl4(odd ? v2 : v3);
    const int row = m0 + 8 * i + 2 * c + odd;
    if (row < M) {
      const float p0 = odd ? r0 : v0, p1 = odd ? v1 : r0, q0 = odd ? r1 : v2, q1 = odd ? v3 : r1;
#if SPLIT
      float* yr = y + ((u64)blockIdx.z * M + row) * N + fb;
      *reinterpret_cast<v2f*>(yr) = v2f{p0, p1};
      *reinterpret_cast<v2f*>(yr + 8) = v2f{q0, q1};
#else
      OUT_T* yr = y + (u64)row * N + fb;
      *reinterpret_cast<u32*>(yr) = pack2f(p0, p1);
      *reinterpret_cast<u32*>(yr + 8) = pack2f(q0, q1);
#endif
    }
  }
}

#define KERNEL_ARGS const u16* __restrict__ x, const u32* __restrict__ w, const u16* __restrict__ scales, \
    const u16* __restrict__ biases, OUT_T* __restrict__ y, int M, int N, int K
"""

KERNEL_RS = r"""
extern "C" __global__ void __launch_bounds__(NTH, 1) KNAME(KERNEL_ARGS) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * R, n0 = blockIdx.y * BF;
  const int KS = K / gridDim.z, kbeg = blockIdx.z * KS, nk = KS / BK, NGR = K / GS;
  const u32 ring_s = saddr(smem);
  const int wg = tid >> 7, g = (tid & 31) >> 2, c = tid & 3;
  const int f = wg * 64 + ((tid >> 5) & 3) * 16 + g;   // this thread's weight rows: f and f + 8
  const StageLoads L = stage_loads(tid, m0, n0, M, K);
  auto issue = [&](int st) { load_stage(L, ring_s + (st % STAGES) * STB, x, w, tid, kbeg + st * BK, st < nk); };
  const u16* sp = scales + (u64)(n0 + f) * NGR;
  const u16* bp = biases + (u64)(n0 + f) * NGR;
  auto sb = [&](int st, u32 (&sv)[2][NGS], u32 (&bv)[2][NGS]) {
    if (st < nk) load_sb(sp, bp, NGR, kbeg + st * BK, sv, bv);
  };
  // The oldest pending stage landed in every thread's part and is visible to the async proxy (wgmma).
  auto landed = [&]() {
    cp_wait<STAGES - 3>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
  };

  float d[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
    d[i] = 0.f;
    asm volatile("" : "+f"(d[i]) :: "memory");
  }
  u32 a0[4][4], a1[4][4];
  u32 sA[2][NGS], bA[2][NGS], sB[2][NGS], bB[2][NGS];
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) issue(st);
  sb(0, sA, bA);
  sb(1, sB, bB);
  cp_wait<STAGES - 2>();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  frag_stage(smem + XST, f, c, sA, bA, a0);
  sb(2, sA, bA);

  // Step i: the wgmmas of stage i (A in registers), then, while they run, stage i+1's A fragments into the
  // other registers; wait_group 0 at the end (ptxas serializes the wgmmas if a register that a wgmma in
  // flight reads, or one of the same window, is written by other instructions).
  auto step = [&](int i, u32 (&a)[4][4], u32 (&nxt)[4][4], u32 (&sv)[2][NGS], u32 (&bv)[2][NGS]) {
    mma_stage(d, a, ring_s + (i % STAGES) * STB);
    if (i + 1 < nk) {
      landed();                                        // stage i+1; stage i-1's wgmmas retired in every warp
      issue(i + STAGES - 1);                           // into the slot of stage i-1
      frag_stage(smem + ((i + 1) % STAGES) * STB + XST, f, c, sv, bv, nxt);
      sb(i + 3, sv, bv);
    }
    wg_wait<0>();
    keep(a);
  };
  for (int i = 0; i < nk; i += 2) {
    step(i, a0, a1, sB, bB);
    if (i + 1 < nk) step(i + 1, a1, a0, sA, bA);
  }
  store_rs(d, y, n0 + f - (g & 1), g & 1, c, m0, M, N);
}
"""


def wgmma_rs_asm(n: int, bf16: bool) -> str:
    """One wgmma.m64n{n}k16, fp32 accumulators d[0..n/2), A from four registers a[0..3], B (x, K-major) from
    shared memory through descriptor db; accumulate."""
    ab = "bf16" if bf16 else "f16"
    nacc = n // 2
    regs = ", ".join(f"%{i}" for i in range(nacc))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nacc))
    return (f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nacc + 5}, 0;\\n'
            f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab} {{{regs}}}, '
            f'{{%{nacc}, %{nacc + 1}, %{nacc + 2}, %{nacc + 3}}}, %{nacc + 4}, p, 1, 1, 0;\\n}}\\n"\n'
            f'               : {outs}\n'
            f'               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));')


def kernel_name(bits: int, gs: int, bf16: bool, r: int, stages: int, split: bool, cw: int = 2) -> str:
    return (f"jang_qgemm_rs_b{bits}_g{gs}_{'bf16' if bf16 else 'f16'}_r{r}_s{stages}_c{cw}_"
            f"{'split' if split else 'out'}")


def source(bits: int, gs: int, bf16: bool, r: int, stages: int, split: bool, cw: int = 2) -> str:
    head = (f"#define BITS {bits}\n#define GS {gs}\n#define IS_BF16 {int(bf16)}\n#define R {r}\n#define CW {cw}\n"
            f"#define STAGES {stages}\n#define SPLIT {int(split)}\n#define OUT_T {'float' if split else 'u16'}\n"
            f"#define KNAME {kernel_name(bits, gs, bf16, r, stages, split, cw)}\n")
    return head + COMMON + KERNEL_RS_HELPERS.replace("WGMMA_RS_ASM", wgmma_rs_asm(r, bf16)) + KERNEL_RS
