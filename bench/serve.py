"""The standard serving comparison: jang-serve (embedded SmolLM2-135M-Instruct JANG bundle) against
mlx-lm's own server on the same GGUF converted by mlx_lm.convert, same load, one invocation.

    .venv/bin/python bench/serve.py                 # CPU: writes bench/results/serve-cpu.json
    .venv/bin/python bench/serve.py --quick         # a short smoke run (not for quoting)
    .venv/bin/python bench/serve.py -- --repeat 5   # anything after -- goes to `jangq bench serve`

On a GPU machine the same command writes bench/results/serve-gpu.json and converts the baseline in
bfloat16 (jang-serve's dtype "auto" is bfloat16 there, float32 on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1,4 clients, 4 requests, 1 repeat")
    p.add_argument("--out", help="JSON path (default: bench/results/serve-<cpu|gpu>.json)")
    p.add_argument("rest", nargs="*", help="extra `jangq bench serve` options (after --)")
    a = p.parse_args()

    import mlx.core as mx

    from jang_serve.loadgen.cli import main as bench_main
    from jang_serve.quantize import DEFAULT_SERVE_PROFILE
    from jang_serve.server.default_model import default_gguf

    gpu = mx.default_device() == mx.gpu
    kind = "gpu" if gpu else "cpu"
    # the baseline gets the bits of our bundle's compressed (MLP) tensors: JANG_6M -> 6
    bits = int(DEFAULT_SERVE_PROFILE.split("_")[1][0])
    out = a.out or str(REPO / "bench" / "results" / f"serve-{kind}.json")
    argv = ["--serve-model", "default", "--serve-args", "--kv-memory 2",
            "--baseline", "mlx-lm", "--baseline-model", str(default_gguf()), "--baseline-bits", str(bits),
            "--baseline-dtype", "bfloat16" if gpu else "float32",
            "--prompt-tokens", "128", "--max-tokens", "64", "--json", out]
    if a.quick:
        argv += ["--concurrency", "1,4", "--requests", "4", "--repeat", "1"]
    else:
        argv += ["--concurrency", "1,4,16,64", "--repeat", "3"]
    return bench_main(argv + a.rest)


if __name__ == "__main__":
    sys.exit(main())
