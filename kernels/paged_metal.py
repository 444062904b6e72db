"""Metal port of the paged attention decode v2 (kernels/paged_v2_cuda.py). UNTESTED ON DEVICE.

Same work split as the CUDA v2 kernel: threadgroup (part, kv_head, seq) of 128 threads; the part's
slots from the block table into threadgroup memory and this lane's slice of the G scaled queries
into registers; K AND V rows loaded together, D/8 lanes per row and 8 values per lane (q8/q4
dequantized as `scale * q + bias`), scores reduced by simd shuffles, an online softmax per
simdgroup, simdgroups merged in threadgroup memory. One difference: the parts are merged by a
second kernel (v1's combine), not by the last threadgroup through ticket counters, since Metal has
no portable device-scope fence for that pattern. Scalar loads, G <= 8 (larger G: the reference).
Guarded by a start-up self-test against the pure-MLX reference (see kernels/metal_common.py).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import paged_cuda, paged_v2_cuda
from .metal_common import HEADER, self_test

THREADS = 128

BODY = r"""
  constexpr int NT = 128;
  constexpr int NWARP = NT / 32;
  constexpr bool QUANT = BITS < 16;
  constexpr int DW = QUANT ? D * BITS / 32 : 1;   // packed words per token row
  constexpr int NGK = QUANT ? D / KG : 1;         // quant groups per token row
  constexpr int LPT = D / 8;                      // lanes per token row
  constexpr int TPW = 32 / LPT;                   // token rows per simdgroup step
  constexpr int U = G <= 4 ? 4 : 2;               // steps per iteration
  constexpr int WT = TPW * U;
  constexpr int BT = NWARP * WT;
  constexpr int TPT = (PART + NT - 1) / NT;

  threadgroup int ssl[PART];
  threadgroup float wm[NWARP][G];
  threadgroup float wl[NWARP][G];
  threadgroup float wo[NWARP][G][D];

  const int part = threadgroup_position_in_grid.x;
  const int kvh = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int nparts = threadgroups_per_grid.x;
  const int tid = thread_position_in_threadgroup.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int dc = lane % LPT, sub = lane / LPT;
  const int MAXB = tables_shape[1];
  const int BS = POOL_SHAPE[1];
  const int HKV = POOL_SHAPE[2];
  const int HQ = HKV * G;
  const size_t qh0 = (size_t)b * HQ + (size_t)kvh * G;
  const size_t obase = qh0 * nparts + part;             // + g * nparts

  // round 1: length, the part's table entries -> slots, this lane's slice of the scaled queries
  const int ctx = lens[b];
  const int start = WINDOW > 0 ? max(0, ctx - WINDOW) : 0;
  const int end = min(ctx, MAXB * BS);
  const int t0 = start + part * PART;
  const int n = min(PART, end - t0);
  if (n <= 0) {
    for (int i = tid; i < G * D; i += NT) po[(obase + (size_t)(i / D) * nparts) * D + i % D] = 0.f;
    if (tid < G) {
      pm[obase + (size_t)tid * nparts] = -INFINITY;
      pl[obase + (size_t)tid * nparts] = 0.f;
    }
    return;
  }
  const device int* table = tables + (size_t)b * MAXB;
  for (int j = 0; j < TPT; ++j) {
    const int i = tid + j * NT;
    if (i < PART) {
      const int t = t0 + i;
      const int blk = i < n ? table[t / BS] : 0;
      ssl[i] = (blk * BS + t % BS) * HKV + kvh;
    }
  }
  const float sscale = scale[0];
  float qr[G][8];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 8; ++i) qr[g][i] = float(q[(qh0 + g) * D + dc * 8 + i]) * sscale;
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // round 2: K and V rows together (8 values per lane), online softmax per simdgroup
  float m[G], l[G], o[G][8];
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f;
  }
  const int base = warp * WT + sub;
  const int iters = (n + BT - 1) / BT;
  for (int it = 0; it < iters; ++it) {
    float kf[U][8], vf[U][8];
    for (int u = 0; u < U; ++u) {
      const int i = base + it * BT + u * TPW;
      if (i < n) {
        const size_t row = (size_t)ssl[i];
        LOAD_KV
      } else {
        for (int e = 0; e < 8; ++e) { kf[u][e] = 0.f; vf[u][e] = 0.f; }
      }
    }
    float s[U][G];
    for (int u = 0; u < U; ++u)
      for (int g = 0; g < G; ++g) {
        float a = 0.f;
        for (int e = 0; e < 8; ++e) a = fma(qr[g][e], kf[u][e], a);
        s[u][g] = a;
      }
    for (int off = LPT / 2; off > 0; off >>= 1)
      for (int u = 0; u < U; ++u)
        for (int g = 0; g < G; ++g) s[u][g] += simd_shuffle_xor(s[u][g], (ushort)off);
    for (int g = 0; g < G; ++g) {
      float mv = m[g];
      for (int u = 0; u < U; ++u) {
        if (base + it * BT + u * TPW >= n) s[u][g] = -INFINITY;
        mv = max(mv, s[u][g]);
      }
      for (int off = LPT; off < 32; off <<= 1) mv = max(mv, simd_shuffle_xor(mv, (ushort)off));
      const float alpha = m[g] == -INFINITY ? 0.f : metal::exp(m[g] - mv);
      l[g] *= alpha;
      for (int e = 0; e < 8; ++e) o[g][e] *= alpha;
      m[g] = mv;
      for (int u = 0; u < U; ++u) {
        const float p = s[u][g] == -INFINITY ? 0.f : metal::exp(s[u][g] - mv);
        l[g] += p;
        for (int e = 0; e < 8; ++e) o[g][e] = fma(p, vf[u][e], o[g][e]);
      }
    }
  }
  for (int off = LPT; off < 32; off <<= 1)
    for (int g = 0; g < G; ++g) {
      l[g] += simd_shuffle_xor(l[g], (ushort)off);
      for (int e = 0; e < 8; ++e) o[g][e] += simd_shuffle_xor(o[g][e], (ushort)off);
    }
  if (sub == 0)
    for (int g = 0; g < G; ++g)
      for (int e = 0; e < 8; ++e) wo[warp][g][dc * 8 + e] = o[g][e];
  if (lane == 0)
    for (int g = 0; g < G; ++g) { wm[warp][g] = m[g]; wl[warp][g] = l[g]; }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // merge the simdgroups: this part's (o, m, l); the combine kernel merges the parts
  for (int i = tid; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    float M = wm[0][g];
    for (int w = 1; w < NWARP; ++w) M = max(M, wm[w][g]);
    float O = 0.f, L = 0.f;
    for (int w = 0; w < NWARP; ++w) {
      const float e = wm[w][g] == -INFINITY ? 0.f : metal::exp(wm[w][g] - M);
      O = fma(e, wo[w][g][d], O);
      L = fma(e, wl[w][g], L);
    }
    po[(obase + (size_t)g * nparts) * D + d] = O;
    if (d == 0) {
      pm[obase + (size_t)g * nparts] = M;
      pl[obase + (size_t)g * nparts] = L;
    }
  }
"""

KV_F = r"""
        for (int e = 0; e < 8; ++e) {
          kf[u][e] = float(k[row * D + dc * 8 + e]);
          vf[u][e] = float(v[row * D + dc * 8 + e]);
        }
"""

KV_Q = r"""
        const int jg = (dc * 8) / KG;
        uint kw[2], vw[2];
        kw[0] = kq[row * DW + dc * BITS / 4];
        vw[0] = vq[row * DW + dc * BITS / 4];
        kw[1] = BITS == 8 ? kq[row * DW + dc * BITS / 4 + 1] : 0u;
        vw[1] = BITS == 8 ? vq[row * DW + dc * BITS / 4 + 1] : 0u;
        const float ksc = float(ks[row * NGK + jg]), kbi = float(kb[row * NGK + jg]);
        const float vsc = float(vs[row * NGK + jg]), vbi = float(vb[row * NGK + jg]);
        for (int e = 0; e < 8; ++e) {
          kf[u][e] = fma(ksc, float(jang_field<BITS>(kw, e)), kbi);
          vf[u][e] = fma(vsc, float(jang_field<BITS>(vw, e)), vbi);
        }
"""

SOURCE_F = BODY.replace("LOAD_KV", KV_F).replace("POOL_SHAPE", "k_shape")
SOURCE_Q = BODY.replace("LOAD_KV", KV_Q).replace("POOL_SHAPE", "kq_shape")

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


TG_LIMIT = 32 * 1024   # threadgroup memory on Apple GPUs


def supports(q, head_dim, g, bits, kv_group) -> bool:
    # threadgroup memory: slots [PART] + per-simdgroup (m, l) and o [4][G][D], at the largest part
    tg_bytes = 4 * (max(paged_v2_cuda.PARTS) + 2 * 4 * g + 4 * g * head_dim)
    return (paged_cuda.supports(q, head_dim, g, bits, kv_group) and paged_v2_cuda.supports(head_dim, g)
            and tg_bytes <= TG_LIMIT)


def paged_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window, bits, kv_group):
    B, HQ, D = q.shape
    pool0 = k_pool[0] if bits < 16 else k_pool
    bs, hkv = pool0.shape[1], pool0.shape[2]
    G = HQ // hkv
    span = block_tables.shape[1] * bs
    if window:
        span = min(span, window)
    part = paged_v2_cuda.pick_part(B, hkv, span)
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
