"""Paged decode attention, v1 (split-K + merge kernel) beside v2 (one launch), on the device.

    python3 bench/paged_small.py OUT.json parity,time        # parity of both against the reference, timings
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        --log-file OUT.csv python3 bench/paged_small.py - ncu   # GPU time per launch at batch 1

parity: every variant timed (v1 where timed: batch 1 and 64 sequences; G = 12 is v1 only), against
kernels.paged.paged_decode_reference in float32 (bf16/fp16, bf16/q8/q4 KV at group 32/64, G 1/2/4/8,
head_dim 64/128/256, windows, contexts 0..8192, batch 1..64, ragged lengths, explicit parts); pass = error <= max(2e-2, 3 x the bf16 reference's own error), all finite.
time: queued (decode_kernels.py method: 100 calls queued, one eval, median of 5), each call on another
layer's pools and query (pools rotated over > 2x the 50 MB L2, as a model's layers are), Llama-3-8B heads
(32 q, 8 KV, D 128): batch 1 at 140 / 1024 / 4096 / 16384 tokens (block 32), batch 8 at 1024 / 4096, and
64 x 2048 (block 16, shuffled blocks) with SDPA on contiguous KV of the same sizes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kernels_bench import timed  # noqa: E402
from kernels_parity_cuda import _f32, make_pool, relerr  # noqa: E402
from jang_serve.kernels import paged, paged_cuda  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = mx.bfloat16
CALLS = 100
L2_ROTATE = 110e6


def parity(res):
    out = res.setdefault("parity", [])
    rng = np.random.default_rng(0)

    def case(dtype, kvq, heads, window, lens, bs=16, parts=(None,), impls=("v2",), nb=None):
        hq, hkv, d = heads
        maxb = max(1, -(-max(lens) // bs))
        nb = nb or max(64, len(lens) * maxb + 8)
        tables = mx.array(rng.integers(0, nb, size=(len(lens), maxb)).astype(np.int32))
        kp, vp = make_pool(nb, bs, hkv, d, dtype, kvq)
        q = mx.random.normal((len(lens), hq, d)).astype(dtype)
        scale = d ** -0.5
        ref = paged.paged_decode_reference(q.astype(mx.float32), _f32(kp), _f32(vp), tables, lens, scale, window, kvq)
        lower = relerr(paged.paged_decode_reference(q, kp, vp, tables, lens, scale, window, kvq), ref)
        bits, grp = (16, 32) if kvq is None else kvq
        for impl in impls:
            for part in parts:
                y = paged_cuda.paged_decode(q, kp, vp, tables, mx.array(lens, dtype=mx.int32), scale, window, bits,
                                            grp, part=part, impl=impl)
                e = relerr(y, ref)
                out.append(dict(impl=impl, dtype=str(dtype), kv=str(kvq), hq=hq, hkv=hkv, d=d, window=window,
                                bs=bs, B=len(lens), max_len=max(lens), part=part, err=e, ref_err=lower,
                                ok=bool(e <= max(2e-2, 3 * lower))))
        print(f"parity {out[-1]}", flush=True)

    ragged = [0, 1, 17, 600, 1500, 333]
    for kvq in (None, (8, 64), (8, 32), (4, 64), (4, 32)):
        for heads in ((32, 8, 128), (8, 8, 64), (16, 2, 128)):
            case(DT, kvq, heads, None, ragged)
    case(DT, None, (4, 1, 256), None, ragged)
    case(DT, (8, 64), (16, 2, 256), None, ragged)
    case(DT, None, (64, 8, 128), None, ragged)                 # G = 8
    case(DT, (4, 64), (64, 8, 64), None, ragged)
    case(DT, None, (96, 8, 128), None, ragged, impls=("v1",))  # G = 12: v1 only (the default path)
    for kvq in (None, (4, 64)):
        case(DT, kvq, (32, 8, 128), 100, ragged)
        case(mx.float16, kvq, (32, 8, 128), None, ragged)
    case(DT, None, (32, 8, 128), 1000, [8192, 5000], bs=32)
    for kvq in (None, (8, 64), (4, 32)):
        case(DT, kvq, (32, 8, 128), None, ragged, parts=(32, 64, 128, 256, 512), impls=("v2",))
    for ctx in (1, 31, 32, 33, 140, 1024, 4096, 8192):          # batch 1, block 32 (the engine's)
        case(DT, None, (32, 8, 128), None, [ctx], bs=32, impls=("v1", "v2"))
    case(DT, (4, 64), (32, 8, 128), None, [4096], bs=32)
    lens64 = [int(x) for x in rng.integers(1, 2049, size=64)]
    for kvq in (None, (8, 64)):
        case(DT, kvq, (32, 8, 128), None, lens64, impls=("v1", "v2"))
    case(DT, None, (32, 8, 128), None, [2048] * 64)
    case(DT, None, (32, 8, 128), None, [int(x) for x in rng.integers(1, 4097, size=8)], bs=32)
    # the plan, reused over many queued launches (the ticket counters must come back to zero each time)
    kp, vp = make_pool(400, 32, 8, 128, DT, None)
    tables = mx.array(rng.permutation(400)[:384].reshape(3, 128).astype(np.int32))
    lens = mx.array([4000, 77, 2500], dtype=mx.int32)
    qs = [mx.random.normal((3, 32, 128)).astype(DT) for _ in range(40)]
    run = paged.paged_decode_plan(qs[0], kp, vp, tables, lens, 0.088, None, None)
    ys = [run(q, kp, vp) for q in qs]
    mx.eval(ys)
    worst = 0.0
    for q, y in zip(qs, ys):
        ref = paged.paged_decode_reference(q.astype(mx.float32), _f32(kp), _f32(vp), tables, lens, 0.088)
        worst = max(worst, relerr(y, ref))
    out.append(dict(impl="v2 plan x40 queued", err=worst, ref_err=0.0, ok=bool(worst <= 2e-2)))
    print(f"parity {out[-1]}", flush=True)
    bad = [c for c in out if not c["ok"]]
    res["parity_summary"] = dict(cases=len(out), failed=len(bad),
                                 worst={i: max(c["err"] for c in out if c["impl"].startswith(i)) for i in ("v1", "v2")})
    print("parity summary", res["parity_summary"], flush=True)
    for c in bad:
        print("FAIL", c, flush=True)


def layers_for(nbytes):
    return max(2, min(32, math.ceil(L2_ROTATE / max(nbytes, 1))))


def batch_inputs(B, ctx, bs, kvq=None, seed=0):
    """Per layer pools of exactly the blocks used, shuffled block tables, and per layer queries."""
    rng = np.random.default_rng(seed)
    nblk = -(-ctx // bs)
    nb = B * nblk
    tables = mx.array(rng.permutation(nb).reshape(B, nblk).astype(np.int32))
    lens = mx.array([ctx] * B, dtype=mx.int32)
    per = 2 * nb * bs * HKV * D * 2 // (4 if kvq and kvq[0] == 4 else 2 if kvq else 1)
    layers = []
    for _ in range(layers_for(per)):
        kp, vp = make_pool(nb, bs, HKV, D, DT, kvq)
        q = mx.random.normal((B, HQ, D)).astype(DT)
        mx.eval(kp, vp, q)
        layers.append((q, kp, vp))
    return layers, tables, lens


def time_case(rows, label, layers, tables, lens, kvq, impls, extra):
    bits, grp = (16, 32) if kvq is None else kvq
    for impl, part in impls:
        def calls():
            return [paged_cuda.paged_decode(*layers[i % len(layers)], tables, lens, D ** -0.5, None, bits, grp,
                                            part=part, impl=impl) for i in range(CALLS)]
        t = timed(calls)
        if impl == "v2":
            used = part or paged_cuda.v2.pick_part(tables.shape[0], HKV, tables.shape[1] * (
                (layers[0][1][0] if kvq else layers[0][1]).shape[1]))
        else:
            shp = (layers[0][1][0] if kvq else layers[0][1]).shape
            used = part or paged_cuda.occupancy_part(paged_cuda.pick_part(HQ // HKV, D, kvq is not None),
                                                     tables.shape[0], HKV, tables.shape[1] * shp[1])
        rows.append(dict(case=label, impl=impl, part=used, default=part is None, kv=str(kvq), layers=len(layers),
                         us=t[0] * 1e6, us_min=t[1] * 1e6, us_max=t[2] * 1e6, **extra))
        print(rows[-1], flush=True)


def timing(res):
    rows = res.setdefault("timing", [])
    sweep = [("v1", None), ("v2", None), ("v2", 32), ("v2", 64), ("v2", 128), ("v2", 256), ("v2", 512)]
    for ctx in (140, 1024, 4096, 16384):
        layers, tables, lens = batch_inputs(1, ctx, 32)
        time_case(rows, f"b1_ctx{ctx}", layers, tables, lens, None, sweep, dict(B=1, ctx=ctx, bs=32))
    for kvq in ((8, 64), (4, 64)):
        layers, tables, lens = batch_inputs(1, 4096, 32, kvq)
        time_case(rows, "b1_ctx4096", layers, tables, lens, kvq, sweep[:2], dict(B=1, ctx=4096, bs=32))
    for ctx in (1024, 4096):
        layers, tables, lens = batch_inputs(8, ctx, 32)
        time_case(rows, f"b8_ctx{ctx}", layers, tables, lens, None, sweep, dict(B=8, ctx=ctx, bs=32))
    # 64 x 2048 against SDPA on contiguous KV of the same sizes
    B, L = 64, 2048
    kc = mx.random.normal((B, HKV, L, D)).astype(DT)
    vc = mx.random.normal((B, HKV, L, D)).astype(DT)
    q4 = mx.random.normal((B, HQ, 1, D)).astype(DT)
    mx.eval(kc, vc, q4)
    t = timed(lambda: [mx.fast.scaled_dot_product_attention(q4, kc, vc, scale=D ** -0.5) for _ in range(25)])
    sdpa = t[0] * 1e6
    rows.append(dict(case="b64_ctx2048", impl="sdpa_contiguous_bf16", us=sdpa, us_min=t[1] * 1e6, us_max=t[2] * 1e6,
                     B=B, ctx=L))
    print(rows[-1], flush=True)
    del kc, vc
    for kvq in (None, (8, 64), (4, 64)):
        layers, tables, lens = batch_inputs(B, L, 16, kvq)
        n0 = len(rows)
        impls = [("v1", None), ("v2", None)] + ([("v2", 128), ("v2", 256)] if kvq is None else [])
        time_case(rows, "b64_ctx2048", layers, tables, lens, kvq, impls, dict(B=B, ctx=L, bs=16))
        for r in rows[n0:]:
            r["ratio_vs_sdpa_contiguous_bf16"] = r["us"] / sdpa
        del layers
    # batch-1 contiguous SDPA for scale (one layer's KV, L2-warm)
    for ctx in (140, 4096):
        kc = mx.random.normal((1, HKV, ctx, D)).astype(DT)
        q4 = mx.random.normal((1, HQ, 1, D)).astype(DT)
        mx.eval(kc, q4)
        t = timed(lambda: [mx.fast.scaled_dot_product_attention(q4, kc, kc, scale=D ** -0.5) for _ in range(CALLS)])
        rows.append(dict(case=f"b1_ctx{ctx}", impl="sdpa_contiguous_bf16_l2warm", us=t[0] * 1e6, us_min=t[1] * 1e6,
                         us_max=t[2] * 1e6, B=1, ctx=ctx))
        print(rows[-1], flush=True)


def ncu_mode():
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    runs = []
    for ctx in (140, 1024, 4096, 16384):
        layers, tables, lens = batch_inputs(1, ctx, 32)
        q, kp, vp = layers[0]
        for impl in ("v1", "v2"):
            runs.append((f"b1_ctx{ctx}_{impl}", lambda q=q, kp=kp, vp=vp, t=tables, n=lens, i=impl:
                         paged_cuda.paged_decode(q, kp, vp, t, n, D ** -0.5, None, 16, 32, impl=i)))
    for _, f in runs:
        mx.eval(f())
    mx.synchronize()
    lib.cuProfilerStart()
    for name, f in runs:
        mx.eval(f())
        mx.synchronize()
    lib.cuProfilerStop()
    print("profiled in order:", [n for n, _ in runs], flush=True)


def main():
    path, modes = sys.argv[1], sys.argv[2].split(",")
    if modes == ["ncu"]:
        ncu_mode()
        return 0
    res = dict(benchmark="paged_small", mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               device=mx.device_info().get("device_name", "?"), method=__doc__)
    rc = 0
    for m in modes:
        t0 = time.time()
        (parity if m == "parity" else timing)(res)
        res[m + "_seconds"] = round(time.time() - t0, 1)
        Path(path).write_text(json.dumps(res, indent=1) + "\n")
        if m == "parity" and res["parity_summary"]["failed"]:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
