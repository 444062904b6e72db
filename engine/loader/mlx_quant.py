"""Per-module quantization of mlx-lm style folders (MLX affine: packed uint32 `weight`, `scales`,
`biases`), and the shape arithmetic that settles each module's (bits, group_size).

config.json of an mlx-lm folder carries
    "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                     "model.layers.0.self_attn.q_proj": {"bits": 8, "group_size": 64},
                     "model.layers.0.mlp.gate_proj": false, ...}
(`quantization_config` is the same thing under its Hugging Face name). A module is quantized when
the checkpoint has `<module>.scales`. For a module with input dimension `in` (known from the float
model), a packed weight [out, in*bits/32] and scales [out, in/gs] give bits and gs exactly, so
the shapes are the final word: a declared (bits, gs) is used when it fits them, otherwise the
shapes decide (4-bit/gs64 and 8-bit/gs128 share a scales shape but not a packed width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.nn as nn

from .errors import LoadError

VALID_BITS = (1, 2, 3, 4, 5, 6, 8)


@dataclass
class QuantPlan:
    """The outcome: which modules are quantized and how, and where each answer came from."""

    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (bits, group_size)
    sources: dict[str, str] = field(default_factory=dict)  # path -> "config" | "manifest" | "shape"
    default: tuple[int, int] | None = None  # the config's global (bits, group_size)

    def spec(self, path: str, module: nn.Module):
        return self.modules.get(path)

    def as_dict(self, fmt: str) -> dict:
        return {
            "format": fmt,
            "bits": self.default[0] if self.default else None,
            "group_size": self.default[1] if self.default else None,
            "modules": {p: {"bits": b, "group_size": g, "source": self.sources.get(p)}
                        for p, (b, g) in sorted(self.modules.items())},
        }


def quant_config(config: dict, cfg_file) -> dict | None:
    """The mlx-lm quantization block of config.json, or None for a float model."""
    q = config.get("quantization", config.get("quantization_config"))
    if q is None:
        return None
    if not isinstance(q, dict):
        raise LoadError(cfg_file, f"bad \"quantization\": expected an object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method is not None and str(method).lower() not in ("mlx", "affine", "jang"):
        raise LoadError(cfg_file, f"unsupported quantization method {method!r} "
                                  f"(only MLX affine and JANG bundles are read)")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise LoadError(cfg_file, f"unsupported quantization mode {mode!r} (only \"affine\" is read)")
    return q


def config_default(q: dict | None) -> tuple[int, int] | None:
    if q and isinstance(q.get("bits"), int) and isinstance(q.get("group_size"), int):
        return q["bits"], q["group_size"]
    return None


def config_override(q: dict | None, path: str):
    """(bits, gs) from a per-module entry, False if the module is marked float, None if absent."""
    entry = (q or {}).get(path)
    if entry is False:
        return False
    if isinstance(entry, dict) and "bits" in entry:
        return int(entry["bits"]), int(entry.get("group_size", q.get("group_size", 64)))
    return None


def input_dims(model: nn.Module) -> dict[str, int]:
    """path -> input dimension of every module that can be quantized (Linear, Embedding, stacked
    expert linears: the last axis of the float weight)."""
    from mlx.utils import tree_flatten

    out = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if "weight" in m and isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "SwitchLinear":
            out[path] = int(m.weight.shape[-1])
    return out


def infer_from_shapes(in_dim: int, w_cols: int, s_cols: int) -> tuple[int, int] | None:
    """(bits, group_size) such that in*bits/32 == w_cols and in/gs == s_cols; None if none."""
    if s_cols <= 0 or in_dim % s_cols or (w_cols * 32) % in_dim:
        return None
    bits, gs = w_cols * 32 // in_dim, in_dim // s_cols
    return (bits, gs) if bits in VALID_BITS else None


def fits(in_dim: int, w_cols: int, s_cols: int, bits: int, gs: int) -> bool:
    return gs > 0 and in_dim % gs == 0 and in_dim * bits == w_cols * 32 and in_dim // gs == s_cols


Declared = Callable[[str], "list[tuple[str, tuple[int, int] | bool | None]]"]


def plan_quantization(model: nn.Module, weights: dict, declared: Declared, default, files: dict,
                      where) -> QuantPlan:
    """Settle (bits, gs) for every module with `<path>.scales` in the (sanitized) weights.

    declared(path) lists (source, value) candidates in order of precedence; the first that fits the
    shapes wins, else the shapes decide. `files` maps tensor names to files for error messages.
    """
    dims = input_dims(model)
    plan = QuantPlan(default=default)
    for key in weights:
        if not key.endswith(".scales"):
            continue
        path = key[: -len(".scales")]
        wkey = f"{path}.weight"
        src_file = files.get(wkey, files.get(key, where))
        if wkey not in weights:
            raise LoadError(src_file, f"{key} has no matching {wkey}")
        if f"{path}.biases" not in weights:
            raise LoadError(src_file, f"{path} has scales but no biases (only MLX affine quantization is read)")
        if path not in dims:
            raise LoadError(src_file, f"quantized tensor {wkey} matches no linear or embedding of the "
                                      f"{model.args.model_type} model")
        in_dim, w, s = dims[path], weights[wkey], weights[key]
        w_cols, s_cols = int(w.shape[-1]), int(s.shape[-1])
        chosen = None
        for source, value in declared(path):
            if value and fits(in_dim, w_cols, s_cols, *value):
                chosen = (value, source)
                break
        if chosen is None:
            inferred = infer_from_shapes(in_dim, w_cols, s_cols)
            if inferred is None:
                raise LoadError(src_file, f"mismatched shapes: {wkey} {list(w.shape)} with scales "
                                          f"{list(s.shape)} fits no bit width for input dimension {in_dim}")
            chosen = (inferred, "shape")
        plan.modules[path], plan.sources[path] = chosen
    return plan
