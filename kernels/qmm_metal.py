"""Metal port of the fused dequant + GEMV (kernels/qmm_cuda.py). UNTESTED ON DEVICE.

Same algorithm as the CUDA kernel: 128-thread threadgroups of 4/W teams, a team owns R output rows,
its threads stride over K in units (16 bytes of packed weights at 2/4/8 bits, 32 values at 3/5/6),
per group scale * sum(x*q) + bias * sum(x), simd_sum then threadgroup memory across the team.
Differences: scalar loads, and the generic bit-stream field extraction (the CUDA FAST=False path).
Guarded by a start-up self-test against mx.quantized_matmul (see kernels/metal_common.py).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import qmm_cuda
from .metal_common import HEADER, self_test

MAX_ROWS = qmm_cuda.MAX_ROWS
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

  const int M = x_shape[0];
  const int N = w_shape[0];
  const int KW = w_shape[1];
  const int K = KW * 32 / BITS;
  const int units = K / VALS;
  const int NGR = K / GS;

  const int tid = thread_position_in_threadgroup.x;
  const int team = tid / TPT;
  const int t = tid % TPT;
  const int row0 = (threadgroup_position_in_grid.x * TEAMS + team) * R;

  float acc[MM][R];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int u = t; u < units; u += TPT) {
    uint wv[R][WORDS];
    float sc[R][NG], bi[R][NG];
    const int g0 = (u * VALS) / GS;
    for (int r = 0; r < R; ++r) {
      const int n = min(row0 + r, N - 1);
      const device uint* p = w + (size_t)n * KW + (size_t)u * WORDS;
      for (int i = 0; i < WORDS; ++i) wv[r][i] = p[i];
      for (int gi = 0; gi < NG; ++gi) {
        sc[r][gi] = float(scales[(size_t)n * NGR + g0 + gi]);
        bi[r][gi] = float(biases[(size_t)n * NGR + g0 + gi]);
      }
    }
    for (int gi = 0; gi < NG; ++gi) {
      float p[MM][R];
      float xs[MM];
      for (int m = 0; m < MM; ++m) {
        xs[m] = 0.f;
        for (int r = 0; r < R; ++r) p[m][r] = 0.f;
      }
      for (int v = gi * GV; v < (gi + 1) * GV; ++v) {
        float xv[MM];
        for (int m = 0; m < MM; ++m) {
          xv[m] = float(x[(size_t)min(m, M - 1) * K + (size_t)u * VALS + v]);
          xs[m] += xv[m];
        }
        for (int r = 0; r < R; ++r) {
          const float q = float(jang_field<BITS>(wv[r], v));
          for (int m = 0; m < MM; ++m) p[m][r] = fma(xv[m], q, p[m][r]);
        }
      }
      for (int m = 0; m < MM; ++m)
        for (int r = 0; r < R; ++r)
          acc[m][r] = fma(sc[r][gi], p[m][r], fma(bi[r][gi], xs[m], acc[m][r]));
    }
  }

  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = simd_sum(acc[m][r]);

  const int lane = tid & 31;
  threadgroup float red[NW][MM * R];
  const int warp = tid >> 5;
  if (lane == 0) {
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < R; ++r) red[warp][m * R + r] = acc[m][r];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = t; i < MM * R; i += TPT) {
    float s = 0.f;
    for (int k = 0; k < W; ++k) s += red[team * W + k][i];
    const int m = i / R, r = i % R;
    if (m < M && row0 + r < N) y[(size_t)m * N + row0 + r] = static_cast<T>(s);
  }
"""

_kernel = None


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(name="jang_qgemv", input_names=["x", "w", "scales", "biases"],
                                       output_names=["y"], source=SOURCE, header=HEADER)
    return _kernel


def supports(x, w, bits, group_size) -> bool:
    return qmm_cuda.supports(x, w, bits, group_size)


def qgemv(x2d, w, scales, biases, bits, group_size):
    m, k = x2d.shape
    n = w.shape[0]
    cfg = qmm_cuda.default_config(m, n, k, bits)
    R, W = cfg["R"], cfg["W"]
    blocks = math.ceil(n / (R * (4 // W)))
    return kernel()(
        inputs=[x2d, w, scales, biases],
        template=[("T", x2d.dtype), ("BITS", bits), ("GS", group_size), ("MM", qmm_cuda.rows_bucket(m)),
                  ("R", R), ("W", W)],
        grid=(blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(m, n)], output_dtypes=[x2d.dtype],
    )[0]


def _cases():
    out = []
    for bits, gs, m, n in ((4, 64, 1, 300), (3, 32, 2, 64), (8, 128, 4, 9000), (2, 32, 1, 40)):
        w = (mx.random.normal((n, 256)) * 0.1).astype(mx.float16)
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        x = mx.random.normal((m, 256)).astype(mx.float16)
        ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
        out.append((qgemv(x, wq, s, b, bits, gs), ref))
    return out


def ready() -> bool:
    """True once the self-test passed (runs it at first call)."""
    return self_test("qmm", _cases)
