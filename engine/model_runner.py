"""Turns a scheduled batch into one flat model call over the paged KV pool.

Flat batch: the new tokens of every scheduled sequence end to end, with absolute positions, the
pool slot of each token, padded block tables and context lengths. Only the rows of sequences that
finish their pending tokens this step (decodes and last prefill chunks) go through lm_head.
"""

from __future__ import annotations

import mlx.core as mx

from .kv_pool import KVPool
from .paged_attention import PagedBackend
from .sequence import Sequence
from .step_arrays import step_inputs


def table_width(blocks: int) -> int:
    """Block-table width for a step whose longest table has `blocks` entries: the next power of two up
    to 16, then the next multiple of 16 (padding entries point at block 0 and are never read). Compiled
    decode steps trace once per width, so the width changes every 16 blocks at most, not every block."""
    if blocks <= 16:
        return 1 << max(0, (blocks - 1).bit_length())
    return -(-blocks // 16) * 16


class ModelRunner:
    def __init__(self, model, pool: KVPool):
        self.model, self.pool = model, pool

    def prepare(self, seqs: list[Sequence], num_new: list[int]):
        """The flat batch: tokens, positions, slots, block tables [B, table_width(...)], the query and
        context lengths, the rows to sample, the step's other arrays (StepAux) and the sampled sequences'
        indices. The arrays are views of one device array (engine/step_arrays.py)."""
        bs = self.pool.block_size
        tokens, positions, slots, query_lens, context_lens, rows, sample_idx = [], [], [], [], [], [], []
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_computed
            tokens.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            bt = seq.block_table
            slots.extend(bt[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:
                rows.append(len(tokens) - 1)
                sample_idx.append(i)
        width = table_width(max(len(s.block_table) for s in seqs))
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        tok, pos, slot, tab, aux = step_inputs(tokens, positions, slots, tables, context_lens, rows, bs)
        return tok, pos, slot, tab, query_lens, context_lens, rows, aux, sample_idx

    def run(self, seqs: list[Sequence], num_new: list[int]) -> tuple[mx.array | None, list[int]]:
        """Compute the step. Returns (logits [S, V] float32 for the sampled sequences, their indices
        into `seqs`). Decode sequences are placed first so the attention batches them together."""
        order = sorted(range(len(seqs)), key=lambda i: num_new[i] != 1)
        seqs_o = [seqs[i] for i in order]
        new_o = [num_new[i] for i in order]
        *flat, sample_idx = self.prepare(seqs_o, new_o)
        return self.execute(*flat), [order[i] for i in sample_idx]

    def execute(self, tokens, positions, slots, tables, qlens, clens, rows, aux=None) -> mx.array | None:
        """The model call on a prepared flat batch (tensor-parallel followers replay rank 0's
        batches through this same function, without `aux`, so every rank evaluates the same collectives)."""
        backend = PagedBackend(self.pool, slots, tables, qlens, clens, aux)
        logits = None
        if rows:
            lrows = aux.rows if aux is not None else mx.array(rows, dtype=mx.int32)
            logits = self.model(tokens, positions, backend, logits_rows=lrows)
            logits = logits.astype(mx.float32)
            mx.eval(logits, self.pool.arrays())
        else:
            self.model(tokens, positions, backend, logits_rows=mx.array([0], dtype=mx.int32))
            mx.eval(self.pool.arrays())
        return logits
