"""End to end on the GPU: our engine vs mlx-lm 0.32.2 on a random-weight Llama-3-8B-shaped model.

    python3 bench/e2e_gpu.py OUT.json [--tiny] [--only a,b,...] [--gen1 128] [--genb 64] [--conc 64]

The weights are generated on the device (bf16, normal(0, 0.02), norms 1). Three models share them:
  ours-jang4m   our decoder, quantized by role like JANG_4M (attention + lm_head 8 bits,
                embeddings and MLP 4 bits, group 64) through engine.models.layers.quantize_model
  ours-bf16     our decoder in bf16
  mlxlm-4bit    mlx-lm's llama model, uniform 4 bits (group 64; nn.quantize, as mlx_lm.convert -q)
Runs (greedy, no EOS stop, warm-up with the same shapes first so JIT compiles stay out):
  batch 1      one prompt of --prompt tokens, --gen1 tokens: decode tok/s after the first token
               (ours through EngineCore; mlx-lm through generate_step)
  batch C      C prompts of --prompt tokens, --genb tokens each, submitted together: aggregate
               tok/s over the whole run and over the decode phase (after every sequence has its
               first token) (ours through EngineCore; mlx-lm through BatchGenerator)
Roofline: bytes a decode step must read (every weight except the embedding table, plus the KV
read at the mean context) over the measured device copy bandwidth. Results are written to the
JSON after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from jang_serve.engine.engine_config import EngineConfig
from jang_serve.engine.engine_core import EngineCore
from jang_serve.engine.sampling_params import SamplingParams

from e2e_baseline import mlx_lm_4bit, run_mlx_lm_batch, run_mlx_lm_single, summarize  # noqa: E402
from e2e_switches import (ABLATIONS_BATCH1, ABLATIONS_BATCHED, ROUTE_CONFIGS, no_fused, no_qgemm,  # noqa: E402
                          match_traces, with_env)

from e2e_models import (LLAMA3_8B, TINY, copy_bandwidth, device_name, ours, qmm_summary,  # noqa: E402,F401
                        random_weights, step_bytes)


def log(*a):
    print(*a, flush=True)


# -- runs ------------------------------------------------------------------------------------------
def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab - 100, size=length).tolist() for _ in range(n)]


ENGINE_KW: dict = {}   # EngineConfig overrides from --async-decode / --fuse (None: the engine's default)


def fresh_memory() -> None:
    """Free the previous run's KV pool from MLX's buffer cache before the next one allocates its own.
    (Later runs in one process measured slower on the H100, e2e-h100.json caveat; ~4 GB of cached pool
    per earlier run is one suspect, not confirmed.)"""
    import gc

    gc.collect()
    mx.clear_cache()


def run_ours(model, cfg, prompts, gen, kv_gb, budget, **kw) -> dict:
    match_traces(model)
    fresh_memory()
    core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=kv_gb, max_num_batched_tokens=budget,
                                                       max_num_seqs=max(64, len(prompts)),
                                                       enable_prefix_caching=False, **{**ENGINE_KW, **kw}))
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, sp)
    core.pipeline.timing = {}
    first, count, steps = {}, 0, []
    mx.synchronize()
    t0 = time.perf_counter()
    while core.has_work():
        ds = core.step()
        now = time.perf_counter()
        n = sum(len(d.token_ids) for d in ds)
        count += n
        steps.append((now, n))
        for d in ds:
            if d.token_ids and d.request_id not in first:
                first[d.request_id] = now
    out = summarize(t0, first, steps, count, len(prompts), gen)
    out["kv_blocks"] = core.pool.num_blocks
    tm = core.pipeline.timing
    if tm.get("steps"):  # host time per pipelined step: graph build / async_eval dispatch / read-back + bookkeeping
        out["pipelined_steps"] = tm["steps"]
        out["pipelined_host_ms"] = {k[:-2]: round(1e3 * v / tm["steps"], 3) for k, v in tm.items() if k != "steps"}
    prev, tl = t0, []
    for t, n in steps:
        tl.append([round(1e3 * (t - prev), 2), n])
        prev = t
    out["timeline_ms_tokens"] = tl
    del core
    return out


def probe_step(model, cfg, nseq, prompt_len, kv_gb) -> dict:
    """Where a decode step's time goes: building the lazy graph on the host (Python + MLX op
    creation) vs evaluating it, for `nseq` sequences that are all decoding (median of 5)."""
    from jang_serve.engine.paged_attention import PagedBackend

    match_traces(model)
    core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=kv_gb, max_num_seqs=max(64, nseq),
                                                       enable_prefix_caching=False, **ENGINE_KW))
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts_for(nseq, prompt_len, cfg["vocab_size"], 7)):
        core.add_request(f"p{i}", p, sp)
    while any(s.num_computed < s.num_tokens - 1 for s in core.scheduler.running + list(core.scheduler.waiting)):
        core.step()
    batch = core.scheduler.schedule()  # allocates the slots of the next token; repeated below unchanged
    seqs, new = batch.seqs, batch.num_new
    if len(seqs) != nseq or any(n != 1 for n in new):
        raise RuntimeError(f"probe: expected {nseq} decoding sequences, got {len(seqs)} / {new}")
    r = core.runner
    build, run, total = [], [], []
    for _ in range(6):
        toks, pos, slots, tables, ql, cl, rows, aux, _si = r.prepare(seqs, new)
        mx.synchronize()
        t0 = time.perf_counter()
        logits = model(toks, pos, PagedBackend(r.pool, slots, tables, ql, cl, aux), logits_rows=aux.rows)
        t1 = time.perf_counter()
        mx.eval(mx.argmax(logits, axis=-1), r.pool.arrays())
        t2 = time.perf_counter()
        build.append(t1 - t0)
        run.append(t2 - t1)
        total.append(t2 - t0)
    del core
    med = lambda v: round(1e3 * statistics.median(v[1:]), 3)  # noqa: E731
    return dict(sequences=nseq, graph_build_ms=med(build), eval_ms=med(run), step_ms=med(total))


# -- main ------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy config (CPU smoke test)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen1", type=int, default=128)
    ap.add_argument("--genb", type=int, default=64)
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--budget", type=int, default=2048, help="our max_num_batched_tokens")
    ap.add_argument("--kv-gb", type=float, default=4.0)
    ap.add_argument("--only", default="", help="comma list of runs to do (default all)")
    ap.add_argument("--prefill-chunk-alt", type=int, default=512,
                    help="also run the 64-sequence cases with this EngineConfig.max_prefill_chunk (0: skip)")
    ap.add_argument("--commit", default=os.environ.get("JANG_COMMIT", ""))
    ap.add_argument("--force-routes", action="store_true", help="probe route configs on the CPU too (a test)")
    ap.add_argument("--note", default="")
    ap.add_argument("--route-pick", action="store_true", help="use the fastest probed route config for the runs")
    ap.add_argument("--async-decode", choices=("auto", "on", "off"), default="auto",
                    help="EngineConfig.async_decode (auto: on on a GPU)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="EngineConfig.compile_decode (auto: on on a GPU)")
    ap.add_argument("--fuse", choices=("auto", "on", "off"), default="auto",
                    help="EngineConfig.fuse_projections (auto: on on a GPU)")
    args = ap.parse_args()
    tri = {"auto": None, "on": True, "off": False}
    ENGINE_KW.update(async_decode=tri[args.async_decode], fuse_projections=tri[args.fuse],
                     compile_decode=tri[args.compile])

    cfg = TINY if args.tiny else LLAMA3_8B
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype = getattr(mx, args.dtype) if args.dtype else (mx.bfloat16 if on_gpu else mx.float32)
    res = dict(benchmark="e2e_gpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=device_name(), versions=dict(mlx=version("mlx"), mlx_lm=version("mlx-lm"),
                                                   python=platform.python_version()),
               commit=args.commit, note=args.note,
               model=dict(config="tiny" if args.tiny else "Llama-3-8B shapes", dtype=str(dtype),
                          weights="random normal(0, 0.02), generated on the device"),
               settings=dict(prompt_tokens=args.prompt, gen_batch1=args.gen1, gen_batched=args.genb,
                             concurrency=args.conc, our_max_num_batched_tokens=args.budget, kv_gb=args.kv_gb,
                             our_prefill_chunk_default=EngineConfig().prefill_chunk(),
                             greedy=True, ignore_eos=True, block_size=16, kv="auto (model dtype)",
                             kernels=os.environ.get("JANG_KERNELS", "auto"), async_decode=args.async_decode,
                             fuse_projections=args.fuse, compile_decode=args.compile,
                             mlx_env={k: v for k, v in os.environ.items() if k.startswith("MLX_")}),
               runs={}, timings_s={})
    out = Path(args.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")

    only = set(filter(None, args.only.split(",")))

    def want(name):
        return not only or name in only

    t = time.perf_counter()
    bw = copy_bandwidth(512 if on_gpu else 64)
    res["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s on {res['device']}")

    weights = random_weights(cfg, dtype)
    models = {}
    models["ours-jang4m"] = ours(cfg, weights, "jang4m")
    models["ours-bf16"] = ours(cfg, weights, None)
    models["mlxlm-4bit"] = mlx_lm_4bit(cfg, weights)
    del weights
    res["timings_s"]["make_models"] = round(time.perf_counter() - t, 1)
    kvb = dtype.size
    ctx1 = args.prompt + args.gen1 // 2
    ctxb = args.prompt + args.genb // 2
    res["models"] = {}
    for name, m in models.items():
        b1, bb = step_bytes(m, ctx1, cfg, kvb), step_bytes(m, args.conc * ctxb, cfg, kvb)
        res["models"][name] = dict(weight_bytes=sum(a.nbytes for _, a in tree_flatten(m.parameters())),
                                   quantized_params_by_bits=qmm_summary(m), step_bytes_batch1=b1,
                                   step_bytes_batched=bb, roofline_tok_s_batch1=round(bw / b1, 1),
                                   roofline_tok_s_batched=round(args.conc * bw / bb, 1))
    save()
    log(json.dumps(res["models"], indent=1))

    # Route configurations of kernels.qmm, probed on one decode step of the JANG model (batch C and 1),
    # only when asked for (--only routes,...): by default every run uses the engine's own routing, as
    # shipped. With --route-pick the fastest at batch C is kept for the runs below (choice recorded).
    res["route_probe"] = {}
    if "routes" in only and (on_gpu or args.force_routes):
        best = None
        for cname, env in ROUTE_CONFIGS:
            try:  # each configuration traces its own compiled decode blocks
                pr = {str(n): with_env(env, probe_step, models["ours-jang4m"], cfg, n, args.prompt, args.kv_gb)
                      for n in (args.conc, 1)}
            except Exception as e:
                pr = dict(error=f"{type(e).__name__}: {e}")
            res["route_probe"][cname] = dict(env=env, probe=pr)
            log("route", cname, json.dumps(pr))
            if "error" not in pr and (best is None or pr[str(args.conc)]["step_ms"] < best[1]):
                best = (cname, pr[str(args.conc)]["step_ms"], env)
            save()
        if best and args.route_pick:
            res["route_chosen"] = best[0]
            os.environ.update(best[2])
            log("route chosen", best[0])

    p1 = prompts_for(1, args.prompt, cfg["vocab_size"], 1)
    pb = prompts_for(args.conc, args.prompt, cfg["vocab_size"], 2)
    warm1 = prompts_for(1, args.prompt, cfg["vocab_size"], 3)
    warmb = prompts_for(args.conc, args.prompt, cfg["vocab_size"], 4)

    # Each run is preceded by the identical run on other prompts of the same lengths (same step
    # shapes, so every JIT compile happens there) and then timed.
    def ours_run(name, prompts, gen):
        return lambda: run_ours(models[name], cfg, prompts, gen, args.kv_gb, args.budget)

    plan = [("batch1/mlxlm-4bit", lambda: run_mlx_lm_single(models["mlxlm-4bit"], warm1[0], args.gen1),
             lambda: run_mlx_lm_single(models["mlxlm-4bit"], p1[0], args.gen1)),
            ("batch1/ours-jang4m", ours_run("ours-jang4m", warm1, args.gen1), ours_run("ours-jang4m", p1, args.gen1)),
            ("batch1/ours-bf16", ours_run("ours-bf16", warm1, args.gen1), ours_run("ours-bf16", p1, args.gen1)),
            # the same JANG batch-1 run without compiled blocks, and with the pipelined decode off
            ("batch1/ours-jang4m-nocompile",
             lambda: run_ours(models["ours-jang4m"], cfg, warm1, args.gen1, args.kv_gb, args.budget, compile_decode=False),
             lambda: run_ours(models["ours-jang4m"], cfg, p1, args.gen1, args.kv_gb, args.budget, compile_decode=False)),
            # ... without the fused norm / SwiGLU / residual GEMVs (kernels.qmm_fused)
            ("batch1/ours-jang4m-nofused",
             lambda: no_fused(run_ours, models["ours-jang4m"], cfg, warm1, args.gen1, args.kv_gb, args.budget),
             lambda: no_fused(run_ours, models["ours-jang4m"], cfg, p1, args.gen1, args.kv_gb, args.budget)),
            ("batch1/ours-jang4m-sync",
             lambda: run_ours(models["ours-jang4m"], cfg, warm1, args.gen1, args.kv_gb, args.budget, async_decode=False),
             lambda: run_ours(models["ours-jang4m"], cfg, p1, args.gen1, args.kv_gb, args.budget, async_decode=False)),
            ("batched/ours-jang4m", ours_run("ours-jang4m", warmb, args.genb), ours_run("ours-jang4m", pb, args.genb)),
            ("batched/ours-bf16", ours_run("ours-bf16", warmb, args.genb), ours_run("ours-bf16", pb, args.genb)),
            ("batched/mlxlm-4bit", lambda: run_mlx_lm_batch(models["mlxlm-4bit"], warmb, args.genb),
             lambda: run_mlx_lm_batch(models["mlxlm-4bit"], pb, args.genb)),
            # the same runs with a larger prefill cap while sequences decode (fewer, longer mixed steps)
            *([(f"batched/ours-{m}-chunk{args.prefill_chunk_alt}",
                (lambda m=m: run_ours(models[f"ours-{m}"], cfg, warmb, args.genb, args.kv_gb, args.budget,
                                      max_prefill_chunk=args.prefill_chunk_alt)),
                (lambda m=m: run_ours(models[f"ours-{m}"], cfg, pb, args.genb, args.kv_gb, args.budget,
                                      max_prefill_chunk=args.prefill_chunk_alt)))
               for m in ("jang4m", "bf16")] if args.prefill_chunk_alt else []),
            # the same JANG run with the tiled GEMM off (5-191 rows through mx.quantized_matmul)
            ("batched/ours-jang4m-noqgemm",
             lambda: no_qgemm(run_ours, models["ours-jang4m"], cfg, warmb, args.genb, args.kv_gb, args.budget),
             lambda: no_qgemm(run_ours, models["ours-jang4m"], cfg, pb, args.genb, args.kv_gb, args.budget)),
            # one switch flipped per run (e2e_switches.ABLATIONS_*)
            *[(f"batch1/ours-jang4m-{tag}",
               (lambda env=env: with_env(env, run_ours, models["ours-jang4m"], cfg, warm1, args.gen1, args.kv_gb, args.budget)),
               (lambda env=env: with_env(env, run_ours, models["ours-jang4m"], cfg, p1, args.gen1, args.kv_gb, args.budget)))
              for tag, env in ABLATIONS_BATCH1.items()],
            *[(f"batched/ours-jang4m-{tag}",
               (lambda env=env: with_env(env, run_ours, models["ours-jang4m"], cfg, warmb, args.genb, args.kv_gb, args.budget)),
               (lambda env=env: with_env(env, run_ours, models["ours-jang4m"], cfg, pb, args.genb, args.kv_gb, args.budget)))
              for tag, env in ABLATIONS_BATCHED.items()]]
    for name, warm, run in plan:
        if not want(name):
            continue
        try:
            t = time.perf_counter()
            warm()
            res["timings_s"][name + "/warmup"] = round(time.perf_counter() - t, 1)
            r = run()
            tags = "|".join(["noqgemm", "sync", "nocompile", "nofused", r"chunk\d+", *ABLATIONS_BATCH1, *ABLATIONS_BATCHED])
            mname = re.sub(rf"-({tags})$", "", name.split("/")[1])
            roof = res["models"][mname]["roofline_tok_s_batch1" if name.startswith("batch1") else "roofline_tok_s_batched"]
            r["roofline_tok_s"] = roof
            r["pct_of_roofline"] = round(100 * r["decode_tok_s"] / roof, 1) if r.get("decode_tok_s") else None
            res["runs"][name] = r
            log(name, json.dumps(r))
        except Exception as e:  # record and go on: one failed run must not lose the others
            import traceback

            traceback.print_exc()
            res["runs"][name] = dict(error=f"{type(e).__name__}: {e}")
        save()

    res["probe"] = {}
    for name in ("ours-jang4m", "ours-bf16"):
        for nseq in (1, args.conc):
            if not want("probe"):
                continue
            try:
                res["probe"][f"{name}/{nseq}"] = pr = probe_step(models[name], cfg, nseq, args.prompt, args.kv_gb)
                log("probe", name, json.dumps(pr))
            except Exception as e:
                import traceback

                traceback.print_exc()
                res["probe"][f"{name}/{nseq}"] = dict(error=f"{type(e).__name__}: {e}")
            save()

    r = res["runs"]

    def ratio(a, b, key):
        try:
            return round(r[a][key] / r[b][key], 2)
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    res["ratios"] = dict(
        batch1_decode_jang4m_vs_mlxlm4bit=ratio("batch1/ours-jang4m", "batch1/mlxlm-4bit", "decode_tok_s"),
        batch1_decode_jang4m_pipelined_vs_sync=ratio("batch1/ours-jang4m", "batch1/ours-jang4m-sync", "decode_tok_s"),
        batch1_decode_jang4m_compiled_vs_not=ratio("batch1/ours-jang4m", "batch1/ours-jang4m-nocompile", "decode_tok_s"),
        batch1_decode_bf16_vs_mlxlm4bit=ratio("batch1/ours-bf16", "batch1/mlxlm-4bit", "decode_tok_s"),
        batched_jang4m_vs_mlxlm4bit=ratio("batched/ours-jang4m", "batched/mlxlm-4bit", "tok_s"),
        batched_decode_jang4m_vs_mlxlm4bit=ratio("batched/ours-jang4m", "batched/mlxlm-4bit", "decode_tok_s"),
        batched_jang4m_vs_ours_bf16=ratio("batched/ours-jang4m", "batched/ours-bf16", "tok_s"),
        batched_decode_jang4m_vs_ours_bf16=ratio("batched/ours-jang4m", "batched/ours-bf16", "decode_tok_s"),
        **{f"batch1_decode_jang4m_vs_{tag}": ratio("batch1/ours-jang4m", f"batch1/ours-jang4m-{tag}", "decode_tok_s")
           for tag in ABLATIONS_BATCH1},
        **{f"batched_jang4m_vs_{tag}": ratio("batched/ours-jang4m", f"batched/ours-jang4m-{tag}", "tok_s")
           for tag in ABLATIONS_BATCHED})
    save()
    log("\n== summary (tok/s; decode = after every sequence has its first token) ==")
    for name, v in r.items():
        if "error" in v:
            log(f"{name:22s} ERROR {v['error'][:200]}")
        else:
            log(f"{name:22s} all {v['tok_s']:9.1f}  decode {v['decode_tok_s']:9.1f}  "
                f"roofline {v['roofline_tok_s']:9.1f}  ({v['pct_of_roofline']}%)  wall {v['wall_s']}s")
    log(json.dumps(res["ratios"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
