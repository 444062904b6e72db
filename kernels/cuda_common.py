"""CUDA helpers shared by the kernels: dtype conversions and vector loads (a header string)."""

HEADER = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jang {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Eight 16-bit floats (one 16-byte load) to floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f(h[i]);
}

// N consecutive 16-bit floats (N in 2, 4, 8, 16, 32; p aligned to N*2 bytes) to floats.
template <typename T, int N>
__device__ __forceinline__ void loadn(const T* p, float* f) {
  if constexpr (N >= 8) {
#pragma unroll
    for (int i = 0; i < N; i += 8) load8<T>(p + i, f + i);
  } else if constexpr (N == 4) {
    uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = to_f(h[i]);
  } else {
    uint32_t v = __ldg(reinterpret_cast<const unsigned int*>(p));
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_f(h[i]);
  }
}

// A scale or bias as raw bits (16 or 32), and those bits as a float.
template <typename S>
__device__ __forceinline__ uint32_t ldg_bits(const S* p) {
  if constexpr (sizeof(S) == 4) return __ldg(reinterpret_cast<const unsigned int*>(p));
  else return __ldg(reinterpret_cast<const unsigned short*>(p));
}
template <typename S> __device__ __forceinline__ float bits_to_f(uint32_t v);
template <> __device__ __forceinline__ float bits_to_f<float>(uint32_t v) { return __uint_as_float(v); }
template <> __device__ __forceinline__ float bits_to_f<__nv_bfloat16>(uint32_t v) { return __uint_as_float(v << 16); }
template <> __device__ __forceinline__ float bits_to_f<__half>(uint32_t v) {
  return __half2float(__ushort_as_half((unsigned short)v));
}

// v with x tied to it by one LOP3 that changes nothing (zero is 0 at run time, unknown to the compiler): work on v
// then waits for x's load, so ptxas issues that load with v's instead of sinking it to x's first real use (the
// GEMV's scale and bias loads had sunk below a unit's arithmetic: a second memory round trip per unit).
__device__ __forceinline__ uint32_t tie(uint32_t v, uint32_t x, uint32_t zero) { return v ^ (x & zero); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Value j (0-based) of a little-endian bit stream of BITS-bit fields held in registers w[].
// j is a compile-time constant after unrolling, so this folds to a shift/funnel-shift and a mask.
template <int BITS>
__device__ __forceinline__ uint32_t field(const uint32_t* w, int j) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  if (sh + BITS <= 32) return (w[wi] >> sh) & MASK;
  return __funnelshift_r(w[wi], w[wi + 1], sh) & MASK;
}

// An integer below 2^23 to float with one logic op and one add (no slow I2F).
__device__ __forceinline__ float u2f(uint32_t v) {
  return __uint_as_float(v | 0x4B000000u) - 8388608.0f;
}

// The float 2^23 + (v & mask) in one LOP3: written as C, `(v & mask) | magic` becomes two LOP3s (SASS LOP3 takes
// one immediate), so the three-input op is spelled out and ptxas keeps the magic in a register.
// kernels/qmm_cuda.py's NOSUB uses it as it is and takes the 2^23 off per group.
__device__ __forceinline__ float magic_mask(uint32_t v, uint32_t mask) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(mask), "r"(0x4B000000u));
  return __uint_as_float(r);
}

// u2f(v & mask): one LOP3 and one add.
__device__ __forceinline__ float u2f_mask(uint32_t v, uint32_t mask) { return magic_mask(v, mask) - 8388608.0f; }

// cp.async (global -> shared, no registers held while in flight; kernels/qgemm*_cuda.py, qgemv_tc).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without registers; zero-filled when !full (rows past M).
__device__ __forceinline__ void cp16(void* dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_u32(dst)), "l"(src), "r"(full ? 16 : 0));
}
template <int NB>  // 4, 8 or 16 bytes (through L1)
__device__ __forceinline__ void cpn(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" :: "r"(smem_u32(dst)), "l"(src), "n"(NB));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

}  // namespace jang
"""


def launch_bounds(threads: int, min_blocks: int) -> str:
    """Header lines (put last in a kernel's header) that give the kernel mx.fast.cuda_kernel declares next
    `__launch_bounds__(threads, min_blocks)`: MLX writes `__global__ void name(...)` right after the header, so
    `__global__` is redefined to carry the bounds, and ptxas keeps registers within 65536 / (threads * min_blocks)
    and schedules for that occupancy (MLX's JIT has no other way to pass them)."""
    return f"\n#undef __global__\n#define __global__ __location__(global) __launch_bounds__({threads}, {min_blocks})\n"


def launch_smem(nbytes: int) -> int:
    """The dynamic shared memory to ask mx.fast.cuda_kernel for. MLX raises a kernel's limit only when the request
    is over 48000 bytes, but the kernel's static shared memory counts against the default 48 KB too, so a request
    just under 48000 fails at launch ("invalid argument"; seen for the tensor-core GEMV's 8-bit norm + SwiGLU
    variant at two rows: 47,104 bytes). Requests from 32 KB up go to at least 48001, so the limit is always set."""
    return max(nbytes, 48001) if nbytes > 32768 else nbytes
