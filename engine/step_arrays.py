"""A step's integer inputs as views of one array.

On CUDA, MLX 0.32 keeps every array of at most 8 bytes in a managed-memory pool that kernels read slowly
(one int32 position read by each block of the q/k/v + RoPE GEMV cost ~12 us per layer at batch 1), and a
buffer the host has just filled is moved to the GPU on its first touch there (~150 us per step, paid by
the first kernel that reads it; bench/results/small-pool-h100.json). So the host writes all of a step's
int32 inputs (tokens, positions, slots, block tables, context lengths, block ids and offsets of the new
tokens, the rows that go through lm_head) into one buffer, makes one array of it, and hands out views:
one migration per step, and no input in the small pool. Views share the buffer; MLX copies nothing.
On CUDA the buffer's migration is started as soon as it is made (kernels/prefetch.py), while the GPU is still
busy with the step before, instead of when the step's first kernel touches it.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from jang_serve.kernels import prefetch

MIN_ENTRIES = 4      # 16 bytes: past MLX's small-allocation size (8 bytes)


class StepAux(NamedTuple):
    """Per-step arrays the attention backend would otherwise build itself (views of the step's buffer)."""
    lens: mx.array                  # context lengths [B]
    blocks: mx.array                # block id of each new token [T]
    offsets: mx.array               # offset in its block [T]
    rows: mx.array | None           # flat rows that go through lm_head, or None when there are none


def pack(parts: dict[str, np.ndarray]) -> dict[str, mx.array]:
    """{name: int32 array of any shape} -> {name: view of one int32 mx.array, same shape}."""
    flat = [np.asarray(a, dtype=np.int32).reshape(-1) for a in parts.values()]
    total = sum(a.size for a in flat)
    buf = np.zeros(max(total, MIN_ENTRIES), dtype=np.int32)
    if total:
        buf[:total] = np.concatenate(flat)
    arr = mx.array(buf)
    prefetch.to_gpu(arr)
    out, start = {}, 0
    for (name, a), f in zip(parts.items(), flat):
        out[name] = arr[start:start + f.size].reshape(np.shape(a))
        start += f.size
    return out


def step_inputs(tokens, positions, slots, tables, context_lens, rows, block_size: int):
    """(tokens, positions, slots, tables, StepAux) of a flat batch, all views of one array."""
    slots = np.asarray(slots, dtype=np.int32)
    parts = dict(tokens=tokens, positions=positions, slots=slots, tables=np.asarray(tables, dtype=np.int32),
                 lens=context_lens, blocks=slots // block_size, offsets=slots % block_size, rows=rows)
    v = pack(parts)
    aux = StepAux(v["lens"], v["blocks"], v["offsets"], v["rows"] if len(rows) else None)
    return v["tokens"], v["positions"], v["slots"], v["tables"], aux
