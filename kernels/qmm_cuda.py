"""Fused dequant + GEMV for MLX's affine packed weights on CUDA (1-8 activation rows).

Layout: w [N, K*bits/32] uint32, each row a little-endian bit stream of `bits`-bit fields;
scales / biases [N, K/group_size]; w_hat[n, k] = scale[n, k/gs] * q[n, k] + bias[n, k/gs].

Work split: a block of 128 threads holds 4/W "teams" of W warps; a team owns R output rows and
its 32*W threads stride over K in *units* (one unit = 16 bytes of packed weights at 2/4/8 bits,
32 values = 12/20/24 bytes at 3/5/6 bits; a unit never crosses a quantization group unless the
group is smaller than the unit). Each thread loads the unit of all R rows first (R independent
16-byte loads in flight), then the matching activations once, and reuses them for the R rows.
Per group it accumulates p = sum(x*q) and sum(x); the group adds scale*p + bias*sum(x).
At the end: warp-shuffle reduction, then shared memory across the W warps of a team.

FAST (2/4/8 bits): instead of shifting every field down, mask it in place inside a 16-bit half
word and turn it into a float with one three-input logic op (mask, OR the 2^23 magic) and one add
(minus 2^23); the activation is pre-scaled by 2^-(bits*j) to undo the field's position j.
At 2 and 4 bits (NOSUB) the add goes too: one shift brings 2 (4-bit) or 4 (2-bit) fields of a word to
bit positions 15-22, the magic float is 2^23 + q * 2^pos, and the 2^23 * sum(x * 2^-pos) it carries is
taken off once per group from a sum shared by the R rows. At positions >= 15 the magic is at most 2^8
times a nonzero field's share, so about 8 of float32's 24 bits go to it: the group sums keep ~16 bits
(NumPy port: ~1e-5 of the output's scale), far past the bf16/fp16 output's 8-11. SASS of the main loop
per unit, one row, R=8 (local nvcc 13, sm_90): 4-bit 1310 -> 943 instructions for 256 weights, 2-bit
2419 -> 1570 for 512, 8-bit 741 -> 614 for 128 (the one-LOP3 step only); measured in
bench/results/kernels-gemv-nosub-h100.json.

Scale and bias loads (2/4/8 bits): ptxas sank them below a unit's arithmetic to their first use (after ~790 of the
943 instructions of a 4-bit unit), a second memory round trip per unit; one LOP3 that ties them to the first weight
word (jang::tie, a no-op at run time) keeps them beside the weight loads, and __launch_bounds__(128, 4) keeps the
longer-lived registers within 128. A scale and its bias travel as raw bits in one register until the group's end.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .cuda_common import HEADER, launch_bounds

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

def fused_variant(epi: int, norm: bool, eps: float, rope: tuple[int, int] | None) -> tuple[str, list[str]]:
    """The header defines and input names of a fused variant of SOURCE (also used by the Metal twin):
    epi 0 plain / 1 residual / 2 SwiGLU / 3 RoPE with rope = (head_dim, rotated heads)."""
    defines = f"#define JANG_EPI {epi}\n#define JANG_NORM {int(norm)}\n"
    if norm:
        defines += f"#define JANG_EPS {float(eps)!r}f\n"
    if rope:
        defines += f"#define JANG_HD {rope[0]}\n#define JANG_NROT {rope[1]}\n"
    names = ["x", "w", "scales", "biases"] + (["nw"] if norm else []) + (["res"] if epi == 1 else []) + \
        (["rpos", "rfreq"] if epi == 3 else [])
    return defines, names


MAX_ROWS = 8          # the kernel serves 1..8 activation rows (qmm.py routes only 1..GEMV_ROWS here)


def rows_bucket(m: int) -> int:
    """Rows are compiled in buckets 1, 2, 4, 8 (fewer kernels to JIT; unused rows are skipped)."""
    return 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8
THREADS = 128
# 2/4/8 bits build with __launch_bounds__(128, 4) (128 registers with the early scale loads); GPU time 1.01-1.32x
# (bench/results/kernels-gemv-bounds-h100.json). 3/5/6 bits keep the plain build: with both, 2-6% slower.
MIN_BLOCKS = 4
GEMV_HEADER = HEADER + launch_bounds(THREADS, MIN_BLOCKS)
BOUNDED_BITS = (2, 4, 8)

_kernels: dict = {}
_override = None          # bench/kernels_gemv_sweep.py puts another build of the kernel here for an A/B


def header(bits: int) -> str:
    return GEMV_HEADER if bits in BOUNDED_BITS else HEADER


def kernel(bits: int):
    if _override is not None:
        return _override
    bounded = bits in BOUNDED_BITS
    if bounded not in _kernels:
        _kernels[bounded] = mx.fast.cuda_kernel(
            name="jang_qgemv" if bounded else "jang_qgemv_u",
            input_names=["x", "w", "scales", "biases"],
            output_names=["y"],
            source=SOURCE,
            header=header(bits),
        )
    return _kernels[bounded]


def default_config(m: int, n: int, k: int, bits: int) -> dict:
    """R rows per team and W warps per team, from the H100 sweep (bench/results/kernels-h100.json):
    8 rows per team at one row of activations (4 at two, 2 at four), one warp per row team for
    wide outputs (N >= 8192) and two for narrow ones, where K is long."""
    mm = rows_bucket(m)
    r = 8 if mm == 1 else 4 if mm == 2 else 2
    w = 1 if n >= 8192 else 2
    if bits == 8 and mm == 1 and n < 8192:
        w = 4   # 8-bit q/k/v (fused) and o at one row: 15.0 / 13.7 us vs 16.5 / 16.4 (kernels-gemv-sweep-h100.json)
    return {"R": r, "W": w, "FAST": True, "PF": False}


def supports(x: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    k = x.shape[-1]
    return (
        x.dtype in (mx.bfloat16, mx.float16)   # load8 reads 8 16-bit values per 16 bytes
        and bits in (2, 3, 4, 5, 6, 8)
        and group_size in (32, 64, 128)
        and k % 128 == 0
        and w.dtype == mx.uint32
        and w.shape[-1] * 32 == k * bits
    )


def qgemv(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int,
          group_size: int, R: int | None = None, W: int | None = None, FAST: bool | None = None,
          PF: bool | None = None) -> mx.array:
    """x2d: [M<=8, K]; returns [M, N] in x's dtype."""
    m, k = x2d.shape
    n = w.shape[0]
    cfg = default_config(m, n, k, bits)
    R = cfg["R"] if R is None else R
    W = cfg["W"] if W is None else W
    FAST = cfg["FAST"] if FAST is None else FAST
    PF = cfg["PF"] if PF is None else PF
    teams = 4 // W
    blocks = math.ceil(n / (R * teams))
    return kernel(bits)(
        inputs=[x2d, w, scales, biases],
        template=[("T", x2d.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size),
                  ("MM", rows_bucket(m)), ("R", R), ("W", W), ("FAST", bool(FAST)), ("PF", bool(PF))],
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x2d.dtype],
    )[0]


def plan(m: int, n: int, k: int, dtype, bits: int, group_size: int):
    """A callable f(x2d, w, scales, biases) -> y with the launch arguments of this shape computed once."""
    cfg = default_config(m, n, k, bits)
    blocks = math.ceil(n / (cfg["R"] * (4 // cfg["W"])))
    kern, grid, tg, shp, odt = kernel(bits), (blocks * THREADS, 1, 1), (THREADS, 1, 1), [(m, n)], [dtype]
    fixed = [("BITS", bits), ("GS", group_size), ("MM", rows_bucket(m)), ("R", cfg["R"]), ("W", cfg["W"]),
             ("FAST", bool(cfg["FAST"])), ("PF", bool(cfg["PF"]))]
    return lambda x2d, w, sc, bi: kern(inputs=[x2d, w, sc, bi], template=[("T", dtype), ("S", sc.dtype)] + fixed,
                                       grid=grid, threadgroup=tg, output_shapes=shp, output_dtypes=odt)[0]
