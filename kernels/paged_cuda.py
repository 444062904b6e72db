"""Paged attention decode on CUDA (one query token per sequence) over bf16/fp16, q8 or q4 KV blocks.

Split-K ("flash decoding"): block (part, kv_head, seq) takes PART consecutive tokens of one sequence
and all G = Hq/Hkv query heads that share the KV head, so each K/V row is read once for the group.
  phase 1  one thread per token: slot from the block table, dot of the K row (16-byte loads,
           dequantized on the fly for q8/q4: scale * sum(q*k_q) + bias * sum(q) per group) with
           the G scaled query rows held in shared memory; scores to shared memory;
  phase 2  per-head max and exp-sum over the part (warp shuffles + shared memory);
  phase 3  V: D/8 lanes per token, 8 values (16 bytes at bf16) per lane, tokens strided over the
           block; partial outputs reduced by shuffles and shared memory;
  output   unnormalised partial o [B, Hq, P, D] fp32 with its max m and sum l [B, Hq, P];
a second kernel merges the P parts: out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p.
Sliding window: a sequence attends to keys [max(0, ctx - window), ctx).
This is v1. `plan` / `paged_decode` route bf16/fp16 KV to v2 (kernels/paged_v2_cuda.py: one launch, K and
V rows loaded together, the last part merges) and keep v1 for q8/q4 KV and G > 8 (see _use_v2).
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

from . import backend
from . import paged_v2_cuda as v2
from .cuda_common import HEADER as COMMON
from .paged_v1_source import HEADER, SOURCE_COMBINE, SOURCE_F, SOURCE_Q  # HEADER / SOURCE_*: re-exported

THREADS = 128
SMEM_LIMIT = 48 * 1024

_kernels: dict[str, object] = {}


def _get(name: str):
    if name not in _kernels:
        hdr = COMMON + HEADER
        if name == "f":
            k = backend.cuda_kernel(name="jang_paged_decode_f",
                                    input_names=["q", "k", "v", "tables", "lens", "scale"],
                                    output_names=["po", "pm", "pl"], source=SOURCE_F, header=hdr)
        elif name == "q":
            k = backend.cuda_kernel(name="jang_paged_decode_q",
                                    input_names=["q", "kq", "ks", "kb", "vq", "vs", "vb", "tables",
                                                 "lens", "scale"],
                                    output_names=["po", "pm", "pl"], source=SOURCE_Q, header=hdr)
        else:
            k = backend.cuda_kernel(name="jang_paged_combine", input_names=["po", "pm", "pl"],
                                    output_names=["out"], source=SOURCE_COMBINE, header=hdr)
        _kernels[name] = k
    return _kernels[name]


def pick_part(g: int, d: int, quant: bool) -> int | None:
    """Largest tokens-per-part whose shared memory fits the static 48 KB limit."""
    for part in (512, 256, 128):
        words = g * d + (g * (d // 32) if quant else g) + g * part + 4 * g + 4 * g * d
        if 4 * words <= SMEM_LIMIT:
            return part
    return None


# Blocks wanted per launch before the parts get smaller (two per SM on a 132-SM H100): at batch 1
# one 512-token part per KV head is 8 blocks, and the decode ran ~24 us whatever the context.
MIN_BLOCKS = 264
MIN_PART = 32


def occupancy_part(max_part: int, batch: int, hkv: int, span: int) -> int:
    """Halve tokens-per-part (down to MIN_PART) while the launch has fewer than MIN_BLOCKS blocks."""
    part = max_part
    while part > MIN_PART and batch * hkv * math.ceil(span / part) < MIN_BLOCKS:
        part //= 2
    return part


_scales: dict[float, mx.array] = {}


def supports(q: mx.array, head_dim: int, g: int, bits: int, kv_group: int) -> bool:
    if q.dtype not in (mx.bfloat16, mx.float16) or head_dim not in (64, 128, 256):
        return False
    if bits < 16 and (kv_group not in (32, 64) or head_dim % kv_group):
        return False
    return pick_part(g, head_dim, bits < 16) is not None


def plan(q, k_pool, block_tables, context_lens, scale, window, bits, kv_group):
    """A callable f(q, k_pool, v_pool) -> out with every launch argument of this step computed once:
    the engine calls it for each layer (same shapes, tables and lengths)."""
    B, HQ, D = q.shape
    shp = (k_pool[0] if bits < 16 else k_pool).shape
    bs, hkv = shp[1], shp[2]
    G = HQ // hkv
    if _use_v2(D, G, bits, None):
        return _plan_v2(q, shp, block_tables, context_lens, scale, window, bits, kv_group, None)
    span = block_tables.shape[1] * bs
    if window:
        span = min(span, window)
    part = occupancy_part(pick_part(G, D, bits < 16), B, hkv, span)
    nparts = max(1, math.ceil(span / part))
    scale_arr = _scale_array(scale)
    tables, lens = block_tables.astype(mx.int32), context_lens.astype(mx.int32)
    tmpl = [("T", q.dtype), ("BITS", bits), ("KG", kv_group if bits < 16 else 32), ("D", D), ("G", G),
            ("PART", part), ("WINDOW", int(window or 0))]
    kern, comb = _get("q" if bits < 16 else "f"), _get("c")
    grid, tg = (nparts * THREADS, hkv, B), (THREADS, 1, 1)
    shapes, f32 = [(B, HQ, nparts, D), (B, HQ, nparts), (B, HQ, nparts)], [mx.float32] * 3
    ctmpl, cgrid, cshape, cdt = [("T", q.dtype), ("D", D)], (B * HQ * THREADS, 1, 1), [(B, HQ, D)], [q.dtype]
    tail = [tables, lens, scale_arr]

    def run(q, k_pool, v_pool):
        inputs = [q, *k_pool, *v_pool, *tail] if bits < 16 else [q, k_pool, v_pool, *tail]
        po, pm, pl = kern(inputs=inputs, template=tmpl, grid=grid, threadgroup=tg, output_shapes=shapes,
                          output_dtypes=f32)
        return comb(inputs=[po, pm, pl], template=ctmpl, grid=cgrid, threadgroup=tg, output_shapes=cshape,
                    output_dtypes=cdt)[0]
    return run


# Routing (H100, bench/results/kernels-paged-small-h100.json, queued): v2 (kernels/paged_v2_cuda.py, one
# launch, 512-token parts) for bf16/fp16 KV where it supports the shape (batch 1: 19 / 20 / 26 us per layer
# at 140 / 1,024 / 4,096 tokens vs v1's 28 / 34 / 33; at 16,384 43-49 vs 41, and batch 8 x 4,096 68-76 vs 68:
# even within noise; 64 x 2,048: 257 vs 267 us); v1 for q8/q4 KV (64 x 2,048: v1 245 / 196 us, v2 305 / 296).
# JANG_PAGED_V2=1: v2 wherever it supports the shape; JANG_PAGED_V2=0: v1 everywhere.
V2_MODE = os.environ.get("JANG_PAGED_V2", "auto")


def _use_v2(d: int, g: int, bits: int, impl: str | None) -> bool:
    if impl == "v2" and not v2.supports(d, g):
        raise ValueError(f"paged_decode: v2 supports head_dim 64/128/256 and G <= {v2.MAX_G}, got {d} / {g}")
    if impl is not None:
        return impl == "v2"
    if V2_MODE == "0" or not v2.supports(d, g):
        return False
    return V2_MODE == "1" or bits == 16


def _scale_array(scale):
    arr = _scales.get(scale)
    if arr is None:  # one array per scale value, not one per call; a view of 16 bytes: MLX keeps arrays of
        # <= 8 bytes in a managed pool that kernels read slowly (bench/results/small-pool-h100.json)
        arr = _scales[scale] = mx.array([scale, 0.0, 0.0, 0.0], dtype=mx.float32)[:1]
    return arr


def _plan_v2(q, pool_shape, block_tables, context_lens, scale, window, bits, kv_group, part):
    B, HQ, D = q.shape
    top = pick_part(HQ // pool_shape[2], D, bits < 16)
    launch = v2.launcher(q.shape, q.dtype, pool_shape, block_tables.shape[1], window, bits, kv_group,
                         part=part, max_part=top)
    tail = [block_tables.astype(mx.int32), context_lens.astype(mx.int32), _scale_array(scale)]

    def run(q, k_pool, v_pool):
        return launch([q, *k_pool, *v_pool, *tail] if bits < 16 else [q, k_pool, v_pool, *tail])
    run.part, run.nparts = launch.part, launch.nparts
    return run


def paged_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window, bits, kv_group,
                 part: int | None = None, impl: str | None = None):
    """q [B, Hq, D]; pools as in the layout (tuples (packed, scales, biases) when bits < 16).
    impl: None (the routing above), "v1" (split-K + merge kernel) or "v2" (one launch)."""
    B, HQ, D = q.shape
    if bits < 16:
        kq, ks, kb = k_pool
        vq, vs, vb = v_pool
        bs, hkv = kq.shape[1], kq.shape[2]
    else:
        bs, hkv = k_pool.shape[1], k_pool.shape[2]
    G = HQ // hkv
    if _use_v2(D, G, bits, impl):
        shp = (kq if bits < 16 else k_pool).shape
        return _plan_v2(q, shp, block_tables, context_lens, scale, window, bits, kv_group, part)(q, k_pool, v_pool)
    span = block_tables.shape[1] * bs
    if window:
        span = min(span, window)
    part = part or occupancy_part(pick_part(G, D, bits < 16), B, hkv, span)
    nparts = max(1, math.ceil(span / part))
    scale_arr = _scale_array(scale)
    tables = block_tables.astype(mx.int32)
    lens = context_lens.astype(mx.int32)
    tmpl = [("T", q.dtype), ("BITS", bits), ("KG", kv_group if bits < 16 else 32), ("D", D), ("G", G),
            ("PART", part), ("WINDOW", int(window or 0))]
    if bits < 16:
        inputs = [q, kq, ks, kb, vq, vs, vb, tables, lens, scale_arr]
        kern = _get("q")
    else:
        inputs = [q, k_pool, v_pool, tables, lens, scale_arr]
        kern = _get("f")
    po, pm, pl = kern(
        inputs=inputs, template=tmpl,
        grid=(nparts * THREADS, hkv, B), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, HQ, nparts, D), (B, HQ, nparts), (B, HQ, nparts)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return _get("c")(
        inputs=[po, pm, pl], template=[("T", q.dtype), ("D", D)],
        grid=(B * HQ * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, HQ, D)], output_dtypes=[q.dtype],
    )[0]
