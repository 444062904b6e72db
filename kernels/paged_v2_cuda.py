"""Paged attention decode on CUDA in one launch, built for few blocks (small batches): v2.

Block (part, kv_head, seq), 128 threads, PART consecutive tokens of one sequence, all G = Hq/Hkv
query heads of the KV head (G <= 8: the queries live in registers). What v1 (kernels/paged_cuda.py)
does as a chain of dependent memory round trips, v2 does in about three:
  round 1  the context length, the block-table entries of the whole part (-> slots in shared
           memory) and this lane's slice of the G scaled query rows, all loads issued together;
  round 2  K AND V rows together: D/8 lanes per token row, 8 values (16 bytes at bf16) per lane,
           U row pairs per lane in flight, the next U prefetched while the current ones are used;
           scores reduced over the row's lanes by shuffles, then an online softmax per warp
           (running max m, sum l, output o) so V is consumed straight from registers;
  merge    warps merge in shared memory; a sequence whose context fits one part writes its output
           at once. Otherwise every part stores its (o, m, l), fences, and takes a ticket from an
           int32 counter per (sequence, kv head); the last part to arrive reads the others (__ldcg,
           L2), writes the merged output and resets the counter to 0 for the next launch.
The counters are persistent zeroed int32 buffers owned by this module, a kernel input that no
other op reads and that the kernel updates in place; the last part resets its counter, so every
launch leaves its buffer at zero. MLX's CUDA graphs order kernels by data dependencies only, so two
launches that do not depend on each other (two runs of decode sequences in one layer of a mixed
step) may run at once: consecutive calls take consecutive buffers of a ring of RING, and
a buffer comes back only RING calls later (by then ordered by data: the layers in between). Plain
constants, so the launch is safe inside mx.compile traces too (the engine's compiled decode step).
q8/q4 KV: a lane's 8 values lie in one quant group; it loads 8 or 4 bytes of packed words plus
that group's scale and bias and dequantizes to floats (`scale * q + bias`) before the dot product.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

from . import backend
from .cuda_common import HEADER as COMMON

HEADER = r"""
namespace jang {

// One lane's 8 values of a K or V row, as loaded (16-bit floats, or packed words + scale/bias).
template <typename T, int BITS>
struct Row8 {
  uint4 w;
  T sc, bi;
};

template <typename T, int BITS, int KG, int D>
__device__ __forceinline__ void load_row8(Row8<T, BITS>& r, const void* pool, const T* ps, const T* pb,
                                          size_t row, int dc) {
  if constexpr (BITS == 16) {
    r.w = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(pool) + row * D + dc * 8));
  } else {
    constexpr int DW = D * BITS / 32;
    const uint32_t* p = reinterpret_cast<const uint32_t*>(pool) + row * DW + dc * BITS / 4;
    if constexpr (BITS == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      r.w.x = v.x; r.w.y = v.y;
    } else {
      r.w.x = __ldg(p);
    }
    const int j = (dc * 8) / KG;
    r.sc = ps[row * (D / KG) + j];
    r.bi = pb[row * (D / KG) + j];
  }
}

template <typename T, int BITS>
__device__ __forceinline__ void zero_row8(Row8<T, BITS>& r) {
  r.w = make_uint4(0u, 0u, 0u, 0u);
  r.sc = from_f<T>(0.f);
  r.bi = from_f<T>(0.f);
}

template <typename T, int BITS>
__device__ __forceinline__ void unpack8(const Row8<T, BITS>& r, float* f) {
  if constexpr (BITS == 16) {
    const T* h = reinterpret_cast<const T*>(&r.w);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_f(h[i]);
  } else {
    const uint32_t w[2] = {r.w.x, r.w.y};
    const float sc = to_f(r.sc), bi = to_f(r.bi);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = fmaf(sc, u2f(field<BITS>(w, i)), bi);
  }
}

template <typename T, int BITS, int KG, int D, int G, int PART, int WINDOW>
__device__ __forceinline__ void paged_decode_v2(
    const T* q, const void* kp, const T* ks, const T* kb, const void* vp, const T* vs, const T* vb,
    const int* tables, const int* lens, const float* scale_p, const int* cnt_in, int MAXB, int BS, int HKV,
    T* out, float* po, float* pm, float* pl) {
  constexpr int NT = 128;
  constexpr int NWARP = NT / 32;
  constexpr int LPT = D / 8;              // lanes per token row
  constexpr int TPW = 32 / LPT;           // token rows per warp step
  constexpr int U = G <= 4 ? 4 : 2;       // warp steps per iteration (rows in flight per lane)
  constexpr int WT = TPW * U;             // tokens per warp per iteration
  constexpr int BT = NWARP * WT;          // tokens per block per iteration
  constexpr int MCH = 64;                 // parts merged per chunk

  __shared__ int ssl[PART];
  __shared__ float wm[NWARP][G], wl[NWARP][G];
  __shared__ float wo[NWARP][G][D];
  __shared__ float wsh[G][MCH];
  __shared__ float mg[G], ilg[G];
  __shared__ int last;

  const int part = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int NP = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int dc = lane % LPT, sub = lane / LPT;
  const int HQ = HKV * G;
  const size_t qh0 = (size_t)b * HQ + (size_t)kvh * G;     // first query head of the group

  // round 1: length, table entries (speculative when there is no window) and queries, together
  const int ctx = lens[b];
  const int* table = tables + (size_t)b * MAXB;
  constexpr int TPT = (PART + NT - 1) / NT;
  int tb[TPT];
  if constexpr (WINDOW == 0) {
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
      const int t = part * PART + tid + j * NT;
      tb[j] = (tid + j * NT < PART && t < MAXB * BS) ? table[t / BS] : 0;
    }
  }
  uint4 qraw[G];
#pragma unroll
  for (int g = 0; g < G; ++g) qraw[g] = __ldg(reinterpret_cast<const uint4*>(q + (qh0 + g) * D + dc * 8));
  const int start = WINDOW > 0 ? max(0, ctx - WINDOW) : 0;
  const int end = min(ctx, MAXB * BS);                        // keys past the table are not there
  const int span = end - start;
  const int nact = span > 0 ? (span + PART - 1) / PART : 0;   // parts with keys
  if (part >= nact) {
    if (nact == 0 && part == 0) {   // no keys: zeros
      for (int i = tid; i < G * D; i += NT) out[qh0 * D + i] = from_f<T>(0.f);
    }
    return;
  }
  const int t0 = start + part * PART;
  const int n = min(PART, end - t0);
#pragma unroll
  for (int j = 0; j < TPT; ++j) {
    const int i = tid + j * NT;
    if (i < PART) {
      const int t = t0 + i;
      if constexpr (WINDOW > 0) tb[j] = i < n ? table[t / BS] : 0;
      ssl[i] = (tb[j] * BS + t % BS) * HKV + kvh;
    }
  }
  const float scale = scale_p[0];
  float qr[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* h = reinterpret_cast<const T*>(&qraw[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) qr[g][i] = to_f(h[i]) * scale;
  }
  __syncthreads();

  // round 2: K and V rows together, online softmax per warp
  float m[G], l[G], o[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY; l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f;
  }
  const int base = warp * WT + sub;       // + it * BT + u * TPW
  const int iters = (n + BT - 1) / BT;
  Row8<T, BITS> kc[U], vc[U], kn[U], vn[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = base + u * TPW;
    if (i < n) {
      load_row8<T, BITS, KG, D>(kc[u], kp, ks, kb, ssl[i], dc);
      load_row8<T, BITS, KG, D>(vc[u], vp, vs, vb, ssl[i], dc);
    } else {
      zero_row8(kc[u]); zero_row8(vc[u]);
    }
  }
  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + (it + 1) * BT + u * TPW;
        if (i < n) {
          load_row8<T, BITS, KG, D>(kn[u], kp, ks, kb, ssl[i], dc);
          load_row8<T, BITS, KG, D>(vn[u], vp, vs, vb, ssl[i], dc);
        } else {
          zero_row8(kn[u]); zero_row8(vn[u]);   // rows past the part: V must be finite zeros
        }
      }
    }
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8<T, BITS>(kc[u], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) a = fmaf(qr[g][i], kf[i], a);
        s[u][g] = a;
      }
    }
#pragma unroll
    for (int off = LPT / 2; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
    float mn[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float v = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (base + it * BT + u * TPW >= n) s[u][g] = -INFINITY;
        v = fmaxf(v, s[u][g]);
      }
#pragma unroll
      for (int off = LPT; off < 32; off <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
      mn[g] = v;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float alpha = m[g] == -INFINITY ? 0.f : __expf(m[g] - mn[g]);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] *= alpha;
      m[g] = mn[g];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      unpack8<T, BITS>(vc[u], vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float p = s[u][g] == -INFINITY ? 0.f : __expf(s[u][g] - m[g]);
        l[g] += p;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[g][i] = fmaf(p, vf[i], o[g][i]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) { kc[u] = kn[u]; vc[u] = vn[u]; }
  }
  // sum over the warp's token rows (same m on every lane), then merge the warps
#pragma unroll
  for (int off = LPT; off < 32; off <<= 1)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], off);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] += __shfl_xor_sync(0xffffffffu, o[g][i], off);
    }
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) wo[warp][g][dc * 8 + i] = o[g][i];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) { wm[warp][g] = m[g]; wl[warp][g] = l[g]; }
  }
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += NT) {
    const int g = idx / D, d = idx % D;
    float M = wm[0][g];
#pragma unroll
    for (int w = 1; w < NWARP; ++w) M = fmaxf(M, wm[w][g]);
    float O = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) {
      const float e = wm[w][g] == -INFINITY ? 0.f : __expf(wm[w][g] - M);
      O = fmaf(e, wo[w][g][d], O);
      L = fmaf(e, wl[w][g], L);
    }
    if (nact == 1) {
      out[(qh0 + g) * D + d] = from_f<T>(L > 0.f ? O / L : 0.f);
    } else {
      const size_t r = (qh0 + g) * NP + part;
      po[r * D + d] = O;
      if (d == 0) { pm[r] = M; pl[r] = L; }
    }
  }
  if (nact == 1) return;

  // the last part of this (sequence, kv head) to arrive merges them all
  __threadfence();
  __syncthreads();
  int* cnt = const_cast<int*>(cnt_in) + (size_t)b * HKV + kvh;
  if (tid == 0) last = atomicAdd(cnt, 1) == nact - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int g = warp; g < G; g += NWARP) {      // per head: M and 1/L over the parts (online merge)
    float M = -INFINITY, L = 0.f;
    for (int p = lane; p < nact; p += 32) {
      const size_t r = (qh0 + g) * NP + p;
      const float mp = __ldcg(pm + r), lp = __ldcg(pl + r);
      const float M2 = fmaxf(M, mp);
      L = (M == -INFINITY ? 0.f : L * __expf(M - M2)) + (mp == -INFINITY ? 0.f : lp * __expf(mp - M2));
      M = M2;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float Mo = __shfl_xor_sync(0xffffffffu, M, off), Lo = __shfl_xor_sync(0xffffffffu, L, off);
      const float M2 = fmaxf(M, Mo);
      L = (M == -INFINITY ? 0.f : L * __expf(M - M2)) + (Mo == -INFINITY ? 0.f : Lo * __expf(Mo - M2));
      M = M2;
    }
    if (lane == 0) { mg[g] = M; ilg[g] = L > 0.f ? 1.f / L : 0.f; }
  }
  if (tid == 0) *cnt = 0;   // every part has arrived: ready for the buffer's next launch
  __syncthreads();
  constexpr int IPT = (G * D + NT - 1) / NT;
  float acc[IPT];
#pragma unroll
  for (int j = 0; j < IPT; ++j) acc[j] = 0.f;
  for (int p0 = 0; p0 < nact; p0 += MCH) {
    const int pn = min(MCH, nact - p0);
    for (int i = tid; i < G * MCH; i += NT) {
      const int g = i / MCH, j = i % MCH;
      if (j < pn) {
        const float mp = __ldcg(pm + (qh0 + g) * NP + p0 + j);
        wsh[g][j] = mp == -INFINITY ? 0.f : __expf(mp - mg[g]) * ilg[g];
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < IPT; ++j) {
      const int idx = tid + j * NT;
      if (idx < G * D) {
        const int g = idx / D, d = idx % D;
        const float* src = po + ((qh0 + g) * NP + p0) * D + d;
        float a = 0.f;
#pragma unroll 8
        for (int p = 0; p < pn; ++p) a = fmaf(wsh[g][p], __ldcg(src + (size_t)p * D), a);
        acc[j] += a;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < IPT; ++j) {
    const int idx = tid + j * NT;
    if (idx < G * D) out[qh0 * D + idx] = from_f<T>(acc[j]);
  }
}

}  // namespace jang
"""

SOURCE_F = r"""
  jang::paged_decode_v2<T, BITS, KG, D, G, PART, WINDOW>(
      q, k, nullptr, nullptr, v, nullptr, nullptr, tables, lens, scale, cnt,
      tables_shape[1], k_shape[1], k_shape[2], out, po, pm, pl);
"""

SOURCE_Q = r"""
  jang::paged_decode_v2<T, BITS, KG, D, G, PART, WINDOW>(
      q, kq, ks, kb, vq, vs, vb, tables, lens, scale, cnt,
      tables_shape[1], kq_shape[1], kq_shape[2], out, po, pm, pl);
"""

THREADS = 128
MAX_G = 8
PARTS = (32, 64, 128, 256, 512)
# Parts: the largest. Measured on the H100 (kernels-paged-small-h100.json), every extra part costs more
# than the occupancy it buys: batch 1 at 4,096 tokens 26 us with 512-token parts (64 blocks), 30 / 42 / 60 /
# 89 us with 256 / 128 / 64 / 32 (up to 1,024 blocks); at 140 tokens 19 us (one part) vs 23 us (five).

_kernels: dict[str, object] = {}
RING = 64
_ring: list = [0, []]   # [next index, RING zeroed buffers of one capacity]


def _get(quant: bool):
    name = "q" if quant else "f"
    if name not in _kernels:
        ins = (["q", "kq", "ks", "kb", "vq", "vs", "vb"] if quant else ["q", "k", "v"]) + \
            ["tables", "lens", "scale", "cnt"]
        _kernels[name] = backend.cuda_kernel(
            name=f"jang_paged_decode_v2_{name}", input_names=ins, output_names=["out", "po", "pm", "pl"],
            source=SOURCE_Q if quant else SOURCE_F, header=COMMON + HEADER)
    return _kernels[name]


def counters(n: int) -> mx.array:
    """Zeroed int32 ticket counters for one launch over n (sequence, kv head) pairs: the next buffer of
    the ring (real buffers of at least n entries; the ring is remade, twice as large, when n outgrows it)."""
    bufs = _ring[1]
    if not bufs or bufs[0].size < n:
        cap = max(n, 2 * bufs[0].size if bufs else 256)
        _ring[:] = [0, [mx.array(np.zeros(cap, dtype=np.int32)) for _ in range(RING)]]
        mx.eval(_ring[1])
    c = _ring[1][_ring[0]]
    _ring[0] = (_ring[0] + 1) % RING
    return c


def supports(head_dim: int, g: int) -> bool:
    return head_dim in (64, 128, 256) and 1 <= g <= MAX_G


def pick_part(batch: int, hkv: int, span: int, max_part: int = 512) -> int:
    """Tokens per part: the largest (max_part), whatever the batch and span (see PARTS)."""
    return max_part


def launcher(q_shape, dtype, pool_shape, table_width, window, bits, kv_group, part=None, max_part=512):
    """f(inputs) -> out for these shapes: inputs are q, the pool(s), tables, lens, scale.
    max_part: the largest part the start-up warm-up compiles (paged_cuda.pick_part)."""
    B, HQ, D = q_shape
    bs, hkv = pool_shape[1], pool_shape[2]
    G = HQ // hkv
    span = table_width * bs
    if window:
        span = min(span, window)
    part = part or pick_part(B, hkv, span, max_part)
    nparts = max(1, -(-span // part))
    tmpl = [("T", dtype), ("BITS", bits), ("KG", kv_group if bits < 16 else 32), ("D", D), ("G", G),
            ("PART", part), ("WINDOW", int(window or 0))]
    kern = _get(bits < 16)
    grid, tg = (nparts * THREADS, hkv, B), (THREADS, 1, 1)
    n = B * hkv
    shapes = [(B, HQ, D), (B, HQ, nparts, D), (B, HQ, nparts), (B, HQ, nparts)]
    dts = [dtype, mx.float32, mx.float32, mx.float32]

    def run(inputs):
        return kern(inputs=[*inputs, counters(n)], template=tmpl, grid=grid, threadgroup=tg, output_shapes=shapes,
                    output_dtypes=dts)[0]
    run.part, run.nparts = part, nparts
    return run
