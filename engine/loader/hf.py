"""Hugging Face style model folders: config.json plus model.safetensors, or shards listed by
model.safetensors.index.json. Also the shared file plumbing the quantized formats use (mlx-lm and
JANG v2 bundles are laid out the same way).

    read_config(path) -> dict
    weight_files(path) -> [Path]                     the safetensors files holding the weights
    tensor_infos(path) -> {name: TensorInfo}         every tensor's dtype/shape/file, from headers only
    iter_tensors(path) -> Iterator[(name, mx.array)] one tensor at a time (for streaming conversion)
    load_weights(path) -> ({name: mx.array}, {name: file})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from .errors import LoadError, read_json
from .safetensors_io import TensorInfo, load_file, read_header, read_tensor

INDEX = "model.safetensors.index.json"
# safetensors files in a bundle that are not model weights
_NOT_WEIGHTS = {"jang_imatrix.safetensors"}
_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def model_dir(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise LoadError(p, "missing (no such file or directory)")
    if not p.is_dir():
        raise LoadError(p, "not a model folder (expected a directory with config.json, or a .gguf file)")
    return p


def read_config(path) -> dict:
    """config.json of a model folder, with transformers-5 `rope_parameters` also exposed as the
    older `rope_theta` / `rope_scaling` keys (both spellings stay)."""
    p = model_dir(path)
    cfg = read_json(p / "config.json", "a model folder needs config.json")
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            cfg.setdefault("rope_theta", rp["rope_theta"])
        if rp.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", rp)
    return cfg


def weight_files(path) -> list[Path]:
    """The weight files, checked to exist: the shards named by the index, else model.safetensors,
    else every *.safetensors (numbered shards must all be there)."""
    p = model_dir(path)
    if (p / INDEX).is_file():
        return sorted({p / f for f in _index_map(p).values()})
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    files = sorted(f for f in p.glob("*.safetensors") if f.name not in _NOT_WEIGHTS)
    if not files:
        other = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(other[:3])}; only safetensors are read from a folder)" if other else ""
        raise LoadError(p, "no weight files: expected model.safetensors or shards with " + INDEX + hint)
    for f in files:
        m = _SHARD_RE.search(f.name)
        if m:
            total = int(m.group(2))
            stem = f.name[: m.start()]
            for i in range(1, total + 1):
                want = p / f"{stem}-{i:0{len(m.group(1))}d}-of-{m.group(2)}.safetensors"
                if not want.is_file():
                    raise LoadError(want, f"missing shard {i} of {total} (and no {INDEX} to say otherwise)")
    return files


def _index_map(p: Path) -> dict[str, str]:
    idx_path = p / INDEX
    idx = read_json(idx_path, "shard index")
    wmap = idx.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise LoadError(idx_path, "bad index: no \"weight_map\" object naming the shard of each tensor")
    for name, shard in wmap.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard:
            raise LoadError(idx_path, f"bad index: tensor {name!r} maps to {shard!r}, not a file name")
    for shard in sorted(set(wmap.values())):
        if not (p / shard).is_file():
            n = sum(1 for v in wmap.values() if v == shard)
            raise LoadError(p / shard, f"missing shard (listed in {INDEX} for {n} tensors)")
    return wmap


def tensor_infos(path) -> dict[str, TensorInfo]:
    """Every weight tensor's dtype, shape and file, read from the headers only. With an index,
    each tensor must be in the shard the index names."""
    p = model_dir(path)
    out: dict[str, TensorInfo] = {}
    for f in weight_files(p):
        infos, _ = read_header(f)
        for name, info in infos.items():
            if name in out:
                raise LoadError(f, f"tensor {name!r} is also in {out[name].file.name}")
            out[name] = info
    if (p / INDEX).is_file():
        wmap = _index_map(p)
        for name, shard in wmap.items():
            if name not in out or out[name].file.name != shard:
                raise LoadError(p / shard, f"tensor {name!r} is listed for this shard in {INDEX} but is "
                                           f"not in it")
        out = {k: v for k, v in out.items() if k in wmap}  # extra, unlisted tensors are not weights
    return out


def iter_tensors(path) -> Iterator[tuple[str, mx.array]]:
    """Yield (name, array) one tensor at a time, in file order, reading only that tensor's bytes."""
    infos = tensor_infos(path)
    for info in sorted(infos.values(), key=lambda i: (str(i.file), i.begin)):
        yield info.name, read_tensor(info)


def load_weights(path, infos: dict[str, TensorInfo] | None = None) -> tuple[dict, dict]:
    """-> (weights {name: mx.array}, files {name: Path}) for the whole folder."""
    infos = tensor_infos(path) if infos is None else infos
    by_file: dict[Path, dict] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, {})[name] = info
    weights, files = {}, {}
    for f, finfos in sorted(by_file.items()):
        arrays = load_file(f, finfos)
        for name in finfos:
            weights[name] = arrays[name]
            files[name] = f
    return weights, files
