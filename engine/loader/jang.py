"""JANG v2 bundles: an mlx-lm style folder (config.json with per-module "quantization" overrides,
model-0000N-of-0000M.safetensors shards + model.safetensors.index.json, tensors in MLX affine
format: packed uint32 weight, float16 scales/biases, float16 norms) plus jang_config.json:

    {"format": "jang", "format_version": "2.0",
     "quantization": {"block_size": 64, "bit_widths_used": [4, 8], "hadamard_rotation": false,
                      "tensor_quantization_manifest": {
                          "model.layers.0.self_attn.q_proj": {"bits": 8, "group_size": 64,
                              "weight_key": "...weight", "scales_key": ..., "weight_shape": [...]}}},
     "source_model": {...}, "capabilities": {...}}

Each module's (bits, group_size) comes from the config.json override, else the manifest, else
the shapes (see mlx_quant.plan_quantization, which also checks the first two against the shapes).
"""

from __future__ import annotations

from pathlib import Path

from .errors import LoadError, read_json
from .mlx_quant import config_default, config_override

JANG_CONFIG = "jang_config.json"


def read_jang_config(path: Path) -> dict:
    f = Path(path) / JANG_CONFIG
    jc = read_json(f, "JANG bundle config")
    version = str(jc.get("format_version", "1.0"))
    if not version.startswith("2."):
        raise LoadError(f, f"JANG format_version {version} is not supported (only 2.x bundles; "
                           f"upgrade v1 bundles with `jang upgrade`)")
    q = jc.get("quantization", {})
    if not isinstance(q, dict):
        raise LoadError(f, "bad \"quantization\": expected an object")
    if q.get("hadamard_rotation"):
        raise LoadError(f, "Hadamard-rotated bundles are not supported (hadamard_rotation is true)")
    man = q.get("tensor_quantization_manifest", {})
    if man is not None and not isinstance(man, dict):
        raise LoadError(f, "bad \"tensor_quantization_manifest\": expected an object")
    return jc


def manifest(jc: dict) -> dict[str, tuple[int, int]]:
    """module path -> (bits, group_size) from the tensor manifest."""
    q = jc.get("quantization", {})
    out = {}
    for path, spec in (q.get("tensor_quantization_manifest") or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("bits"), int):
            out[path] = (spec["bits"], int(spec.get("group_size", q.get("block_size", 64))))
    return out


def jang_default(jc: dict, qcfg: dict | None) -> tuple[int, int] | None:
    d = config_default(qcfg)
    if d:
        return d
    q = jc.get("quantization", {})
    used = q.get("bit_widths_used") or []
    return (min(used), int(q.get("block_size", 64))) if used else None


def jang_declared(jc: dict, qcfg: dict | None):
    """declared(path) for plan_quantization: config override, then manifest, then the default."""
    man = manifest(jc)
    default = jang_default(jc, qcfg)

    def declared(path: str):
        out = []
        o = config_override(qcfg, path)
        if o:
            out.append(("config", o))
        if path in man:
            out.append(("manifest", man[path]))
        if default:
            out.append(("config", default))
        return out

    return declared


def drop_runtime_ignored(weights: dict) -> dict:
    """Bundle tensors that are not model parameters: importance scores and MTP heads."""
    return {k: v for k, v in weights.items() if not k.endswith(".importance") and not k.startswith("mtp.")}
