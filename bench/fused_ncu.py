"""GPU time of the fused decode GEMVs (kernels/qmm_fused.py) beside the plain GEMV of the same matrix, one
kernel at a time under Nsight Compute: which part of a fused variant (the RMSNorm prologue, the RoPE or other
epilogue, the row mapping) costs time at the engine's one-row shapes.

    ncu --clock-control none -k regex:custom_kernel --metrics ... --csv --log-file OUT.csv \
        python3 bench/fused_ncu.py MANIFEST.json
    python3 bench/gemv_ncu.py MANIFEST.json --report OUT.csv   (the same manifest format as bench/gemv_ncu.py)

FN_CASES (JSON list of [N, K, bits, mode]; mode in plain, norm, rope, norm+rope, residual, norm+swiglu) and
FN_W (JSON list of W values; [] = the default config) choose the work; each case is launched FN_LAUNCHES times
(default 2) with fresh weights.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx

from kernels_bench import qweights
from read_floor import read

from jang_serve.kernels import qmm_cuda
from jang_serve.kernels.qmm_fused import _qgemv_rope, qgemv_fused, rope_inv_freq

CASES = json.loads(os.environ.get("FN_CASES", '[[6144, 4096, 8, "plain"], [6144, 4096, 8, "norm"], '
                                  '[6144, 4096, 8, "rope"], [6144, 4096, 8, "norm+rope"]]'))
WS = json.loads(os.environ.get("FN_W", "[]"))
LAUNCHES = int(os.environ.get("FN_LAUNCHES", "2"))
GS, HD, NH, NKV = 64, 128, 32, 8


def launch(mode, x, wq, s, b, bits, nw, res, pos, inv):
    n = wq.shape[0]
    if mode == "plain":
        return qmm_cuda.qgemv(x, wq, s, b, bits, GS)
    if mode in ("rope", "norm+rope"):
        return _qgemv_rope(x, wq, s, b, bits, GS, nw if "norm" in mode else None, 1e-5, pos, inv, HD,
                           n // HD - NKV)
    return qgemv_fused(x, wq, s, b, bits, GS, nw if "norm" in mode else None, 1e-5,
                       res if mode == "residual" else None, swiglu="swiglu" in mode)


def run(manifest_path: str) -> None:
    base_cfg = qmm_cuda.default_config
    manifest = []
    for n, k, bits, mode in CASES:
        x = mx.random.normal((1, k)).astype(mx.bfloat16)
        nw = (mx.random.normal((k,)) * 0.2 + 1).astype(mx.bfloat16)
        res = mx.random.normal((1, n)).astype(mx.bfloat16)
        pos = mx.array([137], mx.int32)
        inv = rope_inv_freq(HD, 500000.0)
        nbytes = n * k * bits // 8 + 2 * 2 * n * (k // GS)
        buf = mx.random.randint(0, 2**31, (nbytes // 64 * 16,)).astype(mx.uint32)
        ws = [qweights(n, k, bits, GS) for _ in range(LAUNCHES + 1)]
        mx.eval(x, nw, res, pos, inv, buf, ws)
        for w in WS or [None]:
            qmm_cuda.default_config = base_cfg if w is None else \
                (lambda *a, w=w: dict(base_cfg(*a), W=w))
            tag = f"{mode}" + ("" if w is None else f",W={w}")
            for i in range(LAUNCHES + 1):
                mx.eval(launch(mode, x, *ws[i], bits, nw, res, pos, inv))
                warm = {"warm": True} if i == 0 else {}
                manifest.append(dict(n=n, k=k, bits=bits, variant=tag, bytes=nbytes, **warm))
        qmm_cuda.default_config = base_cfg
        for i in range(LAUNCHES):
            mx.eval(read(buf, 132 * 8, 4, False))
            manifest.append(dict(n=n, k=k, bits=bits, variant="plain read", bytes=nbytes))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    run(sys.argv[1])
