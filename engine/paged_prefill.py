"""Several prefill sequences of one step attended in a single padded attention call.

Attending each multi-token sequence on its own costs ~10 MLX ops per sequence per layer (gather,
slice, transposes, attention): with 16 new prompts in a step that is thousands of ops, and on a GPU
each op costs microseconds of host dispatch. A `PaddedPrefill` lays a run of such sequences out as
one batch instead, padded to the longest query and the longest context:

    queries [S, Lq, Hq, D]   (taken from the flat batch; padding rows repeat a real row)
    keys    [S, Lk, Hkv, D]  (each sequence's blocks, gathered and dequantized in one op)
    mask    [S, 1, Lq, Lk]   (query j of sequence s at position ctx_s - q_s + j sees keys <= it,
                              and > position - window)

and takes the real rows back out. The index maps and the mask depend only on the step's layout, so
they are built once per step and reused by every layer. On by default on a GPU (`enabled`). Padding costs compute, so a run is only
batched while the padded score matrix stays within `MAX_WASTE` times the real one, or exceeds it by
at most `WASTE_FLOOR` entries (small prompts: a few wasted score entries cost far less than the ops
they save); otherwise the caller attends sequence by sequence.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

MAX_WASTE = 3.0          # padded (S * Lq * Lk) over real (sum q_s * ctx_s) score entries
WASTE_FLOOR = 1 << 18    # padded - real score entries (per head) that are always acceptable


def enabled() -> bool:
    """JANG_PADDED_PREFILL=1/0 forces it; by default on a GPU only. On the CPU an op costs little to
    dispatch and the padding's extra arithmetic does not pay: 16 prompts of 16-64 tokens through
    SmolLM2 took 2.65 s padded vs 2.51 s one by one, same tokens (bench/results/prefill-cpu-ab.json)."""
    env = os.environ.get("JANG_PADDED_PREFILL", "auto").strip().lower()
    if env in ("1", "on", "true"):
        return True
    if env in ("0", "off", "false"):
        return False
    return mx.default_device() != mx.cpu


def worth_batching(query_lens: list[int], context_lens: list[int], block_size: int) -> bool:
    """Whether padding these sequences into one call wastes at most MAX_WASTE of the work."""
    if len(query_lens) < 2:
        return False
    lq = max(query_lens)
    lk = max(-(-c // block_size) for c in context_lens) * block_size
    real = sum(q * c for q, c in zip(query_lens, context_lens))
    padded = len(query_lens) * lq * lk
    return padded <= MAX_WASTE * real or padded - real <= WASTE_FLOOR


class PaddedPrefill:
    """Sequences i..j-1 of the step (every one with >= 2 new tokens), starting at flat row `start`."""

    def __init__(self, start: int, query_lens: list[int], context_lens: list[int], block_tables: mx.array,
                 block_size: int, window: int | None):
        s = len(query_lens)
        self.lq = lq = max(query_lens)
        nblk = max(-(-c // block_size) for c in context_lens)
        lk = nblk * block_size
        q_index = np.empty((s, lq), dtype=np.int32)
        out_index, qpos = [], np.empty((s, lq), dtype=np.int32)
        row = start
        for i, (q, c) in enumerate(zip(query_lens, context_lens)):
            j = np.arange(lq)
            q_index[i] = row + np.minimum(j, q - 1)  # padding rows repeat the last real one
            qpos[i] = c - q + np.minimum(j, q - 1)
            out_index.extend(range(i * lq, i * lq + q))
            row += q
        self.q_index = mx.array(q_index.reshape(-1))
        self.out_index = mx.array(np.array(out_index, dtype=np.int32))
        self.tables = block_tables[:, :nblk]
        kpos = np.arange(lk, dtype=np.int32)[None, None, :]
        mask = kpos <= qpos[:, :, None]
        if window is not None:
            mask &= kpos > qpos[:, :, None] - window
        self.mask = mx.array(mask[:, None])  # [S, 1, Lq, Lk]
        self.num_seqs = s

    def attend(self, q: mx.array, k_pool, v_pool, scale: float, kv_quant, gather_kv) -> mx.array:
        """q: the whole flat batch [T, Hq, D]. Returns this run's rows [sum q_s, Hq, D]."""
        hq, d = q.shape[1:]
        qp = q[self.q_index].reshape(self.num_seqs, self.lq, hq, d).transpose(0, 2, 1, 3)
        kp = gather_kv(k_pool, self.tables, kv_quant, q.dtype).transpose(0, 2, 1, 3)
        vp = gather_kv(v_pool, self.tables, kv_quant, q.dtype).transpose(0, 2, 1, 3)
        out = mx.fast.scaled_dot_product_attention(qp, kp, vp, scale=scale, mask=self.mask)
        return out.transpose(0, 2, 1, 3).reshape(self.num_seqs * self.lq, hq, d)[self.out_index]
