"""Decode A/B of an environment switch inside one process, rounds interleaved (batch 1, or --nseq sequences).

Separate processes cannot compare host-bound runs: on the device machine our graph build plus MLX's dispatch
of one step varied by up to 40% between identical processes (bench/results/prefetch-h100.json). Here one
random-weight Llama-3-8B-shaped JANG_4M (or --quant bf16) model (as bench/e2e_gpu.py makes it) runs the
batch-1 decode with the switch at each value in turn, for several rounds; every run gets fresh compiled traces
and a warm-up run of the same shapes first, so both values see the same phases of the host.

    python3 bench/e2e_ab.py OUT.json --env JANG_QKV_STORE --values 1,0 --rounds 4

With --models jang4m,bf16 (and no switch) each round runs our JANG_4M and bf16 models in turn, on the same random
weights: the paired ratios are ours over bf16, measured through the same phases of the host.

MLX's own settings are read once per process: give those to the process (`MLX_MAX_OPS_PER_BUFFER=60 python3 ...`);
the JSON records the process's MLX_* environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from e2e_gpu import prompts_for, run_ours  # noqa: E402
from e2e_models import LLAMA3_8B, TINY, device_name, ours, random_weights  # noqa: E402
from jang_serve.engine.models.compiled import compile_blocks  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--env", default="JANG_NOOP", help="the switch (default: none that matters)")
    ap.add_argument("--values", default="1", help="comma list")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy config (CPU smoke test)")
    ap.add_argument("--nseq", type=int, default=1, help="concurrent sequences (prompts of --prompt tokens each)")
    ap.add_argument("--models", default="jang4m", help="comma list of jang4m / bf16 (the same random weights); "
                    "with two and one value, each round runs both in turn: ours against bf16 in one process")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    cfg = TINY if args.tiny else LLAMA3_8B
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    weights = random_weights(cfg, mx.bfloat16 if on_gpu else mx.float32)
    names = args.models.split(",")
    models = {m: ours(cfg, weights, None if m == "bf16" else m) for m in names}
    del weights
    p1 = prompts_for(args.nseq, args.prompt, cfg["vocab_size"], 1)
    warm = prompts_for(args.nseq, args.prompt, cfg["vocab_size"], 3)
    values = args.values.split(",")
    res = dict(benchmark="e2e_ab", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=device_name(), mlx=version("mlx"), models=names, env=args.env, values=values, note=args.note,
               nseq=args.nseq, mlx_env={k: v for k, v in os.environ.items() if k.startswith("MLX_")},
               method=__doc__.split("\n\n")[1].replace("\n", " "), runs=[])
    arms = [(m, v) for m in names for v in values]
    for rnd in range(args.rounds):
        for name, v in arms:
            model = models[name]
            os.environ[args.env] = v
            compile_blocks(model, on=False)          # fresh traces: a trace keeps the kernels it was made with
            run_ours(model, cfg, warm, args.gen, 4.0, 2048)
            r = run_ours(model, cfg, p1, args.gen, 4.0, 2048)
            tl = sorted(t for t, _ in r["timeline_ms_tokens"][5:])
            row = dict(round=rnd, model=name, value=v, decode_tok_s=r["decode_tok_s"], tok_s=r["tok_s"],
                       host_ms=r.get("pipelined_host_ms"),
                       median_step_ms=tl[len(tl) // 2])
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    def arm(m, v, key):
        return [r[key] for r in res["runs"] if (r["model"], r["value"]) == (m, v)]

    res["summary"] = {f"{m}/{v}": dict(decode_tok_s=arm(m, v, "decode_tok_s"), tok_s=arm(m, v, "tok_s"),
                                       median_of_median_step_ms=statistics.median(arm(m, v, "median_step_ms")))
                      for m, v in arms}
    if len(arms) == 2:   # first arm over second, round by round: decode and overall tok/s
        res["paired_ratios"] = [round(a["decode_tok_s"] / b["decode_tok_s"], 3)
                                for a, b in zip(res["runs"][0::2], res["runs"][1::2])]
        res["paired_ratios_overall"] = [round(a["tok_s"] / b["tok_s"], 3)
                                        for a, b in zip(res["runs"][0::2], res["runs"][1::2])]
    else:
        res["paired_ratios"] = None
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"]), res["paired_ratios"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
