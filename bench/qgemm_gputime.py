"""GPU time per call of the quantized GEMM against the bf16 dense matmul, under Nsight Compute
(device machine only; the queued timings of bench/kernels_bench.py are bounded by host dispatch).

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file OUT.csv \
        python3 bench/qgemm_gputime.py OUT_cases.json [quick]
    python3 bench/qgemm_gputime.py --summarize OUT.csv OUT_cases.json OUT.json

The first form runs every case once to compile and warm up, then opens the profiler
(cuProfilerStart) and runs, per case, one marker kernel followed by CALLS calls of the op (each
its own mx.eval). ncu's defaults lock base clocks and flush the caches before every kernel, so
weights come from HBM (absolute times pessimistic, ratios from the same run). The second form sums
the kernel times between markers (the op's whole cost: split-K zero fill and cast included) and
divides by CALLS.
"""

from __future__ import annotations

import csv
import ctypes
import json
import sys
import time
from collections import defaultdict

CALLS = 3


def sweep_spec():
    """The stage / warp-layout sweep over 16-256 rows of the three 4-bit shapes and the 8-bit q+k+v."""
    out = []
    for n, k in ((14336, 4096), (4096, 14336), (28672, 4096)):
        for m in (16, 32, 64, 128, 256):
            for cfg in ({}, {"stages": 2}, {"WM": 1, "stages": 2}) if m >= 32 else ({}, {"stages": 2}, {"stages": 3}):
                out.append([n, k, 4, m, cfg])
    for m in (64, 128):
        for cfg in ({}, {"WM": 1}):
            out.append([6144, 4096, 8, m, cfg])
    return out


def cases(quick=False):
    """(label, dict(op, n, k, m, bits, cfg)) in run order. GT_CASES (JSON list of [n, k, bits, m, cfg])
    replaces the qgemm cases; bf16 and v1 of the same shape and rows are added once each."""
    import os
    if os.environ.get("GT_CASES"):
        out, seen = [], set()
        spec = sweep_spec() if os.environ["GT_CASES"] == "sweep" else json.loads(os.environ["GT_CASES"])
        for n, k, bits, m, cfg in spec:
            base = dict(n=n, k=k, m=m)
            if (n, k, m) not in seen:
                seen.add((n, k, m))
                out += [("bf16", dict(base, op="bf16", bits=16)), ("qgemm_v1", dict(base, op="qgemm_v1", bits=bits))]
            out.append(("qgemm", dict(base, op="qgemm", bits=bits, cfg=cfg)))
        return out
    out = []
    shapes = [(14336, 4096, 4), (4096, 14336, 4), (28672, 4096, 4), (6144, 4096, 8), (14336, 4096, 8),
              (14336, 4096, 2), (4096, 4096, 8)]
    if quick:
        shapes = shapes[:4]
    for n, k, bits in shapes:
        ms = (16, 32, 64, 128, 256) if bits == 4 and n in (14336, 4096) and k != 4096 or (n, bits) == (14336, 4) \
            else (16, 64, 128, 256)
        for m in ms:
            base = dict(n=n, k=k, m=m)
            if bits == 4 or n == 6144:
                out.append(("bf16", dict(base, op="bf16", bits=16)))
            out.append(("qgemm", dict(base, op="qgemm", bits=bits, cfg={})))
            out.append(("qgemm_v1", dict(base, op="qgemm_v1", bits=bits)))
            out.append(("qmm", dict(base, op="qmm", bits=bits)))
            if m == 64 and bits == 4 and n in (14336, 4096) and k in (4096, 14336):
                out.append(("mx.quantized_matmul", dict(base, op="mxqmm", bits=bits)))
                for cfg in ({"WM": 1}, {"WM": 2}, {"split": 1}, {"stages": 2}, {"BM": 32}, {"reduce": "atomic"}):
                    out.append(("qgemm", dict(base, op="qgemm", bits=bits, cfg=cfg)))
            if m in (128, 256) and bits == 4 and n == 14336 and k == 4096:
                out.append(("qgemm", dict(base, op="qgemm", bits=bits, cfg={"BM": 64})))
    return out


def run(path, quick=False):
    import mlx.core as mx

    sys.path.insert(0, ".")
    from jang_serve.kernels import qgemm_cuda, qgemm_v1_cuda
    from jang_serve.kernels.qmm import qmm as kqmm

    lib = ctypes.CDLL("libcuda.so.1")
    one = mx.ones((1,))
    marker = mx.fast.cuda_kernel(name="jang_gputime_marker", input_names=["a"], output_names=["b"],
                                 source="if (threadIdx.x == 0) b[0] = a[0] + 1.0f;")

    def mark():
        return marker(inputs=[one], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                      output_dtypes=[mx.float32])[0]

    weights = {}

    def wts(n, k, bits):
        key = (n, k, bits)
        if key not in weights:
            wf = (mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16)
            weights[key] = wf if bits == 16 else mx.quantize(wf, group_size=64, bits=bits)
            mx.eval(weights[key])
        return weights[key]

    def op(c):
        x = mx.random.normal((c["m"], c["k"])).astype(mx.bfloat16)
        w = wts(c["n"], c["k"], c["bits"])
        if c["op"] == "bf16":
            return lambda: x @ w.T
        if c["op"] == "mxqmm":
            return lambda: mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=c["bits"])
        if c["op"] == "qmm":
            return lambda: kqmm(x, *w, c["bits"], 64)
        if c["op"] == "qgemm_v1":
            return lambda: qgemm_v1_cuda.qgemm(x, *w, c["bits"], 64)
        return lambda: qgemm_cuda.qgemm(x, *w, c["bits"], 64, **c["cfg"])

    todo = cases(quick)
    fns = []
    for label, c in todo:
        f = op(c)
        mx.eval(f())   # compile + warm up outside the profiled range
        fns.append(f)
    mx.eval(mark())
    mx.synchronize()
    lib.cuProfilerStart()
    for f in fns:
        mx.eval(mark())
        for _ in range(CALLS):
            mx.eval(f())
    mx.synchronize()
    lib.cuProfilerStop()
    with open(path, "w") as fh:
        json.dump(dict(calls=CALLS, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mlx=mx.__version__,
                       cases=[dict(label=l, **c) for l, c in todo]), fh, indent=1)
    print(f"profiled {len(fns)} cases", flush=True)


def summarize(csv_path, cases_path, out=None):
    rows = list(csv.reader(l for l in open(csv_path) if l.startswith('"')))
    head = rows[0]
    ki, mi, vi = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    meta = json.load(open(cases_path))
    per = []   # per case: name -> [count, us]
    for r in rows[1:]:
        if r[mi] != "gpu__time_duration.sum":
            continue
        name, ns = r[ki], float(r[vi].replace(",", ""))
        if "jang_gputime_marker" in name:
            per.append(defaultdict(lambda: [0, 0.0]))
            continue
        if per:
            per[-1][name.split("(")[0][:60]][0] += 1
            per[-1][name.split("(")[0][:60]][1] += ns / 1e3
    res = []
    for c, d in zip(meta["cases"], per):
        total = sum(v[1] for v in d.values()) / meta["calls"]
        res.append(dict(c, gpu_us=round(total, 2), kernels={k: dict(calls=v[0], us=round(v[1] / meta["calls"], 2))
                                                           for k, v in d.items()}))
    # ratios against the bf16 matmul of the same shape and rows
    bf = {(r["n"], r["k"], r["m"]): r["gpu_us"] for r in res if r["op"] == "bf16"}
    for r in res:
        b = bf.get((r["n"], r["k"], r["m"]))
        if b and r["op"] != "bf16":
            r["vs_bf16"] = round(r["gpu_us"] / b, 3)
    summary = dict(meta, method="Nsight Compute gpu__time_duration.sum (base clocks, caches flushed per kernel); "
                                f"sum of every kernel of the op between markers / {meta['calls']} calls",
                   cases=res)
    if len(per) != len(meta["cases"]):
        summary["warning"] = f"{len(per)} markers for {len(meta['cases'])} cases"
    if out:
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=1)
    for r in res:
        cfg = r.get("cfg") or ""
        print(f"{r['n']:6d}x{r['k']:<6d} m={r['m']:4d} b={r['bits']:2d} {r['op']:8s} {str(cfg):18s} "
              f"{r['gpu_us']:8.1f} us  {('x%.2f bf16' % r['vs_bf16']) if 'vs_bf16' in r else ''}")
    return summary


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        summarize(*sys.argv[2:])
    else:
        run(sys.argv[1], quick="quick" in sys.argv[2:])
