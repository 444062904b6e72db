"""Compiled decode steps on the CPU, A/B: the embedded default model (SmolLM2-135M-Instruct JANG_4L bundle
from the first `jang-serve` run, or --model), greedy, 1 and 4 concurrent requests, with
EngineConfig.compile_decode off and on, interleaved run by run (repeats), same tokens checked.

    .venv/bin/python bench/compile_cpu_ab.py [--model PATH] [--repeats 3] [--out bench/results/compile-cpu-ab.json]
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

from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.loader import load_model
from jang_serve.engine.models.compiled import compile_blocks
from jang_serve.engine.sampling_params import SamplingParams

DEFAULT = "~/.cache/jang-serve/default/SmolLM2-135M-Instruct-JANG_4L-mse-g32"
TEXTS = ["Explain the difference between a list and a tuple in Python.", "Write a haiku about the sea.",
         "What is 17 times 23?", "Name three prime numbers and explain why."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen", type=int, default=40)
    ap.add_argument("--out", default="bench/results/compile-cpu-ab.json")
    a = ap.parse_args()
    lm = load_model(os.path.expanduser(a.model))
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    sp = SamplingParams(max_tokens=a.gen, temperature=0, ignore_eos=True)
    rows = {}
    for n in (1, 4):
        runs = {"off": [], "on": []}
        outs = {}
        for _ in range(a.repeats):
            for name in ("off", "on"):
                compile_blocks(lm.model, on=False)   # fresh traces for each engine
                core = EngineCore(lm, EngineConfig(num_blocks=256, compile_decode=name == "on"))
                core.generate(prompts[:n], sp)     # warm-up (and the first trace)
                t = time.perf_counter()
                out = core.generate(prompts[:n], sp)
                runs[name].append(sum(len(x) for x in out) / (time.perf_counter() - t))
                outs[name] = out
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows[str(n)] = dict(tok_s={k: [round(x, 2) for x in v] for k, v in runs.items()},
                            median={k: round(v, 2) for k, v in med.items()}, ratio_on_off=round(med["on"] / med["off"], 3),
                            same_tokens=outs["on"] == outs["off"])
        print(n, rows[str(n)], flush=True)
    res = dict(benchmark="compile_cpu_ab", date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               device=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)", mlx=mx.__version__,
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
               model=str(a.model), gen_tokens=a.gen, method="greedy, one engine per run, warm-up generate then a timed "
               "generate of the same prompts; off/on interleaved, medians of the repeats", requests=rows)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
