"""JIT-compile every kernel variant a model will use before the server reports healthy.

On CUDA each distinct template (dtype, bits, group size, row bucket, launch shape; for attention:
heads per KV head, head dim, KV bits, window) is one NVRTC compile of a few seconds, so the first
request would otherwise pay them all. A variant's template does not depend on N or K, so warm-up
runs each one on tiny dummy inputs. MLX's own quantized_matmul kernels (where ours do not serve) are
compiled the same way. Compiled PTX of MLX's kernels is cached on disk (MLX_PTX_CACHE_DIR).

    shapes = qmm_shapes(model) + [dict(op="paged", heads=32, kv_heads=8, head_dim=128,
                                       kv_quant=(8, 64), window=None)]
    warmup(shapes, dtype=mx.bfloat16)
"""

from __future__ import annotations

import time

import mlx.core as mx

from . import backend


def qmm_shapes(module) -> list[dict]:
    """One qmm entry per distinct (bits, group_size, N>=8192) among a module tree's quantized linears
    (anything with a uint32 `weight`, `scales`, `biases`, `bits` and `group_size`); stacked expert
    weights ([E, N, packed K], the MoE switch layers) give op="gather_qmm" entries, one per shape."""
    seen, out = set(), []
    for _, m in module.named_modules() if hasattr(module, "named_modules") else []:
        w = getattr(m, "weight", None)
        if not (isinstance(w, mx.array) and w.dtype == mx.uint32 and hasattr(m, "scales")
                and hasattr(m, "bits") and hasattr(m, "group_size")):
            continue
        n, k = w.shape[-2], w.shape[-1] * 32 // m.bits
        op = "gather_qmm" if w.ndim == 3 else "qmm"     # stacked experts [E, N, packed K]
        key = (op, m.bits, m.group_size, n >= 8192, k % 128 == 0) + ((n, k) if w.ndim == 3 else ())
        if key not in seen:
            seen.add(key)
            out.append(dict(op=op, n=n, k=k, bits=m.bits, group_size=m.group_size,
                            scale_dtype=m.scales.dtype, **({"experts": w.shape[0]} if w.ndim == 3 else {})))
    return out


def _qmm(spec, dtype, rows):
    from . import qmm_cuda
    from .qmm import GEMV_ROWS, gemv_kind

    bits, gs = spec["bits"], spec["group_size"]
    sdt = spec.get("scale_dtype", dtype)
    k = 512
    n_calls = 0
    for m in rows:
        x = mx.zeros((m, k), dtype=dtype)
        w = mx.zeros((256, k * bits // 32), dtype=mx.uint32)
        tc = backend.for_op("qmm") == "cuda" and gemv_kind(m, x, w, bits, gs) == "tc"
        if m <= GEMV_ROWS and spec.get("k", 128) % 128 == 0 and not tc:   # the scalar GEMV's template
            cfg = qmm_cuda.default_config(m, spec["n"], spec.get("k", k), bits)
            n = cfg["R"] * 4
            w = mx.zeros((n, k * bits // 32), dtype=mx.uint32)
            s = mx.ones((n, k // gs), dtype=sdt)
            mx.eval(qmm_cuda.qgemv(x, w, s, s, bits, gs, **cfg))
        else:  # the public entry point: the tensor-core GEMV / tiled GEMM (self-tested here) or MLX's kernels
            from .qmm import qmm

            s = mx.ones((256, k // gs), dtype=sdt)
            mx.eval(qmm(x, w, s, s, bits, gs))
        n_calls += 1
    if backend.for_op("qmm") == "cuda":
        n_calls += _wg_precompile(spec, dtype, sdt)
    return n_calls


def _wg_precompile(spec, dtype, sdt) -> int:
    """The warpgroup GEMMs' templates for the model's real shape (tiles and split depend on N and K): the
    register-operand one's row tiles (64-256 in steps of 32) where it serves them, the other one at 128 and
    256 rows where it does; compiled (NVRTC, cached on disk) here after the self-tests, not on the first
    long prompt."""
    from . import qgemm_rs_cuda, qgemm_wg_cuda
    from .qmm import rs_serves, wg_rows

    n, k, bits, gs = spec["n"], spec.get("k"), spec["bits"], spec["group_size"]
    if k is None or not qgemm_wg_cuda.supports_shape(n, k, dtype, sdt, bits, gs):
        return 0
    done = 0
    tiles = [m for m in range(64, 257, 32) if rs_serves(m, bits)]
    rs_ok = bool(tiles) and qgemm_rs_cuda.ready(dtype, sdt, bits, gs)
    if rs_ok:
        for m in tiles:
            qgemm_rs_cuda.plan(m, n, k, dtype, bits, gs)
            done += 1
    lo, hi = wg_rows()   # where the register-operand GEMM failed its self-test, qmm falls back to this one
    wg_tiles = [m for m in (128, 256) if lo <= m <= hi and not (rs_ok and rs_serves(m, bits))]
    if wg_tiles and qgemm_wg_cuda.ready(dtype, sdt, bits, gs):
        for m in wg_tiles:
            qgemm_wg_cuda.plan(m, n, k, dtype, bits, gs)
            done += 1
    return done


def _paged(spec, dtype):
    from .paged import paged_attention_decode

    hq, hkv, d = spec["heads"], spec["kv_heads"], spec["head_dim"]
    kvq = spec.get("kv_quant")
    bs = spec.get("block_size", 16)
    if kvq is None:
        k = mx.zeros((2, bs, hkv, d), dtype=dtype)
        v = k
    else:
        bits, g = kvq
        packed = mx.zeros((2, bs, hkv, d * bits // 32), dtype=mx.uint32)
        sc = mx.ones((2, bs, hkv, d // g), dtype=dtype)
        k = v = (packed, sc, sc)
    q = mx.zeros((1, hq, d), dtype=dtype)
    tables, lens = mx.array([[0, 1]], dtype=mx.int32), mx.array([bs + 1])
    out = paged_attention_decode(q, k, v, tables, lens, d ** -0.5, spec.get("window"), kvq)
    mx.eval(out)
    if backend.for_op("paged") != "cuda":
        return 1
    from . import paged_cuda  # every tokens-per-part template the launch may pick (occupancy_part)

    bits, grp = (16, 32) if kvq is None else kvq
    top = paged_cuda.pick_part(hq // hkv, d, kvq is not None)
    if top is None or not paged_cuda.supports(q, d, hq // hkv, bits, grp):
        return 1
    if paged_cuda._use_v2(d, hq // hkv, bits, None):
        return 1   # the one-launch kernel always takes its largest part: compiled by the call above
    part, n = top, 1
    while part >= paged_cuda.MIN_PART:
        mx.eval(paged_cuda.paged_decode(q, k, v, tables, lens, d ** -0.5, spec.get("window"), bits, grp, part=part))
        part //= 2
        n += 1
    return n


def warmup(shapes: list[dict], dtype=mx.bfloat16, rows=(1, 2, 3, 8, 16, 32, 64, 128, 256)) -> dict:
    """Run every listed op once per activation-row bucket; returns what was done and how long.

    shapes: dicts with op="qmm" or "gather_qmm" (n, k, bits, group_size[, scale_dtype]) or op="paged" (heads,
    kv_heads, head_dim[, kv_quant, window, block_size]). Unknown ops raise ValueError."""
    t0 = time.perf_counter()
    b = backend.current()
    calls = 0
    for spec in shapes:
        op = spec.get("op")
        if op not in ("qmm", "paged", "gather_qmm"):
            raise ValueError(f"warmup: unknown op {op!r} (expected 'qmm', 'gather_qmm' or 'paged')")
        if b == "reference":
            continue    # the reference has nothing to compile ahead
        if op == "gather_qmm":
            from .gather import warmup_spec
            calls += warmup_spec(spec, dtype, b)
        elif op == "qmm":
            if b == "cuda":
                calls += _qmm(spec, dtype, rows)
            else:
                from . import qmm_metal
                qmm_metal.ready()
        else:
            calls += _paged(spec, dtype)
    return {"backend": b, "ops": len(shapes), "calls": calls, "seconds": round(time.perf_counter() - t0, 3)}
