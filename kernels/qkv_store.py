"""The decode q/k/v + RoPE GEMV that also stores each new token's k and v rows into the paged KV pools.

    qkv_rope_store(x, w, scales, biases, bits, group_size, *, n_heads, n_kv, head_dim, positions, inv_freq,
                   k_pool, v_pool, blocks, offsets, norm_weight=None, eps=1e-5) -> (q, k, v) or None

is `kernels.qmm_fused.qkv_rope(...)` followed by the KV write of kernels/kv_write.py (k and v into
`pool[blocks, offsets]`), in one kernel: the RoPE epilogue of the fused GEMV (JANG_KVW in
kernels/qgemv_source.py) writes the finished k and v rows, rounded to the pool dtype exactly as its
output, to their slots too. One launch and one graph node fewer per layer and decode step (the KV write
took 4.1 us of GPU time per layer at batch 1, bench/results/prefetch-h100.json, and MLX's host-side
dispatch of one op ~13 us).

The store is in place, as kernels/kv_write.py's is: MLX does not know of it, so whatever reads the
pools must depend on this kernel's output (the paged attention takes the returned q; steps run in
stream order). It applies where the scalar CUDA GEMV computes q/k/v (not the tensor-core GEMV), with
plain 16-bit pools of x's dtype, after `ready` has checked the kernel against the two-step composition
for that (dtype, bits, group, heads); elsewhere it returns None and the caller writes the pools itself.
`ready` evaluates arrays: call it outside traces (the engine's first decode step at a shape runs eagerly).
JANG_QKV_STORE=0 turns it off (the KV write kernel then runs as before); JANG_KV_WRITE=0 turns off both.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import kv_write, qmm_fused

_checked: dict[tuple, bool] = {}


def _key(dtype, bits: int, group_size: int, n_heads: int, n_kv: int, head_dim: int, norm: bool) -> tuple:
    return (dtype, bits, group_size, n_heads, n_kv, head_dim, norm)


def enabled() -> bool:
    """CUDA, and neither JANG_QKV_STORE=0 nor JANG_KV_WRITE=0."""
    return (os.environ.get("JANG_QKV_STORE", "1") != "0" and os.environ.get("JANG_KV_WRITE", "1") != "0"
            and qmm_fused._kernel_backend() == "cuda")


def applies(x, w, scales, bits, group_size, n_heads, n_kv, head_dim, positions, inv_freq, k_pool, v_pool,
            blocks, offsets, norm_weight) -> bool:
    """The kernel can serve this call (shapes, dtypes, backend); `ready` decides whether it may."""
    t = x.shape[0] if x.ndim == 2 else -1
    return (enabled() and t > 0 and w.shape[0] == (n_heads + 2 * n_kv) * head_dim
            and isinstance(k_pool, mx.array) and isinstance(v_pool, mx.array)
            and k_pool.dtype == v_pool.dtype == x.dtype and k_pool.ndim == 4 and k_pool.shape == v_pool.shape
            and tuple(k_pool.shape[2:]) == (n_kv, head_dim)
            and blocks.dtype == offsets.dtype == mx.int32 and blocks.shape == offsets.shape == (t,)
            and qmm_fused.rope_kernel_supported(x, w, bits, group_size, head_dim, positions, inv_freq, norm_weight)
            and not qmm_fused._tc(x, w, scales, bits, group_size))


def qkv_rope_store(x, w, scales, biases, bits, group_size, *, n_heads, n_kv, head_dim, positions, inv_freq,
                   k_pool, v_pool, blocks, offsets, norm_weight=None, eps=1e-5):
    """See the module docstring. x [T, K]; q [T, n_heads, hd], k and v [T, n_kv, hd] (k and v also stored)."""
    key = _key(x.dtype, bits, group_size, n_heads, n_kv, head_dim, norm_weight is not None)
    if not _checked.get(key) or not applies(x, w, scales, bits, group_size, n_heads, n_kv, head_dim, positions,
                                            inv_freq, k_pool, v_pool, blocks, offsets, norm_weight):
        return None
    nrot = n_heads + n_kv
    y = qmm_fused._qgemv_rope(x, w, scales, biases, bits, group_size, norm_weight, eps, positions, inv_freq,
                              head_dim, nrot, store=(k_pool, v_pool, blocks, offsets, n_heads))
    y = y.reshape(x.shape[0], n_heads + 2 * n_kv, head_dim)
    return y[:, :n_heads], y[:, n_heads:nrot], y[:, nrot:]


def ready(dtype, bits: int, group_size: int, n_heads: int, n_kv: int, head_dim: int, norm: bool) -> bool:
    """First use of a (dtype, bits, group, heads, norm): the kernel on a small random case (one token, the
    decode case the scalar GEMV serves) against qkv_rope plus the reference KV write; q and both pools must
    be equal bit for bit. A mismatch or an error turns the store off for that key, logged."""
    key = _key(dtype, bits, group_size, n_heads, n_kv, head_dim, norm)
    if key in _checked:
        return _checked[key]
    if not enabled():
        return False                             # off, or not CUDA: nothing to check, no verdict kept
    ok, why = False, ""
    try:
        k, n = 256, (n_heads + 2 * n_kv) * head_dim
        wq, s, b = mx.quantize((mx.random.normal((n, k), key=mx.random.key(1)) * 0.05).astype(dtype),
                               group_size=group_size, bits=bits)
        x = mx.random.normal((1, k), key=mx.random.key(2)).astype(dtype)
        nw = (mx.random.normal((k,), key=mx.random.key(3)) * 0.2 + 1).astype(dtype) if norm else None
        pos = mx.array([5, 0, 0, 0], dtype=mx.int32)[:1]
        blk, off = mx.array([2, 0, 0, 0], dtype=mx.int32)[:1], mx.array([3, 0, 0, 0], dtype=mx.int32)[:1]
        inv = qmm_fused.rope_inv_freq(head_dim, 10000.0)
        pools = [mx.random.normal((3, 4, n_kv, head_dim), key=mx.random.key(4 + i)).astype(dtype) for i in range(2)]
        copies = [p + 0 for p in pools]        # own buffers: the kernel writes them in place
        mx.eval(wq, s, b, x, nw, pos, blk, off, inv, pools, copies)
        kw = dict(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, positions=pos, inv_freq=inv, norm_weight=nw)
        if not applies(x, wq, s, bits, group_size, n_heads, n_kv, head_dim, pos, inv, copies[0], copies[1], blk,
                       off, nw):
            why = "the kernel does not serve this case"
        else:
            q, kk, vv = qmm_fused.qkv_rope(x, wq, s, b, bits, group_size, rope=None, **kw)
            want = kv_write.reference(pools[0], pools[1], kk, vv, blk, off)
            _checked[key] = True                 # lets qkv_rope_store run once
            got = qkv_rope_store(x, wq, s, b, bits, group_size, k_pool=copies[0], v_pool=copies[1], blocks=blk,
                                 offsets=off, eps=1e-5, **kw)
            mx.eval(q, want, got)
            ok = all(mx.array_equal(a, c).item() for a, c in ((q, got[0]), (want[0], copies[0]), (want[1], copies[1])))
            why = "" if ok else "mismatch against qkv_rope + the reference KV write"
    except Exception as e:  # a compile or launch error
        ok, why = False, f"{type(e).__name__}: {str(e)[:300]}"
    if not ok:
        import logging

        logging.getLogger("jang_serve.kernels").warning("kernels: cuda q/k/v + KV store %s off (%s)", key, why)
    _checked[key] = ok
    return ok
