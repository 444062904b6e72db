"""The weight-stationary GEMM (kernels/qgemm3_cuda.py) on the device: parity, then queued timings
against the bf16 matmul, the previous tiled GEMM (qgemm v2), kernels.qmm's route and
mx.quantized_matmul, every ratio from the same run (method of bench/kernels_bench.py: 100 calls
queued, one eval, median of 5, weights rotated over > 200 MB).

    python3 bench/qgemm3_bench.py OUT.json [parity] [timing] [quick]
    Q3_VARIANTS='[{"stages": 3}, {"target": 264}]'   # extra qgemm3 configs timed at every row count
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from kernels_bench import CALLS, check, rec, rotation_sets, run_sections, timed  # noqa: E402

from jang_serve.kernels import qgemm3_cuda as q3, qgemm_cuda  # noqa: E402
from jang_serve.kernels.qmm import qmm as kqmm  # noqa: E402
from jang_serve.kernels.backend import relerr  # noqa: E402


def parity(quick, out):
    """Every bit width x group x dtype at 64 rows, plus row counts / splits / TM=1 / fp32 scales."""
    cases = [(b, gs, dt, 64, 512, 1024, {}) for b in (2, 4, 8) for gs in (32, 64, 128)
             for dt in (mx.bfloat16, mx.float16)]
    cases += [(4, 64, mx.bfloat16, m, n, k, o) for m, n, k, o in
              ((16, 512, 1024, {"split": 2}), (33, 512, 1024, {}), (100, 512, 1024, {"split": 2}),
               (256, 384, 2048, {}), (7, 384, 1024, {}), (64, 4096, 4096, {}), (200, 1024, 14336, {}))]
    cases += [(8, 64, mx.bfloat16, 64, 512, 1024, {"stages": 2}), (2, 64, mx.float16, 130, 768, 1024, {"split": 4})]
    if quick:
        cases = cases[::3]
    for bits, gs, dt, m, n, k, over in cases:
        for sdt in ((dt, mx.float32) if (bits, gs, m) == (4, 64, 64) and n == 512 else (dt,)):
            w = (mx.random.normal((n, k)) * 0.05).astype(dt)
            wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
            s, b = s.astype(sdt), b.astype(sdt)
            x = mx.random.normal((m, k)).astype(dt)
            wd = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
            ref = x.astype(mx.float32) @ wd.T
            try:
                y = q3.qgemm(x, wq, s, b, bits, gs, **over)
                err = relerr(y, ref)
                cfg = q3.config(m, n, k, bits, **over)
            except Exception as e:  # keep going: the record says what broke
                err, cfg = repr(e)[:300], None
            ok = isinstance(err, float) and err < 1e-2
            out.append(dict(bits=bits, gs=gs, dtype=str(dt), sdtype=str(sdt), m=m, n=n, k=k, cfg=cfg, relerr=err, ok=ok))
            print(f"parity bits={bits} gs={gs} {dt} s={sdt} m={m} n={n} k={k} {over}: {err} {'ok' if ok else 'FAIL'}",
                  flush=True)


def timing(quick, out):
    shapes = [(14336, 4096, 4), (4096, 14336, 4), (28672, 4096, 4), (6144, 4096, 8), (4096, 4096, 8),
              (14336, 4096, 2)]
    rows = (16, 32, 64, 128, 256)
    if quick:
        shapes, rows = shapes[:3], (64, 256)
    variants = [{}] + json.loads(os.environ.get("Q3_VARIANTS", "[]"))
    for n, k, bits in shapes:
        wb, ws = rotation_sets(n, k, bits)
        nsets, nq = len(wb), len(ws)
        for m in rows:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            ref = mx.quantized_matmul(x, *ws[0], transpose=True, group_size=64, bits=bits)
            tb = timed(lambda: [x @ wb[i % nsets].T for i in range(CALLS)])
            out.append(rec("bf16_matmul", tb, n=n, k=k, m=m, bits=16))
            line = f"n={n} k={k} bits={bits} m={m}: bf16 {tb[0] * 1e6:.1f}"
            if m <= (128 if bits == 8 else 64):
                t = timed(lambda: [mx.quantized_matmul(x, *ws[i % nq], transpose=True, group_size=64, bits=bits)
                                   for i in range(CALLS)])
                out.append(rec("mx.quantized_matmul", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0]))
                line += f" | mx.qmm {t[0] * 1e6:.1f}"
            if qgemm_cuda.supports(x, ws[0][0], bits, 64):
                t = timed(lambda: [qgemm_cuda.qgemm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
                out.append(rec("qgemm_v2", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0],
                               err_vs_quantized_matmul=check(qgemm_cuda.qgemm(x, *ws[0], bits, 64), ref)))
                line += f" | v2 {t[0] * 1e6:.1f}"
            t = timed(lambda: [kqmm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
            out.append(rec("kernels.qmm", t, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0],
                           err_vs_quantized_matmul=check(kqmm(x, *ws[0], bits, 64), ref)))
            line += f" | kqmm {t[0] * 1e6:.1f}"
            for v in variants:
                try:
                    cfg = q3.config(m, n, k, bits, **v)
                    t = timed(lambda: [q3.qgemm(x, *ws[i % nq], bits, 64, **v) for i in range(CALLS)])
                except Exception as e:
                    out.append(dict(name="qgemm3", n=n, k=k, m=m, bits=bits, variant=v, error=repr(e)[:300]))
                    continue
                nbytes = n * k * bits / 8 + 2 * n * (k // 64) * 2 + 2 * m * (k + n)
                out.append(rec("qgemm3", t, nbytes, n=n, k=k, m=m, bits=bits, vs_bf16=t[0] / tb[0], cfg=cfg, variant=v,
                               err_vs_quantized_matmul=check(q3.qgemm(x, *ws[0], bits, 64, **v), ref)))
                line += f" | v3{v or ''} {t[0] * 1e6:.1f} ({tb[0] / t[0]:.2f}x bf16)"
            print(line, flush=True)
        del wb, ws


def main(path, what, quick):
    run_sections(path, f"{CALLS} calls queued, one mx.eval, median of 5; weights rotated over > 200 MB", (("parity", parity), ("timing", timing)), what, quick)


if __name__ == "__main__":
    args = sys.argv[2:]
    main(sys.argv[1], [a for a in args if a in ("parity", "timing")] or ["parity", "timing"], "quick" in args)
