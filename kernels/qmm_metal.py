"""Metal port of the fused dequant + GEMV (kernels/qmm_cuda.py). UNTESTED ON DEVICE.

Same algorithm as the CUDA kernel: 128-thread threadgroups of 4/W teams, a team owns R output rows,
its threads stride over K in units (16 bytes of packed weights at 2/4/8 bits, 32 values at 3/5/6),
per group scale * sum(x*q) + bias * sum(x), simd_sum then threadgroup memory across the team.
Differences: scalar loads, and the generic bit-stream field extraction (the CUDA FAST=False path).
Guarded by a start-up self-test against mx.quantized_matmul (see kernels/metal_common.py).
The fused variants (norm prologue; residual, SwiGLU and RoPE epilogues: kernels/qmm_fused.py) are
built from the same source with JANG_NORM / JANG_EPI defined, and self-tested separately.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import qmm_cuda
from .metal_common import HEADER, self_test

MAX_ROWS = qmm_cuda.MAX_ROWS
THREADS = 128

SOURCE = r"""
  // Fused variants (kernels/qmm_fused.py), as in the CUDA twin: JANG_NORM folds an RMSNorm of x into
  // the dot products; JANG_EPI 1 adds `res`, 2 SwiGLU over gate/up row pairs, 3 RoPE over row pairs.
#ifndef JANG_EPI
#define JANG_EPI 0
#endif
#ifndef JANG_NORM
#define JANG_NORM 0
#endif
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
#if JANG_EPI == 2 || JANG_EPI == 3
  constexpr int RO = R / 2;
  const int NO = N / 2;
#else
  constexpr int RO = R;
  const int NO = N;
#endif
#if JANG_EPI == 3
  constexpr int HH = JANG_HD / 2;
#endif
  const int row0 = (threadgroup_position_in_grid.x * TEAMS + team) * RO;
  int rown[R];
  for (int r = 0; r < R; ++r) {
#if JANG_EPI == 2
    rown[r] = r < RO ? min(row0 + r, NO - 1) : NO + min(row0 + r - RO, NO - 1);
#elif JANG_EPI == 3
    const int pr = min(row0 + (r % RO), NO - 1);
    rown[r] = (pr / HH) * JANG_HD + pr % HH + (r < RO ? 0 : HH);
#else
    rown[r] = min(row0 + r, N - 1);
#endif
  }

  float acc[MM][R];
  float ss[MM];
  for (int m = 0; m < MM; ++m) {
    ss[m] = 0.f;
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  }

  for (int u = t; u < units; u += TPT) {
    uint wv[R][WORDS];
    float sc[R][NG], bi[R][NG];
    const int g0 = (u * VALS) / GS;
    for (int r = 0; r < R; ++r) {
      const int n = rown[r];
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
#if JANG_NORM
          ss[m] = fma(xv[m], xv[m], ss[m]);
          xv[m] *= float(nw[(size_t)u * VALS + v]);
#endif
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

  for (int m = 0; m < MM; ++m) {
    for (int r = 0; r < R; ++r) acc[m][r] = simd_sum(acc[m][r]);
    ss[m] = simd_sum(ss[m]);
  }

  const int lane = tid & 31;
  threadgroup float red[NW][MM * (R + 1)];
  const int warp = tid >> 5;
  if (lane == 0) {
    for (int m = 0; m < MM; ++m) {
      for (int r = 0; r < R; ++r) red[warp][m * (R + 1) + r] = acc[m][r];
      red[warp][m * (R + 1) + R] = ss[m];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int m = t; m < MM; m += TPT) {
    float s[R + 1];
    for (int r = 0; r <= R; ++r) {
      s[r] = 0.f;
      for (int k = 0; k < W; ++k) s[r] += red[team * W + k][m * (R + 1) + r];
    }
#if JANG_NORM
    const float inv = metal::precise::rsqrt(s[R] / float(K) + JANG_EPS);
#else
    const float inv = 1.f;
#endif
    for (int r = 0; r < RO; ++r) {
      const int n = row0 + r;
      if (m >= M || n >= NO) continue;
#if JANG_EPI == 3
      const int h = n / HH, j = n % HH;
      float a = s[r] * inv, b = s[r + RO] * inv;
      if (h < JANG_NROT) {
        const float th = float(rpos[m]) * rfreq[j];
        const float sn = metal::precise::sin(th), cs = metal::precise::cos(th);
        const float a2 = a * cs - b * sn;
        b = a * sn + b * cs;
        a = a2;
      }
      y[(size_t)m * N + h * JANG_HD + j] = static_cast<T>(a);
      y[(size_t)m * N + h * JANG_HD + j + HH] = static_cast<T>(b);
#else
#if JANG_EPI == 2
      const float g = s[r] * inv, u = s[r + RO] * inv;
      const float v = g / (1.f + metal::precise::exp(-g)) * u;
#elif JANG_EPI == 1
      const float v = s[r] * inv + float(res[(size_t)m * NO + n]);
#else
      const float v = s[r] * inv;
#endif
      y[(size_t)m * NO + n] = static_cast<T>(v);
#endif
    }
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


_fused: dict = {}


def _fused_kernel(epi: int, norm: bool, eps: float, rope: tuple[int, int] | None):
    key = (epi, norm, float(eps) if norm else None, rope)
    k = _fused.get(key)
    if k is None:
        defines, names = qmm_cuda.fused_variant(epi, norm, eps, rope)
        k = _fused[key] = mx.fast.metal_kernel(name=f"jang_qgemv_fused_{len(_fused)}", input_names=names,
                                               output_names=["y"], source=SOURCE, header=defines + HEADER)
    return k


def qgemv_fused(x2d, w, scales, biases, bits, group_size, norm_weight=None, eps=1e-5, residual=None,
                swiglu=False, rope=None):
    """The Metal twin of kernels.qmm_fused's CUDA variants. rope: (positions, inv_freq, head_dim, rotated
    heads) for the RoPE epilogue (output [M, N]); swiglu gives [M, N/2]."""
    m, k = x2d.shape
    n = w.shape[0]
    epi = 3 if rope else 2 if swiglu else 1 if residual is not None else 0
    cfg = qmm_cuda.default_config(m, n // 2 if swiglu else n, k, bits)
    r, wv = (max(2, cfg["R"]) if epi in (2, 3) else cfg["R"]), cfg["W"]
    units = n // 2 if epi in (2, 3) else n
    blocks = math.ceil(units / ((r // 2 if epi in (2, 3) else r) * (4 // wv)))
    inputs = [x2d, w, scales, biases] + ([norm_weight] if norm_weight is not None else []) + \
        ([residual] if residual is not None else []) + ([rope[0], rope[1]] if rope else [])
    return _fused_kernel(epi, norm_weight is not None, eps, (rope[2], rope[3]) if rope else None)(
        inputs=inputs,
        template=[("T", x2d.dtype), ("BITS", bits), ("GS", group_size), ("MM", qmm_cuda.rows_bucket(m)),
                  ("R", r), ("W", wv)],
        grid=(blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(m, n // 2 if swiglu else n)], output_dtypes=[x2d.dtype],
    )[0]


def fused_ready(reference) -> bool:
    """Self-test of the fused variants against `reference` (kernels.qmm_fused.qmm_fused_reference)
    at first use; RoPE is checked against an explicit rotation of the reference's output."""
    def cases():
        out = []
        n, k = 264, 256
        wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.1).astype(mx.float16), group_size=64, bits=4)
        x = mx.random.normal((2, k)).astype(mx.float16)
        nw = (mx.random.normal((k,)) * 0.2 + 1).astype(mx.float16)
        res = mx.random.normal((2, n)).astype(mx.float16)
        out.append((qgemv_fused(x, wq, s, b, 4, 64, nw, 1e-5), reference(x, wq, s, b, 4, 64, nw, 1e-5)))
        out.append((qgemv_fused(x, wq, s, b, 4, 64, residual=res), reference(x, wq, s, b, 4, 64, residual=res)))
        out.append((qgemv_fused(x, wq, s, b, 4, 64, nw, 1e-5, swiglu=True),
                    reference(x, wq, s, b, 4, 64, nw, 1e-5, swiglu=True)))
        pos = mx.array([3, 40], dtype=mx.int32)
        inv = mx.power(mx.array(10000.0), -mx.arange(0, 8, 2, dtype=mx.float32) / 8)   # head dim 8: 33 heads
        y = reference(x, wq, s, b, 4, 64, nw, 1e-5).astype(mx.float32).reshape(2, 33, 8)
        th = pos[:, None].astype(mx.float32) * inv[None]
        c, sn = mx.cos(th)[:, None], mx.sin(th)[:, None]
        a, bb = y[:, :20, :4], y[:, :20, 4:]
        rot = mx.concatenate([a * c - bb * sn, a * sn + bb * c], axis=-1)
        want = mx.concatenate([rot, y[:, 20:]], axis=1).reshape(2, n)
        out.append((qgemv_fused(x, wq, s, b, 4, 64, nw, 1e-5, rope=(pos, inv, 8, 20)), want))
        return out

    return self_test("qmm_fused", cases)
