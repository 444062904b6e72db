"""The kernels of one batch-1 decode layer (Llama-3-8B shapes, JANG_4M bits) one by one, on the device.

    python3 bench/decode_kernels.py OUT.json time          # queued timings and launch-shape sweeps
    python3 bench/decode_kernels.py OUT.json dequant       # kernels/dequant_cuda vs mx.dequantize
    ncu --set detailed --clock-control none --profile-from-start off --csv --page details \
        --log-file OUT.csv python3 bench/decode_kernels.py - ncu     # each kernel once, profiled

Kernels, as the compiled decode step calls them (engine/models/compiled.py):
  qkv    RMSNorm + fused q/k/v (6144x4096, 8 bits) + RoPE        kernels.qmm_fused.qkv_rope
  o      o_proj (4096x4096, 8 bits) + residual                   kernels.qmm_fused.qmm_fused
  gu     RMSNorm + fused gate/up (28672x4096, 4 bits) + SwiGLU
  down   down_proj (4096x14336, 4 bits) + residual
  paged  paged decode attention, one sequence, bf16 KV          kernels.paged_cuda.plan (v1 and v2)
  write  the KV write (two scatters)                            engine.paged_attention.write_kv
`time`: 100 calls queued, one eval, median of 5, weights rotated over > 8x the L2 (bench/kernels_bench.py
method); GEMVs at their default (R, W) and a sweep of (R rows per team, W warps per team); the
paged decode at contexts 140 / 1024 / 4096 and tokens-per-part 32..512.
"""

from __future__ import annotations

import json
import os
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from kernels_bench import CALLS, ROTATE_BYTES, copy_bandwidth, rec, timed  # noqa: E402
from jang_serve.engine.paged_attention import write_kv  # noqa: E402
from jang_serve.kernels import paged_cuda, qmm_cuda  # noqa: E402
from jang_serve.kernels.qmm_fused import qkv_rope, qmm_fused, rope_inv_freq  # noqa: E402

H, I, HQ, HKV, HD = 4096, 14336, 32, 8, 128
DT = mx.bfloat16
SHAPES = {"qkv": ((HQ + 2 * HKV) * HD, H, 8), "o": (H, HQ * HD, 8), "gu": (2 * I, H, 4), "down": (H, I, 4)}
SWEEP = ((2, 4), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4))


def qweights(n, k, bits):
    w = (mx.random.normal((n, k)) * 0.02).astype(DT)
    return mx.quantize(w, group_size=64, bits=bits)


def weight_sets(name):
    n, k, bits = SHAPES[name]
    one = n * k * bits // 8 + 4 * n * (k // 64)
    sets = [qweights(n, k, bits) for _ in range(max(2, math.ceil(ROTATE_BYTES / one)))]
    mx.eval(sets)
    return sets, one + 2 * (n + k) * 2


def layer_inputs() -> dict:
    """DK_ROWS (default 1) decode rows' activations: x [m, H], the norm weight, the residual, the RoPE
    positions and rates, and down_proj's input xd [m, I] (evaluated)."""
    m = int(os.environ.get("DK_ROWS", "1"))
    inp = dict(x=mx.random.normal((m, H)).astype(DT), nw=(mx.random.normal((H,)) * 0.1 + 1).astype(DT),
               res=mx.random.normal((m, H)).astype(DT), pos=mx.arange(140, 140 + m, dtype=mx.int32),
               inv=rope_inv_freq(HD, 500000.0), xd=mx.random.normal((m, I)).astype(DT))
    mx.eval(list(inp.values()))
    return inp


def gemv_call(name, ws, inp):
    """The engine's decode GEMV `name` (SHAPES) on weights ws = (w, scales, biases)."""
    w, s, b = ws
    x, nw, res = inp["x"], inp["nw"], inp["res"]
    if name == "qkv":
        return qkv_rope(x, w, s, b, 8, 64, n_heads=HQ, n_kv=HKV, head_dim=HD, positions=inp["pos"],
                        inv_freq=inp["inv"], rope=None, norm_weight=nw, eps=1e-5)[0]
    if name == "o":
        return qmm_fused(x, w, s, b, 8, 64, residual=res)
    if name == "gu":
        return qmm_fused(x, w, s, b, 4, 64, norm_weight=nw, eps=1e-5, swiglu=True)
    return qmm_fused(inp["xd"], w, s, b, 4, 64, residual=res)


def with_config(r, w, fn):
    saved = qmm_cuda.default_config
    qmm_cuda.default_config = lambda m, n, k, bits: {"R": r, "W": w, "FAST": True, "PF": False}
    try:
        return fn()
    finally:
        qmm_cuda.default_config = saved


def paged_inputs(ctx, nblocks=512, bs=32):
    kp = (mx.random.normal((nblocks, bs, HKV, HD)) * 0.5).astype(DT)
    vp = (mx.random.normal((nblocks, bs, HKV, HD)) * 0.5).astype(DT)
    width = 1 << max(3, math.ceil(math.log2(math.ceil(ctx / bs))))
    tables = mx.array([[(7 * i + 3) % nblocks for i in range(width)]], dtype=mx.int32)
    q = mx.random.normal((1, HQ, HD)).astype(DT)
    mx.eval(kp, vp, tables, q)
    return q, kp, vp, tables, mx.array([ctx], dtype=mx.int32)


def time_mode(out):
    bw, copies = copy_bandwidth()
    out["copy_GBps"], out["copies"] = bw / 1e9, copies
    inp = layer_inputs()
    rows = out.setdefault("gemv", [])
    for name in SHAPES:
        sets, nbytes = weight_sets(name)
        cfg0 = qmm_cuda.default_config(1, SHAPES[name][0] // (2 if name == "gu" else 1), SHAPES[name][1], SHAPES[name][2])
        for r, w in [(None, None)] + list(SWEEP):
            def calls():
                return [gemv_call(name, sets[i % len(sets)], inp) for i in range(CALLS)]
            t = timed(calls) if r is None else with_config(r, w, lambda: timed(calls))
            rows.append(rec(name, t, nbytes, bw, R=r or cfg0["R"], W=w or cfg0["W"], default=r is None))
            print(rows[-1], flush=True)
        sets = None
    prow = out.setdefault("paged", [])
    for ctx in (140, 1024, 4096):
        q, kp, vp, tables, lens = paged_inputs(ctx)
        for impl, part in [("v1", p) for p in (None, 32, 64, 128, 256, 512)] + [("v2", None)]:
            def calls():
                return [paged_cuda.paged_decode(q, kp, vp, tables, lens, 0.088, None, 16, 32, part=part, impl=impl)
                        for _ in range(CALLS)]
            t = timed(calls)
            if impl == "v2":
                used = part or paged_cuda.v2.pick_part(1, HKV, tables.shape[1] * 32)
            else:
                used = part or paged_cuda.occupancy_part(paged_cuda.pick_part(4, HD, False), 1, HKV,
                                                         tables.shape[1] * 32)
            prow.append(rec("paged_b1", t, None, None, ctx=ctx, part=used, default=part is None, impl=impl,
                            table_width=tables.shape[1]))
            print(prow[-1], flush=True)
        k1 = mx.random.normal((1, HKV, HD)).astype(DT)
        slots = mx.array([ctx - 1], dtype=mx.int32)
        mx.eval(k1, slots)
        state = {"k": kp, "v": vp}

        def wcalls():
            outs = []
            for _ in range(CALLS):
                state["k"], state["v"] = write_kv(state["k"], state["v"], k1, k1, slots)
                outs += [state["k"], state["v"]]
            return outs[-2:]
        t = timed(lambda: wcalls())
        # timed() divides by the 2 arrays returned: per write_kv call (two scatters) = t * 2 / CALLS
        prow.append(rec("write_kv_b1", tuple(v * 2 / CALLS for v in t), None, None, ctx=ctx))
        print(prow[-1], flush=True)


def ncu_mode():
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    inp = layer_inputs()
    ws = {name: qweights(*SHAPES[name]) for name in SHAPES}
    q, kp, vp, tables, lens = paged_inputs(140)
    mx.eval(ws)
    calls = {name: (lambda name=name: gemv_call(name, ws[name], inp)) for name in SHAPES}
    calls["paged"] = lambda: paged_cuda.paged_decode(q, kp, vp, tables, lens, 0.088, None, 16, 32, impl="v1")
    calls["paged_v2"] = lambda: paged_cuda.paged_decode(q, kp, vp, tables, lens, 0.088, None, 16, 32, impl="v2")
    for f in calls.values():   # compile + warm up
        mx.eval(f())
    mx.synchronize()
    lib.cuProfilerStart()
    for name, f in calls.items():
        mx.eval(f())
        mx.synchronize()
    lib.cuProfilerStop()
    print("profiled", list(calls), flush=True)


def dequant_mode(out):
    """kernels/dequant_cuda against mx.dequantize: max difference and queued time (weights rotated)."""
    from jang_serve.kernels import dequant_cuda

    bw, _ = copy_bandwidth()
    out["copy_GBps"] = bw / 1e9
    rows = out.setdefault("dequant", [])
    for n, k, bits in ((14336, 4096, 4), (4096, 14336, 4), (28672, 4096, 4), (6144, 4096, 8), (14336, 4096, 2)):
        one = n * k * bits // 8 + 4 * n * (k // 64)
        sets = [qweights(n, k, bits) for _ in range(max(2, math.ceil(ROTATE_BYTES / one)))]
        mx.eval(sets)
        w, s, b = sets[0]
        ref = mx.dequantize(w, s, b, group_size=64, bits=bits)
        got = dequant_cuda.dequantize(w, s, b, bits, 64, DT)
        diff = mx.max(mx.abs(ref.astype(mx.float32) - got.astype(mx.float32))).item()
        nbytes = one + n * k * 2
        for name, f in (("mx.dequantize", lambda ws: mx.dequantize(*ws, group_size=64, bits=bits)),
                        ("dequant_cuda", lambda ws: dequant_cuda.dequantize(*ws, bits, 64, DT))):
            t = timed(lambda: [f(sets[i % len(sets)]) for i in range(20)])
            rows.append(rec(name, t, nbytes, bw, n=n, k=k, bits=bits, max_abs_diff_vs_mx=diff))
            print(rows[-1], flush=True)
        sets = None


def main():
    out_path, mode = sys.argv[1], sys.argv[2]
    if mode == "ncu":
        ncu_mode()
        return
    out = dict(benchmark="decode_kernels", mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               method="100 calls queued, one eval, median of 5; weights rotated over > 8x L2")
    try:
        import subprocess
        out["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except Exception:
        out["device"] = str(mx.default_device())
    if mode == "dequant":
        dequant_mode(out)
    else:
        time_mode(out)
    Path(out_path).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
