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


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def mse_groups(g: np.ndarray, bits: int, imp: np.ndarray | None = None, grid: int = 20,
               min_shrink: float = 0.5, refit: int = 2):
    """Best (codes, scales, biases) per row of g [G, gs] (numpy float32; in-place work buffers, ~4x
    faster than the same in MLX on CPU). imp: per-element weights [G, gs] or None. Scales and biases
    come back float16-rounded (as stored) and the codes are computed against those."""
    n = float(2**bits - 1)
    wmin = g.min(1, keepdims=True)
    wmax = g.max(1, keepdims=True)
    best = np.full((g.shape[0], 1), np.inf, np.float32)
    best_a = np.ones((g.shape[0], 1), np.float32)
    buf = np.empty_like(g)

    def err_of(s, b):
        safe = np.where(s == 0, np.float32(1), s)
        np.subtract(g, b, out=buf)
        np.divide(buf, safe, out=buf)
        np.rint(buf, out=buf)
        np.clip(buf, 0, n, out=buf)
        q = buf.copy() if need_codes[0] else None
        np.multiply(buf, s, out=buf)
        np.add(buf, b, out=buf)
        np.subtract(buf, g, out=buf)
        if imp is not None:
            e = np.einsum("ij,ij,ij->i", buf, buf, imp)[:, None]
        else:
            e = np.einsum("ij,ij->i", buf, buf)[:, None]
        return e, q

    need_codes = [False]
    for i in range(grid):
        a = np.float32(1.0 - (1.0 - min_shrink) * i / max(grid - 1, 1))
        lo = _f16(wmin * a)
        s = _f16((wmax * a - lo) / n)
        e, _ = err_of(s, lo)
        better = e < best
        best = np.where(better, e, best)
        best_a = np.where(better, a, best_a)
    need_codes[0] = True
    b = _f16(wmin * best_a)
    s = _f16((wmax * best_a - b) / n)
    e, q = err_of(s, b)
    w_ = imp if imp is not None else None
    for _ in range(refit):
        # least-squares scale and bias for the chosen codes (weighted); kept where it lowers the error
        if w_ is None:
            sw = np.float32(g.shape[1])
            sq, sqq = q.sum(1, keepdims=True), (q * q).sum(1, keepdims=True)
            sg, sqg = g.sum(1, keepdims=True), (q * g).sum(1, keepdims=True)
        else:
            sw = w_.sum(1, keepdims=True)
            sq, sqq = (w_ * q).sum(1, keepdims=True), (w_ * q * q).sum(1, keepdims=True)
            sg, sqg = (w_ * g).sum(1, keepdims=True), (w_ * q * g).sum(1, keepdims=True)
        det = sw * sqq - sq * sq
        ok = np.abs(det) > 1e-12
        s2 = np.where(ok, (sw * sqg - sq * sg) / np.where(ok, det, 1), s)
        b2 = np.where(ok, (sg - s2 * sq) / np.where(sw > 0, sw, 1), b)
        s2, b2 = _f16(s2), _f16(b2)
        e2, q2 = err_of(s2, b2)
        better = e2 < e
        s, b, e = np.where(better, s2, s), np.where(better, b2, b), np.where(better, e2, e)
        q = np.where(better, q2, q)
    return q.astype(np.uint8), s, b


def mse(w: mx.array, bits: int, group_size: int, importance: mx.array | None = None):
    """MSE-optimal clipping. importance: per-input-column weights [in] (e.g. mean x^2 from
    calibration activations) or None for plain squared error. Returns (wq, scales, biases)."""
    shape = w.shape
    in_dim = shape[-1]
    ng = in_dim // group_size
    rows = int(np.prod(shape[:-1]))
    w2 = np.asarray(w.astype(mx.float32)).reshape(rows, in_dim)
    imp_row = None if importance is None else np.asarray(importance.astype(mx.float32)).reshape(1, in_dim)
    step = max(1, _CHUNK // in_dim)
    codes = np.empty((rows, in_dim), np.uint8)
    scales = np.empty((rows, ng), np.float32)
    biases = np.empty((rows, ng), np.float32)
    for r in range(0, rows, step):
        blk = w2[r : r + step]
        k = blk.shape[0]
        imp = None if imp_row is None else np.broadcast_to(imp_row, blk.shape).reshape(-1, group_size)
        q, s, b = mse_groups(np.ascontiguousarray(blk.reshape(-1, group_size)), bits, imp)
        codes[r : r + k] = q.reshape(k, in_dim)
        scales[r : r + k] = s.reshape(k, ng)
        biases[r : r + k] = b.reshape(k, ng)
    return (pack(codes.reshape(*shape), bits), mx.array(scales.reshape(*shape[:-1], ng)).astype(STORE_DTYPE),
            mx.array(biases.reshape(*shape[:-1], ng)).astype(STORE_DTYPE))


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
