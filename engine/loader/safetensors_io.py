"""Safetensors files: the header (checked against the file size, so truncated or corrupt files
fail with a clear message before any tensor is read), one-tensor-at-a-time reads, and whole-file
loads through `mx.load`.

Layout of a .safetensors file: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data;
offsets count from the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import LoadError

# safetensors dtype -> (numpy dtype to read the bytes as, mx dtype to view them as, or None)
_DTYPES = {
    "F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16),
    "I64": (np.int64, None), "I32": (np.int32, None), "I16": (np.int16, None), "I8": (np.int8, None),
    "U64": (np.uint64, None), "U32": (np.uint32, None), "U16": (np.uint16, None), "U8": (np.uint8, None),
    "BOOL": (np.bool_, None),
}

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: F32, BF16, U32, ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int
    file: Path


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """-> ({name: TensorInfo}, metadata). Raises LoadError for anything that is not a complete,
    well-formed safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(path, "missing (weight file not found)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(path, f"truncated or corrupt safetensors: file is only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise LoadError(path, f"truncated or corrupt safetensors: header claims {n} bytes, "
                                  f"file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(path, f"corrupt safetensors: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoadError(path, "corrupt safetensors: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start, out = 8 + n, {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LoadError(path, f"corrupt safetensors: bad header entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise LoadError(path, f"tensor {name!r} has unsupported dtype {dtype}")
        want = math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize
        if e - b != want:
            raise LoadError(path, f"corrupt safetensors: tensor {name!r} {dtype}{list(shape)} needs "
                                  f"{want} bytes, header gives {e - b}")
        if data_start + e > size:
            raise LoadError(path, f"truncated safetensors: tensor {name!r} ends at byte {data_start + e} "
                                  f"but the file has {size} bytes")
        out[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e, path)
    return out, meta


def read_tensor(info: TensorInfo) -> mx.array:
    """Read one tensor from disk (only its bytes)."""
    np_dtype, view = _DTYPES[info.dtype]
    count = math.prod(info.shape)
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        arr = np.fromfile(f, dtype=np_dtype, count=count)
    if arr.size != count:
        raise LoadError(info.file, f"truncated safetensors: tensor {info.name!r} is cut short")
    a = mx.array(arr.reshape(info.shape))
    return a.view(view) if view is not None else a


def load_file(path: Path, infos: dict[str, TensorInfo] | None = None) -> dict[str, mx.array]:
    """All tensors of one file (header checked first); errors from MLX's reader name the file."""
    if infos is None:
        infos, _ = read_header(path)
    try:
        arrays = mx.load(str(path), format="safetensors")
    except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
        raise LoadError(path, f"corrupt safetensors: {e}") from None
    missing = set(infos) - set(arrays)
    if missing:
        raise LoadError(path, f"corrupt safetensors: tensors {sorted(missing)[:5]} could not be read")
    return arrays
