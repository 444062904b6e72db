"""Loading only one rank's shard: tensors stay on disk until the sharding cuts them, then only the
rows / columns / groups / vocabulary slice this rank keeps is copied out of the file.

How (`engine.loader.load_model(path, shard=(rank, size))` drives it):
  1. every checkpoint tensor becomes a `DiskTensor` (file, offset, dtype, shape; nothing read);
     the model's `sanitize`, the quantization plan and the dtype cast see only names and shapes;
  2. each DiskTensor is stood in for by a lazy `mx.zeros` placeholder (never evaluated, no memory),
     so `model.load_weights(strict=True)` checks every name and shape as for a full load;
  3. `shard_model` cuts the model as usual; its slicing goes through `take`, which for a
     placeholder reads just that slice from the memory-mapped file (quantized tensors are cut on
     group boundaries, so the slice is whole packed words); every parameter it did not cut (norms,
     routers, o_proj / down_proj biases) is read whole at the end (`materialize_rest`).
Peak memory is this rank's shard plus one slice in flight; `bytes_read()` counts what was copied
out of the files. `sanitize` runs on index probes (`sanitize_lazy`), so per-expert checkpoint
tensors it stacks become a `StackedTensor` of DiskTensors, read by slice too.
"""

from __future__ import annotations

import copy
import logging
import math
import threading

import mlx.core as mx
import numpy as np

from jang_serve.engine.loader.safetensors_io import _DTYPES, TensorInfo, read_tensor

log = logging.getLogger("jang_serve.engine.tp")

_MX = {"F64": mx.float32, "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "I64": mx.int64,
       "I32": mx.int32, "I16": mx.int16, "I8": mx.int8, "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16,
       "U8": mx.uint8, "BOOL": mx.bool_}
_local = threading.local()
_counter_lock = threading.Lock()
_bytes_read = [0]


def bytes_read() -> int:
    """Bytes copied out of checkpoint files by DiskTensor.read() in this process so far."""
    return _bytes_read[0]


class LazyTensor:
    """A tensor not yet in memory: `[a:b]` slicing and `astype` are recorded as a window and a
    cast; `read()` materialises only the window (`_read()` of a subclass)."""

    def __init__(self, shape: tuple[int, ...], window: tuple[tuple[int, int], ...] | None = None, cast=None):
        self.full_shape, self.cast = tuple(shape), cast
        self.window = window if window is not None else tuple((0, n) for n in self.full_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.window)

    @property
    def ndim(self) -> int:
        return len(self.window)

    @property
    def dtype(self):
        return self.cast if self.cast is not None else self.stored_dtype

    def _copy(self, window, cast) -> "LazyTensor":
        out = copy.copy(self)
        out.window, out.cast = window, cast
        return out

    def astype(self, dtype) -> "LazyTensor":
        return self._copy(self.window, dtype)

    def __getitem__(self, idx) -> "LazyTensor":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim:
            raise IndexError(f"{len(idx)} indices for a {self.ndim}-d tensor {self.name}")
        win = list(self.window)
        for ax, s in enumerate(idx):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise TypeError(f"lazy tensor {self.name}: only [a:b] slices are supported, got {s!r}")
            a, b = win[ax]
            start, stop, _ = s.indices(b - a)
            win[ax] = (a + start, a + max(start, stop))
        return self._copy(tuple(win), self.cast)

    def read(self) -> mx.array:
        a = self._read()
        if a.dtype != self.dtype:  # a recorded cast (or F64 on disk, held as float32)
            a = a.astype(self.dtype)
        mx.eval(a)
        return a


class DiskTensor(LazyTensor):
    """A window of a safetensors tensor on disk; `read()` copies only the window's bytes out of a
    memory map of the file."""

    def __init__(self, info: TensorInfo):
        super().__init__(info.shape)
        self.info, self.name, self.stored_dtype = info, info.name, _MX[info.dtype]

    def _read(self) -> mx.array:
        np_dtype, view = _DTYPES[self.info.dtype]
        n = math.prod(self.shape)
        if n == 0:
            return mx.zeros(self.shape, self.stored_dtype)
        if not self.info.shape:
            return read_tensor(self.info)
        mm = np.memmap(self.info.file, dtype=np_dtype, mode="r", offset=self.info.begin, shape=self.info.shape)
        part = np.ascontiguousarray(mm[tuple(slice(a, b) for a, b in self.window)])
        del mm
        with _counter_lock:
            _bytes_read[0] += part.nbytes
        a = mx.array(part)
        return a.view(view) if view is not None else a


class StackedTensor(LazyTensor):
    """Tensors of one shape stacked along a new first axis (per-expert checkpoint tensors that
    `sanitize` stacks): `read()` reads the window of each part it covers, then stacks."""

    def __init__(self, parts: list[LazyTensor]):
        super().__init__((len(parts), *parts[0].shape))
        self.parts, self.stored_dtype = parts, parts[0].dtype
        self.name = f"stack of {parts[0].name} and {len(parts) - 1} more"

    def _read(self) -> mx.array:
        (e0, e1), rest = self.window[0], tuple(slice(a, b) for a, b in self.window[1:])
        return mx.stack([p[rest].read() for p in self.parts[e0:e1]])


def disk_weights(infos: dict[str, TensorInfo]) -> tuple[dict, dict]:
    """-> ({name: DiskTensor}, {name: file}) for a folder's tensors, reading nothing."""
    return {n: DiskTensor(i) for n, i in infos.items()}, {n: i.file for n, i in infos.items()}


_PROBE = (1.0, 0.0), (3.0, 1000003.0)  # two encodings of a tensor's index: value = a * index + b


def sanitize_lazy(model, weights: dict) -> dict:
    """`model.sanitize` for LazyTensors. sanitize renames, drops and stacks tensors (mx.stack), so it
    runs on probes: each tensor is a [1] array holding its index, under two encodings; what comes
    out says, per output name, which input tensor (shape [1]) or which stack of them ([E, 1]) it
    is. A sanitize that does anything else to the values (the two encodings disagree, or a probe
    cannot be sliced) falls back to reading every tensor whole (a log line says so)."""
    names = list(weights)
    outs = []
    try:
        for a, b in _PROBE:
            outs.append(model.sanitize({k: mx.array([a * i + b], mx.float32) for i, k in enumerate(names)}))
        res = {}
        for k, v in outs[0].items():
            ids = np.array(v).reshape(-1)
            ids2 = (np.array(outs[1][k]).reshape(-1) - _PROBE[1][1]) / _PROBE[1][0]
            if v.shape not in ((1,), (ids.size, 1)) or not np.array_equal(ids, ids2) or \
                    np.any(ids != np.round(ids)) or ids.min() < 0 or ids.max() >= len(names):
                raise ValueError(f"sanitize changes the values of {k}")
            parts = [weights[names[int(i)]] for i in ids]
            res[k] = parts[0] if v.shape == (1,) else StackedTensor(parts)
        return res
    except (TypeError, ValueError, IndexError, KeyError) as e:
        log.info("shard-aware load: %s's sanitize needs the tensors themselves (%s): reading the "
                 "checkpoint whole, then cutting", type(model).__name__, e)
        return model.sanitize({k: v.read() if isinstance(v, LazyTensor) else v for k, v in weights.items()})


def take(a, *idx):
    """`a[idx]` as an array that owns its memory; for a placeholder, read only that slice from disk."""
    pending = getattr(_local, "pending", None)
    ent = pending.get(id(a)) if pending else None
    if ent is not None and ent[0] is a:
        return ent[1][idx].read()
    return mx.contiguous(a[idx])


def materialize_rest(model) -> None:
    """Read every parameter still standing in for a LazyTensor (the ones sharding kept whole)."""
    pending = getattr(_local, "pending", None)
    if not pending:
        return
    for _, m in model.named_modules():
        for k, v in list(m.items()):
            ent = pending.get(id(v)) if isinstance(v, mx.array) else None
            if ent is not None and ent[0] is v:
                m[k] = ent[1].read()


def load_sharded(model, weights: dict, rank: int, size: int) -> dict:
    """Load `weights` ({name: LazyTensor | mx.array}, sanitized and cast) into `model` cut down to
    `rank`'s shard of `size` (the collectives' group is attached later: `attach_group`)."""
    from mlx.utils import tree_flatten

    from .sharding import shard_model

    pending, items = {}, []
    for k, v in weights.items():
        if isinstance(v, LazyTensor):
            ph = mx.zeros(v.shape, v.dtype)  # lazy: never evaluated
            pending[id(ph)] = (ph, v)
            v = ph
        items.append((k, v))
    model.load_weights(items, strict=True)
    del items
    _local.pending = pending
    try:
        info = shard_model(model, None, rank, size)
        left = [k for k, v in tree_flatten(model.parameters()) if id(v) in pending and pending[id(v)][0] is v]
        if left:
            raise RuntimeError(f"shard-aware load left parameters unread: {left[:5]}")
    finally:
        _local.pending = None
    return info


def attach_group(model, group) -> None:
    """Point every all-summing / vocabulary-sharded module of a model cut with group=None at `group`."""
    from .experts import AllSumAfter
    from .sharding import VocabShardedEmbedding, VocabShardedHead, _AllSum

    for _, m in model.named_modules():
        if isinstance(m, (_AllSum, AllSumAfter, VocabShardedEmbedding, VocabShardedHead)):
            m.group = group
