"""Paged attention decode and the KV write, over the pool layout shared with the engine.

Pools, one per layer: a plain array [num_blocks, block_size, Hkv, D] in the model dtype, or for
quantized KV a tuple (packed uint32 [nb, bs, Hkv, D*bits/32], scales, biases [nb, bs, Hkv, D/group])
quantized along D with MLX's affine scheme. `kv_quant` is None or (bits, group). A slot is
block * block_size + offset.

  paged_attention_decode(q [B, Hq, D], k_pool, v_pool, block_tables int32 [B, max_blocks],
                         context_lens [B], scale, window=None, kv_quant=None) -> [B, Hq, D]
      one query token per sequence (the newest, at position context_lens[b] - 1) against that
      sequence's first context_lens[b] keys (the last `window` of them with a sliding window).
  write_kv(k_pool, v_pool, k [T, Hkv, D], v, slot_mapping [T], kv_quant=None) -> (k_pool, v_pool)
      quantizes (if asked) and scatters new keys and values into their slots. MLX updates the
      pool in place when the old pool array has no other reference: assign the result back.
"""

from __future__ import annotations

import mlx.core as mx

from . import backend


def _as_array(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)


def _pool_shape(pool):
    return (pool[0] if isinstance(pool, tuple) else pool).shape


def _gather(pool, blocks, kv_quant, dtype):
    """Dense KV for block ids [B, n] -> [B, n*block_size, Hkv, D] in dtype."""
    if kv_quant is None:
        g = pool[blocks]
    else:
        bits, group = kv_quant
        packed, scales, biases = (p[blocks] for p in pool)
        # scales/biases in the compute dtype, as the engine's reference (and the CUDA kernel, which
        # works in fp32): dequantizing with float16 ones would round the values to float16 too
        g = mx.dequantize(packed, scales.astype(dtype), biases.astype(dtype), group_size=group, bits=bits)
    b, n, bs = g.shape[:3]
    return g.reshape(b, n * bs, *g.shape[3:]).astype(dtype)


def paged_decode_reference(q, k_pool, v_pool, block_tables, context_lens, scale, window=None, kv_quant=None):
    """Gather every sequence's blocks, mask past its length (and outside the window), then SDPA."""
    b = q.shape[0]
    bs = _pool_shape(k_pool)[1]
    bt = _as_array(block_tables).astype(mx.int32)
    k = _gather(k_pool, bt, kv_quant, q.dtype).transpose(0, 2, 1, 3)     # [B, Hkv, L, D]
    v = _gather(v_pool, bt, kv_quant, q.dtype).transpose(0, 2, 1, 3)
    ctx = _as_array(context_lens).astype(mx.int32)[:, None]
    kpos = mx.arange(bt.shape[1] * bs)[None, :]
    mask = kpos < ctx
    if window:
        mask = mask & (kpos >= ctx - window)
    out = mx.fast.scaled_dot_product_attention(q[:, :, None, :], k, v, scale=scale,
                                               mask=mask.reshape(b, 1, 1, -1))
    # A sequence with no keys attends to nothing: zeros (SDPA over an all-masked row gives NaN).
    return mx.where(ctx[:, :, None] > 0, out[:, :, 0, :], 0).astype(q.dtype)


def _check(q, k_pool, v_pool, block_tables, kv_quant):
    if q.ndim != 3:
        raise ValueError(f"paged_attention_decode: q must be [B, Hq, D], got {tuple(q.shape)}")
    if kv_quant is None:
        if isinstance(k_pool, tuple) or isinstance(v_pool, tuple):
            raise ValueError("paged_attention_decode: quantized (tuple) pools need kv_quant=(bits, group)")
    else:
        if not (isinstance(k_pool, tuple) and len(k_pool) == 3 and isinstance(v_pool, tuple) and len(v_pool) == 3):
            raise ValueError("paged_attention_decode: kv_quant pools must be (packed, scales, biases) tuples")
        if kv_quant[0] not in (4, 8):
            raise ValueError(f"paged_attention_decode: KV bits must be 4 or 8, got {kv_quant[0]}")
    shp = _pool_shape(k_pool)
    if len(shp) != 4:
        raise ValueError(f"paged_attention_decode: pool must be [blocks, block_size, Hkv, *], got {shp}")
    if q.shape[1] % shp[2]:
        raise ValueError(f"paged_attention_decode: {q.shape[1]} query heads is not a multiple of {shp[2]} KV heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"paged_attention_decode: block_tables must be [B={q.shape[0]}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")


def paged_attention_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window=None, kv_quant=None):
    block_tables = _as_array(block_tables)
    context_lens = _as_array(context_lens)
    k_pool = tuple(k_pool) if isinstance(k_pool, list) else k_pool
    v_pool = tuple(v_pool) if isinstance(v_pool, list) else v_pool
    _check(q, k_pool, v_pool, block_tables, kv_quant)
    b = backend.for_op("paged")
    if b != "reference":
        d = q.shape[-1]
        hkv = _pool_shape(k_pool)[2]
        g = q.shape[1] // hkv
        bits = 16 if kv_quant is None else kv_quant[0]
        group = 32 if kv_quant is None else kv_quant[1]
        dtypes_ok = (k_pool.dtype == q.dtype) if kv_quant is None else (k_pool[1].dtype == q.dtype)
        if b == "cuda":
            from . import paged_cuda as impl
        else:
            from . import paged_metal as impl
        if dtypes_ok and impl.supports(q, d, g, bits, group) and (b == "cuda" or impl.ready()):
            return impl.paged_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window, bits, group)
    return paged_decode_reference(q, k_pool, v_pool, block_tables, context_lens, scale, window, kv_quant)


def paged_decode_plan(q, k_pool, v_pool, block_tables, context_lens, scale, window=None, kv_quant=None):
    """paged_attention_decode for one step of many layers: checks the arguments and picks the
    implementation once, and returns f(q, k_pool, v_pool) -> out for every layer whose q and pools
    have these shapes and dtypes (the block tables, lengths, scale and window are fixed here).
    On CUDA the launch arguments are computed once too (~0.1 ms of Python per step per 32 layers)."""
    block_tables = _as_array(block_tables)
    context_lens = _as_array(context_lens)
    k_pool = tuple(k_pool) if isinstance(k_pool, list) else k_pool
    v_pool = tuple(v_pool) if isinstance(v_pool, list) else v_pool
    _check(q, k_pool, v_pool, block_tables, kv_quant)
    if backend.for_op("paged") == "cuda":
        from . import paged_cuda

        d, hkv = q.shape[-1], _pool_shape(k_pool)[2]
        bits = 16 if kv_quant is None else kv_quant[0]
        group = 32 if kv_quant is None else kv_quant[1]
        dtypes_ok = (k_pool.dtype == q.dtype) if kv_quant is None else (k_pool[1].dtype == q.dtype)
        if dtypes_ok and paged_cuda.supports(q, d, q.shape[1] // hkv, bits, group):
            return paged_cuda.plan(q, k_pool, block_tables, context_lens, scale, window, bits, group)
    return lambda q, kp, vp: paged_attention_decode(q, kp, vp, block_tables, context_lens, scale, window, kv_quant)


def _write(pool, x, slots, kv_quant):
    if kv_quant is None:
        nb, bs = pool.shape[:2]
        flat = pool.reshape(nb * bs, *pool.shape[2:])
        flat[slots] = x.astype(pool.dtype)
        return flat.reshape(pool.shape)
    bits, group = kv_quant
    parts = mx.quantize(x, group_size=group, bits=bits)
    out = []
    for p, new in zip(pool, parts):
        nb, bs = p.shape[:2]
        flat = p.reshape(nb * bs, *p.shape[2:])
        flat[slots] = new.astype(p.dtype)
        out.append(flat.reshape(p.shape))
    return tuple(out)


def write_kv(k_pool, v_pool, k: mx.array, v: mx.array, slot_mapping, kv_quant=None):
    """Quantize (q8/q4) and scatter new K/V [T, Hkv, D] into their slots; returns the new pools.

    The same MLX ops on every backend: a scatter of T rows is far below a microsecond of memory
    traffic, and a custom kernel could not update the pool in place (its outputs are fresh arrays)."""
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv: k and v must be the same [T, Hkv, D], got {tuple(k.shape)} / {tuple(v.shape)}")
    slots = _as_array(slot_mapping).astype(mx.int32)
    if slots.shape != (k.shape[0],):
        raise ValueError(f"write_kv: slot_mapping must hold {k.shape[0]} slots, got {tuple(slots.shape)}")
    return _write(k_pool, k, slots, kv_quant), _write(v_pool, v, slots, kv_quant)
