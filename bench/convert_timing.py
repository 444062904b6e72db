"""Conversion time and peak memory of `jangq convert` on Qwen2.5-Coder-0.5B (GGUF source) on this CPU.

    flock /tmp/jang-bench.lock .venv/bin/python bench/convert_timing.py JANG_2S:gptq JANG_4M:mse JANG_4M:rtn

Each run is a fresh child process (so its peak RSS is its own) converting the GGUF into a new bundle;
wall time covers everything convert() does (reading and dequantizing the GGUF, calibration and
Hessians for gptq, sensitivity measurement for budgets, quantization, writing). Bundles are kept
under .cache/quality/<model>/ (reused by bench/quality.py) unless that folder already exists, in
which case the run writes to a temp folder and deletes it. Results: bench/results/convert-<model>.json
(merged with earlier runs by "profile:method").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {"qwen2.5-coder": "qwen25_coder_gguf", "smollm2": "smollm2_gguf"}

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {tests!r})
import jang_serve, realdata
from jang_serve.quantize import convert
t = time.time()
r = convert(getattr(realdata, {fn!r})(), {out!r}, profile={profile!r}, method={method!r})
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(wall_s=round(time.time() - t, 1), cpu_s=round(u.ru_utime + u.ru_stime, 1), peak_rss_mb=round(u.ru_maxrss / 1024),
                      average_bits=r.average_bits, size_bytes=r.size_bytes, profile=r.profile, method=r.method)))
"""


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="PROFILE:METHOD, e.g. JANG_2S:gptq")
    ap.add_argument("--model", default="qwen2.5-coder", choices=list(MODELS))
    a = ap.parse_args()
    dest = REPO / "bench" / "results" / f"convert-{a.model}.json"
    old = json.loads(dest.read_text()) if dest.exists() else {"runs": []}
    runs = {f"{r['profile']}:{r['method']}": r for r in old["runs"]}
    limits = {"gptq": 600, "rtn": 120, "mse": 120}
    for spec in a.runs:
        profile, method = spec.split(":")
        keep = REPO / ".cache" / "quality" / a.model / slug(f"ours {profile} ({method})")
        tmp = None
        if keep.exists():
            tmp = Path(tempfile.mkdtemp(prefix="convert-timing-"))
            out = tmp / "bundle"
        else:
            out = keep
        code = CHILD.format(tests=str(REPO / "tests"), fn=MODELS[a.model], out=str(out), profile=profile,
                            method=method)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["limit_s"] = limits[method]
        r["within_limit"] = r["wall_s"] <= limits[method]
        r["date"] = datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z"
        runs[spec] = r
        print(json.dumps(r), flush=True)
    out = {
        "model": a.model,
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "machine_shared": "the 2 cores were shared with 4 other engineers' jobs; timed runs held "
                          "/tmp/jang-bench.lock (no other timed benchmark ran at the same time) but untimed "
                          "work of others may have run concurrently, so these are upper bounds",
        "what": "wall time of one convert() call in a fresh process, GGUF source to finished bundle; "
                "cpu_s = its user+system CPU seconds (all threads; on 2 cores an unshared run takes about "
                "max(cpu_s / 2, cpu_s of its single-threaded parts)); peak_rss_mb = the child's ru_maxrss",
        "runs": list(runs.values()),
    }
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
