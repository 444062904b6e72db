"""Quantized matmuls at 64-256 rows in dependent chains, as the engine runs them: each product takes the previous
one's output, so MLX's CUDA graphs cannot run two of them side by side. The queued method of kernels_bench.py
(100 independent calls, one eval) lets MLX's graphs overlap independent calls, which hides a launch that leaves
SMs idle; here nothing is hidden. Every ratio comes from this one run.

    python3 bench/qgemm_chain.py OUT.json            (COMMIT=... for the record)

Chains (weights ~N(0, 1/K) so activations stay O(1); 100 products per chain, weight sets rotated over > 200 MB):
- `pair`: 14336x4096 then 4096x14336 (the issue's two Llama-3-8B shapes), 2 and 4 bits;
- `mlp`: the engine's MLP at JANG_4M: fused gate/up 28672x4096, gate * up (one elementwise kernel, the same in
  every variant), down 4096x14336, 4 bits;
- `square8`: 4096x4096 at 8 bits (the attention output projection).
Variants: the bf16 matmul (cuBLAS) on bf16 weights; kernels.qmm's route; the route without the register-operand
GEMM (JANG_QGEMM_RS=0); qgemm_rs forced to split=1 (no split-K), and, for contrast, the same route queued as
independent calls (per product). Reported per product: chain time / products.
"""

from __future__ import annotations

import json
import math
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from kernels_bench import CALLS, run_sections, timed  # noqa: E402

from jang_serve.kernels import qgemm_rs_cuda as rs  # noqa: E402
from jang_serve.kernels.qmm import qmm as kqmm  # noqa: E402

ROWS = tuple(int(r) for r in os.environ.get("CHAIN_ROWS", "64,96,128,192,256").split(","))


def weights(n, k, bits, total=200e6):
    """Rotating sets of bf16 weights [n, k] ~ N(0, 1/k) and their quantized forms (group 64)."""
    def one():
        return (mx.random.normal((n, k)) / math.sqrt(k)).astype(mx.bfloat16)
    wb = [one() for _ in range(max(2, math.ceil(total / (n * k * 2))))]
    mx.eval(wb)
    wq = []
    for _ in range(max(2, math.ceil(total / (n * k * bits / 8)))):
        wq.append(mx.quantize(one(), group_size=64, bits=bits))
        mx.eval(wq[-1])
    return wb, wq


def chain_time(build):
    """build() -> the lazy last output of a chain of CALLS products: (median, min, max) seconds per product."""
    return tuple(t / CALLS for t in timed(lambda: [build()]))


def variants(bits):
    """name -> (f(x, weights) for one product, env to set while building)."""
    return {
        "bf16 matmul": (lambda x, w: x @ w[0].T, {}),
        "kernels.qmm": (lambda x, w: kqmm(x, *w[1], bits, 64), {}),
        "kernels.qmm without rs": (lambda x, w: kqmm(x, *w[1], bits, 64), {"JANG_QGEMM_RS": "0"}),
        "qgemm_rs split=1": (lambda x, w: rs.qgemm(x, *w[1], bits, 64, split=1), {}),
    }


def with_env(env, fn):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_chain(label, layers, bits, out, glue=None):
    """layers: list of (n, k) weight shapes applied in turn (the output of one is the input of the next after
    glue, if any); CALLS products in all."""
    sets = [weights(n, k, bits) for n, k in layers]
    per = len(layers)
    for m in ROWS:
        x0 = mx.random.normal((m, layers[0][1])).astype(mx.bfloat16)
        mx.eval(x0)
        row = dict(chain=label, bits=bits, m=m, layers=[f"{n}x{k}" for n, k in layers])
        for name, (f, env) in variants(bits).items():
            def build(f=f):
                x = x0
                for i in range(CALLS // per):
                    for j, (wb, wq) in enumerate(sets):
                        x = f(x, (wb[i % len(wb)], wq[i % len(wq)]))
                        if glue and j == 0:
                            x = glue(x)
                return x
            try:
                t = with_env(env, lambda: chain_time(build))
                row[name] = round(t[0] * 1e6, 2)
                row[name + " min/max"] = [round(t[1] * 1e6, 2), round(t[2] * 1e6, 2)]
            except Exception as e:  # keep going: the record says what broke
                row[name] = repr(e)[:300]
        f = variants(bits)["kernels.qmm"][0]
        wb, wq = sets[0]
        tq = timed(lambda: [f(x0, (wb[i % len(wb)], wq[i % len(wq)])) for i in range(CALLS)])
        row["kernels.qmm queued (first layer alone)"] = round(tq[0] * 1e6, 2)
        tb = timed(lambda: [x0 @ wb[i % len(wb)].T for i in range(CALLS)])
        row["bf16 matmul queued (first layer alone)"] = round(tb[0] * 1e6, 2)
        b = row["bf16 matmul"]
        for name in ("kernels.qmm", "kernels.qmm without rs", "qgemm_rs split=1"):
            if isinstance(row.get(name), float):
                row[f"{name} speedup_vs_bf16"] = round(b / row[name], 3)
        out.append(row)
        print(json.dumps(row), flush=True)
    del sets


def section(quick, out):
    run_chain("pair", [(14336, 4096), (4096, 14336)], 4, out)
    run_chain("pair", [(14336, 4096), (4096, 14336)], 2, out)
    run_chain("mlp", [(28672, 4096), (4096, 14336)], 4, out,
              glue=lambda h: h[:, :14336] * h[:, 14336:])
    run_chain("square8", [(4096, 4096)], 8, out)


if __name__ == "__main__":
    run_sections(sys.argv[1], __doc__.split("\n\n")[0], (("chains", section),), ["chains"], False)
