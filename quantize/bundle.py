"""Run a model folder in this process for calibration and evaluation: a JANG / mlx bundle (kept
quantized, QLinear per module as config.json says) or any source convert() reads (float).

Uses engine.loader.load_model when it can read the path, else builds the model here from the
same pieces (build_model + layers.quantize_model + the bundle's weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from jang_serve.engine.models import build_model
from jang_serve.engine.models.layers import quantize_model


def load_bundle(path, dtype=mx.float32, dequantize: bool = False):
    """-> (model, config). Quantized folders stay quantized (unless `dequantize`: then every weight is
    expanded to a float Linear, the fast path for evaluation on CPU); float sources are cast to `dtype`."""
    p = Path(path)
    if not dequantize and p.is_dir() and (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text())
        q = config.get("quantization")
        if q:
            return _load_quantized(p, config, q, dtype), config
    from .sources import open_source

    src = open_source(p)
    weights = {}
    for _, group in src.groups():
        weights.update(group)
    model = src.model
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return model, src.config


def _load_quantized(p: Path, config: dict, q: dict, dtype):
    model = build_model(config)
    weights = {}
    for f in sorted(p.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    weights = model.sanitize(weights)

    def spec(path, module):
        entry = q.get(path)
        if entry is False:
            return None
        if isinstance(entry, dict):
            return int(entry["bits"]), int(entry["group_size"])
        if f"{path}.scales" in weights:
            return int(q["bits"]), int(q["group_size"])
        return None

    quantize_model(model, spec)
    _quantize_switch(model, weights, q)
    cast = []
    for k, v in weights.items():
        if v.dtype in (mx.float16, mx.bfloat16, mx.float32):
            v = v.astype(dtype)
        cast.append((k, v))
    model.load_weights(cast, strict=False)
    mx.eval(model.parameters())
    return model


def _quantize_switch(model, weights, q):
    """Stacked expert linears are not nn.Linear: swap them for their quantized form here."""
    try:
        from jang_serve.engine.models.switch import SwitchLinear
    except ImportError:
        return
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, SwitchLinear) and f"{path}.scales" in weights:
            e = q.get(path) if isinstance(q.get(path), dict) else q
            swaps.append((path, m.to_quantized(group_size=int(e["group_size"]), bits=int(e["bits"]))))
    if swaps:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swaps))


def forward_logits(model, ids, chunk: int | None = None) -> mx.array:
    """Logits [T, V] (float32) for one sequence of token ids, from position 0."""
    from jang_serve.engine.attention import ContiguousBackend, ContiguousKV

    cache = ContiguousKV(model.num_layers)
    toks = mx.array(ids, dtype=mx.int32)
    back = ContiguousBackend([cache], [len(ids)])
    out = model(toks, mx.arange(len(ids), dtype=mx.int32), back)
    return out.astype(mx.float32)


def batch_logits(model, windows: list[list[int]]) -> list[mx.array]:
    """Logits for several independent sequences in one flat batch."""
    from jang_serve.engine.attention import ContiguousBackend, ContiguousKV

    caches = [ContiguousKV(model.num_layers) for _ in windows]
    toks = mx.array([t for w in windows for t in w], dtype=mx.int32)
    pos = mx.array([i for w in windows for i in range(len(w))], dtype=mx.int32)
    out = model(toks, pos, ContiguousBackend(caches, [len(w) for w in windows])).astype(mx.float32)
    res, at = [], 0
    for w in windows:
        res.append(out[at : at + len(w)])
        at += len(w)
    return res
