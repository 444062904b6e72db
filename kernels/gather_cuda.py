"""Expert-gathered fused dequant + GEMV on CUDA (MoE decode): y[b] = x[xi[b]] @ dequant(w[ei[b]]).T.

The work split and arithmetic are those of the dense GEMV (kernels/qmm_cuda.py): a block of 128
threads holds 4/W teams of W warps, a team owns R output features and strides over K in units of
16 bytes of packed weights (2/4/8 bits) or 32 values (3/5/6 bits); per group scale * sum(x*q) +
bias * sum(x); warp shuffles, then shared memory across a team's warps.

What is new is the gather. Inputs are the flat entry lists xi [B] (which row of x) and ei [B]
(which expert); the grid is (ceil(B/G) entry chunks, N / (R*teams) feature tiles), entry chunks
fastest, so the blocks of one feature tile for every entry run close together in time and entries
that share an expert read its tile from L2. A block serves G consecutive entries: it picks the
expert of the first entry not yet done, takes every entry of its chunk with that expert (their x
rows become the G activation rows of the GEMV, padded with the first), offsets the w / scales /
biases base pointers by expert * N * row length, computes, writes the rows it took, and repeats
until the chunk is done. G = 1 is one entry per block; G > 1 pays when entries arrive sorted by
expert (the MoE layers sort them from 64 pairs), so one pass serves a whole run of an expert.
Indices are clamped to [0, E-1] / [0, rows-1] (an out-of-range index never reads outside w or x).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import backend
from .cuda_common import HEADER

SOURCE = r"""
  constexpr int NW = 4;
  constexpr bool POW2 = (BITS == 2 || BITS == 4 || BITS == 8);
  constexpr int VALS = POW2 ? 128 / BITS : 32;          // values per unit
  constexpr int WORDS = VALS * BITS / 32;               // packed words per unit
  constexpr int NG = VALS > GS ? VALS / GS : 1;         // groups per unit
  constexpr int GV = VALS / NG;                         // values per group chunk
  constexpr int VPW = 32 / BITS;                        // values per word (POW2)
  constexpr int VPH = VPW / 2;                          // values per half word (POW2)
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int TEAMS = NW / W;
  constexpr int TPT = 32 * W;

  const int B = ei_shape[0];                            // entries (gathered rows)
  const int NX = x_shape[0];                            // rows of x
  const int E = w_shape[0];
  const int N = w_shape[1];
  const int KW = w_shape[2];
  const int K = KW * 32 / BITS;
  const int units = K / VALS;
  const int NGR = K / GS;

  const int tid = threadIdx.x;
  const int team = tid / TPT;
  const int t = tid % TPT;
  const int lane = tid & 31;
  const int c0 = blockIdx.x * G;                        // first entry of this block's chunk
  const int row0 = (blockIdx.y * TEAMS + team) * R;     // first output feature of this team

  int ex[G], xr[G];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const int b = min(c0 + j, B - 1);
    ex[j] = min(max((int)ei[b], 0), E - 1);
    xr[j] = min(max((int)xi[b], 0), NX - 1);
  }
  unsigned todo = (1u << min(G, B - c0)) - 1u;           // entries of this chunk not yet written

  while (todo) {                                        // block-uniform: every thread sees the same todo
    const int f = __ffs(todo) - 1;
    int e = 0, xf0 = 0;
#pragma unroll
    for (int j = 0; j < G; ++j) if (j == f) { e = ex[j]; xf0 = xr[j]; }
    unsigned act = 0;
#pragma unroll
    for (int j = 0; j < G; ++j) if (((todo >> j) & 1u) && ex[j] == e) act |= 1u << j;
    todo &= ~act;

    const uint32_t* wrow[R];
    const S* srow[R];
    const S* brow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const size_t n = (size_t)e * N + min(row0 + r, N - 1);   // expert offset + feature
      wrow[r] = w + n * KW;
      srow[r] = scales + n * NGR;
      brow[r] = biases + n * NGR;
    }
    const T* xrow[G];
#pragma unroll
    for (int j = 0; j < G; ++j) xrow[j] = x + (size_t)(((act >> j) & 1u) ? xr[j] : xf0) * K;

    float acc[G][R];
#pragma unroll
    for (int m = 0; m < G; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    for (int u = t; u < units; u += TPT) {
      // packed weights of R rows, then their scales and biases: all loads issued up front
      uint32_t wv[R][WORDS];
      float sc[R][NG], bi[R][NG];
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
          sc[r][gi] = jang::to_f(srow[r][g0 + gi]);
          bi[r][gi] = jang::to_f(brow[r][g0 + gi]);
        }

#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        float p[G][R];
        float xs[G];
#pragma unroll
        for (int m = 0; m < G; ++m) {
          xs[m] = 0.f;
#pragma unroll
          for (int r = 0; r < R; ++r) p[m][r] = 0.f;
        }
#pragma unroll
        for (int c = 0; c < GV / 8; ++c) {
          const int v0 = gi * GV + c * 8;
          float xv[G][8];
#pragma unroll
          for (int m = 0; m < G; ++m) {
            jang::load8<T>(xrow[m] + (size_t)u * VALS + v0, xv[m]);
#pragma unroll
            for (int i = 0; i < 8; ++i) xs[m] += xv[m][i];
            if constexpr (FAST && POW2) {
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                const int jh = ((v0 + i) % VPW) % VPH;
                xv[m][i] *= __uint_as_float((uint32_t)(127 - BITS * jh) << 23);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const int v = v0 + i;
              float q;
              if constexpr (FAST && POW2) {
                const uint32_t word = wv[r][v / VPW];
                const int pw = v % VPW;
                const uint32_t hw = (pw >= VPH) ? (word >> 16) : word;
                q = jang::u2f(hw & (MASK << (BITS * (pw % VPH))));
              } else {
                q = jang::u2f(jang::field<BITS>(wv[r], v));
              }
#pragma unroll
              for (int m = 0; m < G; ++m) p[m][r] = fmaf(xv[m][i], q, p[m][r]);
            }
          }
        }
#pragma unroll
        for (int m = 0; m < G; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r)
            acc[m][r] = fmaf(sc[r][gi], p[m][r], fmaf(bi[r][gi], xs[m], acc[m][r]));
      }
    }

#pragma unroll
    for (int m = 0; m < G; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = jang::warp_sum(acc[m][r]);

    if constexpr (W == 1) {
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < G; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (((act >> m) & 1u) && row0 + r < N) y[(size_t)(c0 + m) * N + row0 + r] = jang::from_f<T>(acc[m][r]);
      }
    } else {
      __shared__ float red[NW][G * R];
      const int warp = tid >> 5;
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < G; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r) red[warp][m * R + r] = acc[m][r];
      }
      __syncthreads();
      for (int i = t; i < G * R; i += TPT) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) s += red[team * W + k][i];
        const int m = i / R, r = i % R;
        if (((act >> m) & 1u) && row0 + r < N) y[(size_t)(c0 + m) * N + row0 + r] = jang::from_f<T>(s);
      }
      __syncthreads();                                  // red is reused by the next pass
    }
  }
"""

THREADS = 128
GROUPS = (1, 2, 4, 8)        # entries per block, compiled in these buckets

_kernel = None


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = backend.cuda_kernel(
            name="jang_gather_qgemv",
            input_names=["x", "w", "scales", "biases", "xi", "ei"],
            output_names=["y"],
            source=SOURCE,
            header=HEADER,
        )
    return _kernel


def default_config(entries: int, n: int, k: int, bits: int, sorted_indices: bool,
                   experts: int | None = None) -> dict:
    """G entries per block, R features per team, W warps per team; from the H100 runs
    (bench/results/kernels-gather-h100.json). Sorted pairs take G=4 once there are >= 4 pairs per
    expert on average (Mixtral 14336x4096, 64-256 pairs: 594-1953 us vs 786-3261 with G=1; Qwen3-MoE
    shapes at 512-1024 pairs: 181-438 vs 194-586), else one entry per block (Qwen3-MoE at 64-256
    pairs: 30-153 us vs 50-182 with G=4); G=2 and G=8 were never the fastest. R=4 (vs 8) was faster
    or even at 2-32 unsorted pairs. Without `experts`, sorted lists of >= 4 entries take G=4.
    Short rows (<= 64 units of K) and wide outputs take one warp per team."""
    vals = 128 // bits if bits in (2, 4, 8) else 32
    units = k // vals
    per_expert = entries / experts if experts else float("inf")
    g = 4 if (sorted_indices and entries >= 4 and per_expert >= 4) else 1
    w = 1 if (n >= 8192 or units <= 64) else 2
    return {"G": g, "R": 4, "W": w, "FAST": True}


def supports(x: mx.array, w: mx.array, bits: int, group_size: int) -> bool:
    """x [rows, K] in bf16/fp16, w uint32 [E, N, K*bits/32], K a multiple of 128."""
    k = x.shape[-1]
    return (
        x.dtype in (mx.bfloat16, mx.float16)
        and bits in (2, 3, 4, 5, 6, 8)
        and group_size in (32, 64, 128)
        and k % 128 == 0
        and w.ndim == 3
        and w.dtype == mx.uint32
        and w.shape[-1] * 32 == k * bits
    )


def _launch(entries: int, n: int, cfg: dict):
    blocks_n = math.ceil(n / (cfg["R"] * (4 // cfg["W"])))
    return (math.ceil(entries / cfg["G"]) * THREADS, blocks_n, 1), (THREADS, 1, 1)


def gather_qgemv(x2d: mx.array, w: mx.array, scales: mx.array, biases: mx.array, xi: mx.array,
                 ei: mx.array, bits: int, group_size: int, sorted_indices: bool = False,
                 G: int | None = None, R: int | None = None, W: int | None = None,
                 FAST: bool | None = None) -> mx.array:
    """x2d [rows, K]; xi, ei int32/uint32 [B]: entry b is x2d[xi[b]] through expert ei[b].
    Returns [B, N] in x's dtype."""
    entries = ei.shape[0]
    n = w.shape[1]
    cfg = default_config(entries, n, x2d.shape[1], bits, sorted_indices, w.shape[0])
    for key, val in (("G", G), ("R", R), ("W", W), ("FAST", FAST)):
        if val is not None:
            cfg[key] = val
    grid, tg = _launch(entries, n, cfg)
    return kernel()(
        inputs=[x2d, w, scales, biases, xi, ei],
        template=[("T", x2d.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size), ("G", cfg["G"]),
                  ("R", cfg["R"]), ("W", cfg["W"]), ("FAST", bool(cfg["FAST"]))],
        grid=grid, threadgroup=tg, output_shapes=[(entries, n)], output_dtypes=[x2d.dtype],
    )[0]


def plan(entries: int, n: int, k: int, dtype, bits: int, group_size: int, sorted_indices: bool,
         experts: int | None = None):
    """A callable f(x2d, w, scales, biases, xi, ei) -> [entries, N] with the launch fixed once."""
    cfg = default_config(entries, n, k, bits, sorted_indices, experts)
    grid, tg = _launch(entries, n, cfg)
    kern, shp, odt = kernel(), [(entries, n)], [dtype]
    fixed = [("BITS", bits), ("GS", group_size), ("G", cfg["G"]), ("R", cfg["R"]), ("W", cfg["W"]),
             ("FAST", bool(cfg["FAST"]))]
    return lambda x2d, w, sc, bi, xi, ei: kern(
        inputs=[x2d, w, sc, bi, xi, ei], template=[("T", dtype), ("S", sc.dtype)] + fixed,
        grid=grid, threadgroup=tg, output_shapes=shp, output_dtypes=odt)[0]
