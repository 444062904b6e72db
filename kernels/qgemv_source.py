"""The CUDA text of the fused dequant + GEMV (kernels/qmm_cuda.py builds and launches it; the fused
variants of kernels/qmm_fused.py and the Metal twin's port read it too). The algorithm and its
measurements: kernels/qmm.md and kernels/qmm_cuda.py's docstring."""

SOURCE = r"""
  // Fused variants (kernels/qmm_fused.py) define these in their header; the plain GEMV has neither.
#ifndef JANG_EPI
#define JANG_EPI 0      // output: 0 plain, 1 plus residual `res`, 2 silu(gate) * up of row pairs,
#endif                  // 3 RoPE (JANG_HD head dim, first JANG_NROT heads rotated by rpos * rfreq)
#ifndef JANG_NORM
#define JANG_NORM 0     // 1: x is RMS-normalised with weight `nw` (and JANG_EPS) on the fly
#endif
  constexpr int NW = 4;
  constexpr bool POW2 = (BITS == 2 || BITS == 4 || BITS == 8);
  constexpr int VALS = POW2 ? 128 / BITS : 32;          // values per unit
  constexpr int WORDS = VALS * BITS / 32;               // packed words per unit
  constexpr int NG = VALS > GS ? VALS / GS : 1;         // groups per unit
  constexpr int GV = VALS / NG;                         // values per group chunk
  constexpr int VPW = 32 / BITS;                        // values per word (POW2)
  constexpr int VPH = VPW / 2;                          // values per half word (POW2)
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  // NOSUB (FAST at 2/4 bits): PER fields share one shift to positions B, B + BITS, ... (the last one ending
  // at bit 22, the top of float32's mantissa).
  constexpr bool NOSUB = FAST && (BITS == 2 || BITS == 4);
  constexpr int PER = BITS == 4 ? 2 : 4;
  constexpr int B = 23 - BITS * PER;
  constexpr int TEAMS = NW / W;
  constexpr bool PACK = POW2 && sizeof(S) == 2;         // a scale and its bias (raw bits) share a register
  constexpr int TPT = 32 * W;

  const int M = x_shape[0];                             // rows used (<= MM, the compiled maximum)
  const int N = w_shape[0];
  const int KW = w_shape[1];
  const int K = KW * 32 / BITS;
  const int units = K / VALS;
  const int NGR = K / GS;

  const int tid = threadIdx.x;
  const int team = tid / TPT;
  const int t = tid % TPT;
#if JANG_EPI == 2
  // A team's first R/2 rows are gate rows, the other R/2 the matching up rows (N/2 further on).
  constexpr int RO = R / 2;                             // output rows per team
  const int NO = N / 2;
#elif JANG_EPI == 3
  // A team owns R/2 rotation pairs: rows (h*HD + j, h*HD + j + HD/2) of head h (v heads pass through).
  constexpr int RO = R / 2;                             // pairs per team
  constexpr int HH = JANG_HD / 2;
  const int NO = N / 2;                                 // pairs in all
#else
  constexpr int RO = R;
  const int NO = N;
#endif
  const int row0 = (blockIdx.x * TEAMS + team) * RO;
  const uint32_t zero = (uint32_t)N >> 31;              // 0 (jang::tie)

  const uint32_t* wrow[R];
  const S* srow[R];
  const S* brow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#if JANG_EPI == 2
    int n = r < RO ? min(row0 + r, NO - 1) : NO + min(row0 + r - RO, NO - 1);
#elif JANG_EPI == 3
    const int pr = min(row0 + (r % RO), NO - 1);
    int n = (pr / HH) * JANG_HD + pr % HH + (r < RO ? 0 : HH);
#else
    int n = min(row0 + r, N - 1);
#endif
    wrow[r] = w + (size_t)n * KW;
    srow[r] = scales + (size_t)n * NGR;
    brow[r] = biases + (size_t)n * NGR;
  }

  const T* xrow[MM];
#pragma unroll
  for (int m = 0; m < MM; ++m) xrow[m] = x + (size_t)min(m, M - 1) * K;

  float acc[MM][R];
#pragma unroll
  for (int m = 0; m < MM; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  float ss[MM];                                         // sum of x^2 (JANG_NORM)
#pragma unroll
  for (int m = 0; m < MM; ++m) ss[m] = 0.f;

  // 1. packed weights of R rows, then their scales and biases: all loads issued up front.
  auto load_unit = [&](int u, uint32_t (&wv)[R][WORDS], uint32_t (&sc)[R][NG], uint32_t (&bi)[R][NG]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t* p = wrow[r] + (size_t)u * WORDS;
      if constexpr (WORDS == 4) {
        uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
        wv[r][0] = v.x; wv[r][1] = v.y; wv[r][2] = v.z; wv[r][3] = v.w;
      } else if constexpr (WORDS == 6) {
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
          wv[r][2 * i] = v.x; wv[r][2 * i + 1] = v.y;
        }
      } else {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) wv[r][i] = __ldg(p + i);
      }
    }
    const int g0 = (u * VALS) / GS;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        const uint32_t s = jang::ldg_bits(srow[r] + g0 + gi), b = jang::ldg_bits(brow[r] + g0 + gi);
        if constexpr (POW2) wv[r][0] = jang::tie(wv[r][0], s ^ b, zero);  // so scales and biases load with the weights
        sc[r][gi] = PACK ? s | b << 16 : s;
        bi[r][gi] = b;                             // unused when PACK
      }
  };

  // 2. per group chunk: activations in slices of 8, reused for the R rows.
  auto compute_unit = [&](int u, const uint32_t (&wv)[R][WORDS], const uint32_t (&sc)[R][NG],
                          const uint32_t (&bi)[R][NG]) {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      float p[MM][R];
      float xs[MM], xs2[MM];                       // sum(x); NOSUB: sum(x * 2^-pos)
#pragma unroll
      for (int m = 0; m < MM; ++m) {
        xs[m] = 0.f;
        xs2[m] = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) p[m][r] = 0.f;
      }
#pragma unroll
      for (int c = 0; c < GV / 8; ++c) {
        const int v0 = gi * GV + c * 8;            // first value of this slice within the unit
        float xf[MM][8];
#if JANG_NORM
        float nwf[8];
        jang::load8<T>(nw + (size_t)u * VALS + v0, nwf);
#endif
#pragma unroll
        for (int m = 0; m < MM; ++m) {
          jang::load8<T>(xrow[m] + (size_t)u * VALS + v0, xf[m]);
#if JANG_NORM
          // rms_norm(x) * nw = (x * nw) * inv_rms: the scalar inv_rms is applied to the sums at the end
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            ss[m] = fmaf(xf[m][i], xf[m][i], ss[m]);
            xf[m][i] *= nwf[i];
          }
#endif
#pragma unroll
          for (int i = 0; i < 8; ++i) xs[m] += xf[m][i];
          if constexpr (NOSUB) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const int pos = B + BITS * (((v0 + i) % VPW) % PER);
              xf[m][i] *= __uint_as_float((uint32_t)(127 - pos) << 23);
              xs2[m] += xf[m][i];
            }
          } else if constexpr (FAST && POW2) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const int jh = ((v0 + i) % VPW) % VPH;
              xf[m][i] *= __uint_as_float((uint32_t)(127 - BITS * jh) << 23);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int v = v0 + i;
            float q;
            if constexpr (NOSUB) {
              // 2^23 + field * 2^pos: shift the field's window (PER fields) to bit B, mask, OR the magic.
              const uint32_t word = wv[r][v / VPW];
              const int pw = v % VPW;
              const int sh = B - BITS * PER * (pw / PER);
              const uint32_t sw = sh >= 0 ? (word << sh) : (word >> -sh);
              q = jang::magic_mask(sw, MASK << (B + BITS * (pw % PER)));
            } else if constexpr (FAST && POW2) {
              const uint32_t word = wv[r][v / VPW];
              const int pw = v % VPW;
              const uint32_t hw = (pw >= VPH) ? (word >> 16) : word;
              q = jang::u2f_mask(hw, MASK << (BITS * (pw % VPH)));
            } else {
              q = jang::u2f(jang::field<BITS>(wv[r], v));
            }
#pragma unroll
            for (int m = 0; m < MM; ++m) p[m][r] = fmaf(xf[m][i], q, p[m][r]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MM; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (NOSUB) p[m][r] = fmaf(-8388608.f, xs2[m], p[m][r]);
          const float scf = jang::bits_to_f<S>(PACK ? sc[r][gi] & 0xffffu : sc[r][gi]);
          const float bif = jang::bits_to_f<S>(PACK ? sc[r][gi] >> 16 : bi[r][gi]);
          acc[m][r] = fmaf(scf, p[m][r], fmaf(bif, xs[m], acc[m][r]));
        }
    }
  };

  if constexpr (PF) {
    // Software pipeline: the next unit's loads are in flight while this one computes.
    uint32_t wa[R][WORDS], wb[R][WORDS];
    uint32_t sa[R][NG], ba[R][NG], sb[R][NG], bb[R][NG];
    int u = t;
    if (u < units) load_unit(u, wa, sa, ba);
    while (u < units) {
      const int u1 = u + TPT;
      if (u1 < units) load_unit(u1, wb, sb, bb);
      compute_unit(u, wa, sa, ba);
      if (u1 >= units) break;
      const int u2 = u1 + TPT;
      if (u2 < units) load_unit(u2, wa, sa, ba);
      compute_unit(u1, wb, sb, bb);
      u = u2;
    }
  } else {
    for (int u = t; u < units; u += TPT) {
      uint32_t wv[R][WORDS];
      uint32_t sc[R][NG], bi[R][NG];
      load_unit(u, wv, sc, bi);
      compute_unit(u, wv, sc, bi);
    }
  }

  // 3. reduce: across the warp, then across the W warps of the team.
#pragma unroll
  for (int m = 0; m < MM; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = jang::warp_sum(acc[m][r]);
    if (JANG_NORM) ss[m] = jang::warp_sum(ss[m]);
  }

  // Output row r of x-row m from the team's sums (s: the R row sums of x-row m; inv: 1/rms).
  auto emit = [&](int m, const float* s, float inv) {
#pragma unroll
    for (int r = 0; r < RO; ++r) {
      const int n = row0 + r;
      if (m >= M || n >= NO) continue;
#if JANG_EPI == 3
      const int h = n / HH, j = n % HH;
      float a = s[r] * inv, b = s[r + RO] * inv;
      if (h < JANG_NROT) {
        float sn, cs;
        sincosf((float)rpos[m] * rfreq[j], &sn, &cs);
        const float a2 = a * cs - b * sn;
        b = a * sn + b * cs;
        a = a2;
      }
      y[(size_t)m * N + h * JANG_HD + j] = jang::from_f<T>(a);
      y[(size_t)m * N + h * JANG_HD + j + HH] = jang::from_f<T>(b);
#ifdef JANG_KVW
      // JANG_KVW q heads come first; the k heads, then the v heads, also go to their pool slot [blk, off] in place
      // (pools [blocks, block size, kv heads, HD], as kernels/kv_write.py writes them)
      if (h >= JANG_KVW) {
        constexpr int NKV = JANG_NROT - JANG_KVW;
        const int kh = h - JANG_KVW;
        T* pool = const_cast<T*>(kh < NKV ? kpool : vpool);
        const size_t dst = (((size_t)kvb[m] * kpool_shape[1] + kvo[m]) * NKV + kh % NKV) * JANG_HD + j;
        pool[dst] = jang::from_f<T>(a);
        pool[dst + HH] = jang::from_f<T>(b);
      }
#endif
      continue;
#endif
#if JANG_EPI == 2
      const float g = s[r] * inv, u = s[r + RO] * inv;
      const float v = g / (1.f + __expf(-g)) * u;
#elif JANG_EPI == 1
      const float v = s[r] * inv + jang::to_f(res[(size_t)m * NO + n]);
#else
      const float v = s[r] * inv;
#endif
      y[(size_t)m * NO + n] = jang::from_f<T>(v);
    }
  };
  auto inv_rms = [&](float sumsq) {
#if JANG_NORM
    return rsqrtf(sumsq / (float)K + JANG_EPS);
#else
    return 1.f;
#endif
  };

  const int lane = tid & 31;
  if constexpr (W == 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MM; ++m) emit(m, acc[m], inv_rms(ss[m]));
    }
  } else {
    __shared__ float red[NW][MM * (R + 1)];
    const int warp = tid >> 5;
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MM; ++m) {
#pragma unroll
        for (int r = 0; r < R; ++r) red[warp][m * (R + 1) + r] = acc[m][r];
        red[warp][m * (R + 1) + R] = ss[m];
      }
    }
    __syncthreads();
    for (int m = t; m < MM; m += TPT) {
      float s[R + 1];
#pragma unroll
      for (int r = 0; r <= R; ++r) {
        s[r] = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) s[r] += red[team * W + k][m * (R + 1) + r];
      }
      emit(m, s, inv_rms(s[R]));
    }
  }
"""
