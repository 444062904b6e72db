"""Per-call floor of queued MLX ops on CUDA under the current MLX_* environment: is a short kernel's
queued time the GPU's or MLX's host dispatch? Run once per environment, in separate processes
(MLX reads MLX_USE_CUDA_GRAPHS / MLX_MAX_OPS_PER_BUFFER once):

    MLX_USE_CUDA_GRAPHS=0 python3 bench/kernels_dispatch_probe.py OUT.json

Times, as bench/kernels_bench.py (100 calls queued, one eval, median of 5): a tiny qgemv (256x512,
~0.1 us of bytes), a tiny elementwise add, the qgemv and mx.quantized_matmul at Llama shapes
(weights rotated over > 8x the L2), and the bf16 matmul 14336x4096.
"""

from __future__ import annotations

import json
import math
import os
import sys

import mlx.core as mx

from jang_serve.kernels import qmm_cuda
from kernels_bench import CALLS, ROTATE_BYTES, qweights, timed


def main(path: str) -> int:
    out = dict(env={k: v for k, v in os.environ.items() if k.startswith("MLX_")}, rows={})
    x = mx.random.normal((1, 512)).astype(mx.bfloat16)
    small = qweights(256, 512, 4, 64)
    a = mx.random.normal((256,)).astype(mx.bfloat16)
    mx.eval(x, small, a)
    out["rows"]["qgemv_256x512_us"] = 1e6 * timed(lambda: [qmm_cuda.qgemv(x, *small, 4, 64) for _ in range(CALLS)])[0]
    out["rows"]["add_256_us"] = 1e6 * timed(lambda: [a + float(i) for i in range(CALLS)])[0]
    for n, k, bits in ((14336, 4096, 4), (4096, 14336, 4), (4096, 4096, 8)):
        qbytes = n * k * bits // 8 + 4 * n * (k // 64)
        nsets = max(2, math.ceil(ROTATE_BYTES / qbytes))
        ws = [qweights(n, k, bits, 64) for _ in range(nsets)]
        xx = mx.random.normal((1, k)).astype(mx.bfloat16)
        mx.eval(ws, xx)
        t = timed(lambda: [qmm_cuda.qgemv(xx, *ws[i % nsets], bits, 64) for i in range(CALLS)])[0]
        out["rows"][f"qgemv_{n}x{k}_{bits}bit_us"] = 1e6 * t
        out["rows"][f"qgemv_{n}x{k}_{bits}bit_pct_copy_2842"] = 100 * (qbytes + 2 * (n + k)) / t / 2842e9
        t = timed(lambda: [mx.quantized_matmul(xx, *ws[i % nsets], transpose=True, group_size=64, bits=bits)
                           for i in range(CALLS)])[0]
        out["rows"][f"quantized_matmul_{n}x{k}_{bits}bit_us"] = 1e6 * t
        del ws
    nb = max(2, math.ceil(ROTATE_BYTES / (14336 * 4096 * 2)))
    wb = [(mx.random.normal((14336, 4096)) * 0.05).astype(mx.bfloat16) for _ in range(nb)]
    xx = mx.random.normal((1, 4096)).astype(mx.bfloat16)
    mx.eval(wb, xx)
    out["rows"]["bf16_matmul_14336x4096_us"] = 1e6 * timed(lambda: [xx @ wb[i % nb].T for i in range(CALLS)])[0]
    print(json.dumps(out))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dispatch.json"))
