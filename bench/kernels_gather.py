"""Parity and timing of the expert-gathered GEMV (kernels/gather_cuda.py) on the device machine.

    python3 bench/kernels_gather.py OUT.json [parity|timing|all]
    .venv/bin/python bench/kernels_gather.py - compile      # local nvcc build of the templates, no GPU

Parity: every bit width x group size x bf16/fp16, launch variants rotated over the cases (G entries
per block 1/2/4/8, R, W, FAST on/off), unsorted (x broadcast against [T, k] indices, as SwitchGLU
passes few pairs), sorted (one x row per pair) and lhs_indices; error ||y - ref|| / ||ref|| against a
float32 reference from the same dequantized experts. Pass: err <= max(2e-2, 3 x mx.gather_qmm's).
Also the public kernels.gather_qmm entry point (routing, plans, index flattening) at those forms.

Timing (MoE decode shapes; Mixtral-like 8 experts 4096->14336 / 14336->4096 top-2, Qwen3-MoE-like
128 experts 2048->768 / 768->2048 top-8; 1-64 tokens): 100 calls queued, one mx.eval, median of 5;
expert weights rotated over >= 400 MB of sets, a fresh random routing per call (distinct experts per
token); bytes = distinct experts read x expert bytes + x + y. Against mx.gather_qmm with the same
arguments (unsorted below 64 pairs, sorted from 64: SwitchGLU's rule). Then the whole expert MLP
(gate, up, silu, down) through kernels.gather_qmm as routed vs mx.gather_qmm.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from jang_serve.kernels import gather as gather_mod
from jang_serve.kernels import gather_cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_bench import CALLS, REPS, ROTATE_BYTES, timed  # noqa: E402
from kernels_parity_cuda import relerr  # noqa: E402
SORT_PAIRS = 64          # engine/models/switch.py sorts (token, expert) pairs from this many
T_START = time.time()
# Stop starting new cases past these many seconds (the device call's limit is 600 s; compiles are
# most of the time: each parity case JITs its own template).
PARITY_BUDGET_S = float(os.environ.get("GB_PARITY_S", 300))
BUDGET_S = float(os.environ.get("GB_TIMING_S", 470))
MLP_BUDGET_S = float(os.environ.get("GB_MLP_S", 470))
BITS_BUDGET_S = float(os.environ.get("GB_BITS_S", 470))
PARITY_DTYPES = os.environ.get("GB_PARITY_DTYPES", "bfloat16,float16").split(",")
PARITY_ENTRY = os.environ.get("GB_PARITY_ENTRY", "1") != "0"


def copy_bandwidth():
    a = mx.random.uniform(shape=(256, 1024, 1024)).astype(mx.bfloat16)
    mx.eval(a)
    t = timed(lambda: [a * 2 for _ in range(10)])
    return 2 * a.nbytes / t[0]


def routing(rng, tokens, top_k, experts):
    """[T, k] distinct experts per token (as top-k routing gives)."""
    return np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.uint32)


# ---------------------------------------------------------------- parity

VARIANTS = ((1, 8, 1, True), (1, 8, 2, True), (1, 4, 4, False), (2, 4, 1, True), (4, 4, 2, True),
            (8, 2, 1, True), (8, 2, 2, False), (4, 2, 1, True))


def dense_ref(x2d, wq, s, b, xi, ei, bits, gs):
    wd = mx.dequantize(wq, s, b, group_size=gs, bits=bits).astype(mx.float32)      # [E, N, K]
    xs = x2d.astype(mx.float32)[xi]                                                 # [B, K]
    return (xs[:, None, :] @ wd[ei].swapaxes(-1, -2))[:, 0, :]


def parity_section():
    out = []
    rng = np.random.default_rng(0)
    i = 0
    for dtype in [getattr(mx, d) for d in PARITY_DTYPES]:
        for bits in (2, 3, 4, 5, 6, 8):
            for gs in (32, 64, 128):
                if time.time() - T_START > PARITY_BUDGET_S:
                    out.append(dict(op="gather_qgemv", skipped=f"{dtype} {bits} bits gs {gs}: time budget", ok=False,
                                    err=float("nan")))
                    continue
                g, r, w, fast = VARIANTS[i % len(VARIANTS)]
                i += 1
                e, n, k = 6, 200 + 8 * (i % 3), 512 if i % 2 else 1024
                wq, s, b = mx.quantize((mx.random.normal((e, n, k)) * 0.05).astype(dtype), group_size=gs, bits=bits)
                if g == 1:          # unsorted: x [T, K] broadcast over the k experts of each token
                    idx = routing(rng, 3, 2, e)
                    xi = np.repeat(np.arange(3), 2)
                    x2d = mx.random.normal((3, k)).astype(dtype)
                    ei = idx.reshape(-1)
                else:               # sorted pairs, one x row each
                    ei = np.sort(rng.integers(0, e, 13)).astype(np.uint32)
                    xi = np.arange(13)
                    x2d = mx.random.normal((13, k)).astype(dtype)
                xi_a, ei_a = mx.array(xi, dtype=mx.int32), mx.array(ei)
                with mx.stream(mx.cpu):   # the reference and MLX's own error on the CPU: no GPU JIT for them
                    ref = dense_ref(x2d, wq, s, b, xi_a, ei_a, bits, gs)
                    base = mx.gather_qmm(x2d[xi_a][:, None, :], wq, s, b, rhs_indices=ei_a, transpose=True,
                                         group_size=gs, bits=bits)[:, 0, :]
                    mx.eval(ref, base)
                y = gather_cuda.gather_qgemv(x2d, wq, s, b, xi_a, ei_a, bits, gs, G=g, R=r, W=w, FAST=fast)
                err, berr = relerr(y, ref), relerr(base, ref)
                out.append(dict(op="gather_qgemv", dtype=str(dtype), bits=bits, gs=gs, n=n, k=k, entries=len(ei),
                                G=g, R=r, W=w, FAST=fast, err=err, ref_err=berr, ok=err <= max(2e-2, 3 * berr)))
                print(f"parity {out[-1]}", flush=True)
    # the public entry point: unsorted broadcast form, sorted form, lhs_indices
    for dtype in (mx.bfloat16, mx.float16) if PARITY_ENTRY else ():
        e, n, k, bits, gs, t, top = 8, 384, 2048, 4, 64, 4, 2
        wq, s, b = mx.quantize((mx.random.normal((e, n, k)) * 0.05).astype(dtype), group_size=gs, bits=bits)
        x = mx.random.normal((t, k)).astype(dtype)
        inds = mx.array(routing(rng, t, top, e))
        flat = inds.reshape(-1)
        order = mx.argsort(flat)
        forms = {
            "unsorted": (mx.expand_dims(x, (1, 2)), inds, None, False),
            "sorted": (x[order // top][:, None, :], flat[order], None, True),
            "lhs": (x[:, None, :], inds, mx.broadcast_to(mx.arange(t)[:, None], (t, top)), False),
        }
        for name, (xx, rhs, lhs, srt) in forms.items():
            y = gather_mod.gather_qmm(xx, wq, s, b, rhs, bits, gs, lhs_indices=lhs, sorted_indices=srt)
            ref = mx.gather_qmm(xx.astype(mx.float32), wq, s.astype(mx.float32), b.astype(mx.float32),
                                lhs_indices=lhs, rhs_indices=rhs, transpose=True, group_size=gs, bits=bits,
                                sorted_indices=srt)
            base = mx.gather_qmm(xx, wq, s, b, lhs_indices=lhs, rhs_indices=rhs, transpose=True, group_size=gs,
                                 bits=bits, sorted_indices=srt)
            route = [p.route for key, p in gather_mod._plans.items() if key[1] == xx.shape and key[7] == rhs.shape]
            err, berr = relerr(y, ref), relerr(base, ref)
            out.append(dict(op="gather_qmm", form=name, dtype=str(dtype), shape=list(y.shape), route=route[-1],
                            err=err, ref_err=berr, ok=err <= max(2e-2, 3 * berr) and y.shape == base.shape))
            print(f"parity {out[-1]}", flush=True)
    return out


# ---------------------------------------------------------------- timing

MODELS = {  # name: (experts, top_k, [(N, K), ...])
    "mixtral": (8, 2, [(14336, 4096), (4096, 14336)]),
    "qwen3moe": (128, 8, [(768, 2048), (2048, 768)]),
}


def weight_sets(e, n, k, bits, gs, dtype=mx.bfloat16):
    per = e * n * (k * bits // 8 + 2 * 2 * k // gs)
    sets = max(2, math.ceil(ROTATE_BYTES / per))
    out = []
    for _ in range(sets):
        wq = mx.random.randint(0, 2**31, (e, n, k * bits // 32)).astype(mx.uint32)
        s = (mx.random.uniform(shape=(e, n, k // gs)) * 0.01).astype(dtype)
        b = (mx.random.uniform(shape=(e, n, k // gs)) * -0.01).astype(dtype)
        out.append((wq, s, b))
    mx.eval(out)
    return out, per // e


def call_inputs(rng, tokens, top_k, e, k, dtype, pool=16):
    """A pool of per-call inputs: (x for the reference, rhs, x2d, xi, ei, sorted, distinct experts)."""
    pairs = tokens * top_k
    srt = pairs >= SORT_PAIRS
    out = []
    for _ in range(pool):
        idx = routing(rng, tokens, top_k, e)
        if srt:
            flat = idx.reshape(-1)
            order = np.argsort(flat, kind="stable")
            ei, xi = flat[order], order // top_k
            x2d = mx.random.normal((tokens, k)).astype(dtype)
            xref = x2d[mx.array(xi)][:, None, :]
            rhs = mx.array(ei)
            xk = xref.reshape(pairs, k)
            xi = np.arange(pairs)
        else:
            x2d = mx.random.normal((tokens, k)).astype(dtype)
            xref, rhs = mx.expand_dims(x2d, (1, 2)), mx.array(idx)
            xk, xi, ei = x2d, np.repeat(np.arange(tokens), top_k), idx.reshape(-1)
        out.append(dict(xref=xref, rhs=rhs, x2d=xk, xi=mx.array(xi.astype(np.int32)), ei=mx.array(ei), srt=srt,
                        distinct=len(set(ei.tolist()))))
    mx.eval([list(d[k_] for k_ in ("xref", "rhs", "x2d", "xi", "ei")) for d in out])
    return out


def timing_section(bw, main=True):
    out = []
    rng = np.random.default_rng(1 if main else 3)
    cases = []
    only = os.environ.get("GB_SHAPES")          # e.g. "mixtral:4096x14336,qwen3moe:768x2048"
    if main:
        for model, (e, top, shapes) in MODELS.items():
            toks = (1, 2, 4, 8, 16, 32, 64, 128)
            for (n, k) in shapes:
                if only and f"{model}:{n}x{k}" not in only.split(","):
                    continue
                cases.append((model, e, top, n, k, 4, 64, toks))
    else:
        for model, (e, top, shapes) in MODELS.items():   # other bit widths at one and eight tokens
            for bits in (2, 3, 8):
                cases.append((model, e, top, shapes[0][0], shapes[0][1], bits, 64, (1, 8)))
    budget = BUDGET_S if main else BITS_BUDGET_S
    for model, e, top, n, k, bits, gs, toks in cases:
        if time.time() - T_START > budget:
            out.append(dict(skipped=f"{model} {n}x{k} {bits} bits: time budget"))
            continue
        sets, ebytes = weight_sets(e, n, k, bits, gs)
        for t in toks:
            if time.time() - T_START > budget:
                out.append(dict(skipped=f"{model} {n}x{k} {bits} bits from {t} tokens: time budget"))
                break
            ins = call_inputs(rng, t, top, e, k, mx.bfloat16)
            srt = ins[0]["srt"]
            pairs = t * top
            nbytes = statistics.mean(d["distinct"] for d in ins) * ebytes + (t * k + pairs * n) * 2
            combos = [(sets[i % len(sets)], ins[i % len(ins)]) for i in range(CALLS)]

            def ref_calls():
                return [mx.gather_qmm(d["xref"], w, s, b, rhs_indices=d["rhs"], transpose=True, group_size=gs,
                                      bits=bits, sorted_indices=d["srt"]) for (w, s, b), d in combos]

            tr = timed(ref_calls)
            row = dict(model=model, n=n, k=k, bits=bits, gs=gs, experts=e, top_k=top, tokens=t, pairs=pairs,
                       sorted=srt, bytes=nbytes, ref_us=tr[0] * 1e6, ref_us_min=tr[1] * 1e6,
                       ref_us_max=tr[2] * 1e6, ref_pct_bw=100 * nbytes / tr[0] / bw, variants=[])
            default = gather_cuda.default_config(pairs, n, k, bits, srt, e)
            variants = [default]
            if bits == 4:
                alts = [dict(G=1, R=8, W=1), dict(G=1, R=4, W=1), dict(G=1, R=4, W=2)] if not srt else \
                    [dict(G=1, R=4, W=1), dict(G=4, R=4, W=1), dict(G=2, R=4, W=1), dict(G=8, R=4, W=1)]
                variants += [dict(a, FAST=True) for a in alts if dict(a, FAST=True) != default]
            for cfg in variants:
                d0 = ins[0]
                y = gather_cuda.gather_qgemv(d0["x2d"], sets[0][0], sets[0][1], sets[0][2], d0["xi"], d0["ei"],
                                             bits, gs, **cfg)
                ref = mx.gather_qmm(d0["xref"], *sets[0], rhs_indices=d0["rhs"], transpose=True, group_size=gs,
                                    bits=bits, sorted_indices=srt).reshape(y.shape)
                err = relerr(y, ref)

                def our_calls(cfg=cfg):
                    return [gather_cuda.gather_qgemv(d["x2d"], w, s, b, d["xi"], d["ei"], bits, gs, **cfg)
                            for (w, s, b), d in combos]

                to = timed(our_calls)
                row["variants"].append(dict(cfg=cfg, us=to[0] * 1e6, us_min=to[1] * 1e6, us_max=to[2] * 1e6,
                                            pct_bw=100 * nbytes / to[0] / bw, speedup=tr[0] / to[0], err=err))
            row["us"], row["speedup"] = row["variants"][0]["us"], row["variants"][0]["speedup"]
            row["best"] = min(row["variants"], key=lambda v: v["us"])
            out.append(row)
            print(f"{model:8s} {n:5d}x{k:5d} b{bits} T={t:3d} pairs={pairs:3d} sorted={int(srt)} "
                  f"mx {row['ref_us']:7.1f} us ({row['ref_pct_bw']:4.0f}%)  ours {row['us']:7.1f} us "
                  f"({row['variants'][0]['pct_bw']:4.0f}%) x{row['speedup']:.2f}  best {row['best']['cfg']} "
                  f"{row['best']['us']:.1f} err {row['variants'][0]['err']:.1e}", flush=True)
        del sets
    return out


def mlp_section(bw):
    """The expert MLP of one MoE layer, as SwitchGLU computes it, through kernels.gather_qmm (routed
    as shipped) and through mx.gather_qmm."""
    out = []
    rng = np.random.default_rng(2)
    for model, (e, top, shapes) in MODELS.items():
        if time.time() - T_START > MLP_BUDGET_S:
            out.append(dict(skipped=f"{model}: time budget"))
            continue
        (n, d), bits, gs = shapes[0], 4, 64
        hidden = n
        layers = list(zip(weight_sets(e, hidden, d, bits, gs)[0], weight_sets(e, hidden, d, bits, gs)[0],
                          weight_sets(e, d, hidden, bits, gs)[0]))      # (gate, up, down) per rotated set
        for t in (1, 8, 64):
            if time.time() - T_START > MLP_BUDGET_S:
                break
            pool = []
            for _ in range(8):
                idx = mx.array(routing(rng, t, top, e))
                pool.append((mx.random.normal((t, d)).astype(mx.bfloat16), idx))
            mx.eval(pool)

            def mlp(gq, x, inds, lay):
                (gw, gs_, gb), (uw, us_, ub), (dw, ds_, db) = lay
                k_ = inds.shape[1]
                flat = inds.reshape(-1)
                srt = flat.size >= SORT_PAIRS
                if srt:
                    order = mx.argsort(flat)
                    inv = mx.argsort(order)
                    xs, idx = x[order // k_][:, None, :], flat[order]
                else:
                    xs, idx = mx.expand_dims(x, (1, 2)), inds
                h = nn.silu(gq(xs, gw, gs_, gb, idx, srt)) * gq(xs, uw, us_, ub, idx, srt)
                y = gq(h, dw, ds_, db, idx, srt)
                return y[inv][:, 0, :].reshape(t, k_, -1) if srt else y[..., 0, :]

            def ours(xs, w, s, b, idx, srt):
                return gather_mod.gather_qmm(xs, w, s, b, idx, bits, gs, sorted_indices=srt)

            def theirs(xs, w, s, b, idx, srt):
                return mx.gather_qmm(xs, w, s, b, rhs_indices=idx, transpose=True, group_size=gs, bits=bits,
                                     sorted_indices=srt)

            def forced(xs, w, s, b, idx, srt):   # the kernel whatever the number of pairs
                return gather_cuda.gather_qgemv(xs.reshape(-1, xs.shape[-1]), w, s, b, forced_xi(idx, srt),
                                                idx.reshape(-1), bits, gs, srt).reshape(*idx.shape, 1, -1)

            def forced_xi(idx, srt):
                return mx.arange(idx.size, dtype=mx.int32) if srt else \
                    mx.broadcast_to(mx.arange(idx.shape[0], dtype=mx.int32)[:, None], idx.shape).reshape(-1)

            x0, i0 = pool[0]
            want = mlp(theirs, x0, i0, layers[0])
            err = relerr(mlp(ours, x0, i0, layers[0]), want)
            err_forced = relerr(mlp(forced, x0, i0, layers[0]), want)
            res = {}
            for name, gq in (("ours", ours), ("forced", forced), ("mx", theirs)):
                res[name] = timed(lambda gq=gq: [mlp(gq, *pool[i % len(pool)], layers[i % len(layers)])
                                                  for i in range(CALLS)])
            route = sorted({p.route for key, p in gather_mod._plans.items() if key[3][0] == e})
            out.append(dict(model=model, d=d, hidden=hidden, experts=e, top_k=top, tokens=t, bits=bits,
                            ours_us=res["ours"][0] * 1e6, kernel_forced_us=res["forced"][0] * 1e6,
                            mx_us=res["mx"][0] * 1e6, speedup=res["mx"][0] / res["ours"][0],
                            speedup_forced=res["mx"][0] / res["forced"][0], err=err, err_forced=err_forced,
                            routes=route))
            print(f"mlp {model} T={t}: ours {res['ours'][0] * 1e6:.1f} us (kernel forced "
                  f"{res['forced'][0] * 1e6:.1f}), mx.gather_qmm {res['mx'][0] * 1e6:.1f} us "
                  f"x{res['mx'][0] / res['ours'][0]:.2f} / x{res['mx'][0] / res['forced'][0]:.2f} err {err:.1e}",
                  flush=True)
    return out


def compile_check() -> bool:
    """Build every bit width x the shipped launch shapes (and a G=8 / FAST=False pair) with the local
    nvcc, no GPU needed (bench/kernels_compile_check.py's wrapper); prints registers and spills."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels_compile_check import build, compile_one

    from jang_serve.kernels import cuda_common
    ok = True
    for bits in (2, 3, 4, 5, 6, 8):
        for g, r, w, fast in ((1, 4, 1, True), (1, 4, 2, True), (4, 4, 1, True), (8, 2, 2, False)):
            tmpl = [("T", "bfloat16"), ("S", "bfloat16"), ("BITS", bits), ("GS", 32 if bits == 2 else 64),
                    ("G", g), ("R", r), ("W", w), ("FAST", fast)]
            src = build("gather_qgemv", gather_cuda.SOURCE, cuda_common.HEADER,
                        [("x", "bfloat16"), ("w", "uint32"), ("scales", "bfloat16"), ("biases", "bfloat16"),
                         ("xi", "int32"), ("ei", "uint32")], [("y", "bfloat16")], tmpl)
            ok &= compile_one(f"bits={bits} G={g} R={r} W={w} FAST={fast}", src)
    return ok


def main(path, what="all"):
    if what == "compile":
        sys.exit(0 if compile_check() else 1)
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = "?"
    res = dict(benchmark="kernels_gather", device=gpu, mlx=mx.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               method=f"{CALLS} calls queued, one mx.eval, median of {REPS}; expert weights rotated over >= "
                      f"{ROTATE_BYTES / 1e6:.0f} MB; fresh routing per call; bytes = distinct experts x expert bytes + x + y")
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    secs = [("parity", lambda: parity_section())] if what in ("parity", "all") else []
    if what in ("timing", "all"):
        secs += [("timing", lambda: timing_section(bw)), ("mlp", lambda: mlp_section(bw)),
                 ("timing_bits", lambda: timing_section(bw, main=False))]
    for name, fn in secs:
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # keep what was measured so far
            import traceback
            traceback.print_exc()
            res[name + "_error"] = repr(e)
        res[name + "_seconds"] = round(time.time() - t0, 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    if "parity" in res:
        bad = [r for r in res["parity"] if not r["ok"] and "skipped" not in r]
        res["parity_summary"] = dict(cases=len(res["parity"]), failed=len(bad),
                                     skipped=sum("skipped" in r for r in res["parity"]),
                                     worst_err=max((r["err"] for r in res["parity"] if "skipped" not in r), default=None))
        print("parity", res["parity_summary"])
    res["seconds"] = round(time.time() - T_START, 1)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kernels-gather.json", sys.argv[2] if len(sys.argv) > 2 else "all")
