"""Reference paged attention in MLX ops: the specification the CUDA/Metal kernels must match.

    write_kv(k_pool, v_pool, k, v, slot_mapping, kv_quant) -> (k_pool, v_pool)
    paged_attention(q, k_pool, v_pool, block_tables, context_lens, query_lens, scale, window, kv_quant)

Pools follow engine/kv_pool.py: a plain array [num_blocks, block_size, Hkv, D], or for quantized
KV a tuple (packed uint32, scales, biases) quantized along D. `kv_quant` is None or (bits, group).
The flat batch holds sequence i's `query_lens[i]` new tokens; its KV holds `context_lens[i]` tokens
(new ones included, already written), found through `block_tables[i]` (int32 [B, max_blocks],
unused entries may hold any valid block id). Query j of sequence i sits at absolute position
context_lens[i] - query_lens[i] + j and sees keys at positions <= its own (and > pos - window).
"""

from __future__ import annotations

import mlx.core as mx

from jang_serve.kernels import paged_attention_decode
from jang_serve.kernels.kv_write import kv_write_inplace
from jang_serve.kernels.paged import paged_decode_plan

from .attention import StepLayout, attend_one
from .paged_prefill import PaddedPrefill, worth_batching
from .paged_prefill import enabled as padded_prefill_enabled


def write_kv(k_pool, v_pool, k: mx.array, v: mx.array, slot_mapping, kv_quant=None):
    """Store new keys/values [T, Hkv, D] at their slots (block * block_size + offset). slot_mapping:
    the slots [T], or the pair (block ids [T], offsets [T]) (`slot_parts`: one scatter node per pool
    instead of a scatter between two reshapes, which a decode step repeats for every layer).

    The scatter updates the pool in place when the pool array has no other reference, so callers
    should drop their old handle (assign the returned pools back)."""
    return _write(k_pool, k, slot_mapping, kv_quant), _write(v_pool, v, slot_mapping, kv_quant)


def write_kv_before(q, k_pool, v_pool, k, v, slots: tuple, kv_quant=None):
    """write_kv for a layer whose attention reads the pools only in ops that take `q` (the paged decode
    kernel; not the prefill paths, which gather K/V without q): returns (q, k_pool, v_pool).
    With plain 16-bit pools on CUDA one kernel writes K and V in place and passes q through, so the
    attention that takes the returned q runs after the write (kernels/kv_write.py)."""
    if kv_quant is None:
        return kv_write_inplace(k_pool, v_pool, k, v, *slots, q)
    return (q, *write_kv(k_pool, v_pool, k, v, slots, kv_quant))


def slot_parts(slot_mapping: mx.array, block_size: int) -> tuple[mx.array, mx.array]:
    return slot_mapping // block_size, slot_mapping % block_size


def _put(p, slots, new):
    if isinstance(slots, tuple):
        blk, off = slots
        p[blk, off] = new.astype(p.dtype)
        return p
    nb, bs = p.shape[:2]
    flat = p.reshape(nb * bs, *p.shape[2:])
    flat[slots] = new.astype(p.dtype)
    return flat.reshape(p.shape)


def _write(pool, x, slots, kv_quant):
    if kv_quant is None:
        return _put(pool, slots, x)
    bits, group = kv_quant
    parts = mx.quantize(x, group_size=group, bits=bits)
    return tuple(_put(p, slots, new) for p, new in zip(pool, parts))


def gather_kv(pool, blocks: mx.array, kv_quant, dtype) -> mx.array:
    """Dense KV of the given blocks: blocks [..., n] -> [..., n * block_size, Hkv, D] in `dtype`."""
    if kv_quant is None:
        g = pool[blocks]
    else:
        bits, group = kv_quant
        packed, scales, biases = (p[blocks] for p in pool)
        # Scales/biases in the compute dtype: with float16 ones the dequantized values would be
        # rounded to float16 too (costs ~1% perplexity at q4 for a float32 model).
        g = mx.dequantize(packed, scales.astype(dtype), biases.astype(dtype), group_size=group, bits=bits)
    shape = g.shape
    return g.reshape(*shape[:-4], shape[-4] * shape[-3], *shape[-2:]).astype(dtype)


def paged_attention(q: mx.array, k_pool, v_pool, block_tables: mx.array, context_lens: list[int],
                    query_lens: list[int], scale: float, window: int | None = None, kv_quant=None,
                    context_lens_arr: mx.array | None = None, prefill_plans: dict | None = None,
                    batch_prefill: bool = True) -> mx.array:
    """q [T, Hq, D] -> [T, Hq, D]. Runs of single-token (decode) sequences go to the paged decode
    kernel together; runs of multi-token (prefill) sequences are padded into one masked attention
    when that wastes little (engine/paged_prefill.py), else attend one at a time with a causal mask.
    `context_lens_arr` is context_lens as an int32 array, built once per step by the caller;
    `prefill_plans` (a dict the caller keeps for the step) caches the padded layouts across layers;
    `batch_prefill=False` attends every prefill sequence on its own."""
    if context_lens_arr is None:
        context_lens_arr = mx.array(context_lens, dtype=mx.int32)
    if q.shape[0] == len(query_lens) and all(n == 1 for n in query_lens):  # pure decode: no slicing
        return paged_attention_decode(q, k_pool, v_pool, block_tables, context_lens_arr, scale, window, kv_quant)
    bs = (k_pool[0] if isinstance(k_pool, tuple) else k_pool).shape[1]
    outs, start, i, n = [], 0, 0, len(query_lens)
    while i < n:
        if query_lens[i] == 0:
            i += 1
            continue
        if query_lens[i] == 1:
            j = i
            while j < n and query_lens[j] == 1:
                j += 1
            # kernels.paged_attention_decode: the CUDA/Metal kernel on a GPU, else its pure-MLX reference
            outs.append(paged_attention_decode(q[start:start + j - i], k_pool, v_pool, block_tables[i:j],
                                               context_lens_arr[i:j], scale, window, kv_quant))
            start += j - i
            i = j
            continue
        j = i
        while j < n and query_lens[j] > 1:
            j += 1
        key = (i, j, window)
        if prefill_plans is not None and key in prefill_plans:  # decided by an earlier layer of the step
            plan = prefill_plans[key]
        else:
            plan = None
            if batch_prefill and worth_batching(query_lens[i:j], context_lens[i:j], bs):
                plan = PaddedPrefill(start, query_lens[i:j], context_lens[i:j], block_tables[i:j], bs, window)
            if prefill_plans is not None:
                prefill_plans[key] = plan
        if plan is not None:
            outs.append(plan.attend(q, k_pool, v_pool, scale, kv_quant, gather_kv))
            start += sum(query_lens[i:j])
            i = j
            continue
        t, ctx = query_lens[i], context_lens[i]
        nblk = -(-ctx // bs)
        k = gather_kv(k_pool, block_tables[i, :nblk], kv_quant, q.dtype)[:ctx]
        v = gather_kv(v_pool, block_tables[i, :nblk], kv_quant, q.dtype)[:ctx]
        outs.append(attend_one(q[start:start + t], k, v, scale, window))
        start += t
        i += 1
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


class PagedBackend:
    """AttentionBackend over a KVPool for one step: writes each layer's new K/V at `slot_mapping`,
    then attends through the block tables. With quantized KV and a pool transform
    (engine/kv_transform.py), q/k/v go through that exact change of basis first."""

    def __init__(self, pool, slot_mapping: mx.array, block_tables: mx.array, query_lens: list[int],
                 context_lens: list[int], aux=None):
        """aux: the step's context lengths and (block, offset) slots as arrays (engine/step_arrays.StepAux),
        else made here."""
        self.pool = pool
        self.layout = StepLayout(list(query_lens), list(context_lens))
        # once per step, not per layer
        self.context_lens_arr = aux.lens if aux is not None else mx.array(self.layout.context_lens, dtype=mx.int32)
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.decode_only = bool(query_lens) and all(n == 1 for n in self.layout.query_lens)
        self._slots = (aux.blocks, aux.offsets) if aux is not None else None
        self._plans: dict = {}
        self._prefill_plans: dict = {}  # padded prefill layouts of this step (or None: one by one), all layers
        self.batch_prefill = not self.decode_only and padded_prefill_enabled()

    @property
    def slots(self):
        """(block ids, offsets) of the new tokens, made once per step (write_kv)."""
        if self._slots is None:
            self._slots = slot_parts(self.slot_mapping, self.pool.block_size)
        return self._slots

    def attend(self, layer, q, k, v, *, scale, window=None):
        pool, tf = self.pool, self.pool.transform
        if tf is not None:  # quantized KV: store and attend in the smoothed, rotated basis
            q, k, v = tf.queries(layer, q), tf.keys(layer, k), tf.values(layer, v)
        if self.decode_only:  # the decode kernel reads the pools through q (kernels/kv_write.py)
            q, pool.k[layer], pool.v[layer] = write_kv_before(q, pool.k[layer], pool.v[layer], k, v, self.slots,
                                                              pool.kv_quant)
        else:  # prefill gathers K/V from the pools without q: a scatter, ordered by data
            pool.k[layer], pool.v[layer] = write_kv(pool.k[layer], pool.v[layer], k, v, self.slots, pool.kv_quant)
        if self.decode_only:  # one decode plan per (scale, window) for all layers of the step
            key = (scale, window, q.shape, q.dtype)
            run = self._plans.get(key)
            if run is None:
                run = self._plans[key] = paged_decode_plan(q, pool.k[layer], pool.v[layer], self.block_tables,
                                                           self.context_lens_arr, scale, window, pool.kv_quant)
            out = run(q, pool.k[layer], pool.v[layer])
        else:
            out = paged_attention(q, pool.k[layer], pool.v[layer], self.block_tables, self.layout.context_lens,
                                  self.layout.query_lens, scale, window, pool.kv_quant, self.context_lens_arr,
                                  self._prefill_plans, self.batch_prefill)
        return out if tf is None else tf.output(layer, out)
