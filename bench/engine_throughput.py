"""Engine throughput on this machine: ours vs mlx-lm's BatchGenerator, same model, same weights.

    .venv/bin/python bench/engine_throughput.py [--model PATH] [--quantize none|q4g64] [--gen 16]
        [--repeats 3] [--out bench/results/engine-cpu.json]

--model: a GGUF (dequantized to float32), a JANG bundle or an mlx-lm folder. `--quantize q4g64`
quantizes the loaded float32 model uniformly (4 bits, group 64, RTN, as mlx-lm's convert -q).
mlx-lm runs its own llama model carrying exactly our parameters (quantized layers made with
nn.quantize at each module's bits / group size), with float32 activations like ours.

For 1, 4 and 16 concurrent requests (prompts of different lengths from the Python docs), both
engines generate `--gen` tokens per request greedily (no EOS stop), interleaved run by run,
`--repeats` times; we report the median (and min / max) aggregate generated tokens/s over the wall
time from submission to the last token (prefill included), and the time to the first token.
Then time to first token of a ~1,000-token prompt, cold and with a prefix-cache hit (the same
992-token prefix, a different tail).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
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


CPU_DENSE_GB = None  # --cpu-dense-gb, for every engine this script makes


def mlx_lm_model(lm):
    """mlx-lm's own llama model carrying exactly our weights (quantized where ours are)."""
    import mlx.nn as nn
    from mlx_lm.models import llama

    ours = dict(tree_flatten(lm.model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)))
    model = llama.Model(llama.ModelArgs.from_dict(lm.config))

    def quantized(path, module):
        m = ours.get(path)
        bits = getattr(m, "bits", None)
        return dict(bits=bits, group_size=m.group_size) if bits else False

    nn.quantize(model, class_predicate=quantized)
    model.load_weights(tree_flatten(lm.model.parameters()), strict=True)
    mx.eval(model.parameters())
    return model


def quantize_uniform(lm, bits: int, group: int):
    """Every linear layer and the embedding at `bits` / `group` (RTN), like mlx-lm's convert -q."""
    from jang_serve.engine.models.layers import quantize_model

    quantize_model(lm.model, lambda path, m: (bits, group))
    mx.eval(lm.model.parameters())


def describe(lm) -> dict:
    from collections import Counter

    import mlx.nn as nn

    mods = tree_flatten(lm.model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    bits = Counter(f"{m.bits}-bit g{m.group_size}" for _, m in mods if getattr(m, "bits", None))
    return dict(format=lm.format, quantized_modules=dict(bits) or "none (float32)")


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
    """(wall seconds, seconds to the first token, outputs)."""
    core = EngineCore(lm, EngineConfig(cpu_dense_gb=CPU_DENSE_GB, kv_memory_gb=1.0, max_num_batched_tokens=budget,
                                       max_num_seqs=64))
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, sp)
    outs, first = [[] for _ in prompts], None
    while core.has_work():
        for d in core.step():
            first = first or time.perf_counter() - t
            outs[int(d.request_id)].extend(d.token_ids)
    dt = time.perf_counter() - t
    assert all(len(o) == gen for o in outs)
    return dt, first, outs


def run_mlx_lm(model, prompts, gen):
    from mlx_lm.generate import BatchGenerator

    g = BatchGenerator(model, max_tokens=gen, completion_batch_size=max(len(prompts), 1),
                       prefill_batch_size=min(len(prompts), 8))
    t = time.perf_counter()
    uids = g.insert(prompts, [gen] * len(prompts))
    outs, first = {u: [] for u in uids}, None
    while responses := g.next_generated():
        first = first or time.perf_counter() - t
        for r in responses:
            outs[r.uid].append(r.token)
    dt = time.perf_counter() - t
    g.close()
    assert all(len(outs[u]) == gen for u in uids), [len(outs[u]) for u in uids]
    return dt, first, [outs[u] for u in uids]


def ttft(lm, prompt_a, prompt_b):
    core = EngineCore(lm, EngineConfig(cpu_dense_gb=CPU_DENSE_GB, kv_memory_gb=1.0, max_num_batched_tokens=2048))
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


def profile_decode(lm, prompts, steps: int = 8) -> dict:
    """Where one decode step of len(prompts) sequences spends its time in our engine (ms, mean of
    `steps` steps after the prefill): scheduling, flat-batch preparation, the model call (forward
    and KV writes, evaluated), sampling, and appending tokens (detokenizer, stop checks)."""
    from jang_serve.engine.sampler import sample

    core = EngineCore(lm, EngineConfig(cpu_dense_gb=CPU_DENSE_GB, kv_memory_gb=1.0, max_num_seqs=64))
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True))
    core.step()  # the prefill
    tot = dict(schedule=0.0, prepare=0.0, model=0.0, sample=0.0, append=0.0)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = core.scheduler.schedule()
        t1 = time.perf_counter()
        core.runner.prepare(batch.seqs, batch.num_new)  # timed alone; run() prepares again
        t2 = time.perf_counter()
        logits, idx = core.runner.run(batch.seqs, batch.num_new)
        t3 = time.perf_counter()
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            core.blocks.register_full_blocks(seq)
        seqs = [batch.seqs[i] for i in idx]
        toks, lps = sample(logits, seqs, None)
        t4 = time.perf_counter()
        for seq, tok, lp in zip(seqs, toks, lps):
            core._append(seq, tok, lp)
        t5 = time.perf_counter()
        for k, a, b in (("schedule", t0, t1), ("prepare", t1, t2), ("model", t2, t3), ("sample", t3, t4),
                        ("append", t4, t5)):
            tot[k] += (b - a) * 1000 / steps
    return dict(sequences=len(prompts), **{k: round(v, 2) for k, v in tot.items()})


def apply_qmm_cpu_rule(rule: str) -> str | None:
    """"rows16" restores kernels.qmm's earlier CPU route (dequantize + BLAS from 16 rows for every
    weight) for this process, to compare with the shipped one; returns a description for the JSON."""
    if rule == "shipped":
        return None
    qmod = sys.modules["jang_serve.kernels.qmm"]
    qmod.CPU_SMALL_DEQUANT_ROWS = qmod.CPU_DEQUANT_ROWS
    return (f"kernels.qmm CPU route set back by this benchmark to the earlier rule: dequantize + BLAS "
            f"from {qmod.CPU_DEQUANT_ROWS} rows for every weight (shipped: from {qmod.CPU_SMALL_DEQUANT_ROWS_SHIPPED} "
            f"rows for weights of <= {qmod.CPU_SMALL_MAX_ELEMENTS} elements)")


def spread(xs: list[float]) -> dict:
    return dict(median=round(statistics.median(xs), 3), min=round(min(xs), 3), max=round(max(xs), 3))


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "engine", "kernels"], cwd=ROOT).returncode
    return (r.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(realdata.smollm2_gguf()))
    ap.add_argument("--quantize", default="none", choices=["none", "q4g64"])
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=64)
    ap.add_argument("--ttft-tokens", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=2048, help="our max_num_batched_tokens")
    ap.add_argument("--out", default=str(ROOT / "bench/results/engine-cpu.json"))
    ap.add_argument("--cpu-dense-gb", type=float, default=None,
                    help="our EngineConfig.cpu_dense_gb (unset: the engine's default; 0: layers stay packed)")
    ap.add_argument("--qmm-cpu-rule", default="shipped", choices=["shipped", "rows16"],
                    help="rows16: kernels.qmm's earlier CPU route, for comparison (mlx-lm calls quantized_matmul itself)")
    args = ap.parse_args()
    qmm_rule = apply_qmm_cpu_rule(args.qmm_cpu_rule)

    lm = load_model(args.model)
    if args.quantize == "q4g64":
        quantize_uniform(lm, 4, 64)
    theirs = mlx_lm_model(lm)
    described = describe(lm)  # before our engine may swap the quantized layers for dense copies (CPU)
    global CPU_DENSE_GB
    CPU_DENSE_GB = args.cpu_dense_gb
    dense = EngineCore(lm, EngineConfig(kv_memory_gb=0.1, cpu_dense_gb=CPU_DENSE_GB)).dense
    tok = lm.tokenizer
    run_ours(lm, docs_prompts(tok, 2, 8, 8), 2, args.budget)  # warm-up both
    run_mlx_lm(theirs, docs_prompts(tok, 2, 8, 8), 2)

    levels = [int(x) for x in args.concurrency.split(",")]
    prompts = {c: docs_prompts(tok, c, args.prompt_min, args.prompt_max) for c in levels}
    runs = {c: dict(ours=[], mlx_lm=[], same=[]) for c in levels}
    for rep in range(args.repeats):  # interleaved: every level and both engines once per repeat
        for c in levels:
            first_ours = rep % 2 == 0
            for who in (("ours", "mlx_lm") if first_ours else ("mlx_lm", "ours")):
                r = run_ours(lm, prompts[c], args.gen, args.budget) if who == "ours" else \
                    run_mlx_lm(theirs, prompts[c], args.gen)
                runs[c][who].append(r)
            same = sum(a == b for a, b in zip(runs[c]["ours"][-1][2], runs[c]["mlx_lm"][-1][2]))
            runs[c]["same"].append(same)
            print(dict(repeat=rep, concurrency=c, ours_s=round(runs[c]["ours"][-1][0], 2),
                       mlx_lm_s=round(runs[c]["mlx_lm"][-1][0], 2), identical=f"{same}/{c}"), flush=True)
    rows = []
    for c in levels:
        gen = c * args.gen
        o, t = runs[c]["ours"], runs[c]["mlx_lm"]
        ratios = [b[0] / a[0] for a, b in zip(o, t)]
        row = dict(concurrency=c, prompt_tokens=sum(map(len, prompts[c])), generated_tokens=gen,
                   ours_tok_s=spread([gen / r[0] for r in o]), mlx_lm_tok_s=spread([gen / r[0] for r in t]),
                   ours_first_token_s=spread([r[1] for r in o]), mlx_lm_first_token_s=spread([r[1] for r in t]),
                   speedup=spread(ratios), identical_outputs=f"{min(runs[c]['same'])}/{c}")
        print(row, flush=True)
        rows.append(row)

    text_ids = docs_prompts(tok, 2, args.ttft_tokens, args.ttft_tokens)
    a = text_ids[0]
    b = a[:992] + text_ids[1][: args.ttft_tokens - 992]
    t = ttft(lm, a, b)
    ttft_row = dict(prompt_tokens=len(a), cold_s=round(t["cold"][0], 3), prefix_hit_s=round(t["prefix_hit"][0], 3),
                    cached_tokens=t["prefix_hit"][1], speedup=round(t["cold"][0] / t["prefix_hit"][0], 1))
    print(ttft_row, flush=True)
    prof = profile_decode(lm, prompts[max(levels)])
    print(prof, flush=True)

    result = dict(
        benchmark="engine_throughput",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        device=dict(kind=str(mx.default_device()), machine=platform.machine(), processor=platform.processor(),
                    cpu_count=os.cpu_count(),
                    blas=jang_serve._blas.loaded or "the mlx[cpu] wheel's reference (netlib) BLAS",
                    note="2-core machine shared with other engineers' work during the run (load average "
                         f"{os.getloadavg()[0]:.1f} at the end); timed section held /tmp/jang-bench.lock; "
                         "repeats interleave both engines, so load hits both alike"),
        versions=dict(mlx=version("mlx"), mlx_lm=version("mlx-lm"), python=platform.python_version()),
        model=dict(path=str(args.model), quantize=args.quantize, activations="float32", **described,
                   our_cpu_dense=dense,
                   note="both engines carry the same parameters (mlx-lm's llama.Model loaded with ours); with "
                        "our_cpu_dense set, our engine runs the quantized layers from dense copies of exactly "
                        "those values (engine/models/dense.py), mlx-lm runs them packed"),
        settings=dict(gen_tokens=args.gen, prompt_tokens=[args.prompt_min, args.prompt_max], greedy=True,
                      repeats=args.repeats, our_max_num_batched_tokens=args.budget, kv="auto (float32)",
                      block_size=16, mlx_lm="BatchGenerator(completion_batch_size=concurrency, "
                                            "prefill_batch_size=min(concurrency, 8))",
                      qmm_cpu_rule=qmm_rule or "kernels.qmm as shipped"),
        throughput=rows,
        ttft=ttft_row,
        decode_step_profile_ms=prof,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
