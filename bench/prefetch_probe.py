"""Does prefetching a host-made array (kernels/prefetch.py) take its migration off the first kernel that reads
it? Each round makes a fresh int32 index array on the host (as a decode step's packed inputs are made),
optionally prefetches it, keeps the GPU busy with unrelated matmuls for ~1 ms (the step before), then gathers
one embedding row with it (the step's first kernel). Under Nsight Compute the gather's time shows the migration.

    ncu --clock-control none --cache-control none -k regex:gather --metrics gpu__time_duration.sum --csv \
        --log-file X.csv python3 bench/prefetch_probe.py OUT.json ncu
    python3 bench/prefetch_probe.py OUT.json report X.csv
    python3 bench/prefetch_probe.py OUT.json time      # wall time per round, no profiler

Rounds alternate off / on (PP_ROUNDS pairs, default 6).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np

from jang_serve.kernels import prefetch

ROUNDS = int(os.environ.get("PP_ROUNDS", "6"))


def rounds():
    table = mx.random.normal((128256, 4096)).astype(mx.bfloat16)
    busy = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    mx.eval(table, busy)
    out = []
    for i in range(2 * ROUNDS):
        on = i % 2 == 1
        idx = mx.array(np.array([(i * 7919) % 128256, 0, 0, 0], dtype=np.int32))
        queued = prefetch.to_gpu(idx) if on else False
        b = busy
        for _ in range(4):
            b = b @ busy
        mx.async_eval(b)                     # the GPU is busy while the host goes on
        t0 = time.perf_counter()
        y = table[idx[:1]]
        mx.eval(y, b)
        dt = time.perf_counter() - t0
        out.append(dict(prefetch=on, queued=queued, wall_ms=round(dt * 1e3, 3)))
    return out


def report(manifest, csv_path):
    rows = [r for r in csv.reader(open(csv_path)) if len(r) > 10]
    hdr = rows[0]
    vi, ni = hdr.index("Metric Value"), hdr.index("Kernel Name")
    us = [float(r[vi].replace(",", "")) / 1e3 for r in rows[1:] if "gather" in r[ni]]
    if len(us) != len(manifest):
        raise SystemExit(f"{len(us)} gathers for {len(manifest)} rounds")
    for m, u in zip(manifest, us):
        m["gather_us"] = round(u, 2)
    summary = {}
    for on in (False, True):
        v = sorted(m["gather_us"] for m in manifest if m["prefetch"] == on)
        summary["on" if on else "off"] = dict(median_us=v[len(v) // 2], all_us=v)
    return dict(rounds=manifest, summary=summary)


if __name__ == "__main__":
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "report":
        res = report(json.load(open(path)), sys.argv[3])
        json.dump(res, open(path.replace(".json", "-report.json"), "w"), indent=1)
        print(json.dumps(res["summary"]))
    else:
        res = rounds()                   # ncu or time: the same rounds (each records its wall time)
        json.dump(res, open(path, "w"), indent=1)
        print(json.dumps(res))
