"""The warpgroup GEMM (kernels/qgemm_wg_cuda.py, wgmma on sm_90a) on the device: NVRTC and descriptor
probe, parity, then queued timings against the bf16 matmul, qgemm3 and kernels.qmm's route, every ratio
from the same run (method of bench/kernels_bench.py: 100 calls queued, one eval, median of 5, weights
rotated over > 200 MB).

    python3 bench/qgemm_wg_bench.py OUT.json [probe] [parity] [rs_parity] [timing] [quick]
    python3 bench/qgemm_wg_bench.py - ncu|ncu_rs        # under ncu (bench/qgemm_rs_ncu.sh)
    WG_VARIANTS='[{"BN": 128}, {"stages": 3}]'   # extra configs timed at every row count
    RS_VARIANTS='[{"stages": 5}]'                # the register-operand kernel's (kernels/qgemm_rs_cuda.py)
    WG_ROWS=128,256 WG_SHAPES=14336x4096x4,...   # narrow the timing grid
"""

from __future__ import annotations

import json
import os
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from kernels_bench import CALLS, check, profile_calls, qweights, rec, rotation_sets, run_sections, timed  # noqa: E402

from jang_serve.kernels import nvrtc, qgemm3_cuda as q3, qgemm_rs_cuda as rs, qgemm_wg_cuda as wg  # noqa: E402
from jang_serve.kernels.qmm import qmm as kqmm  # noqa: E402
from jang_serve.kernels.backend import relerr  # noqa: E402


def one_case(bits, gs, dt, m, n, k, over, fn=None):
    w = (mx.random.normal((n, k)) * 0.05).astype(dt)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    s, b = s.astype(dt), b.astype(dt)
    x = mx.random.normal((m, k)).astype(dt)
    wd = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    ref = x.astype(mx.float32) @ wd.T
    try:
        return relerr((fn or wg.qgemm)(x, wq, s, b, bits, gs, **over), ref)
    except Exception as e:  # keep going: the record says what broke
        return repr(e)[:600]


def probe(quick, out):
    """NVRTC present, the compile time of one template, and one small product against the reference."""
    t0 = time.time()
    try:
        v = nvrtc.version()
        wg.cubin(4, 64, True, 128, 4, False, 2, 1)
        out.append(dict(nvrtc=list(v), compile_s=round(time.time() - t0, 2)))
    except Exception as e:
        out.append(dict(nvrtc_error=repr(e)[:2000]))
        print("nvrtc:", e, flush=True)
        return
    print("nvrtc", v, f"compile {time.time() - t0:.2f}s", flush=True)
    err = one_case(4, 64, mx.bfloat16, 128, 256, 512, {"BN": 128, "split": 1})
    out.append(dict(relerr=err))
    print("128x256x512 check", err, flush=True)


def run_cases(label, mod, cases, out):
    """mod.qgemm (qgemm_wg or qgemm_rs) on each (bits, group, dtype, m, n, k, overrides) case against the
    dequantized float32 matmul; one record per case, with the config the overrides give."""
    for bits, gs, dt, m, n, k, over in cases:
        err = one_case(bits, gs, dt, m, n, k, over, mod.qgemm)
        ok = isinstance(err, float) and err < 1e-2
        try:
            cfg = mod.config(m, n, k, bits, **mod.config_args(over))
        except Exception as e:
            cfg = repr(e)
        out.append(dict(bits=bits, gs=gs, dtype=str(dt), m=m, n=n, k=k, over=over, cfg=cfg, relerr=err, ok=ok))
        print(f"{label} bits={bits} gs={gs} {dt} m={m} n={n} k={k} {over}: {err} {'ok' if ok else 'FAIL'}",
              flush=True)


def parity(quick, out):
    cases = [(b, gs, dt, 136, 512, 1024, {}) for b in (2, 4, 8) for gs in (32, 64, 128)
             for dt in (mx.bfloat16, mx.float16)]
    cases += [(4, 64, mx.bfloat16, m, n, k, o) for m, n, k, o in
              ((128, 256, 512, {"BN": 128, "split": 1}), (256, 512, 1024, {"BN": 256}), (200, 384, 2048, {}),
               (65, 512, 1024, {"split": 4}), (256, 4096, 4096, {}), (192, 1024, 14336, {}),
               (256, 512, 1024, {"stages": 3}), (130, 768, 1024, {"split": 2, "BN": 256}),
               (200, 512, 1024, {"WGS": 1}), (130, 512, 2048, {"WGS": 1, "BN": 256, "split": 2}),
               (256, 512, 1024, {"MT": 2}), (300, 768, 2048, {"MT": 2, "BN": 128, "split": 2}),
               (256, 512, 1024, {"WS": True}), (300, 768, 2048, {"WS": True, "split": 2}),
               (100, 512, 2048, {"WS": True, "stages": 5}), (256, 384, 4096, {"WS": True, "stages": 3}))]
    cases += [(b, 64, dt, 200, 512, 1024, {"WS": True}) for b in (2, 8) for dt in (mx.bfloat16, mx.float16)]
    cases += [(b, gs, dt, m, 512, 2048, {"WS": 2}) for b, gs, dt, m in
              ((4, 64, mx.bfloat16, 256), (4, 32, mx.float16, 100), (2, 128, mx.bfloat16, 300),
               (8, 64, mx.bfloat16, 130))]
    cases += [(8, 64, mx.bfloat16, 256, 512, 1024, {"BN": 256}), (2, 32, mx.float16, 256, 768, 1024, {"split": 2})]
    run_cases("parity", wg, cases[::3] if quick else cases, out)


def rs_parity(quick, out):
    """The register-operand kernel (kernels/qgemm_rs_cuda.py): every bit width, group and dtype, partial row
    tiles, split-K, stage counts."""
    cases = [(b, gs, dt, m, 512, 1024, {}) for b in (2, 4, 8) for gs in (32, 64, 128)
             for dt in (mx.bfloat16, mx.float16) for m in (136, 256)]
    cases += [(4, 64, mx.bfloat16, m, n, k, o) for m, n, k, o in
              ((96, 256, 512, {"split": 1}), (200, 384, 2048, {}), (65, 512, 1024, {"split": 4}),
               (256, 4096, 4096, {}), (192, 1024, 14336, {}), (256, 512, 1024, {"stages": 3}),
               (128, 512, 2048, {"stages": 5}), (300, 768, 2048, {"split": 2}), (32, 512, 1024, {}),
               (256, 512, 1024, {"CW": 1}), (160, 768, 1024, {"CW": 1, "split": 2}))]
    run_cases("rs parity", rs, cases[::3] if quick else cases, out)


def parse_shapes(env, default):
    if not env:
        return default
    return [tuple(int(v) for v in s.split("x")) for s in env.split(",")]


def time_variants(name, mod, variants, x, ws, ref, tb, bits, out) -> str:
    """Queued timing of mod.qgemm (qgemm_rs or qgemm_wg) for each config override in `variants`, recorded with
    its config, error and ratio to the bf16 matmul time tb; returns the log text."""
    (m, k), n, nq, line = x.shape, ws[0][0].shape[0], len(ws), ""
    tag = name.split("_")[1]
    for v in variants:
        try:
            cfg = mod.config(m, n, k, bits, **mod.config_args(v))
            t = timed(lambda: [mod.qgemm(x, *ws[i % nq], bits, 64, **v) for i in range(CALLS)])
            err = check(mod.qgemm(x, *ws[0], bits, 64, **v), ref)
        except Exception as e:
            out.append(dict(name=name, n=n, k=k, m=m, bits=bits, variant=v, error=repr(e)[:300]))
            line += f" | {tag}{v} error"
            continue
        flops = 2 * m * n * k
        out.append(rec(name, t, n=n, k=k, m=m, bits=bits, speedup_vs_bf16=tb[0] / t[0], cfg=cfg, variant=v,
                       tflops=flops / t[0] / 1e12, bf16_tflops=flops / tb[0] / 1e12, err=err))
        line += f" | {tag}{v or ''} {t[0] * 1e6:.1f} ({tb[0] / t[0]:.2f}x bf16)"
    return line


def timing(quick, out):
    shapes = parse_shapes(os.environ.get("WG_SHAPES"), [(14336, 4096, 4), (4096, 14336, 4), (28672, 4096, 4),
                                                        (14336, 4096, 2), (6144, 4096, 8), (4096, 4096, 8)])
    rows = tuple(int(r) for r in os.environ.get("WG_ROWS", "64,96,128,192,256,384,512,768").split(","))
    if quick:
        shapes, rows = shapes[:2], (128, 256)
    variants = [{}] + json.loads(os.environ.get("WG_VARIANTS", "[]"))
    rs_variants = [{}] + json.loads(os.environ.get("RS_VARIANTS", "[]"))
    for n, k, bits in shapes:
        wb, ws = rotation_sets(n, k, bits)
        nsets, nq = len(wb), len(ws)
        for m in rows:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            ref = mx.dequantize(*ws[0], group_size=64, bits=bits)
            ref = (x.astype(mx.float32) @ ref.astype(mx.float32).T)
            tb = timed(lambda: [x @ wb[i % nsets].T for i in range(CALLS)])
            out.append(rec("bf16_matmul", tb, n=n, k=k, m=m, bits=16))
            line = f"n={n} k={k} bits={bits} m={m}: bf16 {tb[0] * 1e6:.1f}"
            os.environ["JANG_QGEMM_WG"] = "0"    # kernels.qmm's route without this kernel (the route before)
            t0 = timed(lambda: [kqmm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
            out.append(rec("kernels.qmm without wg", t0, n=n, k=k, m=m, bits=bits, speedup_vs_bf16=tb[0] / t0[0],
                           err=check(kqmm(x, *ws[0], bits, 64), ref)))
            os.environ.pop("JANG_QGEMM_WG")
            os.environ["JANG_QGEMM_RS"] = "0"    # the route before the register-operand GEMM
            t1 = timed(lambda: [kqmm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
            out.append(rec("kernels.qmm without rs", t1, n=n, k=k, m=m, bits=bits, speedup_vs_bf16=tb[0] / t1[0],
                           err=check(kqmm(x, *ws[0], bits, 64), ref)))
            os.environ.pop("JANG_QGEMM_RS")
            t = timed(lambda: [kqmm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
            out.append(rec("kernels.qmm", t, n=n, k=k, m=m, bits=bits, speedup_vs_bf16=tb[0] / t[0],
                           speedup_vs_route_before=t0[0] / t[0], speedup_vs_without_rs=t1[0] / t[0],
                           err=check(kqmm(x, *ws[0], bits, 64), ref)))
            line += f" | kqmm no-wg {t0[0] * 1e6:.1f} no-rs {t1[0] * 1e6:.1f} now {t[0] * 1e6:.1f}"
            if m <= 256:
                t = timed(lambda: [q3.qgemm(x, *ws[i % nq], bits, 64) for i in range(CALLS)])
                out.append(rec("qgemm3", t, n=n, k=k, m=m, bits=bits, speedup_vs_bf16=tb[0] / t[0],
                               err=check(q3.qgemm(x, *ws[0], bits, 64), ref)))
                line += f" | v3 {t[0] * 1e6:.1f}"
            line += time_variants("qgemm_rs", rs, rs_variants if m <= rs.MAX_ROWS else [], x, ws, ref, tb, bits, out)
            line += time_variants("qgemm_wg", wg, variants, x, ws, ref, tb, bits, out)
            print(line, flush=True)
        del wb, ws


def ncu_mode():
    """Each kernel once under the profiler (ncu --profile-from-start off ... qgemm_wg_bench.py - ncu):
    the warpgroup GEMMs (qgemm_wg, qgemm_rs) at 128 and 256 rows (14336x4096, 4 bits) and the bf16 matmul of
    the same shapes."""
    n, k = 14336, 4096
    ws = qweights(n, k, 4, 64)
    wb = (mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16)
    calls = []
    for m in (128, 256):
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        calls += [lambda x=x: wg.qgemm(x, *ws, 4, 64), lambda x=x: rs.qgemm(x, *ws, 4, 64), lambda x=x: x @ wb.T]
    profile_calls(calls)


def ncu_rs_mode():
    """qgemm_rs alone at 64 and 256 rows (14336x4096, 4 bits), for the per-instruction stall sampling of
    bench/qgemm_rs_ncu.sh."""
    n, k = 14336, 4096
    ws = qweights(n, k, 4, 64)
    profile_calls([lambda m=m: rs.qgemm(mx.random.normal((m, k)).astype(mx.bfloat16), *ws, 4, 64) for m in (64, 256)])


def main(path, what, quick):
    method = (f"{CALLS} calls queued, one mx.eval, median of 5; weights rotated over > 200 MB; "
              "speedup_vs_bf16 = bf16 matmul time / this time (above 1: faster)")
    run_sections(path, method, (("probe", probe), ("parity", parity), ("rs_parity", rs_parity), ("timing", timing)),
                 what, quick)


if __name__ == "__main__":
    args = sys.argv[2:]
    if args in (["ncu"], ["ncu_rs"]):
        ncu_mode() if args == ["ncu"] else ncu_rs_mode()
        sys.exit(0)
    main(sys.argv[1], [a for a in args if a in ("probe", "parity", "rs_parity", "timing")]
         or ["probe", "parity", "rs_parity", "timing"],
         "quick" in args)
