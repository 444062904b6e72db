"""The tensor-core GEMV (kernels/qgemv_tc_cuda.py) on the device: parity, then timings beside the scalar
GEMV (kernels/qmm_cuda.py) and mx.quantized_matmul, every ratio from the same run.

    python3 bench/kernels_gemv_tc.py OUT.json [parity] [time]
    ncu --clock-control none ... python3 bench/kernels_gemv_tc.py - ncu     # each kernel once

Parity: against the float32 reference of the same dequantized weights (rms_norm, matmul, epilogue in
float32); passes when the relative error is below max(2e-2, 3 x that of the scalar kernel's) -- the
scalar kernel is the shipped path whose errors are known (kernels-parity-cuda.json).
Timing: 100 calls queued, one eval, median of 5, weights rotated over > 8x L2 (bench/kernels_bench.py);
bandwidth = (packed weights + scales + biases + x + y) / time against the measured copy bandwidth.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from kernels_bench import CALLS, ROTATE_BYTES, copy_bandwidth, profile_calls, rec, timed  # noqa: E402
from kernels_parity_cuda import relerr  # noqa: E402
from jang_serve.kernels import qgemv_tc_cuda as tc, qmm_cuda  # noqa: E402
from jang_serve.kernels.qmm_fused import rope_inv_freq  # noqa: E402

EPIS = {"plain": {}, "residual": {"residual": True}, "norm": {"norm": True}, "norm+swiglu": {"norm": True, "swiglu": True},
        "swiglu": {"swiglu": True}, "norm+rope": {"norm": True, "rope": True}}
BG = [(b, g) for b in (2, 4, 8) for g in (32, 64, 128) if not (b == 2 and g == 32)]


def scalar(x, wq, s, b, bits, gs, nw=None, res=None, swiglu=False, rope=None, eps=1e-5):
    """The shipped scalar kernels (qmm_cuda through qmm_fused), forced with JANG_GEMV_TC=0."""
    from jang_serve.kernels.qmm_fused import _qgemv_rope, qgemv_fused
    os.environ["JANG_GEMV_TC"] = "0"
    try:
        if rope is not None:
            return _qgemv_rope(x, wq, s, b, bits, gs, nw, eps, rope[0], rope[1], rope[2], rope[3])
        if nw is None and res is None and not swiglu:
            return qmm_cuda.qgemv(x, wq, s, b, bits, gs)
        return qgemv_fused(x, wq, s, b, bits, gs, nw, eps, res, swiglu)
    finally:
        os.environ.pop("JANG_GEMV_TC", None)


def f32_ref(x, wq, s, b, bits, gs, nw=None, res=None, swiglu=False, rope=None, eps=1e-5):
    xf = x.astype(mx.float32)
    h = xf if nw is None else mx.fast.rms_norm(xf, nw.astype(mx.float32), eps)
    y = h @ mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits).T
    if swiglu:
        g, u = mx.split(y, 2, axis=-1)
        y = g * mx.sigmoid(g) * u
    if rope is not None:
        pos, inv, hd, nrot = rope
        m = y.shape[0]
        yh = y.reshape(m, -1, hd)
        ang = pos.astype(mx.float32)[:, None] * inv[None, :]               # [m, hd/2]
        c, sn = mx.cos(ang)[:, None, :], mx.sin(ang)[:, None, :]
        a, bb = yh[..., : hd // 2], yh[..., hd // 2:]
        rot = mx.concatenate([a * c - bb * sn, a * sn + bb * c], axis=-1)
        yh = mx.concatenate([rot[:, :nrot], yh[:, nrot:]], axis=1)
        y = yh.reshape(m, -1)
    return y if res is None else y + res.astype(mx.float32)


def case(epi, dtype, bits, gs, m, n=528, k=1024, **cfg):
    mode = EPIS[epi]
    hd = 64
    if mode.get("rope"):
        n = 12 * hd          # 6 q heads, 3 k heads, 3 v heads
    wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.05).astype(dtype), group_size=gs, bits=bits)
    x = mx.random.normal((m, k)).astype(dtype)
    nw = (mx.random.normal((k,)) * 0.2 + 1).astype(dtype) if mode.get("norm") else None
    sw = bool(mode.get("swiglu"))
    res = mx.random.normal((m, n // 2 if sw else n)).astype(dtype) if mode.get("residual") else None
    rope = None
    if mode.get("rope"):
        rope = (mx.array([3 + 17 * i for i in range(m)], dtype=mx.int32), rope_inv_freq(hd, 10000.0), hd, 9)
    ref = f32_ref(x, wq, s, b, bits, gs, nw, res, sw, rope)
    y = tc.qgemv_tc(x, wq, s, b, bits, gs, norm_weight=nw, residual=res, swiglu=sw, rope=rope, **cfg)
    e = relerr(y, ref)
    be = relerr(scalar(x, wq, s, b, bits, gs, nw, res, sw, rope), ref) if m <= 8 and not (
        bits == 2 and gs == 32) else None
    ok = y.shape == ref.shape and e <= max(2e-2, 3 * (be or 0))
    return dict(epi=epi, dtype=str(dtype).split(".")[-1], bits=bits, gs=gs, m=m, n=n, k=k, err=e, scalar_err=be,
                ok=ok, **cfg)


def parity(out, deadline):
    rows = out.setdefault("parity", [])
    # most important first (the run stops at its deadline): one row bf16, the engine's (bits, group)
    bf, f16, epis = mx.bfloat16, mx.float16, [e for e in EPIS if e != "plain"]
    grid = [("plain", bf, b, g, 1) for b, g in BG]
    grid += [(e, bf, b, 64, 1) for e in epis for b in (4, 8)]
    grid += [("plain", f16, b, g, 1) for b, g in BG] + [("plain", bf, b, g, m) for m in (2, 4, 8) for b, g in BG]
    grid += [(e, bf, b, g, 1) for e in epis for b, g in BG if g != 64 or b == 2]
    grid += [(e, dt, b, 64, m) for e in epis for dt in (bf, f16) for b in (4, 8) for m in (2, 4, 8)]
    grid += [(e, f16, b, 64, 1) for e in epis for b in (4, 8)]
    grid += [("plain", f16, b, g, m) for m in (2, 4, 8) for b, g in BG]
    grid += [(e, f16, b, g, 1) for e in epis for b, g in BG if g != 64 or b == 2]
    t0 = time.time()
    for e, dt, b, g, m in grid:
        if time.time() > deadline:
            out["parity_cut"] = f"stopped at the deadline after {len(rows)} of {len(grid)} cases"
            break
        t1 = time.time()
        try:
            rows.append(case(e, dt, b, g, m))
        except Exception as ex:   # a compile or launch error is a failed case, not the end of the run
            rows.append(dict(epi=e, dtype=str(dt).split(".")[-1], bits=b, gs=g, m=m, ok=False, err=float("inf"),
                             error=f"{type(ex).__name__}: {str(ex)[:300]}"))
        rows[-1]["s"] = round(time.time() - t1, 2)
        if not rows[-1]["ok"]:
            print("FAIL", rows[-1], flush=True)
    # the launch variants that the timings sweep, and odd sizes (partial tiles, K not a power of 2)
    for tt, nwarp, u in ((1, 4, 1), (2, 4, 1), (1, 8, 2), (2, 8, 2), (1, 2, 1)):
        rows.append(case("plain", mx.bfloat16, 4, 64, 1, TT=tt, NWARP=nwarp, U=u))
    rows.append(case("plain", mx.bfloat16, 4, 64, 3, n=1000, k=896))
    rows.append(case("norm+swiglu", mx.bfloat16, 4, 64, 1, n=1000, k=896))
    out["parity_summary"] = dict(n=len(rows), ok=sum(r["ok"] for r in rows), worst=max(r["err"] for r in rows),
                                 seconds=time.time() - t0)
    print("parity", out["parity_summary"], flush=True)


def weight_sets(n, k, bits, gs=64):
    one = n * k * bits // 8 + 4 * n * (k // gs)
    sets = [mx.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16), group_size=gs, bits=bits)
            for _ in range(max(2, math.ceil(ROTATE_BYTES / one)))]
    mx.eval(sets)
    return sets, one


def time_plain(out, bw, variants, save=lambda: None):
    rows = out.setdefault("gemv", [])
    for (n, k) in ((14336, 4096), (4096, 14336)):
        for bits in [int(b) for b in os.environ.get("GT_BITS", "4,2,8,3").split(",")]:
            sets, one = weight_sets(n, k, bits)
            for m in ([int(r) for r in os.environ.get("GT_ROWS", "1,2,4,8").split(",")] if bits == 4 else (1,)):
                x = mx.random.normal((m, k)).astype(mx.bfloat16)
                mx.eval(x)
                nbytes = one + 2 * m * (n + k)
                ref = mx.quantized_matmul(x, *sets[0], transpose=True, group_size=64, bits=bits)
                kinds = [("mx.quantized_matmul", lambda ws: mx.quantized_matmul(x, *ws, transpose=True, group_size=64,
                                                                                 bits=bits), {})]
                kinds.append(("scalar", lambda ws: qmm_cuda.qgemv(x, *ws, bits, 64), {}))
                if bits != 3:
                    kinds.append(("tc", lambda ws: tc.qgemv_tc(x, *ws, bits, 64), {"default": True,
                                                                                  **tc.config(m, n, k, bits, 64)}))
                    if m == 1:
                        for tt, nwarp, u in variants:
                            kinds.append(("tc", lambda ws, c=(tt, nwarp, u): tc.qgemv_tc(
                                x, *ws, bits, 64, TT=c[0], NWARP=c[1], U=c[2]), dict(TT=tt, NWARP=nwarp, U=u)))
                for name, f, extra in kinds:
                    t = timed(lambda: [f(sets[i % len(sets)]) for i in range(CALLS)])
                    r = rec(name, t, nbytes, bw, n=n, k=k, bits=bits, m=m, err_vs_qmm=relerr(f(sets[0]), ref), **extra)
                    rows.append(r)
                    print(r, flush=True)
            sets = None
            save()


def fused_calls():
    """The engine's decode GEMVs (Llama-3-8B, JANG_4M) as (shapes, call(name, weights)): bench/decode_kernels.py's."""
    from decode_kernels import SHAPES, gemv_call, layer_inputs

    names = {"qkv+rope": "qkv", "o+res": "o", "gu+swiglu": "gu", "down+res": "down"}
    inp = layer_inputs()
    return {k: SHAPES[v] for k, v in names.items()}, (lambda name, ws: gemv_call(names[name], ws, inp))


def with_impl(impl, f):
    """Run f with the tensor-core GEMV on for every row count ("tc": JANG_GEMV_TC=all) or off ("scalar")."""
    os.environ["JANG_GEMV_TC"] = "0" if impl == "scalar" else "all"
    try:
        return f()
    finally:
        os.environ.pop("JANG_GEMV_TC", None)


def time_fused(out, bw):
    """The engine's decode GEMVs: tc vs the scalar fused kernels."""
    rows = out.setdefault("fused", [])
    shapes, call = fused_calls()
    for name, (n, k, bits) in shapes.items():
        sets, one = weight_sets(n, k, bits)
        nbytes = one + 2 * (n + k) * 2
        for impl in ("tc", "scalar"):
            t = with_impl(impl, lambda: timed(lambda: [call(name, sets[i % len(sets)]) for i in range(CALLS)]))
            y = with_impl(impl, lambda: call(name, sets[0]))
            r = rec(name, t, nbytes, bw, impl=impl, n=n, k=k, bits=bits, m=int(os.environ.get("DK_ROWS", "1")))
            if impl == "tc":
                y_tc = y
            else:
                r["tc_vs_scalar_relerr"] = relerr(y_tc, y)
            rows.append(r)
            print(r, flush=True)
        sets = None


def variants():
    """(TT, NWARP, U) launch shapes swept beside the default (GT_VARIANTS="1,4,2;2,8,1")."""
    return [tuple(int(v) for v in c.split(",")) for c in
            os.environ.get("GT_VARIANTS", "1,4,2;2,4,2;1,8,2;2,8,1;1,8,1;1,4,4;1,8,4").split(";") if c]


def ncu_mode():
    """Each kernel once under the profiler: tc / scalar / mx.quantized_matmul at the issue's shapes (2, 3, 4,
    8 bits, one row) and the fused decode shapes (tc, scalar)."""
    calls, labels = [], []
    for (n, k) in ((14336, 4096), (4096, 14336)):
        for bits in [int(b) for b in os.environ.get("GT_BITS", "4,2,8,3").split(",")]:
            ws = mx.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16), group_size=64, bits=bits)
            x = mx.random.normal((1, k)).astype(mx.bfloat16)
            mx.eval(ws, x)
            if bits != 3:
                calls.append(lambda x=x, ws=ws, bits=bits: tc.qgemv_tc(x, *ws, bits, 64))
                labels.append(f"tc {n}x{k} b{bits}")
                for c in (variants() if bits == 4 else ()):     # the swept launch shapes too (GPU time ranks them better than queued)
                    calls.append(lambda x=x, ws=ws, bits=bits, c=c: tc.qgemv_tc(x, *ws, bits, 64, TT=c[0], NWARP=c[1],
                                                                              U=c[2]))
                    labels.append(f"tc {n}x{k} b{bits} TT{c[0]} NWARP{c[1]} U{c[2]}")
            calls.append(lambda x=x, ws=ws, bits=bits: qmm_cuda.qgemv(x, *ws, bits, 64))
            calls.append(lambda x=x, ws=ws, bits=bits: mx.quantized_matmul(x, *ws, transpose=True, group_size=64,
                                                                           bits=bits))
            labels += [f"scalar {n}x{k} b{bits}", f"qmm {n}x{k} b{bits}"]
    shapes, call = fused_calls()
    for name, (n, k, bits) in shapes.items():
        ws = mx.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16), group_size=64, bits=bits)
        mx.eval(ws)
        for impl in ("tc", "scalar"):
            calls.append(lambda name=name, ws=ws, impl=impl: with_impl(impl, lambda: call(name, ws)))
            labels.append(f"{impl} {name}")
    profile_calls(calls, labels)


def main():
    path = sys.argv[1]
    modes = sys.argv[2:] or ["parity", "time"]
    if "ncu" in modes:
        ncu_mode()
        return
    out = dict(benchmark="kernels_gemv_tc", mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               method="100 calls queued, one eval, median of 5; weights rotated over > 8x L2", commit=os.environ.get("COMMIT"))
    try:
        import subprocess
        out["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except Exception:
        out["device"] = str(mx.default_device())
    budget = float(os.environ.get("GT_PARITY_S", "200"))

    def save():
        Path(path).write_text(json.dumps(out, indent=1) + "\n")
    try:
        if "parity" in modes:
            parity(out, time.time() + budget)
            save()
        if "fused" in modes:      # only the fused decode GEMVs (DK_ROWS rows), tc vs scalar
            bw, copies = copy_bandwidth()
            out["copy_GBps"], out["copies"] = bw / 1e9, copies
            time_fused(out, bw)
            save()
        if "time" in modes:
            bw, copies = copy_bandwidth()
            out["copy_GBps"], out["copies"] = bw / 1e9, copies
            time_fused(out, bw)
            save()
            time_plain(out, bw, variants(), save)
    finally:
        save()


if __name__ == "__main__":
    main()
