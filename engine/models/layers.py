"""Building blocks shared by the model families: RoPE over per-token positions, the quantized
linear that routes through `kernels.qmm`, and the function that quantizes a float model in place."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from jang_serve.kernels import qmm

from .switch import QSwitchLinear, SwitchLinear


class RoPE(nn.Module):
    """Rotary embedding applied to a flat batch: x [T, H, D], positions [T] (absolute per token).

    Supports HF `rope_scaling` types: none/default, linear, llama3, and yarn-free dynamic-less configs.
    """

    def __init__(self, dims: int, base: float = 10000.0, traditional: bool = False, scaling: dict | None = None,
                 max_position_embeddings: int = 2048):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.scale = 1.0
        self._freqs = None
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) if scaling else "default"
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif kind == "llama3":
            self._freqs = _llama3_freqs(dims, base, scaling)
        elif kind not in ("default", None):
            raise ValueError(f"unsupported rope_scaling type {kind!r}")

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        x4 = x[:, :, None, :]
        if self._freqs is not None:
            out = mx.fast.rope(x4, self.dims, traditional=self.traditional, base=None, scale=self.scale,
                               offset=positions, freqs=self._freqs)
        else:
            out = mx.fast.rope(x4, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                               offset=positions)
        return out[:, :, 0, :]


def _llama3_freqs(dims: int, base: float, cfg: dict) -> mx.array:
    factor = float(cfg.get("factor", 8.0))
    low = float(cfg.get("low_freq_factor", 1.0))
    high = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # "periods" as mx.fast.rope expects
    wavelens = 2 * math.pi * freqs
    freqs = mx.where(wavelens > low_wavelen, freqs * factor, freqs)
    medium = (wavelens > high_wavelen) & (wavelens < low_wavelen)
    smooth = (old_ctx / wavelens - low) / (high - low)
    smoothed = freqs / ((1 - smooth) / factor + smooth)
    return mx.where(medium, smoothed, freqs)


class QLinear(nn.Module):
    """A linear layer on MLX affine-quantized weights (weight/scales/biases, same names as mlx-lm),
    computed through `kernels.qmm` so the fast kernels apply to every quantized linear."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.input_dims, self.output_dims = input_dims, output_dims
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int) -> "QLinear":
        out_d, in_d = lin.weight.shape
        q = cls(in_d, out_d, "bias" in lin, bits, group_size)
        q.weight, q.scales, q.biases = mx.quantize(lin.weight, group_size=group_size, bits=bits)
        if "bias" in lin:
            q.bias = lin.bias
        return q

    def __call__(self, x: mx.array) -> mx.array:
        y = qmm(x, self.weight, self.scales, self.biases, self.bits, self.group_size)
        if "bias" in self:
            y = y + self.bias
        return y

    def dense_twin(self, weight: mx.array) -> nn.Module:
        """The same layer over a dense `weight` (models/dense.py); subclasses return their own twin."""
        out = nn.Linear(self.input_dims, self.output_dims, bias="bias" in self)
        out.weight = weight
        if "bias" in self:
            out.bias = self.bias.astype(weight.dtype)
        return out


QuantSpec = Callable[[str, nn.Module], "tuple[int, int] | None"]


def quantize_model(model: nn.Module, spec: QuantSpec) -> None:
    """Replace nn.Linear / nn.Embedding / SwitchLinear (stacked MoE experts) leaves in place by
    quantized ones (QLinear / nn.QuantizedEmbedding / QSwitchLinear).

    `spec(path, module)` returns (bits, group_size) or None to keep the module in float. Weights
    are quantized from the current values (load real quantized weights afterwards to overwrite them).
    """

    def swap(path: str, m: nn.Module):
        if isinstance(m, nn.Linear) and not isinstance(m, QLinear):
            s = spec(path, m)
            return QLinear.from_linear(m, *s) if s else m
        if isinstance(m, SwitchLinear):
            s = spec(path, m)
            return QSwitchLinear.from_switch(m, *s) if s else m
        if isinstance(m, nn.Embedding) and not isinstance(m, nn.QuantizedEmbedding):
            s = spec(path, m)
            return nn.QuantizedEmbedding.from_embedding(m, group_size=s[1], bits=s[0]) if s else m
        return m

    leaves = model.leaf_modules()
    flat = _flatten_modules(leaves)
    new = {path: swap(path, m) for path, m in flat}
    changed = [(p, m) for p, m in new.items() if m is not dict(flat)[p]]
    if changed:
        model.update_modules(_unflatten(changed))


def _flatten_modules(tree, prefix=""):
    out = []
    if isinstance(tree, nn.Module):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _flatten_modules(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += _flatten_modules(v, f"{prefix}.{i}" if prefix else str(i))
    return out


def _unflatten(items):
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)


class FusedLinear(nn.Module):
    """Several linears that read the same input, as one matmul (one kernel, one Python call):
    their weights (and scales/biases, all at one bits/group) stacked along the output. Returns
    the parts' outputs as views of the one result."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        first = parts[0]
        self.quantized = isinstance(first, QLinear)
        if self.quantized:
            self.bits, self.group_size = first.bits, first.group_size
            self.scales = mx.concatenate([p.scales for p in parts])
            self.biases = mx.concatenate([p.biases for p in parts])
        self.weight = mx.concatenate([p.weight for p in parts])
        if "bias" in first:
            self.bias = mx.concatenate([p.bias for p in parts])
        sizes = [p.weight.shape[0] for p in parts]
        self.splits = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
        self.freeze()
        # Materialise now: lazy concatenations keep the parts alive and belong to this thread's stream,
        # which the engine's own thread does not have ("There is no Stream(gpu, 0) in current thread").
        mx.eval(self.parameters())

    @staticmethod
    def can_fuse(parts: list[nn.Module]) -> bool:
        """Same kind (all QLinear at one bits/group and scale dtype, or all plain float nn.Linear),
        same input size, and bias on all or none."""
        first = parts[0]
        if any("bias" in p for p in parts) and not all("bias" in p for p in parts):
            return False
        if isinstance(first, QLinear):
            return all(type(p) is QLinear and (p.bits, p.group_size, p.input_dims, p.scales.dtype) ==
                       (first.bits, first.group_size, first.input_dims, first.scales.dtype) for p in parts)
        return all(type(p) is nn.Linear and p.weight.shape[1] == first.weight.shape[1]
                   and p.weight.dtype == first.weight.dtype for p in parts)

    def joint(self, x: mx.array) -> mx.array:
        """The parts' outputs side by side, unsplit: [..., sum of output sizes]."""
        if self.quantized:
            y = qmm(x, self.weight, self.scales, self.biases, self.bits, self.group_size)
        else:
            y = x @ self.weight.T
        if "bias" in self:
            y = y + self.bias
        return y

    def __call__(self, x: mx.array) -> list[mx.array]:
        return mx.split(self.joint(x), self.splits, axis=-1)


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v into `qkv_fused` and gate/up into `gate_up_fused` wherever a module opts in by
    `FUSE = {"qkv_fused": ("q_proj", "k_proj", "v_proj"), ...}` and the parts can be fused; the
    parts are removed. Call after anything that reads the separate weights (e.g. the KV transform).
    Returns the number of fused groups."""
    count = 0
    for _, m in model.named_modules():
        for name, names in getattr(type(m), "FUSE", {}).items():
            if name in m or not all(n in m for n in names):
                continue
            parts = [m[n] for n in names]
            if not FusedLinear.can_fuse(parts):
                continue
            m[name] = FusedLinear(parts)
            for n in names:
                del m[n]
            count += 1
    return count
