"""Where a prefix hit's time to first token goes, with kernels.qmm's CPU route as shipped and with
its earlier `rows16` rule (bench/engine_throughput.py --qmm-cpu-rule):

    .venv/bin/python bench/engine_hit_profile.py [--model PATH] [--quantize none|q4g64] [--out JSON]

The prompt pair is engine_throughput's: a ~1,000-token prompt, then one sharing its first 992 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jang_serve._blas  # noqa: F401  (first: a real BLAS for MLX on Linux, as engine_throughput)
import mlx.core as mx
from mlx.utils import tree_flatten

from engine_throughput import (ROOT, EngineConfig, EngineCore, SamplingParams, apply_qmm_cpu_rule, describe,  # noqa: E402
                               docs_prompts, git_commit, load_model, quantize_uniform, realdata)


def profile_hit(lm, prompt_a, prompt_b, repeats: int = 3, matmuls: bool = True) -> dict:
    """Where a prefix hit's time to first token goes (8 new tokens after 992 cached): the whole
    step, the model call alone on the same 8 tokens without a cache (so no attention over the
    prefix), and each distinct quantized weight's matmul at 8 rows through MLX's quantized_matmul
    and through dequantize + BLAS (ms, medians)."""
    import mlx.nn as nn

    from jang_serve.engine.attention import ContiguousBackend, ContiguousKV
    from jang_serve.engine.models.layers import QLinear

    qmod = sys.modules["jang_serve.kernels.qmm"]
    model, rows = lm.model, len(prompt_b) - 992

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return round(statistics.median(ts) * 1000, 2)

    core = EngineCore(lm, EngineConfig(kv_memory_gb=1.0, max_num_batched_tokens=2048))
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    core.add_request("warm", prompt_a, sp)
    while core.has_work():
        core.step()
    hits = []
    for i in range(repeats):
        core.add_request(f"hit{i}", prompt_b, sp)  # the partial last block is never cached: 8 new tokens each time
        t = time.perf_counter()
        while core.has_work():
            core.step()
        hits.append(time.perf_counter() - t)
    toks = mx.array(prompt_b[992:], dtype=mx.int32)

    def forward():
        be = ContiguousBackend([ContiguousKV(model.num_layers)], [rows])
        mx.eval(model(toks, mx.arange(rows), be, logits_rows=mx.array([rows - 1], dtype=mx.int32)))

    mats, seen = [], set()
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if not matmuls or not isinstance(m, (QLinear, nn.QuantizedEmbedding)):
            continue
        k_in = m.weight.shape[1] * 32 // m.bits
        key = (m.weight.shape[0], k_in, m.bits, m.group_size)
        if key in seen:
            continue
        seen.add(key)
        x = mx.random.normal((rows, k_in))
        args = (m.weight, m.scales, m.biases, m.bits, m.group_size)
        mats.append(dict(name=path.split(".")[-1], out=key[0], inp=key[1], bits=m.bits, group=m.group_size,
                         quantized_matmul_ms=med(lambda: mx.eval(qmod.qmm_reference(x, *args))),
                         dequant_blas_ms=med(lambda: mx.eval(qmod.qmm_dequant_matmul(x, *args)))))
    return dict(new_tokens=rows, cached_tokens=992, hit_step_ms=round(statistics.median(hits) * 1000, 1),
                forward_without_cache_ms=med(forward), matmuls_at_new_tokens_rows=mats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(realdata.smollm2_gguf()))
    ap.add_argument("--quantize", default="none", choices=["none", "q4g64"])
    ap.add_argument("--ttft-tokens", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "bench/results/engine-cpu-hit-profile.json"))
    args = ap.parse_args()
    lm = load_model(args.model)
    if args.quantize == "q4g64":
        quantize_uniform(lm, 4, 64)
    text_ids = docs_prompts(lm.tokenizer, 2, args.ttft_tokens, args.ttft_tokens)
    a = text_ids[0]
    b = a[:992] + text_ids[1][: args.ttft_tokens - 992]
    out = {"shipped": profile_hit(lm, a, b, matmuls=False)}
    out["rows16"] = dict(rule=apply_qmm_cpu_rule("rows16"), **profile_hit(lm, a, b))
    for k, v in out.items():
        print(k, {x: y for x, y in v.items() if x != "matmuls_at_new_tokens_rows"}, flush=True)
    result = dict(benchmark="engine_hit_profile",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=git_commit(),
                  device=dict(kind=str(mx.default_device()), cpu_count=os.cpu_count(),
                              blas=jang_serve._blas.loaded or "the mlx[cpu] wheel's reference BLAS",
                              note="2-core machine shared with other engineers' work; run under "
                                   f"/tmp/jang-bench.lock (load average {os.getloadavg()[0]:.1f} at the end)"),
                  versions=dict(mlx=version("mlx"), python=platform.python_version()),
                  model=dict(path=str(args.model), quantize=args.quantize, **describe(lm)), profile=out)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
