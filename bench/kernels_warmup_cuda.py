"""Warm-up on CUDA for Llama-3-8B-shaped JANG_4M layers: cold compile time, a second (no-op) pass,
and a check that the warmed ops then run without compiling (first call after warm-up timed).

    python3 bench/kernels_warmup_cuda.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import mlx.core as mx

from jang_serve.kernels import paged_attention_decode, qmm, warmup

SHAPES = [
    dict(op="qmm", n=4096, k=4096, bits=8, group_size=64),      # attention projections (critical, 8-bit)
    dict(op="qmm", n=14336, k=4096, bits=4, group_size=64),     # gate / up
    dict(op="qmm", n=4096, k=14336, bits=4, group_size=64),     # down
    dict(op="qmm", n=128256, k=4096, bits=8, group_size=64),    # lm_head
    dict(op="paged", heads=32, kv_heads=8, head_dim=128, kv_quant=None),
    dict(op="paged", heads=32, kv_heads=8, head_dim=128, kv_quant=(8, 64)),
]


def first_call_ms(fn):
    t0 = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - t0) * 1e3


def main(path):
    res = dict(mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               device=mx.device_info().get("device_name", "?"), shapes=[str(s) for s in SHAPES])
    res["cold"] = warmup(SHAPES, rows=(1, 2, 3, 8, 16, 64))
    print("cold", res["cold"], flush=True)
    res["second"] = warmup(SHAPES, rows=(1, 2, 3, 8, 16, 64))
    print("second", res["second"], flush=True)
    checks = {}
    for m in (1, 3, 8, 64):
        w, s, b = mx.quantize(mx.random.normal((14336, 4096)).astype(mx.bfloat16) * 0.05, group_size=64, bits=4)
        x = mx.random.normal((m, 4096)).astype(mx.bfloat16)
        mx.eval(w, s, b, x)
        checks[f"qmm_4bit_14336x4096_rows{m}_first_call_ms"] = first_call_ms(lambda: qmm(x, w, s, b, 4, 64))
    kp = mx.random.normal((600, 16, 8, 128)).astype(mx.bfloat16)
    q = mx.random.normal((4, 32, 128)).astype(mx.bfloat16)
    tables = mx.arange(4 * 150, dtype=mx.int32).reshape(4, 150)
    lens = mx.array([2400, 100, 1, 700], dtype=mx.int32)
    mx.eval(kp, q)
    checks["paged_bf16_first_call_ms"] = first_call_ms(
        lambda: paged_attention_decode(q, kp, kp, tables, lens, 0.088, None, None))
    res["first_calls_after_warmup"] = checks
    print(checks)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kernels-warmup.json")
