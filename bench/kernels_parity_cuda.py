"""CUDA parity of every kernel against the pure-MLX reference, run on the device machine.

    python3 bench/kernels_parity_cuda.py OUT.json

Error metric: ||out - ref|| / ||ref|| with ref computed in float32 from the same (dequantized)
inputs. Fresh random inputs for every case. A case passes when the kernel's error is below
max(2e-2, 3 x the error of mx.quantized_matmul / the MLX reference against the same ref) and
every output is finite. Exits non-zero if any case fails.
"""

from __future__ import annotations

import json
import os
import sys
import time

import mlx.core as mx
import numpy as np

from jang_serve.kernels import paged, paged_cuda, qgemm_cuda, qgemm_v1_cuda, qmm_cuda
from jang_serve.kernels.qmm import qmm as kqmm


def relerr(a, b):
    a = np.array(a.astype(mx.float32)).astype(np.float64)
    b = np.array(b.astype(mx.float32)).astype(np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def qweights(n, k, bits, gs, dtype):
    w = mx.random.normal((n, k)).astype(dtype) * 0.05
    return mx.quantize(w, group_size=gs, bits=bits)


VARIANTS = ((4, 1, True), (4, 1, False), (2, 4, True), (8, 1, True), (4, 2, True), (1, 4, True))


def _qmm_case(out, op, dtype, bits, gs, n, k, m, sdtype=None, **cfg):
    wq, s, b = qweights(n, k, bits, gs, dtype)
    if sdtype is not None:
        s, b = s.astype(sdtype), b.astype(sdtype)
    x = mx.random.normal((m, k)).astype(dtype)
    ref = x.astype(mx.float32) @ mx.dequantize(wq, s, b, group_size=gs, bits=bits).astype(mx.float32).T
    if op in ("qgemm", "qgemm_v1"):  # baseline: the bf16/fp16 dense matmul of the dequantized weight (no MLX qmm JIT)
        base = relerr(x @ mx.dequantize(wq, s, b, group_size=gs, bits=bits).astype(dtype).T, ref)
    else:
        base = relerr(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits), ref)
    if op == "qmm":
        y = kqmm(x, wq, s, b, bits, gs)
    elif op == "qgemm":
        y = qgemm_cuda.qgemm(x, wq, s, b, bits, gs, **cfg)
    elif op == "qgemm_v1":
        y = qgemm_v1_cuda.qgemm(x, wq, s, b, bits, gs, **cfg)
    else:
        y = qmm_cuda.qgemv(x, wq, s, b, bits, gs, **cfg)
    out.append(dict(op=op, dtype=str(dtype), bits=bits, gs=gs, n=n, k=k, m=m, **cfg,
                    **({"sdtype": str(sdtype)} if sdtype is not None else {}), err=relerr(y, ref), ref_err=base))


def qmm_cases():
    # Each distinct template (dtype, bits, gs, row bucket, R, W, FAST) is one NVRTC compile (~3 s):
    # keep them few. The bench checks its own timed variants against mx.quantized_matmul too.
    out = []
    for bits in (2, 3, 4, 5, 6, 8):
        for m in (1, 3):
            _qmm_case(out, "qgemv", mx.bfloat16, bits, 64, 1000, 512, m)
        for gs in (32, 128):
            _qmm_case(out, "qgemv", mx.bfloat16, bits, gs, 1000, 512, 1)
        _qmm_case(out, "qgemv", mx.bfloat16, bits, 64, 4096, 1024, 1)
        _qmm_case(out, "qgemv", mx.bfloat16, bits, 64, 300, 2048, 2)
    for bits in (3, 4, 8):
        _qmm_case(out, "qgemv", mx.float16, bits, 64, 1000, 1024, 1)
    # the public entry point on every row-count path (GEMV, quantized_matmul, dequant + matmul)
    for m in (1, 7, 16, 40, 130):
        _qmm_case(out, "qmm", mx.bfloat16, 4, 64, 512, 1024, m)
    return out


def qgemm_cases():
    if os.environ.get("KP_QUICK") == "1":
        return qgemm_quick_cases()
    # the tiled tensor-core GEMM: bits 2/4/8, every group size, row tiles 16/32/64/128, warps along M 1/2,
    # split-K or not, 2-4 cp.async stages, bf16/fp16 activations, bf16/fp16/fp32 scales.
    # Each template is one NVRTC compile (~2 s): keep them few.
    out = []
    for gs in (32, 64, 128):
        for bits in (2, 4, 8):
            _qmm_case(out, "qgemm", mx.bfloat16, bits, gs, 384, 1024, 40)
    for bits in (2, 4, 8):
        for m in (5, 16, 64, 100, 256):
            _qmm_case(out, "qgemm", mx.bfloat16, bits, 64, 256, 2048, m)
        print(f"qgemm bits={bits}: {len(out)} cases, worst {max(c['err'] for c in out):.2e}", flush=True)
    for m, bm, wm, split, st in ((64, 64, 1, 1, 2), (64, 64, 2, 4, 3), (33, 64, 2, 8, 2), (200, 128, 2, 2, 2),
                                 (64, 32, 2, 16, 4), (64, 32, 1, 2, 3), (130, 64, 1, 1, 3), (16, 16, 1, 4, 4)):
        _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 1024, 4096, m, BM=bm, WM=wm, split=split, stages=st)
    for bits, m in ((4, 64), (8, 40), (2, 130)):   # split-K through atomics instead of the reduce kernel
        _qmm_case(out, "qgemm", mx.bfloat16, bits, 64, 512, 4096, m, split=4, reduce="atomic")
    for bits in (2, 4, 8):
        for m in (8, 64, 130):
            _qmm_case(out, "qgemm", mx.float16, bits, 64, 512, 1024, m)
    for sdt in (mx.float32, mx.float16):   # scales/biases in another dtype than x
        _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 512, 1024, 64, sdtype=sdt)
    _qmm_case(out, "qgemm", mx.bfloat16, 8, 64, 16000, 4096, 64)
    _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 14336, 4096, 256)
    _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 4096, 14336, 64)
    for m in (7, 16, 40, 130, 256):   # the public entry point on the GEMM row counts
        _qmm_case(out, "qmm", mx.bfloat16, 8, 64, 512, 1024, m)
        _qmm_case(out, "qmm", mx.bfloat16, 4, 64, 512, 1024, m)
    return out


def qgemm_quick_cases():
    # fewer templates: every bit width and group size, both dtypes, split / atomics, the timed shapes
    out = []
    for bits, gs in ((2, 32), (4, 64), (8, 128), (4, 128), (8, 32)):
        for m in (16, 64, 200):
            _qmm_case(out, "qgemm", mx.bfloat16, bits, gs, 256, 2048, m)
    for bits in (4, 8):
        _qmm_case(out, "qgemm", mx.float16, bits, 64, 512, 1024, 64)
    _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 512, 1024, 64, sdtype=mx.float32)
    for m, bm, wm, split, st, red in ((64, 64, 1, 1, 3, None), (64, 64, 2, 8, 2, None), (64, 32, 1, 2, 4, None),
                                      (64, 64, 2, 4, 3, "atomic"), (256, 64, 2, 1, 3, None), (37, 64, 2, 2, 3, None)):
        _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 1024, 4096, m, BM=bm, WM=wm, split=split, stages=st,
                  **({"reduce": red} if red else {}))
    _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 14336, 4096, 256)
    _qmm_case(out, "qgemm", mx.bfloat16, 4, 64, 4096, 14336, 64)
    _qmm_case(out, "qgemm", mx.bfloat16, 8, 64, 6144, 4096, 64)
    for m in (16, 64, 256):
        _qmm_case(out, "qmm", mx.bfloat16, 4, 64, 512, 1024, m)
    for bits in (4, 8):   # the previous tiled GEMM (kernels.qmm's default until v2 is measured)
        _qmm_case(out, "qgemm_v1", mx.bfloat16, bits, 64, 512, 1024, 64)
    return out


def make_pool(nb, bs, hkv, d, dtype, kv_quant):
    k = mx.random.normal((nb, bs, hkv, d)).astype(dtype)
    v = mx.random.normal((nb, bs, hkv, d)).astype(dtype)
    if kv_quant is None:
        return k, v
    bits, g = kv_quant
    return tuple(mx.quantize(k, group_size=g, bits=bits)), tuple(mx.quantize(v, group_size=g, bits=bits))


def paged_cases():
    out = []
    rng = np.random.default_rng(0)
    combos = [(mx.bfloat16, kvq, heads, None) for kvq in (None, (8, 64), (8, 32), (4, 64), (4, 32))
              for heads in ((32, 8, 128), (8, 8, 64), (16, 2, 128))]
    combos += [(mx.bfloat16, None, (4, 1, 256), None), (mx.bfloat16, None, (64, 8, 128), None)]
    combos += [(mx.bfloat16, kvq, (32, 8, 128), 100) for kvq in (None, (4, 64))]
    combos += [(mx.float16, kvq, (32, 8, 128), None) for kvq in (None, (4, 64))]
    for dtype, kv_quant, (hq, hkv, d), window in combos:
        bs, nb = 16, 300
        lens = [0, 1, 17, 600, 1500, 333]
        maxb = -(-max(lens) // bs)
        tables = mx.array(rng.integers(0, nb, size=(len(lens), maxb)).astype(np.int32))
        kp, vp = make_pool(nb, bs, hkv, d, dtype, kv_quant)
        q = mx.random.normal((len(lens), hq, d)).astype(dtype)
        scale = d ** -0.5
        ref = paged.paged_decode_reference(q.astype(mx.float32),
                                           _f32(kp), _f32(vp), tables, lens, scale, window, kv_quant)
        lower = paged.paged_decode_reference(q, kp, vp, tables, lens, scale, window, kv_quant)
        bits = 16 if kv_quant is None else kv_quant[0]
        grp = 32 if kv_quant is None else kv_quant[1]
        parts = (None, 32, 64) if (hq, hkv, d) == (32, 8, 128) and dtype == mx.bfloat16 else (None,)
        for impl in ("v1", "v2"):   # v1: split-K + merge kernel; v2: one launch (kernels/paged_v2_cuda.py)
            for part in parts:  # None: the default part; small parts as batch-1 decode picks them
                y = paged_cuda.paged_decode(q, kp, vp, tables, mx.array(lens), scale, window, bits, grp, part=part,
                                            impl=impl)
                out.append(dict(op=f"paged_decode_{impl}", dtype=str(dtype), kv=str(kv_quant), hq=hq, hkv=hkv,
                                d=d, window=window, part=part, err=relerr(y, ref), ref_err=relerr(lower, ref)))
    # the public entry point
    kp, vp = make_pool(64, 16, 8, 128, mx.bfloat16, (4, 64))
    tables = mx.array(rng.permutation(64)[:60].reshape(4, 15).astype(np.int32))
    q = mx.random.normal((4, 32, 128)).astype(mx.bfloat16)
    lens = [5, 240, 100, 17]
    ref = paged.paged_decode_reference(q.astype(mx.float32), _f32(kp), _f32(vp), tables, lens, 0.088, None, (4, 64))
    y = paged.paged_attention_decode(q, kp, vp, tables, lens, 0.088, None, (4, 64))
    out.append(dict(op="paged_attention_decode", dtype="bfloat16", kv="(4, 64)", hq=32, hkv=8, d=128,
                    window=None, err=relerr(y, ref), ref_err=relerr(
                        paged.paged_decode_reference(q, kp, vp, tables, lens, 0.088, None, (4, 64)), ref)))
    # the per-step plan the engine uses for every layer (launch arguments computed once)
    run = paged.paged_decode_plan(q, kp, vp, tables, mx.array(lens, dtype=mx.int32), 0.088, None, (4, 64))
    for _ in range(2):  # reused, as for a second layer
        y = run(q, kp, vp)
        out.append(dict(op="paged_decode_plan", dtype="bfloat16", kv="(4, 64)", hq=32, hkv=8, d=128,
                        window=None, err=relerr(y, ref), ref_err=relerr(
                            paged.paged_decode_reference(q, kp, vp, tables, lens, 0.088, None, (4, 64)), ref)))
    return out


def _f32(pool):
    if isinstance(pool, tuple):
        return (pool[0], pool[1].astype(mx.float32), pool[2].astype(mx.float32))
    return pool.astype(mx.float32)


def main(path):
    t0 = time.time()
    cases = []
    res = dict(device=mx.device_info().get("device_name", "?"), mlx=mx.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    want = (sys.argv[2] if len(sys.argv) > 2 else "paged,qmm,qgemm").split(",")
    for name, fn in (("paged", paged_cases), ("qmm", qmm_cases), ("qgemm", qgemm_cases)):
        if name not in want:
            continue
        t1 = time.time()
        cases += fn()
        res[name + "_seconds"] = round(time.time() - t1, 1)
        print(f"{name}: {len(cases)} cases so far, {time.time() - t1:.0f} s", flush=True)
        for c in cases:
            c["pass"] = bool(c["err"] <= max(2e-2, 3 * c["ref_err"]))
        bad = [c for c in cases if not c["pass"]]
        res.update(cases=len(cases), failed=len(bad), seconds=round(time.time() - t0, 1), results=cases)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    worst = {}
    for c in cases:
        worst[c["op"]] = max(worst.get(c["op"], 0.0), c["err"])
    print(f"parity: {len(cases)} cases, {len(bad)} failed, worst rel err by op: {worst}")
    for c in bad[:30]:
        print("FAIL", c)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "kernels-parity-cuda.json"))
