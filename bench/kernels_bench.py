"""Kernel timings on the device machine, every ratio measured in the same run (BENCHMARKING.md).

    python3 bench/kernels_bench.py OUT.json [quick]
    KB_SECTIONS=gemm [KB_QGEMM_SWEEP=0] python3 bench/kernels_bench.py OUT.json   # some sections only

Method: each op is run once per input set to compile and warm up; then 100 calls are built
(rotating through enough distinct weight / KV sets to exceed the L2 cache several times), queued
with one mx.eval, and timed to the end of that eval; repeated REPS times, median reported
(with min and max). Bandwidth = bytes that must move per call / time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np

from jang_serve.kernels import paged, paged_cuda, qgemm_cuda, qgemm_v1_cuda, qmm_cuda
from jang_serve.kernels.qmm import qmm as kqmm

# (R rows per team, W warps per team, FAST) variants swept at one row; 4-bit sweeps them all.
VARIANTS = ((8, 1, True), (8, 2, True), (8, 1, False), (4, 1, True))
CALLS = 100
REPS = 5
ROTATE_BYTES = 400e6      # > 8x the H100's 50 MB L2


def timed(make_calls):
    """make_calls() -> list of CALLS lazy arrays. Returns (median, min, max) seconds per call."""
    mx.eval(make_calls())   # warm-up / compile
    ts = []
    for _ in range(REPS):
        outs = make_calls()
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        ts.append((time.perf_counter() - t0) / len(outs))
    return statistics.median(ts), min(ts), max(ts)


def profile_calls(calls, labels=None):
    """Each call once under the profiler (ncu --profile-from-start off ...): a warm-up pass first, then
    cuProfilerStart, every call evaluated and synchronized, cuProfilerStop."""
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    for f in calls:
        mx.eval(f())
    mx.synchronize()
    if labels:
        print("order", labels, flush=True)
    lib.cuProfilerStart()
    for f in calls:
        mx.eval(f())
        mx.synchronize()
    lib.cuProfilerStop()
    print("profiled", len(calls), flush=True)


def rec(name, t, nbytes=None, bw=None, **kw):
    d = dict(name=name, us=t[0] * 1e6, us_min=t[1] * 1e6, us_max=t[2] * 1e6, **kw)
    if nbytes:
        d["bytes"] = nbytes
        d["GBps"] = nbytes / t[0] / 1e9
        if bw:
            d["pct_copy_bw"] = 100 * nbytes / t[0] / bw
    return d


def copy_bandwidth():
    """Device copy bandwidth (bytes read + written per second): the best of two MLX copies of
    512 MB (a reversed-view copy and an elementwise multiply)."""
    a = mx.random.uniform(shape=(256, 1024, 1024)).astype(mx.bfloat16)   # 512 MB
    mx.eval(a)
    t1 = timed(lambda: [mx.contiguous(a[::-1]) for _ in range(10)])
    t2 = timed(lambda: [a * 2 for _ in range(10)])
    r1 = rec("copy_reversed_512MB", t1, 2 * a.nbytes)
    r2 = rec("multiply_512MB", t2, 2 * a.nbytes)
    return max(r1["GBps"], r2["GBps"]) * 1e9, [r1, r2]


def check(y, ref):
    """Relative error of a kernel output against the reference output (both computed here)."""
    a = np.array(y.astype(mx.float32)).astype(np.float64)
    b = np.array(ref.astype(mx.float32)).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_sections(path, method, sections, what, quick, extra=None):
    """The device-bench driver: header (device, MLX, date, COMMIT, copy bandwidth), then each wanted section
    fn(quick, rows) in order, the JSON rewritten after each (a timeout keeps what was measured); `extra()`
    adds keys after each section. Prints the parity tally when there is one."""
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    res = dict(device=gpu, mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               commit=os.environ.get("COMMIT", "?"), method=method)
    bw, copy = copy_bandwidth()
    res["copy_bandwidth_GBps"], res["copy"] = bw / 1e9, copy
    for name, fn in sections:
        if name in what:
            t0 = time.time()
            res[name] = []
            try:
                fn(quick, res[name])
            except BaseException as e:   # also a timeout's SIGINT: keep what was measured
                res[name + "_error"] = repr(e)
                print(f"{name} failed: {e!r}", flush=True)
            res[name + "_seconds"] = round(time.time() - t0, 1)
            res.update(extra() if extra else {})
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
    for key in [k for k in res if k.endswith("parity") and isinstance(res[k], list)]:
        bad = [r for r in res[key] if not r["ok"]]
        print(f"{key}: {len(res[key]) - len(bad)}/{len(res[key])} ok")
    return res


def rotation_sets(n, k, bits, total=200e6):
    """Enough bf16 weights and quantized weights (group 64) of [n, k] to rotate over `total` bytes each,
    evaluated: (bf16 list, quantized list)."""
    wb = [(mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16) for _ in range(max(3, math.ceil(total / (n * k * 2))))]
    ws = [qweights(n, k, bits, 64) for _ in range(max(3, math.ceil(total / (n * k * bits / 8))))]
    mx.eval(wb, ws)
    return wb, ws


def qweights(n, k, bits, gs):
    w = (mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16)
    return mx.quantize(w, group_size=gs, bits=bits)


def gemv_section(bw, quick):
    out = []
    shapes = [(14336, 4096), (4096, 14336)]
    bits_list = (4,) if quick else (2, 3, 4, 8)
    for (n, k) in shapes:
        # bf16 dense baseline (same shapes, rotated)
        nsets = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
        wb = [(mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16) for _ in range(nsets)]
        mx.eval(wb)
        for m in (1,):
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            t = timed(lambda: [x @ wb[i % nsets].T for i in range(CALLS)])
            out.append(rec("bf16_matmul", t, n * k * 2 + 2 * (m * k + m * n), bw, n=n, k=k, m=m, bits=16))
        del wb
        for bits in bits_list:
            gs = 64
            qbytes = n * k * bits // 8 + 2 * 2 * n * (k // gs)
            nsets = max(2, math.ceil(ROTATE_BYTES / qbytes))
            ws = [qweights(n, k, bits, gs) for _ in range(nsets)]
            mx.eval(ws)
            for m in (1, 2, 4, 8):
                x = mx.random.normal((m, k)).astype(mx.bfloat16)
                nbytes = qbytes + 2 * (m * k + m * n)
                t = timed(lambda: [mx.quantized_matmul(x, *ws[i % nsets], transpose=True, group_size=gs, bits=bits)
                                   for i in range(CALLS)])
                out.append(rec("mx.quantized_matmul", t, nbytes, bw, n=n, k=k, m=m, bits=bits))
                ref = mx.quantized_matmul(x, *ws[0], transpose=True, group_size=gs, bits=bits)
                t = timed(lambda: [kqmm(x, *ws[i % nsets], bits, gs) for i in range(CALLS)])
                out.append(rec("kernels.qmm", t, nbytes, bw, n=n, k=k, m=m, bits=bits,
                               cfg=qmm_cuda.default_config(m, n, k, bits),
                               err_vs_quantized_matmul=check(kqmm(x, *ws[0], bits, gs), ref)))
                if m == 1:
                    for R, W, F in VARIANTS if bits == 4 else ():
                        t = timed(lambda: [qmm_cuda.qgemv(x, *ws[i % nsets], bits, gs, R=R, W=W, FAST=F)
                                           for i in range(CALLS)])
                        out.append(rec("qgemv_variant", t, nbytes, bw, n=n, k=k, m=m, bits=bits,
                                       cfg=dict(R=R, W=W, FAST=F), err_vs_quantized_matmul=check(
                                           qmm_cuda.qgemv(x, *ws[0], bits, gs, R=R, W=W, FAST=F), ref)))
            del ws
    return out


def gemm_section(bw, quick):
    """16-256 rows: bf16 matmul vs mx.quantized_matmul vs dequantize+matmul vs the tiled qgemm vs
    kernels.qmm (whatever route it picks), and qgemm's variants (row tile, warps along M, split-K,
    stages, split-K reduce) at 64-256 rows of the Llama shapes; the previous tiled GEMM (qgemm_v1) beside them.
    KB_QGEMM_IMPL=v2 times kernels.qmm with the new GEMM on its route (JANG_QGEMM_IMPL)."""
    if os.environ.get("KB_QGEMM_IMPL"):
        os.environ["JANG_QGEMM_IMPL"] = os.environ["KB_QGEMM_IMPL"]
    out = []
    shapes = [(14336, 4096, (4, 8, 2)), (4096, 14336, (4,)), (28672, 4096, (4,)), (6144, 4096, (8,)),
              (4096, 4096, (8,)), (1024, 4096, (8,))]
    if quick:   # the 4-bit shapes and the engine's fused ones, fewer variants
        shapes = [(14336, 4096, (4,)), (4096, 14336, (4,)), (28672, 4096, (4,)), (6144, 4096, (8,))]
    if os.environ.get("KB_GEMM_SHAPES"):   # e.g. 14336x4096x4,28672x4096x4
        shapes = [tuple(int(v) for v in sh.split("x")[:2]) + ((int(sh.split("x")[2]),),)
                  for sh in os.environ["KB_GEMM_SHAPES"].split(",")]
    for (n, k, bits_list) in shapes:
        nsets = max(3, math.ceil(200e6 / (n * k * 2)))   # rotate over > 4x the L2
        wb = [(mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16) for _ in range(nsets)]
        for bits in bits_list:
            ms = (16, 32, 64, 128, 256) if bits == 4 and k * n == 14336 * 4096 else (16, 64, 128, 256)
            if os.environ.get("KB_GEMM_ROWS"):
                ms = tuple(int(v) for v in os.environ["KB_GEMM_ROWS"].split(","))
            nq = max(3, math.ceil(200e6 / (n * k * bits / 8)))
            ws = [qweights(n, k, bits, 64) for _ in range(nq)]
            mx.eval(wb, ws)
            for m in ms:
                x = mx.random.normal((m, k)).astype(mx.bfloat16)
                tb = timed(lambda: [x @ wb[i % nsets].T for i in range(CALLS)])
                out.append(rec("bf16_matmul", tb, n=n, k=k, m=m, bits=16))
                if not quick or m <= 64:
                    t = timed(lambda: [mx.quantized_matmul(x, *ws[i % nq], transpose=True, group_size=64, bits=bits)
                                       for i in range(CALLS)])
                    out.append(rec("mx.quantized_matmul", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0]))
                if m >= 128:
                    t = timed(lambda: [x @ mx.dequantize(*ws[i % nq], group_size=64, bits=bits).astype(mx.bfloat16).T
                                       for i in range(CALLS)])
                    out.append(rec("dequantize+matmul", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0]))
                ref = mx.quantized_matmul(x, *ws[0], transpose=True, group_size=64, bits=bits)
                if qgemm_cuda.supports(x, ws[0][0], bits, 64):
                    variants = [{}]
                    if os.environ.get("KB_QGEMM_VARIANTS"):   # a JSON list of qgemm_cuda.config overrides, every row count
                        variants += json.loads(os.environ["KB_QGEMM_VARIANTS"])
                    if m in (64, 128, 256) and bits == 4 and n in (14336, 4096) and os.environ.get("KB_QGEMM_SWEEP", "1") == "1" \
                            and (not quick or m == 64 or n == 14336):
                        dflt = qgemm_cuda.config(m, n, k, bits)
                        alt = [{"WM": 3 - dflt["WM"]}, {"split": 1}, {"split": dflt["split"] * 2},
                               {"stages": 2}, {"BM": 64 if dflt["BM"] != 64 else 32}]
                        if dflt["split"] > 1:
                            alt.append({"reduce": "atomic"})
                        variants += [v for v in alt if v.get("split", 1) * 256 <= k and v.get("stages", 2)
                                     <= qgemm_cuda.max_stages(bits, v.get("BM", dflt["BM"]))
                                     and v != {"split": dflt["split"]}]
                    for v in variants:
                        try:
                            cfg = qgemm_cuda.config(m, n, k, bits, **v)
                        except ValueError:
                            continue
                        t = timed(lambda: [qgemm_cuda.qgemm(x, *ws[i % nq], bits, 64, **v) for i in range(CALLS)])
                        out.append(rec("qgemm", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0], cfg=cfg,
                                       variant=v, err_vs_quantized_matmul=check(
                                           qgemm_cuda.qgemm(x, *ws[0], bits, 64, **v), ref)))
                if qgemm_v1_cuda.supports(x, ws[0][0], bits, 64):   # the previous tiled GEMM, same run
                    t = timed(lambda: [qgemm_v1_cuda.qgemm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
                    out.append(rec("qgemm_v1", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0],
                                   err_vs_quantized_matmul=check(qgemm_v1_cuda.qgemm(x, *ws[0], bits, 64), ref)))
                t = timed(lambda: [kqmm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
                out.append(rec("kernels.qmm", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0],
                               route=kqmm_route(x, ws[0][0], bits),
                               err_vs_quantized_matmul=check(kqmm(x, *ws[0], bits, 64), ref)))
                print(f"gemm n={n} k={k} bits={bits} m={m}: bf16 {tb[0]*1e6:.1f} us, qmm {t[0]*1e6:.1f} us", flush=True)
            del ws
        del wb
    return out


def kqmm_route(x, w, bits):
    import importlib
    return importlib.import_module("jang_serve.kernels.qmm")._cuda_route(x.shape[0], x, w, bits, 64)


def floor_section(bw, quick):
    """What bounds one call: an empty custom kernel (the per-call floor of MLX's dispatch), and the
    GEMV on a 4x wider matrix, where the per-call floor matters less."""
    out = []
    noop = mx.fast.cuda_kernel(name="jang_noop", input_names=["a"], output_names=["b"],
                               source="if (threadIdx.x == 0 && blockIdx.x == 0) b[0] = a[0];")
    a = mx.ones((4,))
    t = timed(lambda: [noop(inputs=[a], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                            output_dtypes=[mx.float32])[0] for _ in range(CALLS)])
    out.append(rec("noop_custom_kernel", t))
    t = timed(lambda: [a + i for i in range(CALLS)])
    out.append(rec("tiny_mlx_add", t))
    n, k = 57344, 4096
    for bits in (4, 2):
        ws = [qweights(n, k, bits, 64) for _ in range(3)]
        mx.eval(ws)
        x = mx.random.normal((1, k)).astype(mx.bfloat16)
        nbytes = n * k * bits // 8 + 4 * n * (k // 64) + 2 * (k + n)
        t = timed(lambda: [kqmm(x, *ws[i % 3], bits, 64) for i in range(CALLS)])
        out.append(rec("kernels.qmm", t, nbytes, bw, n=n, k=k, m=1, bits=bits,
                       cfg=qmm_cuda.default_config(1, n, k, bits)))
        t = timed(lambda: [mx.quantized_matmul(x, *ws[i % 3], transpose=True, group_size=64, bits=bits)
                           for i in range(CALLS)])
        out.append(rec("mx.quantized_matmul", t, nbytes, bw, n=n, k=k, m=1, bits=bits))
        del ws
    return out


def paged_section(bw, quick):
    out = []
    B, HQ, HKV, D, BS, L = 64, 32, 8, 128, 16, 2048
    nblk = L // BS
    rng = np.random.default_rng(0)
    nb = B * nblk + 16
    tables = mx.array(rng.permutation(nb)[: B * nblk].reshape(B, nblk).astype(np.int32))
    lens = mx.array([L] * B, dtype=mx.int32)
    q = mx.random.normal((B, HQ, D)).astype(mx.bfloat16)
    scale = D ** -0.5
    # contiguous baseline: SDPA over [B, Hkv, L, D]
    kc = mx.random.normal((B, HKV, L, D)).astype(mx.bfloat16)
    vc = mx.random.normal((B, HKV, L, D)).astype(mx.bfloat16)
    mx.eval(kc, vc)
    q4 = q[:, :, None, :]
    kv_bytes_bf16 = 2 * kc.nbytes
    t = timed(lambda: [mx.fast.scaled_dot_product_attention(q4, kc, vc, scale=scale) for _ in range(CALLS // 4)])
    sdpa = rec("sdpa_contiguous_bf16", t, kv_bytes_bf16, bw, B=B, L=L)
    out.append(sdpa)
    del kc, vc
    for kvq in (None, (8, 64), (4, 64)):
        k = mx.random.normal((nb, BS, HKV, D)).astype(mx.bfloat16)
        v = mx.random.normal((nb, BS, HKV, D)).astype(mx.bfloat16)
        if kvq:
            k = tuple(mx.quantize(k, group_size=kvq[1], bits=kvq[0]))
            v = tuple(mx.quantize(v, group_size=kvq[1], bits=kvq[0]))
        mx.eval(k, v)
        used = B * L / (nb * BS)
        nbytes = int(used * (sum(a.nbytes for a in k) + sum(a.nbytes for a in v) if kvq else k.nbytes + v.nbytes))
        name = "bf16" if kvq is None else f"q{kvq[0]}"
        t = timed(lambda: [paged.paged_attention_decode(q, k, v, tables, lens, scale, None, kvq)
                           for _ in range(CALLS // 4)])
        r = rec(f"paged_decode_{name}", t, nbytes, bw, B=B, L=L, kv=str(kvq))
        r["ratio_vs_sdpa_contiguous_bf16"] = r["us"] / sdpa["us"]
        out.append(r)
        if kvq is None:   # the routed path (v2 for bf16) beside the previous kernel (v1)
            t = timed(lambda: [paged_cuda.paged_decode(q, k, v, tables, lens, scale, None, 16, 32, impl="v1")
                               for _ in range(CALLS // 4)])
            r = rec(f"paged_decode_{name}_v1", t, nbytes, bw, B=B, L=L, kv=str(kvq))
            r["ratio_vs_sdpa_contiguous_bf16"] = r["us"] / sdpa["us"]
            out.append(r)
        if not quick and kvq is None:
            t = timed(lambda: [paged.paged_decode_reference(q, k, v, tables, lens, scale, None, kvq)
                               for _ in range(8)])
            out.append(rec(f"paged_reference_{name}", t, nbytes, bw, B=B, L=L, kv=str(kvq)))
        del k, v
    return out


def main(path, quick=False):
    t_start = time.time()
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = "?"
    bw, copy = copy_bandwidth()
    res = dict(device=gpu, mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               method=f"{CALLS} calls queued, one mx.eval, median of {REPS}; weights rotated over >= "
                      f"{ROTATE_BYTES / 1e6:.0f} MB", copy_bandwidth_GBps=bw / 1e9, copy=copy)
    want = os.environ.get("KB_SECTIONS", "gemv,floor,paged,gemm").split(",")
    res["sections"] = want
    for name, fn in (("gemv", gemv_section), ("floor", floor_section), ("paged", paged_section),
                     ("gemm", gemm_section)):
        if name not in want:
            continue
        t0 = time.time()
        try:
            res[name] = fn(bw, quick and name != "gemv")
        except Exception as e:  # keep what was measured so far
            res[name + "_error"] = repr(e)
            print(f"{name} failed: {e!r}")
        res[name + "_seconds"] = round(time.time() - t0, 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    res["seconds"] = round(time.time() - t_start, 1)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"device {gpu}; copy bandwidth {bw / 1e9:.0f} GB/s")
    for sec in ("gemv", "floor", "paged", "gemm"):
        for r in res.get(sec, []):
            extra = " ".join(f"{k}={r[k]}" for k in ("n", "k", "m", "bits", "kv", "cfg", "route") if k in r)
            pct = f"{r['pct_copy_bw']:.0f}%" if "pct_copy_bw" in r else ""
            vs = f"x{r['vs_bf16']:.2f} bf16" if "vs_bf16" in r else ""
            print(f"{sec:5s} {r['name']:22s} {extra:55s} {r['us']:9.1f} us {pct} {vs}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kernels-bench.json", quick="quick" in sys.argv[2:])
