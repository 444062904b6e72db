"""MLX affine quantization of one weight tensor: w ~= scale * q + bias per group of `group_size`
inputs, codes q in [0, 2^bits - 1] packed little-endian into uint32 words (the layout of
`mx.quantize`, so `mx.quantized_matmul`, mlx-lm and the reference loader read our tensors as is).

    rtn(w, bits, gs)              min/max round-to-nearest (exactly mx.quantize)
    mse(w, bits, gs, importance)  per-group search of the clip range, then a least-squares refit of
                                  scale and bias, minimising the (importance-weighted) squared error
    pack(codes, bits)             uint8 codes [..., C] -> uint32 [..., C*bits/32]

Scales and biases are returned in float16 (what the bundle stores); codes are computed against the
rounded values so the stored tensor is exactly what was optimised.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

STORE_DTYPE = mx.float16
_CHUNK = 1 << 22  # elements per chunk, bounds the temporaries of the search


def rtn(w: mx.array, bits: int, group_size: int):
    wq, s, b = mx.quantize(w.astype(mx.float32), group_size=group_size, bits=bits)
    return wq, s.astype(STORE_DTYPE), b.astype(STORE_DTYPE)


def dequantize(wq, scales, biases, bits: int, group_size: int, dtype=mx.float32) -> mx.array:
    return mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=group_size, bits=bits).astype(dtype)


def pack(codes: mx.array | np.ndarray, bits: int) -> mx.array:
    """Pack integer codes (< 2**bits) along the last axis as a little-endian bit stream."""
    c = np.asarray(codes, dtype=np.uint8)
    lead, n = c.shape[:-1], c.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    flat = c.reshape(-1, n)
    out = np.empty((flat.shape[0], n * bits // 32), dtype=np.uint32)
    rows = max(1, _CHUNK // max(n, 1) // 2)
    for r in range(0, flat.shape[0], rows):
        planes = np.unpackbits(flat[r : r + rows, :, None], axis=-1, bitorder="little")[..., :bits]
        stream = planes.reshape(planes.shape[0], -1)
        out[r : r + rows] = np.packbits(stream, axis=-1, bitorder="little").view("<u4")
    return mx.array(out.reshape(*lead, -1))


def _groups(w: mx.array, group_size: int) -> mx.array:
    return w.astype(mx.float32).reshape(-1, group_size)


def _codes(g, s, b, n):
    safe = mx.where(s == 0, 1.0, s)
    return mx.clip(mx.round((g - b) / safe), 0, n)


def _fit(g, lo, hi, n):
    s = ((hi - lo) / n).astype(STORE_DTYPE).astype(mx.float32)
    b = lo.astype(STORE_DTYPE).astype(mx.float32)
    return s, b


def mse_groups(g: mx.array, bits: int, imp: mx.array | None = None, grid: int = 20,
               min_shrink: float = 0.5, refit: int = 2):
    """Best (codes, scales, biases) per row of g [G, gs]. imp: per-element weights [G, gs] or None."""
    n = 2**bits - 1
    wmin = mx.min(g, axis=1, keepdims=True)
    wmax = mx.max(g, axis=1, keepdims=True)
    wt = imp if imp is not None else 1.0
    best_err = None
    best_lo, best_hi = wmin, wmax
    for i in range(grid):
        a = 1.0 - (1.0 - min_shrink) * i / max(grid - 1, 1)
        lo, hi = wmin * a, wmax * a
        s, b = _fit(g, lo, hi, n)
        q = _codes(g, s, b, n)
        err = mx.sum(((q * s + b) - g) ** 2 * wt, axis=1, keepdims=True)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_lo = mx.where(better, lo, best_lo)
            best_hi = mx.where(better, hi, best_hi)
        mx.eval(best_err, best_lo, best_hi)
    s, b = _fit(g, best_lo, best_hi, n)
    q = _codes(g, s, b, n)
    # Least-squares refit of scale and bias for the chosen codes (weighted), keep it if it helps.
    for _ in range(refit):
        w_ = imp if imp is not None else mx.ones_like(g)
        sw = mx.sum(w_, 1, keepdims=True)
        sq = mx.sum(w_ * q, 1, keepdims=True)
        sqq = mx.sum(w_ * q * q, 1, keepdims=True)
        sg = mx.sum(w_ * g, 1, keepdims=True)
        sqg = mx.sum(w_ * q * g, 1, keepdims=True)
        det = sw * sqq - sq * sq
        ok = mx.abs(det) > 1e-12
        s2 = mx.where(ok, (sw * sqg - sq * sg) / mx.where(ok, det, 1.0), s)
        b2 = mx.where(ok, (sg - s2 * sq) / mx.where(sw > 0, sw, 1.0), b)
        s2 = s2.astype(STORE_DTYPE).astype(mx.float32)
        b2 = b2.astype(STORE_DTYPE).astype(mx.float32)
        q2 = _codes(g, s2, b2, n)
        e_old = mx.sum(((q * s + b) - g) ** 2 * wt, 1, keepdims=True)
        e_new = mx.sum(((q2 * s2 + b2) - g) ** 2 * wt, 1, keepdims=True)
        better = e_new < e_old
        s, b, q = mx.where(better, s2, s), mx.where(better, b2, b), mx.where(better, q2, q)
        mx.eval(s, b, q)
    return q, s, b


def mse(w: mx.array, bits: int, group_size: int, importance: mx.array | None = None):
    """MSE-optimal clipping. importance: per-input-column weights [in] (e.g. mean x^2 from
    calibration activations) or None for plain squared error. Returns (wq, scales, biases)."""
    shape = w.shape
    in_dim = shape[-1]
    ng = in_dim // group_size
    rows = int(np.prod(shape[:-1]))
    w2 = w.astype(mx.float32).reshape(rows, in_dim)
    step = max(1, _CHUNK // in_dim)
    qs, ss, bs = [], [], []
    for r in range(0, rows, step):
        blk = w2[r : r + step]
        g = blk.reshape(-1, group_size)
        imp = None
        if importance is not None:
            imp = mx.broadcast_to(importance.astype(mx.float32)[None, :], blk.shape).reshape(-1, group_size)
        q, s, b = mse_groups(g, bits, imp)
        qs.append(np.asarray(q.astype(mx.uint8)).reshape(blk.shape[0], in_dim))
        ss.append(s.reshape(blk.shape[0], ng).astype(STORE_DTYPE))
        bs.append(b.reshape(blk.shape[0], ng).astype(STORE_DTYPE))
    codes = np.concatenate(qs, 0).reshape(*shape)
    scales = mx.concatenate(ss, 0).reshape(*shape[:-1], ng)
    biases = mx.concatenate(bs, 0).reshape(*shape[:-1], ng)
    return pack(codes, bits), scales, biases


def quantize(w: mx.array, bits: int, group_size: int, method: str = "rtn", importance=None):
    if method == "rtn":
        return rtn(w, bits, group_size)
    if method in ("mse", "gptq"):  # gptq without activations falls back to the MSE grid
        return mse(w, bits, group_size, importance)
    raise ValueError(f"unknown method {method!r}; use rtn, mse or gptq")


def pick_group_size(in_dim: int, group_size: int) -> int | None:
    """The requested group size if it divides the input dim, else the largest of 128/64/32 that
    does; None -> the tensor stays in float."""
    if in_dim % group_size == 0:
        return group_size
    for g in (128, 64, 32):
        if in_dim % g == 0:
            return g
    return None
