"""`jangq inspect`: what a bundle holds: per-tensor bits, group size, bytes, and the averages."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def _headers(path: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h = json.loads(fh.read(n))
        h.pop("__metadata__", None)
        out.update(h)
    return out


def inspect_bundle(path) -> dict:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a model folder (no config.json)")
    cfg = json.loads((p / "config.json").read_text())
    jc = json.loads((p / "jang_config.json").read_text()) if (p / "jang_config.json").is_file() else {}
    q = cfg.get("quantization") or {}
    heads = _headers(p)

    def nbytes(name):
        a, b = heads[name]["data_offsets"]
        return b - a

    rows, params, stored, nominal = [], 0, 0, 0
    for name, h in sorted(heads.items()):
        if not name.endswith(".weight") or len(h["shape"]) < 2:
            continue
        base = name[: -len(".weight")]
        if base + ".scales" in heads:
            e = q.get(base) if isinstance(q.get(base), dict) else q
            bits, gs = int(e["bits"]), int(e["group_size"])
            shape = list(h["shape"][:-1]) + [h["shape"][-1] * 32 // bits]
            by = nbytes(name) + nbytes(base + ".scales") + nbytes(base + ".biases")
        else:
            bits, gs, shape, by = 16, None, h["shape"], nbytes(name)
        n = 1
        for d in shape:
            n *= d
        params += n
        stored += 8 * by
        nominal += n * bits
        rows.append({"tensor": base, "shape": shape, "bits": bits, "group_size": gs, "bytes": by,
                     "bits_per_weight": round(8 * by / n, 3)})
    jq = jc.get("quantization", {})
    return {"path": str(p), "format": jc.get("format", "mlx" if q else "hf"), "profile": jq.get("profile"),
            "method": jq.get("method"), "model_type": cfg.get("model_type"), "tensors": rows,
            "weight_params": params, "average_bits": round(stored / max(params, 1), 4),
            "nominal_bits": round(nominal / max(params, 1), 4),
            "size_bytes": sum(f.stat().st_size for f in p.glob("*.safetensors"))}


def format_table(info: dict) -> str:
    lines = [f"{'tensor':60s} {'shape':>18s} {'bits':>4s} {'gs':>4s} {'bytes':>11s} {'b/w':>6s}"]
    for r in info["tensors"]:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"{r['tensor'][:60]:60s} {shape:>18s} {r['bits']:>4d} {str(r['group_size'] or '-'):>4s} "
                     f"{r['bytes']:>11,d} {r['bits_per_weight']:>6.2f}")
    lines.append(f"\n{info['path']}: format {info['format']}, profile {info['profile']}, method {info['method']}")
    lines.append(f"{info['weight_params']:,} weights, {info['size_bytes']:,} bytes, "
                 f"average {info['average_bits']:.3f} bits/weight stored ({info['nominal_bits']:.3f} nominal)")
    return "\n".join(lines)
