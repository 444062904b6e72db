"""GPU time of GEMV variants under Nsight Compute, one kernel at a time (no launch path, no neighbours), beside a
plain streaming read of the same bytes: where a variant's time goes that the queued timing's spread (~±15%
between processes) hides.

    ncu --clock-control none -k regex:custom_kernel --metrics ... --csv --log-file OUT.csv \
        python3 bench/gemv_ncu.py MANIFEST.json
    python3 bench/gemv_ncu.py MANIFEST.json --report OUT.csv   (joins the ncu rows to the manifest, prints a table)

GN_SHAPES (JSON list of [N, K, bits]) and GN_VARIANTS (JSON list of configs as in kernels_gemv_sweep.py: "impl":
"before" with GS_BEFORE, "defs", R / W / ...) choose the work; every (shape, variant) is launched GN_LAUNCHES
times (default 3) with fresh weights each time (ncu flushes the caches before each kernel anyway).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys

import mlx.core as mx

from kernels_bench import qweights
from kernels_gemv_sweep import gemv
from read_floor import read

SHAPES = [(14336, 4096, 4), (4096, 14336, 4), (14336, 4096, 2), (14336, 4096, 3), (6144, 4096, 8)]
if os.environ.get("GN_SHAPES"):
    SHAPES = [tuple(s) for s in json.loads(os.environ["GN_SHAPES"])]
VARIANTS = json.loads(os.environ.get("GN_VARIANTS", '[{}]'))
LAUNCHES = int(os.environ.get("GN_LAUNCHES", "3"))
GS = 64


def label(cfg: dict) -> str:
    if not cfg:
        return "default"
    if cfg.get("impl") == "before":
        return "before"
    return cfg.get("tag") or ",".join(f"{k}={v}" for k, v in cfg.items())


def run(manifest_path: str) -> None:
    manifest = []
    for n, k, bits in SHAPES:
        x = mx.random.normal((1, k)).astype(mx.bfloat16)
        nbytes = n * k * bits // 8 + 2 * 2 * n * (k // GS)
        buf = mx.random.randint(0, 2**31, (nbytes // 64 * 16,)).astype(mx.uint32)
        ws = [qweights(n, k, bits, GS) for _ in range(LAUNCHES)]
        mx.eval(x, buf, ws)
        for cfg in VARIANTS:
            try:
                mx.eval(gemv(x, *ws[0], bits, GS, cfg))  # compiles; profiled too (marked warm, left out)
            except Exception as e:  # a variant that does not build for this shape launches nothing
                print(f"skip {n}x{k}/{bits} {label(cfg)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            manifest.append(dict(n=n, k=k, bits=bits, variant=label(cfg), bytes=nbytes, warm=True))
            for i in range(LAUNCHES):
                mx.eval(gemv(x, *ws[i], bits, GS, cfg))
                manifest.append(dict(n=n, k=k, bits=bits, variant=label(cfg), bytes=nbytes))
        for i in range(LAUNCHES):
            mx.eval(read(buf, 132 * 8, 4, False))
            manifest.append(dict(n=n, k=k, bits=bits, variant="plain read", bytes=nbytes))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def report(manifest_path: str, csv_path: str) -> dict:
    manifest = json.load(open(manifest_path))
    rows = [r for r in csv.reader(open(csv_path)) if len(r) > 10]
    hdr = rows[0]
    ki, mi, vi, ii = hdr.index("Kernel Name"), hdr.index("Metric Name"), hdr.index("Metric Value"), hdr.index("ID")
    per: dict[int, dict] = {}
    for r in rows[1:]:
        per.setdefault(int(r[ii]), {})[r[mi]] = r[vi]
    ids = sorted(per)
    if len(ids) != len(manifest):
        raise SystemExit(f"{len(ids)} profiled kernels for {len(manifest)} launches in the manifest")
    table: dict[str, dict] = {}
    for i, m in zip(ids, manifest):
        if m.get("warm"):
            continue
        key = f'{m["n"]}x{m["k"]}/{m["bits"]} {m["variant"]}'
        t = table.setdefault(key, dict(bytes=m["bytes"], metrics={}))
        for name, v in per[i].items():
            try:
                t["metrics"].setdefault(name, []).append(float(v.replace(",", "")))
            except ValueError:
                pass
    out = {}
    for key, t in table.items():
        med = {name: statistics.median(v) for name, v in t["metrics"].items()}
        us = med.get("gpu__time_duration.sum", float("nan")) / 1e3      # ns -> us
        out[key] = dict(us=round(us, 2), GBps=round(t["bytes"] / us / 1e3, 1),
                        **{name: round(v, 2) for name, v in med.items() if name != "gpu__time_duration.sum"})
        print(f"{key:40s} {us:7.2f} us {t['bytes'] / us / 1e3:7.1f} GB/s  " +
              " ".join(f"{name.split('__')[1][:28]}={v:.3g}" for name, v in med.items()
                       if name != "gpu__time_duration.sum"))
    return out


if __name__ == "__main__":
    if "--report" in sys.argv:
        res = report(sys.argv[1], sys.argv[sys.argv.index("--report") + 1])
        if len(sys.argv) > sys.argv.index("--report") + 2:
            json.dump(res, open(sys.argv[sys.argv.index("--report") + 2], "w"), indent=1)
    else:
        run(sys.argv[1])
