"""kernels.qmm on the CPU against mx.quantized_matmul, SmolLM2-135M shapes, in one run.

    .venv/bin/python bench/qmm_cpu.py [--out bench/results/qmm-cpu.json]

For each shape and row count: the median of 3 timings of 3 calls each, the reference
(mx.quantized_matmul) and kernels.qmm interleaved, 4-bit group 64, float32 activations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import jang_serve._blas  # noqa: F401  (first: OpenBLAS for MLX where installed)
import mlx.core as mx

from jang_serve.kernels import qmm, qmm_reference

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"q_proj 576->576": (576, 576), "gate/up 576->1536": (1536, 576), "down 1536->576": (576, 1536),
          "tied lm_head 576->49152": (49152, 576)}


def timed(fn, reps=3):
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/qmm-cpu.json"))
    ap.add_argument("--rows", default="1,4,8,16,64")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for name, (n, k) in SHAPES.items():
        w = mx.random.normal((n, k)) * 0.02
        q, s, b = mx.quantize(w, group_size=64, bits=4)
        mx.eval(q, s, b)
        for m in rows:
            x = mx.random.normal((m, k))
            mx.eval(x)
            ref_t, our_t = [], []
            for _ in range(3):  # interleaved A B A B
                ref_t.append(timed(lambda: qmm_reference(x, q, s, b, 4, 64)))
                our_t.append(timed(lambda: qmm(x, q, s, b, 4, 64)))
            diff = float(mx.abs(qmm(x, q, s, b, 4, 64) - qmm_reference(x, q, s, b, 4, 64)).max())
            r, o = statistics.median(ref_t), statistics.median(our_t)
            results.append(dict(shape=name, n=n, k=k, rows=m, reference_ms=r, qmm_ms=o, speedup=r / o,
                                reference_spread=[min(ref_t), max(ref_t)], qmm_spread=[min(our_t), max(our_t)],
                                max_abs_diff=diff, qmm_gflops=2 * m * n * k / o / 1e6))
            print(f"{name:26s} rows {m:4d}: reference {r:8.2f} ms  qmm {o:8.2f} ms  x{r / o:5.1f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = dict(benchmark="qmm_cpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=dict(kind="cpu", processor=platform.processor() or platform.machine(), cores=os.cpu_count(),
                           blas=jang_serve._blas.loaded or "mlx[cpu] wheel's netlib BLAS", note="shared machine"),
               versions=dict(mlx=version("mlx"), jang_serve_commit=commit), bits=4, group_size=64,
               activations="float32", results=results)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
