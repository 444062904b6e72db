"""Time to first token through the engine on the GPU: one prompt of 128 / 256 tokens (prefill rows that the
warpgroup GEMMs serve) on the random-weight Llama-3-8B-shaped model, JANG_4M with the current route and with
one switch set to 0 (--off: JANG_QGEMM_RS, the route before the register-operand GEMM; JANG_QGEMM_WG, the
route before both warpgroup GEMMs), and the bf16 model.

    python3 bench/e2e_prefill.py OUT.json [--reps 7] [--lens 128,256] [--layers 32] [--off JANG_QGEMM_RS]

Per length: a warm-up request per configuration, then `reps` rounds; each round runs one request per
configuration (the order rotates), timed from add_request to its one token (max_tokens=1, prefix caching off);
median and min per configuration, ratios from the medians of the same run.
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

import e2e_models as E  # noqa: E402
from e2e_gpu import prompts_for  # noqa: E402
from jang_serve.engine.engine_config import EngineConfig  # noqa: E402
from jang_serve.engine.engine_core import EngineCore  # noqa: E402
from jang_serve.engine.sampling_params import SamplingParams  # noqa: E402


def ttft(core, prompt, rid) -> float:
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    mx.synchronize()
    t0 = time.perf_counter()
    core.add_request(rid, prompt, sp)
    while core.has_work():
        core.step()
    mx.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lens", default="128,256")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--commit", default=os.environ.get("COMMIT", ""))
    ap.add_argument("--off", default="JANG_QGEMM_RS")
    a = ap.parse_args()
    sw = a.off
    cfg = dict(E.LLAMA3_8B, num_hidden_layers=a.layers)
    w = E.random_weights(cfg, mx.bfloat16)
    models = {"jang4m": E.ours(cfg, w, "jang4m"), "bf16": E.ours(cfg, w, None)}
    del w
    cores = {k: EngineCore((m, None, cfg), EngineConfig(kv_memory_gb=2.0, max_num_seqs=4, enable_prefix_caching=False))
             for k, m in models.items()}
    confs = [("jang4m", None), ("jang4m", "0"), ("bf16", None)]     # (model, the switch's value)
    names = {("jang4m", None): "jang4m", ("jang4m", "0"): f"jang4m {sw}=0", ("bf16", None): "bf16"}
    res = dict(benchmark="e2e_prefill", device=E.device_name(), mlx=mx.__version__, commit=a.commit,
               date=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), layers=a.layers, reps=a.reps,
               method=__doc__.strip().splitlines()[-3:], route_before=f"{sw}=0", rows={})
    n = 0
    for length in [int(v) for v in a.lens.split(",")]:
        prompts = prompts_for(a.reps + 1, length, cfg["vocab_size"], length)
        times = {c: [] for c in confs}
        for r in range(a.reps + 1):
            order = confs[r % 3:] + confs[:r % 3]
            for model, env in order:
                if env is None:
                    os.environ.pop(sw, None)
                else:
                    os.environ[sw] = env
                t = ttft(cores[model], prompts[r], f"r{n}")
                n += 1
                if r:                      # round 0 is the warm-up
                    times[(model, env)].append(t)
        os.environ.pop(sw, None)
        row = {names[c]: dict(median_ms=round(1e3 * statistics.median(v), 2), min_ms=round(1e3 * min(v), 2))
               for c, v in times.items()}
        med = {k: v["median_ms"] for k, v in row.items()}
        row["speedup_vs_route_before"] = round(med[f"jang4m {sw}=0"] / med["jang4m"], 3)
        row["speedup_vs_bf16"] = round(med["bf16"] / med["jang4m"], 3)
        res["rows"][str(length)] = row
        print(length, json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
