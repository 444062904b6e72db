"""GEMV launch-variant sweep on the device: one activation row, every (R, W, PF) variant of
kernels/qmm_cuda.py at the Llama-3-8B shapes (and the fused q/k/v and gate/up shapes), against
mx.quantized_matmul and the bf16 matmul of the same shape, all in one run.

    python3 bench/kernels_gemv_sweep.py OUT.json

GS_VARIANTS (JSON list of configs) replaces the variant grid; a config with "impl": "tc" runs the
tensor-core GEMV (kernels/qgemv_tc_cuda.py, its TT / NWARP / U / PIPE) instead of the scalar one (R / W /
PF / FAST). GS_SHAPES (JSON list of [N, K, bits, what]) replaces the shapes; GS_ROWS sets the
activation rows (default 1). A config with "impl": "before" runs the scalar kernel body read from the file
GS_BEFORE (e.g. an earlier commit's qmm_cuda.SOURCE) instead, for an A/B in one process; one with "defs" builds
the kernel with those header lines first (its "tag" names it in the results).

Method as bench/kernels_bench.py (BENCHMARKING.md): 100 calls queued, one eval, median of 5,
weights rotated over > 8x the L2; bandwidth = (packed weights + scales + biases + x + y) / time
against the measured copy bandwidth. Each variant's output is checked against the float32 matmul
of the dequantized weight (relative error, next to mx.quantized_matmul's own).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import subprocess
import sys
import time

import mlx.core as mx

from jang_serve.kernels import qgemv_tc_cuda, qmm_cuda
from kernels_bench import CALLS, ROTATE_BYTES, check, copy_bandwidth, qweights, rec, timed

SHAPES = [  # (N, K, bits, what)
    (14336, 4096, 4, "gate/up"), (4096, 14336, 4, "down"),
    (14336, 4096, 2, "gate/up"), (4096, 14336, 2, "down"),
    (14336, 4096, 3, "gate/up"), (4096, 14336, 3, "down"),
    (28672, 4096, 4, "gate+up fused"), (6144, 4096, 8, "q+k+v fused"), (4096, 4096, 8, "o"),
]
VARIANTS = [dict(R=r, W=w, PF=pf, FAST=True) for r, w, pf in itertools.product((4, 8), (1, 2, 4), (False, True))]
if os.environ.get("GS_VARIANTS"):
    VARIANTS = json.loads(os.environ["GS_VARIANTS"])
if os.environ.get("GS_SHAPES"):
    SHAPES = [tuple(s) for s in json.loads(os.environ["GS_SHAPES"])]


# The scalar GEMV build a config names: "impl": "before" = another version of the kernel body (the text of the file
# GS_BEFORE, e.g. the SOURCE of an earlier commit's kernels/qmm_cuda.py) with the plain header; "defs" = the shipped
# source with those header lines before the plain header (e.g. launch bounds); otherwise the shipped build
# (qmm_cuda.header(bits)). With dep, the kernel takes one more input it never reads (GS_CHAIN).
_built: dict[tuple, object] = {}


def variant_kernel(cfg: dict, bits: int, dep: bool = False):
    if cfg.get("impl") == "before":
        key = ("before", qmm_cuda.HEADER, dep)
    else:
        key = ("now", cfg["defs"] + qmm_cuda.HEADER if "defs" in cfg else qmm_cuda.header(bits), dep)
    if key not in _built:
        src = open(os.environ["GS_BEFORE"]).read() if key[0] == "before" else qmm_cuda.SOURCE
        _built[key] = mx.fast.cuda_kernel(name=f"jang_qgemv_v{len(_built)}", output_names=["y"], source=src,
                                          input_names=["x", "w", "scales", "biases"] + (["dep"] if dep else []),
                                          header=key[1])
    return _built[key]


def gemv(x, w, sc, bi, bits, gs, cfg):
    if cfg.get("impl") == "tc":
        if not qgemv_tc_cuda.supports(x, w, bits, gs):
            raise ValueError("the tensor-core GEMV does not serve this case")
        return qgemv_tc_cuda.qgemv_tc(x, w, sc, bi, bits, gs, **{k: v for k, v in cfg.items() if k != "impl"})
    if cfg.get("impl") == "before" or "defs" in cfg:
        qmm_cuda._override = variant_kernel(cfg, bits)
    try:
        return qmm_cuda.qgemv(x, w, sc, bi, bits, gs, **{k: v for k, v in cfg.items()
                                                         if k not in ("impl", "defs", "tag")})
    finally:
        qmm_cuda._override = None


# GS_CHAIN=1 also times each config as a chain: call i takes call i-1's output as an extra, unused input, so no two
# calls run side by side (as in a decode step, where each matrix waits for the one before).
def gemv_chain(x, ws, bits, gs, cfg, calls):
    m, k = x.shape
    n = ws[0][0].shape[0]
    d = dict(qmm_cuda.default_config(m, n, k, bits), **{a: b for a, b in cfg.items() if a in ("R", "W", "FAST", "PF")})
    kern = variant_kernel(cfg, bits, dep=True)
    blocks = math.ceil(n / (d["R"] * (4 // d["W"])))
    tmpl = [("T", x.dtype), ("S", ws[0][1].dtype), ("BITS", bits), ("GS", gs), ("MM", qmm_cuda.rows_bucket(m)),
            ("R", d["R"]), ("W", d["W"]), ("FAST", bool(d["FAST"])), ("PF", bool(d["PF"]))]
    outs, prev = [], x
    for i in range(calls):
        prev = kern(inputs=[x, *ws[i % len(ws)], prev], template=tmpl, grid=(blocks * qmm_cuda.THREADS, 1, 1),
                    threadgroup=(qmm_cuda.THREADS, 1, 1), output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
        outs.append(prev)
    return outs


def main(path: str) -> int:
    t0 = time.time()
    bw, copies = copy_bandwidth()
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()
    res = dict(benchmark="kernels_gemv_sweep", device=name, mlx=mx.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               copy_bandwidth_GBps=round(bw / 1e9, 1), copies=copies, method=__doc__.split("\n\n")[1], rows=[])
    gs, m = 64, int(os.environ.get("GS_ROWS", "1"))
    for n, k, bits, what in SHAPES:
        qbytes = n * k * bits // 8 + 2 * 2 * n * (k // gs)
        nbytes = qbytes + 2 * (m * k + m * n)
        nsets = max(2, math.ceil(ROTATE_BYTES / qbytes))
        ws = [qweights(n, k, bits, gs) for _ in range(nsets)]
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        mx.eval(ws, x)
        ref = x.astype(mx.float32) @ mx.dequantize(*ws[0], group_size=gs, bits=bits).astype(mx.float32).T
        base = dict(n=n, k=k, m=m, bits=bits, what=what)
        if bits == 4 and what in ("gate/up", "down"):
            nb = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
            wb = [(mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16) for _ in range(nb)]
            mx.eval(wb)
            t = timed(lambda: [x @ wb[i % nb].T for i in range(CALLS)])
            res["rows"].append(rec("bf16_matmul", t, n * k * 2 + 2 * (m * k + m * n), bw, **dict(base, bits=16)))
            del wb
        t = timed(lambda: [mx.quantized_matmul(x, *ws[i % nsets], transpose=True, group_size=gs, bits=bits)
                           for i in range(CALLS)])
        res["rows"].append(rec("mx.quantized_matmul", t, nbytes, bw, **base, err=check(
            mx.quantized_matmul(x, *ws[0], transpose=True, group_size=gs, bits=bits), ref)))
        for v in [None] + VARIANTS:
            cfg = v or {}
            try:
                t = timed(lambda: [gemv(x, *ws[i % nsets], bits, gs, cfg) for i in range(CALLS)])
                err = check(gemv(x, *ws[0], bits, gs, cfg), ref)
                row = rec("qgemv" if v else "qgemv_default", t, nbytes, bw, **base,
                          cfg=cfg or qmm_cuda.default_config(m, n, k, bits), err=err)
            except Exception as e:  # one broken variant must not lose the sweep
                row = dict(name="qgemv", **base, cfg=cfg, error=f"{type(e).__name__}: {e}"[:300])
            res["rows"].append(row)
            if os.environ.get("GS_CHAIN") == "1" and "us" in row:
                t = timed(lambda: gemv_chain(x, ws, bits, gs, cfg, CALLS))
                res["rows"].append(rec("qgemv_chain", t, nbytes, bw, **base, cfg=cfg))
                row = dict(row, chain_us=res["rows"][-1]["us"])
            print(json.dumps({k2: (round(v2, 2) if isinstance(v2, float) else v2) for k2, v2 in row.items()
                              if k2 not in ("us_min", "us_max", "bytes")}), flush=True)
        del ws
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    # best variant per shape/bits
    best = {}
    for r in res["rows"]:
        if r.get("name") == "qgemv" and "us" in r:
            key = f'{r["n"]}x{r["k"]}/{r["bits"]}/{r["cfg"].get("impl", "scalar")}'
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    res["best"] = {k2: dict(cfg=v2["cfg"], us=round(v2["us"], 2), pct_copy_bw=round(v2["pct_copy_bw"], 1),
                            err=v2["err"]) for k2, v2 in best.items()}
    res["seconds"] = round(time.time() - t0, 1)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n== best per shape ({m} rows) ==")
    for k2, v2 in res["best"].items():
        print(k2, json.dumps(v2))
    for r in res["rows"]:
        if r["name"] in ("mx.quantized_matmul", "qgemv_default", "bf16_matmul") and "us" in r:
            print(f'{r["name"]:20s} {r["n"]}x{r["k"]}/{r["bits"]}: {r["us"]:.1f} us {r.get("pct_copy_bw", 0):.0f}%')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "kernels-gemv-sweep.json"))
