"""The q/k/v projection's end at many rows in one kernel: split-K partials + RoPE + the KV store.

    qkv_rope_store_rows(xn, w, scales, biases, bits, group_size, *, n_heads, n_kv, head_dim, positions, rope,
                        k_pool, v_pool, blocks, offsets) -> (q, k, v) or None

is, where it serves, the composition
    y = qmm(xn, w, ...)                                   (xn already normed: the previous layer's epilogue)
    q, k = rope(y's q and k heads, positions); v = y's v heads
    k_pool[blocks, offsets], v_pool[blocks, offsets] = k, v
in one kernel after the GEMM. At 16-256 rows a decode step ran the q/k/v GEMM's split-K reduce, MLX's RoPE and
kernels/kv_write.py as three GPU ops per layer (64 sequences, Llama-3-8B shapes, H100: ~125 us of reduces, 161 us
of RoPE and 135 us of KV writes per step, plus MLX's host-side dispatch of each op;
bench/results/epilogue-h100.json). The GEMM `kernels.qmm` picks hands out its float32 partial sums
(`qmm.partials_plan`, as for kernels/gemm_epilogue.py); one thread per (row, rotated pair j, j + hd/2) sums them
in split order and rounds to x's dtype (the GEMM's own output), rotates q and k heads with mx.fast.rope's
arithmetic (inv_freq = 1/freqs[j] or exp2(-j/(hd/2) * log2(base)), theta = scale * position * inv_freq, float cos
and sin, one rounding), writes q to an output of its own (row-contiguous: the attention kernel takes it as it is;
a view of a joint output cost a copy kernel per layer) and k and v to another, and each k and v row to its pool
slot too.

The store is in place, as kernels/kv_write.py's: MLX does not know of it, so whatever reads the pools must take
this kernel's output (the paged decode attention takes q). It serves plain 16-bit pools of x's dtype and a plain
full-head, non-traditional RoPE, after `ready` has checked the kernel against the composition for the step's
(dtype, heads, RoPE); elsewhere (CPU, Metal, the GEMVs' rows, JANG_QKV_EPILOGUE=0, JANG_KV_WRITE=0) it returns None
and the caller runs the composition. `ready` evaluates arrays: call it outside traces.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import numpy as np

from . import backend, kv_write
from .qmm import partials_plan, qmm

THREADS = 128

SOURCE = r"""
  // ws [S, M, N] float32 partials, N = (NQ + 2 NKV) * HD; thread: row m = blockIdx.y, pair p of that row
  const int m = blockIdx.y, M = ws_shape[1], N = ws_shape[2], S = ws_shape[0];
  constexpr int HH = HD / 2;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= N / 2) return;
  const int h = p / HH, j = p % HH;
  const size_t n1 = (size_t)h * HD + j, n2 = n1 + HH;
  const float* w0 = ws + (size_t)m * N;
  float a = w0[n1], b = w0[n2];
  for (int s = 1; s < S; ++s) {   // the splits in order, as qgemm_cuda's reduce kernel sums them
    a += w0[(size_t)s * M * N + n1];
    b += w0[(size_t)s * M * N + n2];
  }
  T ta = static_cast<T>(a), tb = static_cast<T>(b);
  if (h < NQ + NKV) {             // q and k heads: mx.fast.rope's arithmetic
#if JANG_FREQS
    const float inv = 1.0 / fr[j];
#else
    const float inv = exp2(-(static_cast<float>(j) / static_cast<float>(HH)) * JANG_LOG2BASE);
#endif
    const float theta = (JANG_SCALE * static_cast<float>(pos[m])) * inv;
    const float cs = cos(theta), sn = sin(theta);
    const float x1 = static_cast<float>(ta), x2 = static_cast<float>(tb);
    ta = static_cast<T>(x1 * cs - x2 * sn);
    tb = static_cast<T>(x1 * sn + x2 * cs);
  }
  if (h < NQ) {                   // q: its own row-contiguous output (the attention takes it without a copy)
    T* qr = q + ((size_t)m * NQ + h) * HD + j;
    qr[0] = ta;
    qr[HH] = tb;
  } else {                        // k heads, then v heads: to kv, and to the pool slot [blk, off] in place
    const int kh = h - NQ;
    T* kr = kv + ((size_t)m * 2 * NKV + kh) * HD + j;
    kr[0] = ta;
    kr[HH] = tb;
    T* pool = const_cast<T*>(kh < NKV ? kpool : vpool);
    const size_t dst = (((size_t)blk[m] * kpool_shape[1] + off[m]) * NKV + kh % NKV) * HD + j;
    pool[dst] = ta;
    pool[dst + HH] = tb;
  }
"""

_kernels: dict[tuple, object] = {}
_dummy: dict = {}
_checked: dict[tuple, bool] = {}


def enabled() -> bool:
    return (os.environ.get("JANG_QKV_EPILOGUE", "1") != "0" and os.environ.get("JANG_KV_WRITE", "1") != "0"
            and backend.for_op("qkv_epilogue") == "cuda" and hasattr(mx.fast, "cuda_kernel"))


def rope_params(rope) -> tuple | None:
    """(freqs or None, log2(base), scale) of a plain RoPE module (engine.models.layers.RoPE, not traditional), else
    None. Read from the module's fields: what the kernel must reproduce."""
    from jang_serve.engine.models.layers import RoPE

    if type(rope) is not RoPE or rope.traditional:
        return None
    freqs = rope._freqs
    if freqs is None and not rope.base:
        return None
    # MLX keeps base as a float32 and passes log2 of it (taken in double) to its kernel as a float32
    log2base = float(np.float32(math.log2(np.float32(rope.base)))) if freqs is None else 0.0
    return freqs, log2base, float(np.float32(rope.scale))


def _f32(v: float) -> str:
    return f"{np.float32(v)!r}".replace("np.float32(", "").rstrip(")") + "f"


def _kernel(with_freqs: bool, log2base: float, scale: float):
    key = (with_freqs, log2base, scale)
    k = _kernels.get(key)
    if k is None:
        header = (f"#define JANG_FREQS {int(with_freqs)}\n#define JANG_LOG2BASE {_f32(log2base)}\n"
                  f"#define JANG_SCALE {_f32(scale)}\n")
        k = _kernels[key] = backend.cuda_kernel(
            name="jang_qkv_epi", input_names=["ws", "pos", "fr", "blk", "off", "kpool", "vpool"],
            output_names=["q", "kv"], source=SOURCE, header=header, ensure_row_contiguous=False)
    return k


def epilogue(ws, positions, rope, k_pool, v_pool, blocks, offsets, n_heads: int, n_kv: int, head_dim: int, dtype):
    """The kernel: ws [S, M, N] float32 -> (q [M, n_heads, hd], kv [M, 2 n_kv, hd]) in dtype (q and k rotated; k and
    v also stored)."""
    freqs, log2base, scale = rope_params(rope)
    if freqs is None:
        freqs = _dummy.get(0)
        if freqs is None:
            freqs = _dummy[0] = mx.ones((1,), dtype=mx.float32)
    m, n = ws.shape[1], ws.shape[2]
    return _kernel(rope._freqs is not None, log2base, scale)(
        inputs=[ws, positions, freqs, blocks, offsets, k_pool, v_pool],
        template=[("T", dtype), ("HD", head_dim), ("NQ", n_heads), ("NKV", n_kv)],
        grid=(-(-(n // 2) // THREADS) * THREADS, m, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(m, n_heads, head_dim), (m, 2 * n_kv, head_dim)], output_dtypes=[dtype, dtype])


def _key(dtype, n_heads, n_kv, head_dim, rope) -> tuple:
    freqs, log2base, scale = rope_params(rope)
    return (dtype, n_heads, n_kv, head_dim, freqs is not None, log2base, scale)


def applies(xn, w, n_heads, n_kv, head_dim, positions, rope, k_pool, v_pool, blocks, offsets) -> bool:
    """The kernel can serve this call (shapes, dtypes, backend, RoPE); `ready` decides whether it may."""
    t = xn.shape[0] if xn.ndim == 2 else -1
    return (enabled() and t > 0 and xn.dtype in (mx.bfloat16, mx.float16) and head_dim % 2 == 0
            and w.shape[0] == (n_heads + 2 * n_kv) * head_dim and rope_params(rope) is not None
            and rope.dims == head_dim and isinstance(k_pool, mx.array) and isinstance(v_pool, mx.array)
            and k_pool.dtype == v_pool.dtype == xn.dtype and k_pool.ndim == 4 and k_pool.shape == v_pool.shape
            and tuple(k_pool.shape[2:]) == (n_kv, head_dim) and positions.dtype == mx.int32
            and positions.shape == (t,) and blocks.dtype == offsets.dtype == mx.int32
            and blocks.shape == offsets.shape == (t,))


def qkv_rope_store_rows(xn, w, scales, biases, bits, group_size, *, n_heads, n_kv, head_dim, positions, rope,
                        k_pool, v_pool, blocks, offsets):
    """See the module docstring. xn [T, K]; q [T, n_heads, hd], k and v [T, n_kv, hd] (k and v also stored), or
    None where the kernel does not serve (the caller then runs the composition and writes the pools)."""
    if not applies(xn, w, n_heads, n_kv, head_dim, positions, rope, k_pool, v_pool, blocks, offsets) \
            or not _checked.get(_key(xn.dtype, n_heads, n_kv, head_dim, rope)):
        return None
    plan = partials_plan(xn, w, scales, biases, bits, group_size)
    if plan is None:
        return None
    q, kv = epilogue(plan(xn, w, scales, biases), positions, rope, k_pool, v_pool, blocks, offsets, n_heads, n_kv,
                     head_dim, xn.dtype)
    return q, kv[:, :n_kv], kv[:, n_kv:]


def reference(xn, w, scales, biases, bits, group_size, n_heads, n_kv, head_dim, positions, rope, k_pool, v_pool,
              blocks, offsets):
    """The composition: (q, k, v, k_pool', v_pool')."""
    y = qmm(xn, w, scales, biases, bits, group_size).reshape(xn.shape[0], n_heads + 2 * n_kv, head_dim)
    qk = rope(y[:, :n_heads + n_kv], positions)
    q, k, v = qk[:, :n_heads], qk[:, n_heads:], y[:, n_heads + n_kv:]
    return (q, k, v, *kv_write.reference(k_pool, v_pool, k, v, blocks, offsets))


def self_test(dtype, n_heads: int, n_kv: int, head_dim: int, rope) -> tuple[bool, str]:
    """The kernel against the composition on random partials at 1 and 3 splits (rows past one block of pairs,
    positions up to 8191): v and the v pool must match exactly; q, k and the k pool within one rounding of x's
    dtype (the two may round cos/sin products differently); the k pool must hold exactly the kernel's own k."""
    worst = 0.0
    n = (n_heads + 2 * n_kv) * head_dim
    for s, m in ((1, 5), (3, 17)):
        ws = mx.random.normal((s, m, n)) * 2.0
        pos = mx.random.randint(0, 8192, (m,)).astype(mx.int32)
        blk = mx.random.permutation(m + 3)[:m].astype(mx.int32)
        off = mx.random.randint(0, 4, (m,)).astype(mx.int32)
        pools = [mx.random.normal((m + 3, 4, n_kv, head_dim)).astype(dtype) for _ in range(2)]
        copies = [p + 0 for p in pools]   # own buffers: the kernel writes them in place
        mx.eval(ws, pos, blk, off, pools, copies)
        gq, gkv = epilogue(ws, pos, rope, copies[0], copies[1], blk, off, n_heads, n_kv, head_dim, dtype)
        got = mx.concatenate([gq, gkv], axis=1)
        acc = ws[0]
        for i in range(1, s):
            acc = acc + ws[i]
        want = acc.astype(dtype).reshape(m, n_heads + 2 * n_kv, head_dim)
        qk = rope(want[:, :n_heads + n_kv], pos)
        v = want[:, n_heads + n_kv:]
        kp, vp = kv_write.reference(pools[0], pools[1], qk[:, n_heads:], v, blk, off)
        mx.eval(got, qk, kp, vp, copies)
        if not (mx.array_equal(got[:, n_heads + n_kv:], v).item() and mx.array_equal(copies[1], vp).item()):
            return False, f"v or the v pool differs from the composition at {s} splits, {m} rows"
        own = kv_write.reference(pools[0] + 0, pools[1], got[:, n_heads:n_heads + n_kv], v, blk, off)[0]
        if not mx.array_equal(copies[0], own).item():
            return False, f"the k pool does not hold the kernel's k at {s} splits, {m} rows"
        err = max(backend.relerr(got[:, :n_heads + n_kv], qk), backend.relerr(copies[0], kp))
        worst = max(worst, err)
        if err > 4e-3:
            return False, f"q/k relative error {err:.2e} at {s} splits, {m} rows"
    return True, f"worst q/k relative error {worst:.1e}"


def ready(dtype, n_heads: int, n_kv: int, head_dim: int, rope) -> bool:
    """Checked once per (dtype, heads, RoPE) on first use (evaluates arrays: outside traces); a failure logs and
    keeps the composition."""
    if rope_params(rope) is None or not enabled() or dtype not in (mx.bfloat16, mx.float16):
        return False
    return backend.verdict(_checked, _key(dtype, n_heads, n_kv, head_dim, rope),
                           lambda: self_test(dtype, n_heads, n_kv, head_dim, rope), "q/k/v RoPE + KV store epilogue")
