"""The fused GEMV variants (kernels/qmm_fused.py) on the device: parity, then timing against the
unfused op sequence they replace, in the same run.

    python3 bench/kernels_fused_cuda.py OUT.json

Parity: every mode (norm, residual, norm+SwiGLU, SwiGLU) x bits 2/3/4/8 x group 32/64/128 at one
row in bf16, plus 5/6 bits, 2-4 rows and fp16 at some settings, against a float32 composition of the same dequantized weights (rms_norm,
matmul, epilogue); passes when the relative error is below max(2e-2, 3 x that of the unfused
composition in the activation dtype). Timing: Llama-3-8B layer shapes at one row (JANG_4M bits:
q/k/v 8, gate/up 4, o 8, down 4), 100 calls queued and one eval, median of 5, weights rotated over
> 8x L2: fused call vs the unfused sequence (rms_norm + qmm, qmm + silu*mul, qmm + add).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_bench import CALLS, ROTATE_BYTES, rec, timed  # noqa: E402
from kernels_parity_cuda import relerr  # noqa: E402

from jang_serve.engine.models.layers import RoPE  # noqa: E402
from jang_serve.kernels.qmm_fused import (_qgemv_rope, qgemv_fused, qkv_rope, qmm_fused_reference,  # noqa: E402
                                          rope_inv_freq)

MODES = {"norm": dict(norm=True), "residual": dict(residual=True), "norm+swiglu": dict(norm=True, swiglu=True),
         "swiglu": dict(swiglu=True)}


def inputs(n, k, m, bits, gs, dtype, mode):
    wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.05).astype(dtype), group_size=gs, bits=bits)
    x = mx.random.normal((m, k)).astype(dtype)
    nw = (mx.random.normal((k,)) * 0.2 + 1).astype(dtype) if mode.get("norm") else None
    n_out = n // 2 if mode.get("swiglu") else n
    res = mx.random.normal((m, n_out)).astype(dtype) if mode.get("residual") else None
    return x, wq, s, b, nw, res


def f32_reference(x, wq, s, b, bits, gs, nw, eps, res, swiglu):
    xf = x.astype(mx.float32)
    h = xf if nw is None else mx.fast.rms_norm(xf, nw.astype(mx.float32), eps)
    y = h @ mx.dequantize(wq, s, b, group_size=gs, bits=bits).astype(mx.float32).T
    if swiglu:
        g, u = mx.split(y, 2, axis=-1)
        y = g * mx.sigmoid(g) * u
    return y if res is None else y + res.astype(mx.float32)


def parity():
    rows, fails = [], 0
    # every template is one NVRTC compile: all bits x groups at one row in bf16, the other row
    # buckets and fp16 at 4 bits / group 64
    grid = [(mx.bfloat16, bits, gs, 1) for bits in (2, 3, 4, 8) for gs in (32, 64, 128)]
    grid += [(mx.bfloat16, bits, 64, 1) for bits in (5, 6)]
    grid += [(mx.bfloat16, 4, 64, m) for m in (2, 3, 4)] + [(mx.float16, 4, 64, 1), (mx.float16, 8, 32, 3)]
    for name, mode in MODES.items():
        for dtype, bits, gs, m in grid:
            n, k = (520, 1024) if name != "residual" else (264, 1024)  # partial last team
            x, wq, s, b, nw, res = inputs(n, k, m, bits, gs, dtype, mode)
            sw = bool(mode.get("swiglu"))
            ref = f32_reference(x, wq, s, b, bits, gs, nw, 1e-5, res, sw)
            y = qgemv_fused(x, wq, s, b, bits, gs, nw, 1e-5, res, sw)
            base = qmm_fused_reference(x, wq, s, b, bits, gs, nw, 1e-5, res, sw)
            e, be = relerr(y, ref), relerr(base, ref)
            ok = e <= max(2e-2, 3 * be) and y.shape == ref.shape
            fails += not ok
            rows.append(dict(mode=name, dtype=str(dtype), bits=bits, gs=gs, m=m, n=n, k=k, err=e,
                             composition_err=be, ok=ok))
    return rows, fails


ROPE_SCALINGS = {"default": None, "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def rope_parity():
    """qkv_rope's kernel (norm + q/k/v + RoPE) against float32: rms_norm, matmul, mx.fast.rope."""
    rows, fails = [], 0
    for sname, scaling in ROPE_SCALINGS.items():
        for dtype, bits, gs, m, norm in ((mx.bfloat16, 8, 64, 1, True), (mx.bfloat16, 4, 32, 1, True),
                                         (mx.bfloat16, 8, 64, 4, True), (mx.float16, 8, 64, 2, False)):
            nh, nkv, hd = 8, 2, 128
            n, k = (nh + 2 * nkv) * hd, 1024
            x, wq, s, b, nw, _ = inputs(n, k, m, bits, gs, dtype, dict(norm=norm))
            rope = RoPE(hd, base=500000.0, scaling=scaling)
            inv = rope_inv_freq(hd, rope.base, rope.scale, rope._freqs)
            pos = mx.array([5, 1000, 7000, 130000][:m], dtype=mx.int32)
            ref = f32_reference(x, wq, s, b, bits, gs, nw, 1e-5, None, False).reshape(m, nh + 2 * nkv, hd)
            ref = mx.concatenate([rope(ref[:, :nh + nkv], pos), ref[:, nh + nkv:]], axis=1).reshape(m, n)
            y = _qgemv_rope(x, wq, s, b, bits, gs, nw, 1e-5, pos, inv, hd, nh + nkv)
            q, kk, v = qkv_rope(x, wq, s, b, bits, gs, n_heads=nh, n_kv=nkv, head_dim=hd, positions=pos,
                                inv_freq=inv, rope=rope, norm_weight=nw, eps=1e-5)   # the routed entry point
            routed = mx.concatenate([q, kk, v], axis=1).reshape(m, n)
            base_y = qmm_fused_reference(x, wq, s, b, bits, gs, nw, 1e-5).reshape(m, nh + 2 * nkv, hd)
            base = mx.concatenate([rope(base_y[:, :nh + nkv], pos), base_y[:, nh + nkv:]], axis=1).reshape(m, n)
            e, er, be = relerr(y, ref), relerr(routed, ref), relerr(base, ref)
            ok = max(e, er) <= max(2e-2, 3 * be)
            fails += not ok
            rows.append(dict(mode="norm+qkv+rope" if norm else "qkv+rope", rope=sname, dtype=str(dtype), bits=bits,
                             gs=gs, m=m, err=e, routed_err=er, composition_err=be, ok=ok))
    return rows, fails


def timing():
    """One row, Llama-3-8B shapes: the fused call vs the unfused sequence it replaces."""
    cases = [("norm+qkv 6144x4096 8-bit", 6144, 4096, 8, dict(norm=True)),
             ("norm+gate_up+swiglu 28672x4096 4-bit", 28672, 4096, 4, dict(norm=True, swiglu=True)),
             ("o_proj+residual 4096x4096 8-bit", 4096, 4096, 8, dict(residual=True)),
             ("down+residual 4096x14336 4-bit", 4096, 14336, 4, dict(residual=True))]
    out = []
    for label, n, k, bits, mode in cases:
        one = inputs(n, k, 1, bits, 64, mx.bfloat16, mode)
        copies = max(2, int(ROTATE_BYTES // (one[1].nbytes + 1)) + 1)
        sets = [one] + [inputs(n, k, 1, bits, 64, mx.bfloat16, mode) for _ in range(copies - 1)]
        mx.eval(sets)
        sw = bool(mode.get("swiglu"))

        def fused():
            return [qgemv_fused(*(sets[i % copies][:4]), bits, 64, sets[i % copies][4], 1e-5, sets[i % copies][5], sw)
                    for i in range(CALLS)]

        def unfused():
            outs = []
            for i in range(CALLS):
                x, wq, s, b, nw, res = sets[i % copies]
                outs.append(qmm_fused_reference(x, wq, s, b, bits, 64, nw, 1e-5, res, sw))
            return outs

        tf, tu = timed(fused), timed(unfused)
        wbytes = one[1].nbytes + one[2].nbytes + one[3].nbytes
        out.append(dict(case=label, fused=rec("fused", tf, wbytes), unfused=rec("unfused", tu, wbytes),
                        speedup=round(tu[0] / tf[0], 3)))
        print(json.dumps(out[-1]), flush=True)
    # norm + q/k/v + RoPE (one kernel) vs rms_norm + qmm + mx.fast.rope (Llama-3-8B: 32 + 8 + 8 heads of 128)
    rope = RoPE(128, base=500000.0, scaling=ROPE_SCALINGS["llama3"])
    inv = rope_inv_freq(128, rope.base, rope.scale, rope._freqs)
    pos = mx.array([700], dtype=mx.int32)
    one = inputs(6144, 4096, 1, 8, 64, mx.bfloat16, dict(norm=True))
    copies = max(2, int(ROTATE_BYTES // (one[1].nbytes + 1)) + 1)
    sets = [one] + [inputs(6144, 4096, 1, 8, 64, mx.bfloat16, dict(norm=True)) for _ in range(copies - 1)]
    mx.eval(sets, inv)

    def fused_rope():
        return [_qgemv_rope(*(sets[i % copies][:4]), 8, 64, sets[i % copies][4], 1e-5, pos, inv, 128, 40)
                for i in range(CALLS)]

    def unfused_rope():
        outs = []
        for i in range(CALLS):
            x, wq, s, b, nw, _ = sets[i % copies]
            y = qmm_fused_reference(x, wq, s, b, 8, 64, nw, 1e-5).reshape(1, 48, 128)
            outs.append(rope(y[:, :40], pos))
            outs.append(y[:, 40:])
        return outs

    tf, tu = timed(fused_rope), timed(unfused_rope)
    tu = tuple(2 * v for v in tu)   # timed() divides by the list length: two outputs per call there
    wbytes = one[1].nbytes + one[2].nbytes + one[3].nbytes
    out.append(dict(case="norm+qkv+rope 6144x4096 8-bit", fused=rec("fused", tf, wbytes),
                    unfused=rec("unfused", tu, wbytes), speedup=round(tu[0] / tf[0], 3)))
    print(json.dumps(out[-1]), flush=True)
    return out


def main(path):
    dev = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() or str(mx.default_device())
    res = dict(benchmark="kernels_fused_cuda", device=dev,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               versions=dict(mlx=version("mlx"), python=platform.python_version()),
               commit=os.environ.get("JANG_COMMIT", ""))
    rows, fails = parity()
    rrows, rfails = rope_parity()
    rows += rrows
    fails += rfails
    res["parity"] = dict(cases=len(rows), failed=fails, worst_err=max(r["err"] for r in rows), rows=rows)
    print(f"parity: {len(rows) - fails}/{len(rows)} pass, worst {res['parity']['worst_err']:.2e}", flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    res["timing"] = dict(method=f"{CALLS} calls queued, one eval, median of 5, weights rotated over > {ROTATE_BYTES/1e6:.0f} MB",
                         cases=timing())
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
