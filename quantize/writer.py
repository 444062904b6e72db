"""The JANG v2 writer: sharded MLX-native safetensors plus config.json and jang_config.json.

Tensors arrive one at a time (`add`) and go to disk whenever the pending shard reaches
`max_shard_bytes`, so memory stays at about one shard's worth at most (and one tensor for small
shards). `finish()` names the shards model-0000i-of-0000N.safetensors and writes

  model.safetensors.index.json   {"metadata": {"format": "jang", "format_version": "2.0", ...}, "weight_map"}
  config.json                    the model config + mlx-style "quantization": global bits/group_size and
                                 one {"bits", "group_size", "mode"} entry per quantized module
  jang_config.json               format "jang", format_version "2.0", quantization (profile, method,
                                 target/actual bits, manifest), source model, runtime sizes
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

FORMAT = "jang"
FORMAT_VERSION = "2.0"
MAX_SHARD_BYTES = 5 * 1000**3


def _nbytes(a: mx.array) -> int:
    return a.nbytes


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


class BundleWriter:
    def __init__(self, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, arr: mx.array) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ValueError(f"tensor {name} written twice")
        n = _nbytes(arr)
        if self.pending and self.pending_bytes + n > self.max:
            self._flush()
        self.pending[name] = arr
        self.pending_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        if not self.pending:
            return
        idx = len(self.shards) + 1
        mx.save_safetensors(str(self.dir / f"model-{idx:05d}.partial.safetensors"), self.pending,
                            metadata={"format": "mlx"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict, jang_config: dict) -> dict:
        self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.dir / f"model-{i:05d}.partial.safetensors").rename(self.dir / final)
            weight_map.update({t: final for t in names})
        size = sum((self.dir / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"format": FORMAT, "format_version": FORMAT_VERSION, "total_size": size},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.dir / "model.safetensors.index.json", index)
        write_json(self.dir / "config.json", config)
        jang_config = {"format": FORMAT, "format_version": FORMAT_VERSION, **jang_config}
        jang_config.setdefault("runtime", {})["total_weight_bytes"] = size
        write_json(self.dir / "jang_config.json", jang_config)
        return {"shards": n, "size_bytes": size}


def quantization_block(default_bits: int, group_size: int, per_module: dict[str, tuple[int, int]]) -> dict:
    """mlx-lm style `quantization`: global defaults + an entry per quantized module path."""
    q: dict = {"group_size": group_size, "bits": default_bits, "mode": "affine"}
    for path, (bits, gs) in sorted(per_module.items()):
        q[path] = {"group_size": gs, "bits": bits, "mode": "affine"}
    return q
