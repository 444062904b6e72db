"""Decode-step KV write: new keys and values into their pool slots with one kernel, in place.

    kv_write_inplace(k_pool, v_pool, k [T, Hkv, D], v, blocks [T], offsets [T], q [T, Hq, D])
        -> (q, k_pool, v_pool)

The specification is two MLX scatters (`pool[blocks, offsets] = k`, same for v), which the engine
runs on the CPU and on Metal. On CUDA (bf16/fp16 pools) one kernel copies both rows of every new
token straight into the pool buffers: one launch instead of two scatters and their view nodes per
layer and step. MLX does not know that the kernel writes the pools, and its CUDA graphs order
kernels by data dependencies only, so the kernel also passes the layer's queries through (q in,
a copy out): the attention, which reads the pools, takes that copy and so runs after the write.
The pools come back unchanged (same arrays); steps are separate graphs, run in stream order. The
pools must be row-contiguous (they are: zeros at start-up, and every scatter returns a contiguous
array).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import backend

SOURCE = r"""
  // thread i of token t = blockIdx.y copies 16 bytes (8 values) of k's and v's rows [H, D] of token t
  // into the pools, and 16 bytes of q's row [HQ, D] to qo
  const int t = blockIdx.y;
  const int H = k_shape[1], D = k_shape[2];
  const int HQ = q_shape[1];
  const int BS = kpool_shape[1];
  const int per = H * D / 8;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < HQ * D / 8) {
    const int h = (i * 8) / D, d = (i * 8) % D;
    const T* qs = q + (size_t)t * q_strides[0] + (size_t)h * q_strides[1] + d;
    T* qd = qo + ((size_t)t * HQ + h) * D + d;
    if ((reinterpret_cast<size_t>(qs) & 15) == 0) {
      *reinterpret_cast<uint4*>(qd) = *reinterpret_cast<const uint4*>(qs);
    } else {
      for (int j = 0; j < 8; ++j) qd[j] = qs[j];
    }
  }
  if (i < per) {
    const int h = (i * 8) / D, d = (i * 8) % D;
    const size_t sk = (size_t)t * k_strides[0] + (size_t)h * k_strides[1] + d;
    const size_t sv = (size_t)t * v_strides[0] + (size_t)h * v_strides[1] + d;
    const size_t dst = (((size_t)blk[t] * BS + off[t]) * H + h) * D + d;
    T* kp = const_cast<T*>(kpool) + dst;
    T* vp = const_cast<T*>(vpool) + dst;
    const T* ks = k + sk;
    const T* vs = v + sv;
    const bool aligned = ((reinterpret_cast<size_t>(ks) | reinterpret_cast<size_t>(vs) |
                           reinterpret_cast<size_t>(kp)) & 15) == 0;
    if (aligned) {
      *reinterpret_cast<uint4*>(kp) = *reinterpret_cast<const uint4*>(ks);
      *reinterpret_cast<uint4*>(vp) = *reinterpret_cast<const uint4*>(vs);
    } else {
      for (int j = 0; j < 8; ++j) { kp[j] = ks[j]; vp[j] = vs[j]; }
    }
  }
"""

THREADS = 128
_kernel = None
_ready: bool | None = None


def _get():
    global _kernel
    if _kernel is None:
        _kernel = backend.cuda_kernel(name="jang_kv_write", input_names=["q", "k", "v", "blk", "off", "kpool", "vpool"],
                                      output_names=["qo"], source=SOURCE, ensure_row_contiguous=False)
    return _kernel


def supported(k_pool, k: mx.array) -> bool:
    """One-kernel path: CUDA, plain (unquantized) 16-bit pools of k's dtype, rows of whole 16-byte chunks
    (JANG_KV_WRITE=0: always the scatters)."""
    return (os.environ.get("JANG_KV_WRITE", "1") != "0" and backend.for_op("kv_write") == "cuda" and isinstance(k_pool, mx.array) and k_pool.dtype == k.dtype
            and k.dtype in (mx.bfloat16, mx.float16) and k.ndim == 3 and k.shape[2] % 8 == 0 and ready())


def ready() -> bool:
    """First use: the kernel against the two scatters on a small case with strided k/v (as the engine
    passes slices of the fused q/k/v output); a mismatch or error turns the kernel off with a log line.
    Evaluates arrays: the engine's first decode step at a new shape runs eagerly, never in a trace."""
    global _ready
    if _ready is None:
        try:
            kv = mx.random.normal((3, 6, 16)).astype(mx.bfloat16)
            k, v = kv[:, 1:3], kv[:, 4:6]
            blk, off = mx.array([2, 0, 3], dtype=mx.int32), mx.array([1, 3, 0], dtype=mx.int32)
            pools = [mx.random.normal((4, 4, 2, 16)).astype(mx.bfloat16) for _ in range(2)]
            copies = [p + 0 for p in pools]   # own buffers: the kernel writes in place
            mx.eval(kv, pools, copies)
            q = kv[:, 2:5]
            want = (q, *reference(pools[0], pools[1], k, v, blk, off))
            got = _launch(copies[0], copies[1], k, v, blk, off, q)
            mx.eval(want, got)
            _ready = all(mx.array_equal(a, b).item() for a, b in zip(want, got))
            if not _ready:
                backend.disable("cuda", "kv_write", "self-test mismatch")
        except Exception as e:  # compile or launch failure
            _ready = False
            backend.disable("cuda", "kv_write", repr(e)[:200])
    return _ready


def reference(k_pool, v_pool, k, v, blocks, offsets):
    k_pool[blocks, offsets] = k.astype(k_pool.dtype)
    v_pool[blocks, offsets] = v.astype(v_pool.dtype)
    return k_pool, v_pool


def kv_write_inplace(k_pool, v_pool, k: mx.array, v: mx.array, blocks: mx.array, offsets: mx.array, q: mx.array):
    """See the module docstring; the reference (two scatters, q as it is) where the kernel does not apply."""
    if v.shape != k.shape or v_pool.shape != k_pool.shape or q.dtype != k.dtype or q.ndim != 3 \
            or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or not supported(k_pool, k):
        return (q, *reference(k_pool, v_pool, k, v, blocks, offsets))
    return _launch(k_pool, v_pool, k, v, blocks, offsets, q)


def _launch(k_pool, v_pool, k, v, blocks, offsets, q):
    t, h, d = k.shape
    chunks = max(h, q.shape[1]) * d // 8
    qo = _get()(inputs=[q, k, v, blocks, offsets, k_pool, v_pool], template=[("T", k.dtype)],
                grid=(-(-chunks // THREADS) * THREADS, t, 1), threadgroup=(THREADS, 1, 1),
                output_shapes=[q.shape], output_dtypes=[q.dtype])[0]
    return qo, k_pool, v_pool
