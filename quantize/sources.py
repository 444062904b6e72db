"""Where the float weights come from: an HF safetensors folder, an mlx / JANG quantized folder
(dequantized tensor by tensor), or a GGUF file (dequantized by engine.loader.gguf).

A Source gives the config, the tokenizer files, and `groups()`: the weights one transformer layer at
a time (plus one group for the tensors outside the layers), already passed through the model
family's `sanitize()` (HF quirks -> our names, experts stacked), as float32 mx arrays. Safetensors
are read through a memory map, so only the group being converted is in memory.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from jang_serve.engine.models import build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json")

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
       "I32": np.int32, "U32": np.uint32, "I8": np.int8, "U8": np.uint8, "I16": np.int16, "BOOL": np.bool_}


class SourceError(ValueError):
    pass


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SourceError(f"{path}: not a safetensors file (too short)")
        n = struct.unpack("<Q", head)[0]
        if n > 100_000_000:
            raise SourceError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SourceError(f"{path}: unreadable safetensors header ({e})") from None
    return header, 8 + n


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        self.header, self.base = _read_header(path)
        self.header.pop("__metadata__", None)
        self._mm = None
        size, end = path.stat().st_size, self.base + max((t["data_offsets"][1] for t in self.header.values()), default=0)
        if size < end:
            raise SourceError(f"{path}: truncated safetensors file ({size} bytes, its header needs {end})")

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def get(self, name) -> mx.array:
        info = self.header[name]
        if info["dtype"] not in _NP:
            raise SourceError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        a, b = info["data_offsets"]
        raw = self._mm[self.base + a : self.base + b]
        arr = np.frombuffer(raw, dtype=_NP[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return mx.array(arr)


def _group_key(name: str) -> int:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


class Source:
    """Base: subclasses fill `config`, `kind`, `_names` (raw name -> shape) and `_raw(name)`."""

    kind = "?"
    config: dict
    path: Path

    def __init__(self):
        self.model = build_model(self.config)  # lazy float skeleton (nothing is evaluated)

    @property
    def moe(self) -> bool:
        from .roles import is_moe_config

        return is_moe_config(self.config)

    def raw_names(self) -> list[str]:
        raise NotImplementedError

    def _raw(self, name: str) -> mx.array:
        raise NotImplementedError

    def groups(self) -> Iterator[tuple[int, dict[str, mx.array]]]:
        """(layer index or -1, {our name: float32 array}) per layer, in layer order; -1 first."""
        by: dict[int, list[str]] = {}
        for n in self.raw_names():
            by.setdefault(_group_key(n), []).append(n)
        for key in sorted(by):
            raw = {n: self._raw(n) for n in by[key]}
            yield key, self.model.sanitize(raw)

    def tokenizer_files(self) -> dict[str, bytes]:
        return {}

    def save_tokenizer(self, out: Path) -> list[str]:
        files = self.tokenizer_files()
        for name, data in files.items():
            (out / name).write_bytes(data)
        return sorted(files)


class SafetensorsSource(Source):
    """An HF checkpoint folder, or an mlx-lm / JANG quantized one (config has `quantization`)."""

    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{path}: no config.json")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise SourceError(f"{cfg_path}: not valid JSON ({e})") from None
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{path}: no .safetensors files")
        self.files = [_SafetensorsFile(f) for f in files]
        self.where: dict[str, _SafetensorsFile] = {}
        for f in self.files:
            for n in f.header:
                self.where[n] = f
        self.quant = self.config.pop("quantization", None)
        self.config.pop("quantization_config", None)
        self.kind = "mlx" if self.quant else "hf"
        super().__init__()

    def raw_names(self):
        if not self.quant:
            return list(self.where)
        # quantized folder: one logical float tensor per weight; drop scales/biases
        out = []
        for n in self.where:
            if n.endswith((".scales", ".biases")) and n[: -len(".scales")] + ".weight" in self.where:
                continue
            out.append(n)
        return out

    def _bits(self, module: str) -> tuple[int, int]:
        spec = self.quant.get(module)
        if isinstance(spec, dict):
            return int(spec["bits"]), int(spec["group_size"])
        return int(self.quant["bits"]), int(self.quant["group_size"])

    def _raw(self, name):
        f = self.where[name]
        if self.quant and name.endswith(".weight"):
            base = name[: -len(".weight")]
            if base + ".scales" in self.where:
                bits, gs = self._bits(base)
                wq = f.get(name)
                s = self.where[base + ".scales"].get(base + ".scales").astype(mx.float32)
                b = self.where[base + ".biases"].get(base + ".biases").astype(mx.float32)
                return mx.dequantize(wq, s, b, group_size=gs, bits=bits)
        return f.get(name).astype(mx.float32)

    def tokenizer_files(self):
        return {n: (self.path / n).read_bytes() for n in TOKENIZER_FILES if (self.path / n).is_file()}


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: Path):
        self.path = path
        try:
            from jang_serve.engine.loader import gguf
        except ImportError as e:
            raise SourceError(f"{path}: GGUF import needs engine.loader.gguf ({e})") from None
        try:
            g = gguf.read_gguf(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable source
            raise SourceError(f"{path}: cannot read GGUF ({type(e).__name__}: {e})") from None
        self.config = dict(g.config)
        self.config.pop("quantization", None)
        self.weights = g.weights
        self.tokenizer = g.tokenizer
        super().__init__()

    def raw_names(self):
        return list(self.weights)

    def _raw(self, name):
        return self.weights[name].astype(mx.float32)

    def save_tokenizer(self, out: Path) -> list[str]:
        if self.tokenizer is None or not hasattr(self.tokenizer, "save"):
            return []
        before = {p.name for p in out.iterdir()}
        self.tokenizer.save(out)
        return sorted({p.name for p in out.iterdir()} - before)


def open_source(src) -> Source:
    """Open an HF / mlx / JANG folder or a .gguf file; SourceError names the problem."""
    p = Path(src)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if p.is_dir():
        return SafetensorsSource(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(p)
    raise SourceError(f"{p}: not a model folder (config.json + safetensors) or a GGUF file")
