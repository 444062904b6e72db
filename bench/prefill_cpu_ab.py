"""Padded prefill (engine/paged_prefill.py) on vs off on this machine's CPU, side by side.

    .venv/bin/python bench/prefill_cpu_ab.py [OUT.json]

SmolLM2-135M (GGUF dequantized to float32), 16 prompts of 16-64 random tokens admitted at once, one
generated token each (so the time is the prefill); the two settings alternate, 5 repeats, medians of
the last 4. Also checks both give the same tokens. Decides the JANG_PADDED_PREFILL default on the CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import realdata  # noqa: E402

from jang_serve.engine.engine_config import EngineConfig  # noqa: E402  (before mlx: OpenBLAS)
from jang_serve.engine.engine_core import EngineCore  # noqa: E402
from jang_serve.engine.loader import load_model  # noqa: E402
from jang_serve.engine.sampling_params import SamplingParams  # noqa: E402


def main(out: str):
    lm = load_model(str(realdata.smollm2_gguf()))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 64))] for _ in range(16)]

    def run():
        core = EngineCore((lm.model, None, lm.config), EngineConfig(num_blocks=512, enable_prefix_caching=False))
        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, sp)
        t, got = time.perf_counter(), []
        while core.has_work():
            got += core.step()
        return time.perf_counter() - t, sorted((d.request_id, tuple(d.token_ids)) for d in got)

    times, toks = {"padded": [], "one_by_one": []}, {}
    for _ in range(5):
        for mode in times:
            os.environ["JANG_PADDED_PREFILL"] = "1" if mode == "padded" else "0"
            dt, toks[mode] = run()
            times[mode].append(dt)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    res = dict(benchmark="prefill_cpu_ab", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=f"cpu ({platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f})",
               versions=dict(mlx=version("mlx"), python=platform.python_version()),
               setup="SmolLM2-135M float32, 16 prompts of 16-64 tokens at once, 1 token each; alternating, 5 repeats",
               seconds={k: [round(x, 4) for x in v] for k, v in times.items()},
               median_s={k: round(v, 4) for k, v in med.items()},
               padded_over_one_by_one=round(med["padded"] / med["one_by_one"], 3),
               same_tokens=toks["padded"] == toks["one_by_one"])
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("median_s", "padded_over_one_by_one", "same_tokens")}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "bench/results/prefill-cpu-ab.json"))
