"""Metal port of the split-K paged attention decode (kernels/paged_cuda.py). UNTESTED ON DEVICE.

Same phases and layout as the CUDA kernel: threadgroup (part, kv_head, seq) of 128 threads, one
token per thread for the scores (dequantizing q8/q4 keys per group), per-part softmax statistics,
V summed with D/8 lanes per token, partial (o, m, l) per part, then a merge kernel. Scalar loads.
Guarded by a start-up self-test against the pure-MLX reference (see kernels/metal_common.py).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import paged_cuda
from .metal_common import HEADER, self_test

THREADS = 128

BODY = r"""
  constexpr int NT = 128;
  constexpr int NWARP = NT / 32;
  constexpr bool QUANT = BITS < 16;
  constexpr int DW = QUANT ? D * BITS / 32 : 1;
  constexpr int NGK = QUANT ? D / KG : 1;
  constexpr int LPT = D / 8;
  constexpr int TPW = 32 / LPT;
  constexpr int NSLOT = NWARP * TPW;

  threadgroup float qsh[G][D];
  threadgroup float qgs[G][NGK];
  threadgroup float ssh[G][PART];
  threadgroup float red[NWARP][G];
  threadgroup float osh[NWARP][G][D];

  const int part = threadgroup_position_in_grid.x;
  const int kvh = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int nparts = threadgroups_per_grid.x;
  const int tid = thread_position_in_threadgroup.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int MAXB = tables_shape[1];
  const int BS = POOL_SHAPE[1];
  const int HKV = POOL_SHAPE[2];
  const int HQ = HKV * G;
  const int ctx = lens[b];
  const int start = WINDOW > 0 ? max(0, ctx - WINDOW) : 0;
  const int t0 = start + part * PART;
  const int t1 = min(ctx, t0 + PART);
  const size_t obase = ((size_t)b * HQ + (size_t)kvh * G) * nparts + part;

  if (t0 >= t1) {
    for (int i = tid; i < G * D; i += NT) po[(obase + (size_t)(i / D) * nparts) * D + i % D] = 0.f;
    if (tid < G) {
      pm[obase + (size_t)tid * nparts] = -INFINITY;
      pl[obase + (size_t)tid * nparts] = 0.f;
    }
    return;
  }

  const float sscale = scale[0];
  for (int i = tid; i < G * D; i += NT)
    qsh[i / D][i % D] = float(q[((size_t)b * HQ + (size_t)kvh * G + i / D) * D + i % D]) * sscale;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (QUANT) {
    for (int i = tid; i < G * NGK; i += NT) {
      float s = 0.f;
      for (int d = 0; d < KG; ++d) s += qsh[i / NGK][(i % NGK) * KG + d];
      qgs[i / NGK][i % NGK] = s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  const device int* table = tables + (size_t)b * MAXB;
  float mloc[G];
  for (int g = 0; g < G; ++g) mloc[g] = -INFINITY;
  for (int t = t0 + tid; t < t1; t += NT) {
    const size_t row = ((size_t)table[t / BS] * BS + (t % BS)) * HKV + kvh;
    float s[G];
    for (int g = 0; g < G; ++g) s[g] = 0.f;
    LOAD_SCORE
    for (int g = 0; g < G; ++g) {
      ssh[g][t - t0] = s[g];
      mloc[g] = max(mloc[g], s[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float mv = simd_max(mloc[g]);
    if (lane == 0) red[warp][g] = mv;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float mxv[G];
  for (int g = 0; g < G; ++g) {
    mxv[g] = red[0][g];
    for (int wi = 1; wi < NWARP; ++wi) mxv[g] = max(mxv[g], red[wi][g]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float lsum[G];
  for (int g = 0; g < G; ++g) lsum[g] = 0.f;
  for (int t = t0 + tid; t < t1; t += NT) {
    for (int g = 0; g < G; ++g) {
      const float p = metal::exp(ssh[g][t - t0] - mxv[g]);
      ssh[g][t - t0] = p;
      lsum[g] += p;
    }
  }
  for (int g = 0; g < G; ++g) {
    const float sv = simd_sum(lsum[g]);
    if (lane == 0) red[warp][g] = sv;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int dc = lane % LPT;
  const int sub = lane / LPT;
  const int slot = warp * TPW + sub;
  float o[G][8];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f;
  for (int t = t0 + slot; t < t1; t += NSLOT) {
    const size_t row = ((size_t)table[t / BS] * BS + (t % BS)) * HKV + kvh;
    float vf[8];
    LOAD_V
    for (int g = 0; g < G; ++g) {
      const float p = ssh[g][t - t0];
      for (int i = 0; i < 8; ++i) o[g][i] = fma(p, vf[i], o[g][i]);
    }
  }
  for (int off = LPT; off < 32; off <<= 1)
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 8; ++i) o[g][i] += simd_shuffle_xor(o[g][i], (ushort)off);
  if (sub == 0) {
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 8; ++i) osh[warp][g][dc * 8 + i] = o[g][i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < G * D; i += NT) {
    float s = 0.f;
    for (int wi = 0; wi < NWARP; ++wi) s += osh[wi][i / D][i % D];
    po[(obase + (size_t)(i / D) * nparts) * D + i % D] = s;
  }
  if (tid < G) {
    float l = 0.f;
    for (int wi = 0; wi < NWARP; ++wi) l += red[wi][tid];
    pm[obase + (size_t)tid * nparts] = mxv[tid];
    pl[obase + (size_t)tid * nparts] = l;
  }
"""

SCORE_F = r"""
    const device T* kr = k + row * D;
    for (int d = 0; d < D; ++d) {
      const float kv = float(kr[d]);
      for (int g = 0; g < G; ++g) s[g] = fma(qsh[g][d], kv, s[g]);
    }
"""

SCORE_Q = r"""
    const device uint* kr = kq + row * DW;
    constexpr int WG = KG * BITS / 32;
    for (int j = 0; j < NGK; ++j) {
      uint wv[WG];
      for (int i = 0; i < WG; ++i) wv[i] = kr[j * WG + i];
      const float sc = float(ks[row * NGK + j]);
      const float bi = float(kb[row * NGK + j]);
      float dot[G];
      for (int g = 0; g < G; ++g) dot[g] = 0.f;
      for (int e = 0; e < KG; ++e) {
        const float kqv = float(jang_field<BITS>(wv, e));
        for (int g = 0; g < G; ++g) dot[g] = fma(qsh[g][j * KG + e], kqv, dot[g]);
      }
      for (int g = 0; g < G; ++g) s[g] += sc * dot[g] + bi * qgs[g][j];
    }
"""

V_F = r"""
    for (int i = 0; i < 8; ++i) vf[i] = float(v[row * D + dc * 8 + i]);
"""

V_Q = r"""
    uint wv[2];
    const device uint* vr = vq + row * DW + dc * BITS / 4;
    wv[0] = vr[0];
    wv[1] = BITS == 8 ? vr[1] : 0u;
    const int jg = (dc * 8) / KG;
    const float sc = float(vs[row * NGK + jg]);
    const float bi = float(vb[row * NGK + jg]);
    for (int i = 0; i < 8; ++i) vf[i] = fma(sc, float(jang_field<BITS>(wv, i)), bi);
"""

SOURCE_F = BODY.replace("LOAD_SCORE", SCORE_F).replace("LOAD_V", V_F).replace("POOL_SHAPE", "k_shape")
SOURCE_Q = BODY.replace("LOAD_SCORE", SCORE_Q).replace("LOAD_V", V_Q).replace("POOL_SHAPE", "kq_shape")

SOURCE_COMBINE = r"""
  const int P = pm_shape[2];
  const size_t bh = threadgroup_position_in_grid.x;
  float M = -INFINITY;
  for (int p = 0; p < P; ++p) M = max(M, pm[bh * P + p]);
  float L = 0.f;
  for (int p = 0; p < P; ++p) {
    const float m = pm[bh * P + p];
    L += (m == -INFINITY) ? 0.f : metal::exp(m - M) * pl[bh * P + p];
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int d = thread_position_in_threadgroup.x; d < D; d += 128) {
    float acc = 0.f;
    for (int p = 0; p < P; ++p) {
      const float m = pm[bh * P + p];
      if (m != -INFINITY) acc += metal::exp(m - M) * po[(bh * P + p) * D + d];
    }
    out[bh * D + d] = static_cast<T>(acc * inv);
  }
"""

_kernels: dict[str, object] = {}


def _get(name):
    if name not in _kernels:
        if name == "f":
            k = mx.fast.metal_kernel(name="jang_paged_decode_f",
                                     input_names=["q", "k", "v", "tables", "lens", "scale"],
                                     output_names=["po", "pm", "pl"], source=SOURCE_F, header=HEADER)
        elif name == "q":
            k = mx.fast.metal_kernel(name="jang_paged_decode_q",
                                     input_names=["q", "kq", "ks", "kb", "vq", "vs", "vb", "tables", "lens",
                                                  "scale"],
                                     output_names=["po", "pm", "pl"], source=SOURCE_Q, header=HEADER)
        else:
            k = mx.fast.metal_kernel(name="jang_paged_combine", input_names=["po", "pm", "pl"],
                                     output_names=["out"], source=SOURCE_COMBINE, header=HEADER)
        _kernels[name] = k
    return _kernels[name]


def supports(q, head_dim, g, bits, kv_group) -> bool:
    return paged_cuda.supports(q, head_dim, g, bits, kv_group)


def paged_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window, bits, kv_group):
    B, HQ, D = q.shape
    pool0 = k_pool[0] if bits < 16 else k_pool
    bs, hkv = pool0.shape[1], pool0.shape[2]
    G = HQ // hkv
    part = paged_cuda.pick_part(G, D, bits < 16)
    span = block_tables.shape[1] * bs
    if window:
        span = min(span, window)
    nparts = max(1, math.ceil(span / part))
    tmpl = [("T", q.dtype), ("BITS", bits), ("KG", kv_group if bits < 16 else 32), ("D", D), ("G", G),
            ("PART", part), ("WINDOW", int(window or 0))]
    rest = [block_tables.astype(mx.int32), context_lens.astype(mx.int32), mx.array([scale], dtype=mx.float32)]
    if bits < 16:
        inputs, kern = [q, *k_pool, *v_pool, *rest], _get("q")
    else:
        inputs, kern = [q, k_pool, v_pool, *rest], _get("f")
    po, pm, pl = kern(inputs=inputs, template=tmpl, grid=(nparts * THREADS, hkv, B), threadgroup=(THREADS, 1, 1),
                      output_shapes=[(B, HQ, nparts, D), (B, HQ, nparts), (B, HQ, nparts)],
                      output_dtypes=[mx.float32] * 3)
    return _get("c")(inputs=[po, pm, pl], template=[("T", q.dtype), ("D", D)],
                     grid=(B * HQ * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                     output_shapes=[(B, HQ, D)], output_dtypes=[q.dtype])[0]


def _cases():
    from .paged import paged_decode_reference

    out = []
    for kvq, window in ((None, None), ((8, 64), None), ((4, 32), 20)):
        nb, bs, hkv, d, hq = 12, 16, 2, 64, 8
        k = mx.random.normal((nb, bs, hkv, d)).astype(mx.float16)
        v = mx.random.normal((nb, bs, hkv, d)).astype(mx.float16)
        if kvq:
            k = tuple(mx.quantize(k, group_size=kvq[1], bits=kvq[0]))
            v = tuple(mx.quantize(v, group_size=kvq[1], bits=kvq[0]))
        tables = mx.array([[3, 1, 7, 0], [5, 2, 9, 11]], dtype=mx.int32)
        lens = mx.array([50, 9], dtype=mx.int32)
        q = mx.random.normal((2, hq, d)).astype(mx.float16)
        bits = 16 if kvq is None else kvq[0]
        grp = 32 if kvq is None else kvq[1]
        out.append((paged_decode(q, k, v, tables, lens, 0.125, window, bits, grp),
                    paged_decode_reference(q, k, v, tables, lens, 0.125, window, kvq)))
    return out


def ready() -> bool:
    return self_test("paged", _cases)
