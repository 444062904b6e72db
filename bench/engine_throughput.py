"""Engine throughput on this machine: ours vs mlx-lm's BatchGenerator, same model, same weights.

    .venv/bin/python bench/engine_throughput.py [--model PATH] [--gen 16] [--out bench/results/engine-cpu.json]

For 1, 4 and 16 concurrent requests (prompts of different lengths from the Python docs), both
engines generate `--gen` tokens per request greedily (no EOS stop), interleaved run by run; we report
aggregate generated tokens/s over the wall time from submission to the last token (prefill
included). Then time to first token of a ~1,000-token prompt, cold and with a prefix-cache hit
(the same 992-token prefix, a different tail).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jang_serve._blas  # noqa: F401  (first: gives MLX a real BLAS on Linux, for both engines alike)
import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import realdata  # noqa: E402
from jang_serve.engine.engine_config import EngineConfig  # noqa: E402
from jang_serve.engine.engine_core import EngineCore  # noqa: E402
from jang_serve.engine.loader import load_model  # noqa: E402
from jang_serve.engine.sampling_params import SamplingParams  # noqa: E402


def mlx_lm_model(lm):
    """mlx-lm's own llama model carrying exactly our weights."""
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(lm.config))
    model.load_weights(tree_flatten(lm.model.parameters()), strict=True)
    mx.eval(model.parameters())
    return model


def docs_prompts(tok, n: int, lo: int, hi: int) -> list[list[int]]:
    text = realdata.python_docs_text()
    ids = tok.encode(text[200_000:200_000 + 40 * hi * n])
    out, pos = [], 0
    for i in range(n):
        length = lo + (hi - lo) * i // max(n - 1, 1)
        out.append(ids[pos:pos + length])
        pos += length
    return out


def run_ours(lm, prompts, gen, budget):
    core = EngineCore(lm, EngineConfig(kv_memory_gb=1.0, max_num_batched_tokens=budget, max_num_seqs=64))
    t = time.perf_counter()
    outs = core.generate(prompts, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
    dt = time.perf_counter() - t
    assert all(len(o) == gen for o in outs)
    return dt, outs


def run_mlx_lm(model, prompts, gen):
    from mlx_lm.generate import BatchGenerator

    g = BatchGenerator(model, max_tokens=gen, completion_batch_size=max(len(prompts), 1),
                       prefill_batch_size=min(len(prompts), 8))
    t = time.perf_counter()
    uids = g.insert(prompts, [gen] * len(prompts))
    outs = {u: [] for u in uids}
    while responses := g.next_generated():
        for r in responses:
            outs[r.uid].append(r.token)
    dt = time.perf_counter() - t
    g.close()
    assert all(len(outs[u]) == gen for u in uids), [len(outs[u]) for u in uids]
    return dt, [outs[u] for u in uids]


def ttft(lm, prompt_a, prompt_b):
    core = EngineCore(lm, EngineConfig(kv_memory_gb=1.0, max_num_batched_tokens=2048))
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    res = {}
    for name, p in (("cold", prompt_a), ("prefix_hit", prompt_b)):
        core.add_request(name, p, sp)
        t = time.perf_counter()
        while core.has_work():
            for d in core.step():
                if d.token_ids and name not in res:
                    res[name] = (time.perf_counter() - t, d.cached_tokens)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(realdata.smollm2_gguf()))
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=64)
    ap.add_argument("--ttft-tokens", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=2048, help="our max_num_batched_tokens")
    ap.add_argument("--out", default=str(ROOT / "bench/results/engine-cpu.json"))
    args = ap.parse_args()

    lm = load_model(args.model)
    theirs = mlx_lm_model(lm)
    tok = lm.tokenizer
    run_ours(lm, docs_prompts(tok, 2, 8, 8), 2, args.budget)  # warm-up both
    run_mlx_lm(theirs, docs_prompts(tok, 2, 8, 8), 2)

    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        prompts = docs_prompts(tok, c, args.prompt_min, args.prompt_max)
        d_ours, o_ours = run_ours(lm, prompts, args.gen, args.budget)
        d_theirs, o_theirs = run_mlx_lm(theirs, prompts, args.gen)
        same = sum(a == b for a, b in zip(o_ours, o_theirs))
        row = dict(concurrency=c, prompt_tokens=sum(map(len, prompts)), generated_tokens=c * args.gen,
                   ours_s=round(d_ours, 3), mlx_lm_s=round(d_theirs, 3),
                   ours_tok_s=round(c * args.gen / d_ours, 3), mlx_lm_tok_s=round(c * args.gen / d_theirs, 3),
                   speedup=round(d_theirs / d_ours, 3), identical_outputs=f"{same}/{c}")
        print(row, flush=True)
        rows.append(row)

    text_ids = docs_prompts(tok, 2, args.ttft_tokens, args.ttft_tokens)
    a = text_ids[0]
    b = a[:992] + text_ids[1][: args.ttft_tokens - 992]
    t = ttft(lm, a, b)
    ttft_row = dict(prompt_tokens=len(a), cold_s=round(t["cold"][0], 3), prefix_hit_s=round(t["prefix_hit"][0], 3),
                    cached_tokens=t["prefix_hit"][1], speedup=round(t["cold"][0] / t["prefix_hit"][0], 1))
    print(ttft_row, flush=True)

    result = dict(
        benchmark="engine_throughput",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dict(kind=str(mx.default_device()), machine=platform.machine(), processor=platform.processor(),
                    cpu_count=__import__("os").cpu_count(),
                    blas=jang_serve._blas.loaded or "the mlx[cpu] wheel's reference (netlib) BLAS"),
        versions=dict(mlx=version("mlx"), mlx_lm=version("mlx-lm"), python=platform.python_version()),
        model=dict(path=str(args.model), dtype="float32", note="GGUF Q4_1 dequantized to float32; both engines get the same weights"),
        settings=dict(gen_tokens=args.gen, prompt_tokens=[args.prompt_min, args.prompt_max], greedy=True,
                      our_max_num_batched_tokens=args.budget, kv="auto (float32)", block_size=16),
        throughput=rows,
        ttft=ttft_row,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
