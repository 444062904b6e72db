"""Host time of a many-sequence decode step, split into graph build and MLX's dispatch (device machine).

    python3 bench/dispatch_probe.py OUT.json [--nseq 64] [--layers 8] [--steps 40] [--quant jang4m|bf16]

On the random-weight Llama-3-8B-shaped model of bench/e2e_gpu.py (optionally fewer layers: the host's work per
layer is what is measured), `nseq` sequences decoding: each step's lazy graph is built (Python, compiled-call
replay), then dispatched with mx.async_eval while the GPU is idle (so the dispatch is not waiting for
anything), then waited for; then the same steps pipelined as the engine runs them (step t+1 built and
dispatched while the GPU runs step t, whose tokens are read after). Medians per step and per layer, with the
MLX_* environment recorded: run it once per setting (MLX reads its settings once per process), or under
`py-spy record --native` to see where the dispatch goes (on the H100 host, 1 kHz native sampling fell behind
and was killed before it wrote anything: use a lower rate):

    py-spy record --native -r 1000 -f raw -o SPY.txt -- python3 bench/dispatch_probe.py OUT.json
    python3 bench/dispatch_probe.py --summarize SPY.txt [--under async_eval] > top.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import e2e_gpu as E  # noqa: E402
from decode_anatomy import StepMaker, op_count  # noqa: E402


def summarize(path: str, under: str, top: int = 40) -> dict:
    """py-spy's raw (collapsed) stacks: samples whose stack passes through `under`, by the frame they were in
    (self) and by every native frame below `under` (inclusive)."""
    total, self_n, incl = 0, {}, {}
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        idx = next((i for i, f in enumerate(frames) if under in f), None)
        if idx is None:
            continue
        n = int(n)
        total += n
        leaf = frames[-1].split(" (")[0]
        self_n[leaf] = self_n.get(leaf, 0) + n
        for f in set(fr.split(" (")[0] for fr in frames[idx + 1:]):
            incl[f] = incl.get(f, 0) + n
    pick = lambda d: [(k[:140], v, round(100 * v / max(total, 1), 1))  # noqa: E731
                      for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return dict(samples=total, self=pick(self_n), inclusive=pick(incl))


def main():
    if "--summarize" in sys.argv:
        i = sys.argv.index("--summarize")
        under = sys.argv[sys.argv.index("--under") + 1] if "--under" in sys.argv else "async_eval"
        res = summarize(sys.argv[i + 1], under)
        print(f"samples under {under}: {res['samples']}")
        for kind in ("self", "inclusive"):
            print(f"-- {kind}")
            for name, n, pct in res[kind]:
                print(f"{pct:6.1f}% {n:7d}  {name}")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--nseq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quant", default="jang4m")
    ap.add_argument("--tiny", action="store_true", help="toy dimensions (CPU smoke test)")
    a = ap.parse_args()
    cfg = dict(E.TINY if a.tiny else E.LLAMA3_8B, num_hidden_layers=a.layers)
    w = E.random_weights(cfg, mx.bfloat16)
    model = E.ours(cfg, w, None if a.quant == "bf16" else a.quant)
    del w
    sm = StepMaker(model, cfg, a.nseq)
    build, dispatch, wait = [], [], []
    for _ in range(a.steps):
        mx.synchronize()
        t0 = time.perf_counter()
        tok = sm.step()
        t1 = time.perf_counter()
        mx.async_eval(tok, sm.pool.arrays())
        t2 = time.perf_counter()
        mx.eval(tok)
        mx.synchronize()
        t3 = time.perf_counter()
        build.append(t1 - t0)
        dispatch.append(t2 - t1)
        wait.append(t3 - t2)
    # pipelined, as the engine runs: step t+1 built and dispatched while the GPU still runs step t
    pbuild, pdispatch, pwait, prev = [], [], [], None
    mx.synchronize()
    t_start = time.perf_counter()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        tok = sm.step()
        t1 = time.perf_counter()
        mx.async_eval(tok, sm.pool.arrays())
        t2 = time.perf_counter()
        if prev is not None:
            prev.tolist()
        t3 = time.perf_counter()
        prev = tok
        pbuild.append(t1 - t0)
        pdispatch.append(t2 - t1)
        pwait.append(t3 - t2)
    prev.tolist()
    step_ms = 1e3 * (time.perf_counter() - t_start) / a.steps
    med = lambda v: round(1e3 * statistics.median(v[3:]), 3)  # noqa: E731
    ops = op_count([sm.step()] + sm.pool.arrays()[:2])
    mx.eval(sm.pool.arrays())
    res = dict(benchmark="dispatch_probe", device=E.device_name(), mlx=mx.__version__, nseq=a.nseq, layers=a.layers,
               quant=a.quant, env={k: v for k, v in os.environ.items() if k.startswith(("MLX_", "JANG_"))},
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               build_ms=med(build), dispatch_ms=med(dispatch), gpu_wait_ms=med(wait),
               dispatch_ms_per_layer=round(med(dispatch) / a.layers, 3),
               pipelined=dict(build_ms=med(pbuild), dispatch_ms=med(pdispatch), wait_ms=med(pwait),
                              step_ms=round(step_ms, 3)), graph_ops=ops)
    print(json.dumps(res), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
