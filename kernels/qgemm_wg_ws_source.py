"""CUDA source of the warp-specialized warpgroup GEMM (WS): warpgroup 0 produces, warpgroups 1..WGS multiply.

The producer issues the cp.async loads of x and the packed weights STAGES-2 stages ahead, dequantizes each
stage into its slot's bf16 / fp16 tile, fences the writes to the async proxy and arrives on the slot's FULL
barrier; the consumers wait on FULL, issue their wgmmas, keep one stage in flight and arrive on EMPTY of the
stage before, which the producer waits on before it reuses that slot. Named barriers (bar.sync / bar.arrive
with the block's thread count): FULL = 1..STAGES, EMPTY = STAGES+1..2*STAGES, the producers' own = 2*STAGES+1.
So the consumers' MMAs no longer wait for the loads, the dequant and the proxy fence of their own stage.
Uses HELPERS of kernels/qgemm_wg_source.py (BM, XST, WQST, WBB, UB, RB, NACC, toff, desc, wgmma, ...).
"""

KERNEL_WS = r"""
#ifndef PWG
#define PWG 1
#endif
constexpr int PTH = 128 * PWG;                   // producer threads (warpgroups 0..PWG-1)
constexpr int ATH = 128 * (WGS + PWG);           // all threads
constexpr int PUPT = BN * 2 / PTH;               // 32-value units a producer thread dequantizes per stage
static_assert(PUPT >= 1 && BM * 8 % PTH == 0, "qgemm_wg_ws: producer split");
constexpr int WSLOT = XST + WQST + WBB;          // slot: x tile | packed weights | dequantized weights
constexpr int LA = STAGES - 2;                   // loads run this many stages ahead
constexpr int FULL0 = 1, EMPTY0 = 1 + STAGES, PBAR = 1 + 2 * STAGES;
static_assert(PBAR < 16, "qgemm_wg_ws: too many stages for the named barriers");

__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}

extern "C" __global__ void __launch_bounds__(128 * (WGS + PWG), 1)
KNAME(const u16* __restrict__ x, const u32* __restrict__ w, const u16* __restrict__ scales,
      const u16* __restrict__ biases, OUT_T* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int KS = K / gridDim.z;
  const int kbeg = blockIdx.z * KS;
  const int nk = KS / BK;
  const int NGR = K / GS;
  const u64 KB = (u64)K * BITS / 8;
  const u32 smem_s = saddr(smem);

  if (tid < PTH) {                                   // ---------------- producer
#if PREG
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(PREG));
#endif
    auto issue = [&](int st) {
      if (st < nk) {
        const u32 slot = smem_s + (st % STAGES) * WSLOT;
        const int k0 = kbeg + st * BK;
#pragma unroll
        for (int it = 0; it < BM * 8 / PTH; ++it) {  // 16-byte chunks: row r, K chunk c
          const int ch = tid + it * PTH, r = ch >> 3, c = ch & 7;
          const int row = imin(m0 + r, M - 1);
          cp16(slot + toff(r, c), x + (u64)row * K + k0 + c * 8, m0 + r < M);
        }
        constexpr int WCH = WQST / 16;
#pragma unroll
        for (int it = 0; it < (WCH + PTH - 1) / PTH; ++it) {
          const int ch = tid + it * PTH;
          if (WCH % PTH == 0 || ch < WCH) {
            const int r = ch / (RB / 16), c = ch % (RB / 16);
            cp16(slot + XST + ch * 16,
                 reinterpret_cast<const unsigned char*>(w) + (u64)(n0 + r) * KB + (u64)k0 * BITS / 8 + c * 16, true);
          }
        }
      }
      cp_commit();
    };
    auto load_sb = [&](int st, u32 (&s2)[PUPT], u32 (&b2)[PUPT]) {
      if (st < nk) {
#pragma unroll
        for (int u = 0; u < PUPT; ++u) {
          const int unit = tid + u * PTH, r = unit >> 1, h = unit & 1;
          const u64 gi = (u64)(n0 + r) * NGR + (kbeg + st * BK + h * 32) / GS;
          s2[u] = scales[gi];                        // raw: paired at use
          b2[u] = biases[gi];
        }
      }
    };
    u32 sA[PUPT], bA[PUPT], sB[PUPT], bB[PUPT];
#pragma unroll
    for (int st = 0; st < LA; ++st) issue(st);
    load_sb(0, sA, bA);
    load_sb(1, sB, bB);
    auto pstep = [&](int j, u32 (&s2)[PUPT], u32 (&b2)[PUPT]) {
      const int ld = j + LA;
      if (ld < nk && ld >= STAGES) bar_sync(EMPTY0 + ld % STAGES, ATH);   // consumers are done with ld - STAGES
      issue(ld);
      cp_wait<LA>();
      bar_sync(PBAR, PTH);                           // every producer's copies of stage j landed
      unsigned char* slot = smem + (j % STAGES) * WSLOT;
#pragma unroll
      for (int u = 0; u < PUPT; ++u) {
        const int unit = tid + u * PTH;
        unit_to_tile(slot + XST, slot + XST + WQST, unit >> 1, unit & 1, s2[u], b2[u]);
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      bar_arrive(FULL0 + j % STAGES, ATH);
      load_sb(j + 2, s2, b2);
    };
    for (int j = 0; j < nk; j += 2) {
      pstep(j, sA, bA);
      if (j + 1 < nk) pstep(j + 1, sB, bB);
    }
    cp_wait<0>();
    return;
  }

  // ---------------------------------------------------------------- consumers
#if CREG
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(CREG));
#endif
  const int ct = tid - PTH;
  const int wg = ct >> 7;
  float d[MT][NACC];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NACC; ++i) d[mt][i] = 0.f;
  for (int j = 0; j < nk; ++j) {
    bar_sync(FULL0 + j % STAGES, ATH);
    const u32 slot = smem_s + (j % STAGES) * WSLOT;
    const u32 xa = slot + wg * MT * 8192, wa = slot + XST + WQST;
    wg_fence();
#pragma unroll
    for (int jj = 0; jj < BK / 16; ++jj)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) wgmma(d[mt], desc(xa + mt * 8192 + jj * KSTEP), desc(wa + jj * KSTEP));
    wg_commit();
    wg_wait<1>();                                    // stage j-1's MMAs are done: its slot is free
    if (j >= 1 && j - 1 + STAGES < nk) bar_arrive(EMPTY0 + (j - 1) % STAGES, ATH);
  }
  wg_wait<0>();

  store_tile(d, y, ct, wg, m0, n0, M, N);
}
"""
