"""An exact change of basis for quantized KV: per-channel key smoothing plus a Hadamard rotation.

Keys of small models carry outlier channels, which wreck 4-bit quantization along head_dim. Since
attention only uses q·k and softmax(.)·v, we may store

    k' = (k / s) H      v' = v H      and attend with   q' = (q * s) H,   out = out' H

for any per-channel scale s > 0 and orthonormal, symmetric H (a block Hadamard matrix): q'·k' = q·k
and out' H = out exactly; only the quantization error changes. Values get their own per-channel
scale t the same way (v' = (v / t) H, out = (out' H) * t). The scales come from the weights
(`channel_scales`): s = sqrt(|k| / |q|), t = sqrt(|v| / |o_proj column|) per channel, which
balances each channel's quantization error against how much it counts; H spreads the error evenly
over the group. The paged attention itself is unchanged: it sees q', k', v'.

With a calibration pass (engine/kv_calibration.py) the key scales use the measured per-channel RMS of
the centred keys and of the queries instead of the weights' estimate, and keys (optionally values)
are first centred on per-channel means c_k, c_v:
k' = ((k - c_k) / s) H shifts every score of a query by the same -q·c_k (softmax is unchanged), and
v' = ((v - c_v) / t) H gives out = (out' H) * t + c_v (the softmax weights sum to one). Exact too;
it takes the shared offset out of the range each quantization group must cover.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def block_hadamard(d: int) -> np.ndarray:
    """Orthonormal symmetric block-diagonal Hadamard matrix of size d (blocks of the largest power
    of two dividing d)."""
    b = d & -d
    h = np.array([[1.0]])
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    h /= np.sqrt(b)
    return np.kron(np.eye(d // b), h)


def _dense_weight(lin) -> np.ndarray | None:
    if "scales" in lin and hasattr(lin, "bits"):
        w = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=lin.group_size, bits=lin.bits)
    elif "weight" in lin:
        w = lin.weight
    else:
        return None
    return np.array(w.astype(mx.float32))


def _projection(attn, name: str) -> np.ndarray | None:
    """Dense weight of attn.<name>, also after fuse_projections stacked it into a FusedLinear."""
    if name in attn:
        return _dense_weight(attn[name])
    for fused, names in getattr(type(attn), "FUSE", {}).items():
        if name in names and fused in attn:
            w = _dense_weight(attn[fused])
            return None if w is None else np.split(w, attn[fused].splits)[names.index(name)]
    return None


def _attn_magnitudes(model, blk):
    """Per-channel magnitude estimates [Hkv, D] of a layer's keys, queries (RMS over the query heads
    sharing a KV head), values, and of the o_proj columns each value channel feeds (same RMS), from
    the weights: the norm of each projection row times the input norm's weights."""
    h, d = model.kv_heads, model.head_dim
    attn = blk.self_attn
    gamma = np.array(blk.input_layernorm.weight.astype(mx.float32))
    wk, wq, wv, wo = (_projection(attn, n) for n in ("k_proj", "q_proj", "v_proj", "o_proj"))
    if any(w is None for w in (wk, wq, wv, wo)) or wk.shape != (h * d, gamma.shape[0]) \
            or wv.shape != wk.shape or wq.shape[0] % (h * d) or wo.shape[1] != wq.shape[0]:
        raise ValueError("not a plain q/k/v/o attention")

    def per_kv_head(rows: np.ndarray) -> np.ndarray:  # [Hq * D] -> [Hkv, D], RMS over a group's heads
        return np.sqrt((rows.reshape(h, -1, d) ** 2).mean(axis=1))

    k = np.linalg.norm(wk * gamma, axis=1).reshape(h, d)
    q = per_kv_head(np.linalg.norm(wq * gamma, axis=1))
    v = np.linalg.norm(wv * gamma, axis=1).reshape(h, d)
    o = per_kv_head(np.linalg.norm(wo, axis=0))
    return k, q, v, o


def _balance(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sqrt(num / den) per channel, normalised to geometric mean 1 per head."""
    s = np.sqrt(np.maximum(num, 1e-6) / np.maximum(den, 1e-6))
    return (s / np.exp(np.log(s).mean(axis=-1, keepdims=True))).astype(np.float32)


def channel_scales(model) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """Per layer [Hkv, D] key and value smoothing scales (None where the layer is not the usual
    q/k/v/o attention, e.g. models that normalise k per head: those keep the k_norm estimate).

    The error a quantized key adds to a score is q·e, with e spread evenly over the channels by the
    Hadamard rotation and proportional to the size of k / s; q·e then grows with q * s. The product
    |q * s| |k / s| is smallest for s = sqrt(|k| / |q|) per channel. Values likewise: an error in
    value channel c reaches the layer's output through o_proj's columns, so t = sqrt(|v| / |o_c|)."""
    ks: list[np.ndarray | None] = []
    vs: list[np.ndarray | None] = []
    try:
        layers = model.model.layers
    except AttributeError:
        return [None] * model.num_layers, [None] * model.num_layers
    for blk in layers:
        attn = getattr(blk, "self_attn", None)
        try:
            if attn is not None and "k_norm" in attn:
                mag = np.abs(np.array(attn.k_norm.weight.astype(mx.float32)))
                mag = np.broadcast_to(mag, (model.kv_heads, model.head_dim)).copy()
                mag = np.maximum(mag, np.roll(mag, model.head_dim // 2, axis=-1))  # RoPE mixes i, i + d/2
                ks.append(_balance(mag, np.ones_like(mag)))
                vs.append(None)
                continue
            k, q, v, o = _attn_magnitudes(model, blk)
        except (AttributeError, ValueError, TypeError):
            ks.append(None)
            vs.append(None)
            continue
        ks.append(_balance(k, q))
        vs.append(_balance(v, o))
    return ks, vs


class KVTransform:
    """`calib`: optional statistics of a calibration pass (kv_calibration.kv_stats): with them, keys
    (and with center="kv" values) are centred on their means, and the key scales come from the
    measured sizes of the centred keys and of the queries instead of the weights' estimate."""

    def __init__(self, model, dtype=mx.float32, calib: dict | None = None, center: str = "k"):
        d = model.head_dim
        self.h = mx.array(block_hadamard(d), dtype=dtype)
        self.group = None
        k_scales, v_scales = channel_scales(model)
        n = len(k_scales)
        calib = calib or {}
        k_means = calib.get("k_mean") if center in ("k", "kv") else None
        v_means = calib.get("v_mean") if center == "kv" else None
        k_means, v_means = k_means or [None] * n, v_means or [None] * n
        if calib.get("k_rms"):  # measured sizes: centred keys against the queries that multiply them
            k_scales = [s if kr is None or qr is None or s is None else _balance(kr, qr)
                        for s, kr, qr in zip(k_scales, calib["k_rms"], calib["q_rms"])]
        self.k_scale = [None if s is None else mx.array(s, dtype=dtype) for s in k_scales]
        self.v_scale = [None if s is None else mx.array(s, dtype=dtype) for s in v_scales]
        self.k_mean = [None if c is None else mx.array(c, dtype=dtype) for c in k_means]
        self.v_mean = [None if c is None else mx.array(c, dtype=dtype) for c in v_means]
        mx.eval(self.h, [a for a in self.k_scale + self.v_scale + self.k_mean + self.v_mean if a is not None])

    @staticmethod
    def _per_query_head(s: mx.array, hq: int) -> mx.array:
        return s if hq == s.shape[0] else mx.repeat(s, hq // s.shape[0], axis=0)

    def keys(self, layer: int, k: mx.array) -> mx.array:
        s, c = self.k_scale[layer], self.k_mean[layer]
        if c is not None:
            k = k - c
        return (k if s is None else k / s) @ self.h

    def values(self, layer: int, v: mx.array) -> mx.array:
        t, c = self.v_scale[layer], self.v_mean[layer]
        if c is not None:
            v = v - c
        return (v if t is None else v / t) @ self.h

    def queries(self, layer: int, q: mx.array) -> mx.array:
        s = self.k_scale[layer]
        if s is not None:
            q = q * self._per_query_head(s, q.shape[1])
        return q @ self.h

    def output(self, layer: int, o: mx.array) -> mx.array:
        """Attention output [T, Hq, D] in the stored basis -> the model's basis."""
        o = o @ self.h
        t, c = self.v_scale[layer], self.v_mean[layer]
        if t is not None:
            o = o * self._per_query_head(t, o.shape[1])
        return o if c is None else o + self._per_query_head(c, o.shape[1])
