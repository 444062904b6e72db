"""Do our kernels pay for reading MLX's small-allocation pool? On CUDA, MLX 0.32 puts every array of at most
8 bytes (one int32 position, one context length, one slot, one float scale: a batch-1 decode step's metadata)
in a managed-memory pool (cudaMallocManaged + cudaMemAdviseSetReadMostly), which the host writes whenever it
makes such an array; larger arrays live in ordinary buffers. This times three decode-step kernels with their
small inputs from that pool ("small") against the same values as views of 16-byte arrays ("view": a[:1] of a
4-element array, same buffer, no copy) and as whole 16-byte arrays where the kernel reads only the first
entry ("padded").

    python3 bench/small_pool.py OUT.json time          # queued: 100 calls, one eval, median of 5
    ncu --clock-control none -k regex:custom_kernel --metrics gpu__time_duration.sum --csv --log-file X.csv \
        python3 bench/small_pool.py MANIFEST.json ncu    # each launch alone
    python3 bench/gemv_ncu.py MANIFEST.json --report X.csv

Cases (Llama-3-8B shapes, batch 1): the norm + q/k/v + RoPE GEMV at 8 bits (rpos), paged decode v2 over 140
tokens (context length and scale), the KV write of one token (block and offset).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kernels_bench import CALLS, qweights, timed  # noqa: E402
from kernels_parity_cuda import make_pool  # noqa: E402

from jang_serve.kernels import kv_write, paged_cuda  # noqa: E402
from jang_serve.kernels.qmm_fused import _qgemv_rope, rope_inv_freq  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16


def ints(vals, how, dtype=mx.int32):
    """vals as an array of the pool ("small"), a view of a 4-entry array ("view") or 4 entries ("padded")."""
    if how == "small":
        return mx.array(vals, dtype=dtype)
    a = mx.array(list(vals) + [0] * (4 - len(vals)), dtype=dtype)
    return a[:len(vals)] if how == "view" else a


def cases():
    """{name: (how -> f() -> array)}; each f is one launch."""
    out = {}
    x = mx.random.normal((1, 4096)).astype(mx.bfloat16)
    nw = (mx.random.normal((4096,)) * 0.2 + 1).astype(mx.bfloat16)
    ws = [qweights(6144, 4096, 8, 64) for _ in range(8)]
    inv = rope_inv_freq(D, 500000.0)
    mx.eval(x, nw, ws, inv)
    it = iter(range(10**9))

    def rope(how):
        pos = ints([137], how)
        mx.eval(pos)
        return lambda: _qgemv_rope(x, *ws[next(it) % len(ws)], 8, 64, nw, 1e-5, pos, inv, D, HQ + HKV)
    out["qkv_rope_8bit"] = rope

    rng = np.random.default_rng(0)
    nblk = -(-140 // BS)
    layers = []
    for _ in range(16):
        kp, vp = make_pool(nblk, BS, HKV, D, mx.bfloat16, None)
        layers.append((mx.random.normal((1, HQ, D)).astype(mx.bfloat16), kp, vp))
    tables = mx.array(rng.permutation(nblk).reshape(1, nblk).astype(np.int32))
    mx.eval(layers, tables)

    def paged(how):
        lens = ints([140], how)
        scale = ints([D ** -0.5], how, mx.float32)
        mx.eval(lens, scale)
        paged_cuda._scales[D ** -0.5] = scale     # the kernel's scale input (one array per scale value)

        def f():
            q, kp, vp = layers[next(it) % len(layers)]
            return paged_cuda.paged_decode(q, kp, vp, tables, lens, D ** -0.5, None, 16, 32, impl="v2")
        return f
    out["paged_v2_b1_ctx140"] = paged

    pools = [(mx.zeros((64, BS, HKV, D), mx.bfloat16), mx.zeros((64, BS, HKV, D), mx.bfloat16)) for _ in range(8)]
    k = mx.random.normal((1, HKV, D)).astype(mx.bfloat16)
    q = mx.random.normal((1, HQ, D)).astype(mx.bfloat16)
    mx.eval(pools, k, q)

    def write(how):
        blocks, offs = ints([5], how), ints([3], how)
        mx.eval(blocks, offs)

        def f():
            kp, vp = pools[next(it) % len(pools)]
            return kv_write.kv_write_inplace(kp, vp, k, k, blocks, offs, q)[0]
        return f
    out["kv_write_1tok"] = write
    return out


def main():
    path, mode = sys.argv[1], sys.argv[2]
    hows = ("small", "view", "padded")
    if mode == "ncu":
        kv_write.ready()   # the KV write's one-time self-test: one more custom kernel, before the cases'
        manifest = [dict(n=0, k=0, bits=0, variant="kv_write self-test", bytes=1, warm=True)]
        for name, make in cases().items():
            for how in hows:
                f = make(how)
                for i in range(4):
                    mx.eval(f())
                    warm = {"warm": True} if i == 0 else {}
                    manifest.append(dict(n=0, k=0, bits=0, variant=f"{name} {how}", bytes=1, **warm))
        json.dump(manifest, open(path, "w"))
        return 0
    res = dict(benchmark="small_pool", mlx=mx.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               device=mx.device_info().get("device_name", "?"), method=__doc__, rows=[])
    for name, make in cases().items():
        fs = {how: make(how) for how in hows}
        for rep in range(2):                      # interleaved twice
            for how in hows:
                t = timed(lambda: [fs[how]() for _ in range(CALLS)])
                res["rows"].append(dict(case=name, how=how, rep=rep, us=round(t[0] * 1e6, 2),
                                        us_min=round(t[1] * 1e6, 2), us_max=round(t[2] * 1e6, 2)))
                print(res["rows"][-1], flush=True)
    Path(path).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
