"""Does the weight-stationary GEMM (128 KB of dynamic shared memory per block) slow down when other
kernels run between its calls (the engine's case), e.g. by shared-memory carveout switches? Queued
timings (kernels_bench method) of each GEMM alone, a 1-row GEMV alone, and the two interleaved.

    python3 bench/qgemm3_interleave.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from kernels_bench import CALLS, qweights, timed  # noqa: E402

from jang_serve.kernels import qgemm3_cuda as q3, qgemm_cuda  # noqa: E402
from jang_serve.kernels.qmm import qmm as kqmm  # noqa: E402


def main(path):
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mlx=mx.__version__, runs={})
    n, k = 14336, 4096
    ws = [qweights(n, k, 4, 64) for _ in range(8)]
    gv = [qweights(4096, 4096, 8, 64) for _ in range(8)]
    mx.eval(ws, gv)
    x = mx.random.normal((64, k)).astype(mx.bfloat16)
    x1 = mx.random.normal((1, 4096)).astype(mx.bfloat16)
    gemms = {"v3": lambda i: q3.qgemm(x, *ws[i % 8], 4, 64), "v2": lambda i: qgemm_cuda.qgemm(x, *ws[i % 8], 4, 64)}
    gemv = lambda i: kqmm(x1, *gv[i % 8], 8, 64)   # noqa: E731
    for rep in range(2):
        r = {"gemv": timed(lambda: [gemv(i) for i in range(CALLS)])[0] * 1e6}
        for name, f in gemms.items():
            r[name] = timed(lambda: [f(i) for i in range(CALLS)])[0] * 1e6
            r[name + "+gemv"] = timed(lambda: [o for i in range(CALLS) for o in (f(i), gemv(i))])[0] * 2e6
            r[name + "_interleave_extra_us"] = r[name + "+gemv"] - r[name] - r["gemv"]
        res["runs"][f"rep{rep}"] = r
        print(json.dumps(r), flush=True)
    json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
