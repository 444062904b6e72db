"""The residual + RMSNorm epilogue (kernels/gemm_epilogue.py) on the device: parity and time against the ops it
replaces, at the decoder's two "GEMM + residual + norm" shapes of Llama-3-8B (o_proj 4096x4096 at 8 bits,
down_proj 4096x14336 at 4 bits; JANG_4M) and row counts from the tiled GEMMs' range.

    python3 bench/epilogue_bench.py OUT.json [--rows 16,17,32,64,96,128,192,256]

parity   h = residual + qmm(a) and hn = rms_norm(h) from qmm_add_norm against qmm, +, mx.fast.rms_norm
         (relative error; and whether h is bit-identical)
time     a dependent chain of 32 layers' worth of the op (each call's residual is the previous h, as in a
         decode step), evaluated at once, per call: fused against the composition (median of 5 after a
         warm-up), and the composition's extra GPU ops per call
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from e2e_models import device_name  # noqa: E402
from jang_serve.kernels import backend, gemm_epilogue  # noqa: E402
from jang_serve.kernels.qmm import partials_plan, qmm  # noqa: E402

SHAPES = {"o_proj 4096x4096 8-bit": (4096, 4096, 8), "down_proj 4096x14336 4-bit": (4096, 14336, 4)}
CHAIN = 32


def weights(n, k, bits, layers):
    out = []
    for _ in range(layers):
        w = mx.random.normal((n, k)).astype(mx.bfloat16) * 0.02
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        out.append((q, s.astype(mx.bfloat16), b.astype(mx.bfloat16)))
    mx.eval(out)
    return out


def chain(ws, a, r, nw, bits, fused):
    h = r
    for q, s, b in ws:
        if fused:
            h, hn = gemm_epilogue.qmm_add_norm(a, q, s, b, bits, 64, h, nw, 1e-5)
        else:
            h, hn = gemm_epilogue.add_norm_reference(qmm(a, q, s, b, bits, 64), h, nw, 1e-5)
        a = hn[:, :a.shape[1]] if a.shape[1] <= hn.shape[1] else a   # depend on the previous output
    return h, hn


def per_call(make):
    mx.eval(make())
    ts = []
    for _ in range(5):
        outs = make()
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        ts.append((time.perf_counter() - t0) / CHAIN)
    return round(1e6 * statistics.median(ts), 2), round(1e6 * min(ts), 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", default="16,17,32,64,96,128,192,256")
    args = ap.parse_args()
    assert gemm_epilogue.ready(mx.bfloat16, 1e-5), "the epilogue kernel failed its self-test"
    res = dict(benchmark="epilogue_bench", device=device_name(), mlx=version("mlx"),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               method=__doc__.split("\n\n")[2].replace("\n", " "), cases=[])
    for label, (n, k, bits) in SHAPES.items():
        ws = weights(n, k, bits, 4)
        nw = (1.0 + 0.1 * mx.random.normal((n,))).astype(mx.bfloat16)
        for m in (int(v) for v in args.rows.split(",")):
            a = mx.random.normal((m, k)).astype(mx.bfloat16)
            r = mx.random.normal((m, n)).astype(mx.bfloat16)
            q, s, b = ws[0]
            plan = partials_plan(a, q, s, b, bits, 64)
            h, hn = gemm_epilogue.qmm_add_norm(a, q, s, b, bits, 64, r, nw, 1e-5)
            want_h, want_hn = gemm_epilogue.add_norm_reference(qmm(a, q, s, b, bits, 64), r, nw, 1e-5)
            row = dict(shape=label, rows=m, partials=plan is not None,
                       h_identical=mx.array_equal(h, want_h).item(),
                       h_relerr=backend.relerr(h, want_h), hn_relerr=backend.relerr(hn, want_hn))
            layers = ws * (CHAIN // len(ws))
            row["fused_us"], row["fused_min_us"] = per_call(lambda: list(chain(layers, a, r, nw, bits, True)))
            row["composed_us"], row["composed_min_us"] = per_call(lambda: list(chain(layers, a, r, nw, bits, False)))
            row["speedup"] = round(row["composed_us"] / row["fused_us"], 3)
            res["cases"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    res["ok"] = all(c["h_relerr"] < 1e-3 and c["hn_relerr"] < 4e-3 for c in res["cases"])
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
