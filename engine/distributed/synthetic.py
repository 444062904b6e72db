"""Random-weight models generated directly as one rank's shard, for benchmarks of shapes too big to
write to disk or to hold whole on one rank (a Llama-3-70B shape at JANG_4M is ~40 GB).

A synthetic model is a folder with config.json and synthetic.json:
    {"seed": 0, "std": 0.02, "modules": {"model.layers.0.self_attn.q_proj": [8, 64], ...}}
(`modules`: each quantized module's bits and group size, e.g. from quantize's JANG roles; the
engine never imports quantize). `load_synthetic(path, dtype, shard=(rank, size))` builds the
model, quantizes the listed modules, and fills in only the values that rank keeps.

Every value is a hash of (seed, tensor name, element index), computed on the device for the
window being read: a rank's slice is exactly the same slice of the whole random tensor, so a
tensor-parallel run and a single-device run of the same folder compute the same model (their
greedy tokens can be compared). Packed weights are random bits, so quantized values are uniform
over [0, 2^bits); scales/biases are constant per module and centre them to std `std`; float
weights are uniform with std `std`; norms are 1 and linear biases 0.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .shard_load import LazyTensor, load_sharded

SPEC = "synthetic.json"


def is_synthetic(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / SPEC).is_file()


def write_spec(out, config: dict, modules: dict[str, tuple[int, int]], seed: int = 0, std: float = 0.02) -> Path:
    """A synthetic model folder (config.json + synthetic.json); nothing big is written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / SPEC).write_text(json.dumps({"seed": seed, "std": std,
                                        "modules": {k: list(v) for k, v in sorted(modules.items())}}))
    return out


def _mix(x):
    """A 32-bit integer hash (lowbias32), element-wise on uint32 (multiplication wraps)."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, mx.uint32)
    return x ^ (x >> 16)


class HashTensor(LazyTensor):
    """One parameter's values, computed for the window being read (see the module docstring)."""

    def __init__(self, name: str, shape, dtype, kind: str, seed: int, std: float, bits: int | None = None):
        super().__init__(shape)
        self.name, self.stored_dtype, self.kind, self.std, self.bits = name, dtype, kind, std, bits
        self.key = (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF

    def _hash(self):
        idx = mx.zeros((), mx.uint32)
        for (a, b), n in zip(self.window, self.full_shape):  # flat index of each element (mod 2^32)
            idx = idx[..., None] * mx.array(n, mx.uint32) + mx.arange(a, b, dtype=mx.uint32)
        return _mix(_mix(idx ^ mx.array(self.key, mx.uint32)))

    def _read(self) -> mx.array:
        shape, dt = self.shape, self.stored_dtype
        if self.kind == "ones":
            return mx.ones(shape, dt)
        if self.kind == "zeros":
            return mx.zeros(shape, dt)
        if self.kind == "bits":
            return self._hash()
        levels = 2 ** (self.bits or 0) - 1
        q_std = ((levels + 1) ** 2 - 1) ** 0.5 / 12 ** 0.5 if levels else 1.0
        if self.kind == "scales":
            return mx.full(shape, self.std / q_std, dt)
        if self.kind == "biases":
            return mx.full(shape, -self.std / q_std * levels / 2, dt)
        u = (self._hash() >> 8).astype(mx.float32) * (1.0 / (1 << 24))  # uniform [0, 1)
        return ((u - 0.5) * (self.std * 12 ** 0.5)).astype(dt)


def _kind(name: str, arr) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if arr.dtype == mx.uint32:
        return "bits"
    if leaf in ("scales", "biases"):
        return leaf
    if "norm" in name:
        return "ones"
    if leaf == "bias":
        return "zeros"
    return "uniform"


def load_synthetic(path, dtype="auto", shard: tuple[int, int] | None = None):
    """-> engine.loader.LoadedModel of the synthetic folder `path` (format "synthetic", no
    tokenizer), cut to `shard`'s rank when given (only that rank's values are computed)."""
    from jang_serve.engine.loader.dtype import resolve_dtype
    from jang_serve.engine.loader.load import LoadedModel, _build
    from jang_serve.engine.models.layers import quantize_model

    p = Path(path)
    config = json.loads((p / "config.json").read_text())
    spec = json.loads((p / SPEC).read_text())
    dt = resolve_dtype(dtype)
    mods = {k: tuple(v) for k, v in spec.get("modules", {}).items()}
    model = _build(config, p / "config.json")
    if mods:
        quantize_model(model, lambda path_, m: mods.get(path_))
    weights = {}
    for name, arr in tree_flatten(model.parameters()):  # shapes only: the arrays are never evaluated
        kind = _kind(name, arr)
        bits = mods.get(name.rsplit(".", 1)[0], (None,))[0]
        weights[name] = HashTensor(name, arr.shape, mx.uint32 if kind == "bits" else dt, kind,
                                   int(spec.get("seed", 0)), float(spec.get("std", 0.02)), bits)
    info = None
    if shard is None:
        model.load_weights([(k, v.read()) for k, v in weights.items()], strict=True)
    else:
        info = load_sharded(model, weights, *shard)
    model.eval()
    mx.eval(model.parameters())
    quant = {"format": "synthetic", "modules": {k: {"bits": b, "group_size": g} for k, (b, g) in mods.items()}}
    return LoadedModel(model, config, None, quant if mods else None, p, "synthetic", dt, info)
