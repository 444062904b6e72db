"""Metal port of the expert-gathered fused dequant + GEMV (kernels/gather_cuda.py). UNTESTED ON DEVICE.

Same algorithm as the CUDA kernel: threadgroups of 128 threads = 4/W teams of W simdgroups, a team
owns R output features; grid (ceil(B/G) entry chunks, feature tiles); a threadgroup serves G
consecutive entries, one pass per distinct expert among them, with the w / scales / biases base
offset by expert * N * row length and each entry's x row taken from the index list xi.
Differences: scalar loads, and the generic bit-stream field extraction (the CUDA FAST=False path).
Guarded by a start-up self-test against mx.gather_qmm (see kernels/metal_common.py).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import gather_cuda
from .metal_common import HEADER, self_test

THREADS = 128

SOURCE = r"""
  constexpr int NW = 4;
  constexpr bool POW2 = (BITS == 2 || BITS == 4 || BITS == 8);
  constexpr int VALS = POW2 ? 128 / BITS : 32;
  constexpr int WORDS = VALS * BITS / 32;
  constexpr int NG = VALS > GS ? VALS / GS : 1;
  constexpr int GV = VALS / NG;
  constexpr int TEAMS = NW / W;
  constexpr int TPT = 32 * W;

  const int B = ei_shape[0];
  const int NX = x_shape[0];
  const int E = w_shape[0];
  const int N = w_shape[1];
  const int KW = w_shape[2];
  const int K = KW * 32 / BITS;
  const int units = K / VALS;
  const int NGR = K / GS;

  const int tid = thread_position_in_threadgroup.x;
  const int team = tid / TPT;
  const int t = tid % TPT;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int c0 = threadgroup_position_in_grid.x * G;
  const int row0 = (threadgroup_position_in_grid.y * TEAMS + team) * R;

  int ex[G], xr[G];
  for (int j = 0; j < G; ++j) {
    const int b = min(c0 + j, B - 1);
    ex[j] = min(max((int)ei[b], 0), E - 1);
    xr[j] = min(max((int)xi[b], 0), NX - 1);
  }
  uint todo = (1u << min(G, B - c0)) - 1u;
  threadgroup float red[NW][G * R];

  while (todo != 0u) {
    const int f = ctz(todo);
    const int e = ex[f];
    const int xf0 = xr[f];
    uint act = 0u;
    for (int j = 0; j < G; ++j) if (((todo >> j) & 1u) && ex[j] == e) act |= 1u << j;
    todo &= ~act;
    int xrow[G];
    for (int j = 0; j < G; ++j) xrow[j] = ((act >> j) & 1u) ? xr[j] : xf0;

    float acc[G][R];
    for (int m = 0; m < G; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    for (int u = t; u < units; u += TPT) {
      uint wv[R][WORDS];
      float sc[R][NG], bi[R][NG];
      const int g0 = (u * VALS) / GS;
      for (int r = 0; r < R; ++r) {
        const size_t n = (size_t)e * N + min(row0 + r, N - 1);
        const device uint* p = w + n * KW + (size_t)u * WORDS;
        for (int i = 0; i < WORDS; ++i) wv[r][i] = p[i];
        for (int gi = 0; gi < NG; ++gi) {
          sc[r][gi] = float(scales[n * NGR + g0 + gi]);
          bi[r][gi] = float(biases[n * NGR + g0 + gi]);
        }
      }
      for (int gi = 0; gi < NG; ++gi) {
        float p[G][R];
        float xs[G];
        for (int m = 0; m < G; ++m) {
          xs[m] = 0.f;
          for (int r = 0; r < R; ++r) p[m][r] = 0.f;
        }
        for (int v = gi * GV; v < (gi + 1) * GV; ++v) {
          float xv[G];
          for (int m = 0; m < G; ++m) {
            xv[m] = float(x[(size_t)xrow[m] * K + (size_t)u * VALS + v]);
            xs[m] += xv[m];
          }
          for (int r = 0; r < R; ++r) {
            const float q = float(jang_field<BITS>(wv[r], v));
            for (int m = 0; m < G; ++m) p[m][r] = fma(xv[m], q, p[m][r]);
          }
        }
        for (int m = 0; m < G; ++m)
          for (int r = 0; r < R; ++r)
            acc[m][r] = fma(sc[r][gi], p[m][r], fma(bi[r][gi], xs[m], acc[m][r]));
      }
    }

    for (int m = 0; m < G; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = simd_sum(acc[m][r]);
    if (lane == 0) {
      for (int m = 0; m < G; ++m)
        for (int r = 0; r < R; ++r) red[warp][m * R + r] = acc[m][r];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = t; i < G * R; i += TPT) {
      float s = 0.f;
      for (int k = 0; k < W; ++k) s += red[team * W + k][i];
      const int m = i / R, r = i % R;
      if (((act >> m) & 1u) && row0 + r < N) y[(size_t)(c0 + m) * N + row0 + r] = static_cast<T>(s);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
"""

_kernel = None


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(name="jang_gather_qgemv",
                                       input_names=["x", "w", "scales", "biases", "xi", "ei"],
                                       output_names=["y"], source=SOURCE, header=HEADER)
    return _kernel


def supports(x, w, bits, group_size) -> bool:
    return gather_cuda.supports(x, w, bits, group_size)


def gather_qgemv(x2d, w, scales, biases, xi, ei, bits, group_size, sorted_indices=False):
    """Same contract as gather_cuda.gather_qgemv: returns [B, N] in x's dtype."""
    entries, n = ei.shape[0], w.shape[1]
    cfg = gather_cuda.default_config(entries, n, x2d.shape[1], bits, sorted_indices, w.shape[0])
    blocks_n = math.ceil(n / (cfg["R"] * (4 // cfg["W"])))
    return kernel()(
        inputs=[x2d, w, scales, biases, xi, ei],
        template=[("T", x2d.dtype), ("BITS", bits), ("GS", group_size), ("G", cfg["G"]), ("R", cfg["R"]),
                  ("W", cfg["W"])],
        grid=(math.ceil(entries / cfg["G"]) * THREADS, blocks_n, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(entries, n)], output_dtypes=[x2d.dtype],
    )[0]


def plan(entries, n, k, dtype, bits, group_size, sorted_indices, experts=None):
    return lambda x2d, w, sc, bi, xi, ei: gather_qgemv(x2d, w, sc, bi, xi, ei, bits, group_size, sorted_indices)


def _cases():
    out = []
    for bits, gs, e, n, idx, srt in ((4, 64, 4, 300, [2, 0, 3], False), (3, 32, 3, 64, [0, 0, 1, 2, 2], True),
                                     (8, 128, 2, 9000, [1], False), (2, 32, 5, 40, [4, 4, 4, 0, 1, 1, 3, 3, 3], True)):
        wf = (mx.random.normal((e, n, 256)) * 0.1).astype(mx.float16)
        wq, s, b = mx.quantize(wf, group_size=gs, bits=bits)
        rhs = mx.array(idx, dtype=mx.uint32)
        x = mx.random.normal((len(idx), 1, 256)).astype(mx.float16)
        ref = mx.gather_qmm(x, wq, s, b, rhs_indices=rhs, transpose=True, group_size=gs, bits=bits)
        xi = mx.arange(len(idx), dtype=mx.int32)
        got = gather_qgemv(x.reshape(len(idx), 256), wq, s, b, xi, rhs, bits, gs, srt)
        out.append((got.reshape(ref.shape), ref))
    return out


def ready() -> bool:
    """True once the self-test passed (runs it at first call)."""
    return self_test("gather_qmm", _cases)
