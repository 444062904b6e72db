"""Per-kernel GPU time of one engine decode step (or, with --prefill N, of one N-token prompt's prefill),
under Nsight Compute (device machine only).

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file OUT.csv \
        python3 bench/e2e_profile.py [--tiny]
    python3 bench/e2e_profile.py --summarize OUT.csv [OUT.json]

`--models ours-jang4m --nseqs 1` narrows the cases. Nsight Compute's defaults lock base clocks and flush
the caches before every kernel (pessimistic for small kernels); add `--clock-control none
--cache-control none` to ncu for times near those of a real run.

The first form builds the models of bench/e2e_gpu.py, brings 64 sequences (and, separately, one)
to decoding, warms up, and opens the profiler (cuProfilerStart) around exactly one decode step of
each (model, batch) case, tagging the case by a tiny marker kernel. The second form sums the kernel
times per case and per kernel name.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _profiler():
    lib = ctypes.CDLL("libcuda.so.1")
    return lib.cuProfilerStart, lib.cuProfilerStop


def run(args):
    import mlx.core as mx

    import e2e_gpu as E
    from jang_serve.engine.engine_config import EngineConfig
    from jang_serve.engine.engine_core import EngineCore
    from jang_serve.engine.paged_attention import PagedBackend
    from jang_serve.engine.sampling_params import SamplingParams

    start, stop = _profiler()
    cfg = E.TINY if args.tiny else E.LLAMA3_8B
    weights = E.random_weights(cfg, mx.bfloat16)
    quant = {"ours-jang4m": "jang4m", "ours-bf16": None}
    models = {name: E.ours(cfg, weights, quant[name]) for name in args.models.split(",")}
    del weights
    one = mx.ones((1,))

    def mark(tag):  # a kernel whose name says which case follows
        k = mx.fast.cuda_kernel(name=f"jang_profile_marker_{tag}", input_names=["a"], output_names=["b"],
                                source="if (threadIdx.x == 0) b[0] = a[0] + 1.0f;")
        return k(inputs=[one], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                 output_dtypes=[mx.float32])[0]

    if args.prefill:
        for name, model in models.items():
            core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=2.0, max_num_seqs=4,
                                                               enable_prefix_caching=False))
            sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            prompts = E.prompts_for(3, args.prefill, cfg["vocab_size"], 9)
            for i, p in enumerate(prompts[:2]):       # warm-up: every prefill kernel compiled
                core.add_request(f"w{i}", p, sp)
                while core.has_work():
                    core.step()
            tag = (1 if name == "ours-jang4m" else 2) * 1000 + args.prefill
            mx.eval(mark(tag))
            mx.synchronize()
            start()
            mx.eval(mark(tag))
            t = time.perf_counter()
            core.add_request("p", prompts[2], sp)
            while core.has_work():
                core.step()
            mx.synchronize()
            stop()
            print(f"profiled {name} prefill={args.prefill} tag={tag} ({1e3 * (time.perf_counter() - t):.1f} ms under ncu)",
                  flush=True)
            del core
        return
    for name, model in models.items():
        for nseq in (int(n) for n in args.nseqs.split(",")):
            core = EngineCore((model, None, cfg), EngineConfig(kv_memory_gb=2.0, max_num_seqs=64,
                                                               enable_prefix_caching=False))
            sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
            for i, p in enumerate(E.prompts_for(nseq, 128, cfg["vocab_size"], 9)):
                core.add_request(f"r{i}", p, sp)
            while any(q.num_computed < q.num_tokens - 1 for q in core.scheduler.running + list(core.scheduler.waiting)):
                core.step()       # prefill until every sequence decodes
            for _ in range(3):    # warm decode steps: every kernel compiled
                core.step()
            batch = core.scheduler.schedule()
            r = core.runner
            toks, pos, slots, tables, ql, cl, rows, aux, _ = r.prepare(batch.seqs, batch.num_new)
            tag = (1 if name == "ours-jang4m" else 2) * 1000 + nseq
            mx.eval(mark(tag))
            mx.synchronize()
            start()
            mx.eval(mark(tag))
            t = time.perf_counter()
            logits = model(toks, pos, PagedBackend(r.pool, slots, tables, ql, cl, aux), logits_rows=aux.rows)
            mx.eval(mx.argmax(logits, axis=-1), r.pool.arrays())
            mx.synchronize()
            stop()
            print(f"profiled {name} nseq={nseq} tag={tag} ({1e3 * (time.perf_counter() - t):.1f} ms under ncu)",
                  flush=True)
            del core


def summarize(path, out=None):
    """Sum gpu__time_duration per case (between marker kernels) and kernel name."""
    rows = list(csv.reader(l for l in open(path) if l.startswith('"')))
    head = rows[0]
    ki, mi, vi = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    case, res = None, {}
    for r in rows[1:]:
        if r[mi] != "gpu__time_duration.sum":
            continue
        name, ns = r[ki], float(r[vi].replace(",", ""))
        if "jang_profile_marker" in name:
            case = name  # the marker's template tag is in its mangled name
            res.setdefault(case, defaultdict(lambda: [0, 0.0]))
            continue
        if case is None:
            continue
        short = name.split("(")[0][:80]
        res[case][short][0] += 1
        res[case][short][1] += ns / 1e3
    summary = {}
    for c, d in res.items():
        total = sum(v[1] for v in d.values())
        top = sorted(d.items(), key=lambda kv: -kv[1][1])
        summary[c] = dict(total_gpu_us=round(total, 1), kernels=sum(v[0] for v in d.values()),
                          by_kernel=[dict(name=k, calls=v[0], us=round(v[1], 1)) for k, v in top])
        print(f"== {c}: {total / 1e3:.2f} ms GPU in {summary[c]['kernels']} kernels")
        for k, v in top[:14]:
            print(f"   {v[1]:9.1f} us  {v[0]:4d}x  {k}")
    if out:
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--summarize", nargs="+")
    ap.add_argument("--models", default="ours-jang4m,ours-bf16")
    ap.add_argument("--nseqs", default="64,1")
    ap.add_argument("--prefill", type=int, default=0, help="profile one prompt of this many tokens instead")
    a = ap.parse_args()
    if a.summarize:
        summarize(*a.summarize)
    else:
        run(a)
