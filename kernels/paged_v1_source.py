"""CUDA source text of the v1 paged decode kernels (kernels/paged_cuda.py launches them; the algorithm
is described there): the per-part decode for bf16/fp16 KV (SOURCE_F) and q8/q4 KV (SOURCE_Q), their
shared device function (HEADER), and the kernel that merges the parts (SOURCE_COMBINE)."""

HEADER = r"""
namespace jang {

template <typename T, int BITS, int KG, int D, int G, int PART, int WINDOW>
__device__ __forceinline__ void paged_decode(
    const T* q, const void* kp, const T* ks, const T* kb, const void* vp, const T* vs, const T* vb,
    const int* tables, const int* lens, const float* scale_p, int MAXB, int BS, int HKV,
    float* po, float* pm, float* pl) {
  constexpr int NT = 128;
  constexpr int NWARP = NT / 32;
  constexpr bool QUANT = BITS < 16;
  constexpr int DW = QUANT ? D * BITS / 32 : 1;     // packed words per token row
  constexpr int NGK = QUANT ? D / KG : 1;           // quant groups per token row
  constexpr int LPT = D / 8;                        // lanes per token in the V phase
  constexpr int TPW = 32 / LPT;                     // tokens per warp in the V phase
  constexpr int NSLOT = NWARP * TPW;

  __shared__ float qsh[G][D];
  __shared__ float qgs[G][NGK];
  __shared__ float ssh[G][PART];
  __shared__ float red[NWARP][G];
  __shared__ float osh[NWARP][G][D];

  const int part = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int nparts = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int HQ = HKV * G;
  const int ctx = lens[b];
  const int start = WINDOW > 0 ? max(0, ctx - WINDOW) : 0;
  const int t0 = start + part * PART;
  const int t1 = min(ctx, t0 + PART);
  const size_t obase = ((size_t)b * HQ + (size_t)kvh * G) * nparts + part;   // + g * nparts

  if (t0 >= t1) {
    for (int i = tid; i < G * D; i += NT) {
      const int g = i / D, d = i % D;
      po[(obase + (size_t)g * nparts) * D + d] = 0.f;
    }
    if (tid < G) {
      pm[obase + (size_t)tid * nparts] = -INFINITY;
      pl[obase + (size_t)tid * nparts] = 0.f;
    }
    return;
  }

  // phase 0: scaled queries (and their per-group sums for quantized K) into shared memory
  const float scale = scale_p[0];
  for (int i = tid; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    qsh[g][d] = to_f(q[((size_t)b * HQ + (size_t)kvh * G + g) * D + d]) * scale;
  }
  __syncthreads();
  if constexpr (QUANT) {
    for (int i = tid; i < G * NGK; i += NT) {
      const int g = i / NGK, j = i % NGK;
      float s = 0.f;
      for (int d = 0; d < KG; ++d) s += qsh[g][j * KG + d];
      qgs[g][j] = s;
    }
    __syncthreads();
  }

  const int* table = tables + (size_t)b * MAXB;

  // phase 1: scores, one token per thread
  float mloc[G];
#pragma unroll
  for (int g = 0; g < G; ++g) mloc[g] = -INFINITY;
  for (int t = t0 + tid; t < t1; t += NT) {
    const size_t row = ((size_t)table[t / BS] * BS + (t % BS)) * HKV + kvh;
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.f;
    if constexpr (!QUANT) {
      const T* kr = reinterpret_cast<const T*>(kp) + row * D;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        float kf[8];
        load8<T>(kr + c * 8, kf);
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
          for (int i = 0; i < 8; ++i) s[g] = fmaf(qsh[g][c * 8 + i], kf[i], s[g]);
      }
    } else {
      const uint32_t* kr = reinterpret_cast<const uint32_t*>(kp) + row * DW;
      constexpr int WG = KG * BITS / 32;          // words per group (8 or 16)
#pragma unroll
      for (int j = 0; j < NGK; ++j) {
        uint32_t wv[WG];
#pragma unroll
        for (int i = 0; i < WG; i += 4) {
          uint4 v = __ldg(reinterpret_cast<const uint4*>(kr + j * WG + i));
          wv[i] = v.x; wv[i + 1] = v.y; wv[i + 2] = v.z; wv[i + 3] = v.w;
        }
        const float sc = to_f(ks[row * NGK + j]);
        const float bi = to_f(kb[row * NGK + j]);
        float dot[G];
#pragma unroll
        for (int g = 0; g < G; ++g) dot[g] = 0.f;
#pragma unroll
        for (int e = 0; e < KG; ++e) {
          const float kq = u2f(field<BITS>(wv, e));
#pragma unroll
          for (int g = 0; g < G; ++g) dot[g] = fmaf(qsh[g][j * KG + e], kq, dot[g]);
        }
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] += sc * dot[g] + bi * qgs[g][j];
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      ssh[g][t - t0] = s[g];
      mloc[g] = fmaxf(mloc[g], s[g]);
    }
  }

  // phase 2: softmax statistics of this part
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float v = warp_max(mloc[g]);
    if (lane == 0) red[warp][g] = v;
  }
  __syncthreads();
  float mx[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    mx[g] = red[0][g];
#pragma unroll
    for (int w = 1; w < NWARP; ++w) mx[g] = fmaxf(mx[g], red[w][g]);
  }
  __syncthreads();
  float lsum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) lsum[g] = 0.f;
  for (int t = t0 + tid; t < t1; t += NT) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = __expf(ssh[g][t - t0] - mx[g]);
      ssh[g][t - t0] = p;
      lsum[g] += p;
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float v = warp_sum(lsum[g]);
    if (lane == 0) red[warp][g] = v;
  }
  __syncthreads();

  // phase 3: weighted sum of V rows
  const int dc = lane % LPT;           // which 8 values of the row
  const int sub = lane / LPT;
  const int slot = warp * TPW + sub;
  float o[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f;
#pragma unroll 4
  for (int t = t0 + slot; t < t1; t += NSLOT) {
    const size_t row = ((size_t)table[t / BS] * BS + (t % BS)) * HKV + kvh;
    float vf[8];
    if constexpr (!QUANT) {
      load8<T>(reinterpret_cast<const T*>(vp) + row * D + dc * 8, vf);
    } else {
      const uint32_t* vr = reinterpret_cast<const uint32_t*>(vp) + row * DW + dc * BITS / 4;
      uint32_t wv[2];
      if constexpr (BITS == 8) {
        uint2 v = __ldg(reinterpret_cast<const uint2*>(vr));
        wv[0] = v.x; wv[1] = v.y;
      } else {
        wv[0] = __ldg(vr); wv[1] = 0u;
      }
      const int j = (dc * 8) / KG;
      const float sc = to_f(vs[row * NGK + j]);
      const float bi = to_f(vb[row * NGK + j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) vf[i] = fmaf(sc, u2f(field<BITS>(wv, i)), bi);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = ssh[g][t - t0];
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] = fmaf(p, vf[i], o[g][i]);
    }
  }
#pragma unroll
  for (int off = LPT; off < 32; off <<= 1)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] += __shfl_xor_sync(0xffffffffu, o[g][i], off);
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) osh[warp][g][dc * 8 + i] = o[g][i];
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) s += osh[w][g][d];
    po[(obase + (size_t)g * nparts) * D + d] = s;
  }
  if (tid < G) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) l += red[w][tid];
    pm[obase + (size_t)tid * nparts] = mx[tid];
    pl[obase + (size_t)tid * nparts] = l;
  }
}

}  // namespace jang
"""

SOURCE_F = r"""
  jang::paged_decode<T, BITS, KG, D, G, PART, WINDOW>(
      q, k, nullptr, nullptr, v, nullptr, nullptr, tables, lens, scale,
      tables_shape[1], k_shape[1], k_shape[2], po, pm, pl);
"""

SOURCE_Q = r"""
  jang::paged_decode<T, BITS, KG, D, G, PART, WINDOW>(
      q, kq, ks, kb, vq, vs, vb, tables, lens, scale,
      tables_shape[1], kq_shape[1], kq_shape[2], po, pm, pl);
"""

# Merge the parts: one block per (seq, head).
SOURCE_COMBINE = r"""
  const int P = pm_shape[2];
  const size_t bh = blockIdx.x;
  float M = -INFINITY;
  for (int p = 0; p < P; ++p) M = fmaxf(M, pm[bh * P + p]);
  float L = 0.f;
  for (int p = 0; p < P; ++p) {
    const float m = pm[bh * P + p];
    L += (m == -INFINITY) ? 0.f : __expf(m - M) * pl[bh * P + p];
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < P; ++p) {
      const float m = pm[bh * P + p];
      if (m != -INFINITY) acc += __expf(m - M) * po[(bh * P + p) * D + d];
    }
    out[bh * D + d] = jang::from_f<T>(acc * inv);
  }
"""
