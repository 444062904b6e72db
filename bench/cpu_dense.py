"""Dense weights on the CPU, A/B: the embedded default model (SmolLM2-135M-Instruct JANG_4L bundle from
the first `jang-serve` run, or --model) decoded greedily by the engine with its quantized layers packed
(EngineConfig.cpu_dense_gb=0: kernels.qmm, i.e. MLX's CPU quantized_matmul below 4-16 rows) and dense
(the default: engine/models/dense.py), 1 / 4 / 16 concurrent requests, arms interleaved run by run,
one fresh load per run. Beside the tokens/s: the weight bytes each arm holds, the bytes a decode step
reads, and the memory-bandwidth roofline of this machine (a timed float32 sum over 1 GB).

    .venv/bin/python bench/cpu_dense.py [--model PATH] [--repeats 3] [--out bench/results/cpu-dense.json]
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
from pathlib import Path

import jang_serve._blas  # noqa: F401 -- first: MLX gets a real BLAS on Linux
import mlx.core as mx
from mlx.utils import tree_flatten

from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.loader import load_model
from jang_serve.engine.sampling_params import SamplingParams

DEFAULT = "~/.cache/jang-serve/default/SmolLM2-135M-Instruct-JANG_4L-mse-g32"
TEXTS = ["Explain the difference between a list and a tuple in Python.", "Write a haiku about the sea.",
         "What is 17 times 23?", "Name three prime numbers and explain why."]


def read_bandwidth_gbs() -> dict:
    """This machine's read bandwidth as MLX's CPU sees it, best of 5 rounds of 8 calls: a float32 sum
    over 268 MB, and a one-row matmul with a 268 MB float32 matrix (BLAS sgemv: a decode step's
    access pattern; far larger than the last-level cache)."""
    w = mx.random.normal((8192, 8192))
    x = mx.random.normal((1, 8192))
    mx.eval(w, x)
    out = {}
    for name, f in (("sum", lambda: w.sum()), ("gemv", lambda: x @ w.T)):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(8):
                mx.eval(f())
            best = min(best, (time.perf_counter() - t) / 8)
        out[name] = round(w.nbytes / best / 1e9, 2)
    return out


def weight_bytes(model, tied: bool) -> tuple[int, int]:
    """(bytes of all parameters, bytes a decode step reads: all but the embedding table when the head
    is untied; with a tied head the table is read whole as the lm_head)."""
    params = tree_flatten(model.parameters())
    total = sum(v.nbytes for _, v in params)
    table = sum(v.nbytes for k, v in params if "embed_tokens" in k)
    return total, total if tied else total - table


def run(path, gb, n, gen):
    lm = load_model(path)
    prompts = [lm.tokenizer.encode(t) for t in (TEXTS * 4)[:n]]
    core = EngineCore(lm, EngineConfig(num_blocks=512, cpu_dense_gb=gb))
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    core.generate(prompts, sp)  # warm-up: compiled traces, first-use allocations
    t = time.perf_counter()
    out = core.generate(prompts, sp)
    dt = time.perf_counter() - t
    held = weight_bytes(lm.model, bool(lm.config.get("tie_word_embeddings")))
    return sum(len(x) for x in out) / dt, out, held, core.dense


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", default="bench/results/cpu-dense.json")
    a = ap.parse_args()
    path = os.path.expanduser(a.model)
    load0 = os.getloadavg()
    bw = read_bandwidth_gbs()
    arms = {"packed": 0.0, "dense": None}
    rows, held = {}, {}
    for n in (1, 4, 16):
        runs = {k: [] for k in arms}
        outs = {}
        for _ in range(a.repeats):
            for name, gb in arms.items():
                tok_s, out, (total, read), dense = run(path, gb, n, a.gen)
                runs[name].append(tok_s)
                outs[name] = out
                held[name] = dict(weight_bytes=total, read_per_step=read, dense=dense)
        med = {k: statistics.median(v) for k, v in runs.items()}
        row = dict(tok_s={k: [round(x, 2) for x in v] for k, v in runs.items()},
                   median={k: round(v, 2) for k, v in med.items()},
                   ratio_dense_packed=round(med["dense"] / med["packed"], 3),
                   same_tokens=outs["dense"] == outs["packed"])
        if n == 1:  # one token per step: the step reads every weight once
            peak = max(bw.values())
            row["roofline_tok_s"] = {k: round(peak * 1e9 / held[k]["read_per_step"], 1) for k in arms}
            row["fraction_of_roofline"] = {k: round(med[k] / row["roofline_tok_s"][k], 3) for k in arms}
        rows[str(n)] = row
        print(n, row, flush=True)
    res = dict(benchmark="cpu_dense", date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               device=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
               versions=dict(mlx=mx.__version__, python=platform.python_version()),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
               loadavg_start_end=[load0, os.getloadavg()], model=str(a.model), gen_tokens=a.gen,
               read_bandwidth_gbs=bw,
               held=held, method="greedy, ignore_eos; one fresh load and engine per run, warm-up generate then a timed "
               "generate of the same prompts; packed/dense interleaved, medians of the repeats. Roofline: the "
               "higher read bandwidth / weight bytes per step (batch 1).", requests=rows)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
