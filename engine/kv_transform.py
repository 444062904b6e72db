"""An exact change of basis for quantized KV: per-channel key smoothing plus a Hadamard rotation.

Keys of small models carry outlier channels, which wreck 4-bit quantization along head_dim. Since
attention only uses q·k and softmax(.)·v, we may store

    k' = (k / s) H      v' = v H      and attend with   q' = (q * s) H,   out = out' H

for any per-channel scale s > 0 and orthonormal, symmetric H (a block Hadamard matrix): q'·k' = q·k
and out' H = out exactly; only the quantization error changes. s flattens the key channels
(s = sqrt of each channel's expected magnitude, estimated from the k projection weights), H
spreads what is left evenly over the group. The paged attention itself is unchanged: it sees q', k', v'.
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


def key_channel_scales(model, alpha: float = 0.5) -> list[np.ndarray | None]:
    """Per layer [Hkv, D] smoothing scales from the weights (None where the layer is not the
    usual q/k/v attention). A key channel's magnitude is estimated as the norm of its k_proj row
    times the input norm's weights (k_norm's weight for models that normalise k per head)."""
    h, d = model.kv_heads, model.head_dim
    out: list[np.ndarray | None] = []
    try:
        layers = model.model.layers
    except AttributeError:
        return [None] * model.num_layers
    for blk in layers:
        attn = getattr(blk, "self_attn", None)
        try:
            if attn is not None and "k_norm" in attn:
                mag = np.abs(np.array(attn.k_norm.weight.astype(mx.float32)))
                mag = np.broadcast_to(mag, (h, d)).copy()
            else:
                w = _dense_weight(attn.k_proj)
                gamma = np.array(blk.input_layernorm.weight.astype(mx.float32))
                if w is None or w.shape != (h * d, gamma.shape[0]):
                    raise ValueError
                mag = np.linalg.norm(w * gamma[None, :], axis=1).reshape(h, d)
        except (AttributeError, ValueError, TypeError):
            out.append(None)
            continue
        # RoPE mixes channel i with i + d/2 (and 2i with 2i+1): give both the larger magnitude.
        mag = np.maximum(mag, np.roll(mag, d // 2, axis=-1))
        s = np.maximum(mag, 1e-6) ** alpha
        s /= np.exp(np.log(s).mean(axis=-1, keepdims=True))
        out.append(s.astype(np.float32))
    return out


class KVTransform:
    def __init__(self, model, dtype=mx.float32):
        d = model.head_dim
        self.h = mx.array(block_hadamard(d), dtype=dtype)
        self.group = None
        scales = key_channel_scales(model)
        self.k_scale = [None if s is None else mx.array(s, dtype=dtype) for s in scales]
        mx.eval(self.h, [s for s in self.k_scale if s is not None])

    def keys(self, layer: int, k: mx.array) -> mx.array:
        s = self.k_scale[layer]
        return (k if s is None else k / s) @ self.h

    def values(self, v: mx.array) -> mx.array:
        return v @ self.h

    def queries(self, layer: int, q: mx.array) -> mx.array:
        s = self.k_scale[layer]
        if s is not None:
            hq, hkv = q.shape[1], s.shape[0]
            q = q * (s if hq == hkv else mx.repeat(s, hq // hkv, axis=0))
        return q @ self.h

    def output(self, o: mx.array) -> mx.array:
        return o @ self.h
