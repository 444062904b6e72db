"""The standard serving comparison: jang-serve against mlx-lm's own server on the SAME model files
(SmolLM2-135M-Instruct as a JANG_4L:mse:g32 bundle, which mlx_lm.load reads as is), same load, one
invocation.

    .venv/bin/python bench/serve.py                       # CPU: writes bench/results/serve-cpu.json
    .venv/bin/python bench/serve.py --quick               # a short smoke run (not for quoting)
    .venv/bin/python bench/serve.py --model X.gguf        # another GGUF (converted once) or a bundle folder
    .venv/bin/python bench/serve.py -- --repeat 5         # anything after -- goes to `jangq bench serve`

Both servers get one bundle folder: jang-serve loads it with dtype "auto" (float32 on CPU, bfloat16
on GPU); mlx-lm gets the same folder with its float16 norms/scales/biases cast to that dtype (an exact
copy of what our loader computes with). On a GPU machine the result goes to serve-gpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bundle_for(model: str | None) -> Path:
    """The JANG bundle to serve: the embedded default, a given bundle folder, or a .gguf converted
    once with the default serving profile (next to jang-serve's own converted models)."""
    from jang_serve.server.default_model import ensure_default_model

    if model is None:
        return ensure_default_model()
    src = Path(model)
    if src.is_dir():
        return src
    if src.suffix != ".gguf" or not src.is_file():
        raise SystemExit(f"error: --model {model}: expected a .gguf file or a model folder")
    from jang_serve.quantize import DEFAULT_SERVE_PROFILE, convert
    from jang_serve.server.config import jang_home

    out = jang_home() / "bench" / f"{src.stem}-{DEFAULT_SERVE_PROFILE.replace(':', '-')}"
    if not (out / "config.json").is_file():
        print(f"converting {src} -> {out} ({DEFAULT_SERVE_PROFILE}) ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(str(src), str(out), profile=DEFAULT_SERVE_PROFILE)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1,4 clients, 4 requests, 1 repeat")
    p.add_argument("--model", help="a .gguf or a JANG/mlx-lm bundle folder (default: the embedded SmolLM2)")
    p.add_argument("--out", help="JSON path (default: bench/results/serve-<cpu|gpu>.json)")
    p.add_argument("rest", nargs="*", help="extra `jangq bench serve` options (after --)")
    a = p.parse_args()

    import mlx.core as mx

    from jang_serve.loadgen.cli import main as bench_main

    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    bundle = bundle_for(a.model)
    out = a.out or str(REPO / "bench" / "results" / f"serve-{kind}.json")
    argv = ["--serve-model", str(bundle), "--serve-args", "--kv-memory 2",
            "--baseline", "mlx-lm", "--baseline-model", str(bundle), "--baseline-dtype", "auto",
            "--tokenizer", str(bundle), "--prompt-tokens", "128", "--max-tokens", "64", "--json", out]
    if kind == "gpu":  # one unmeasured round per level first: kernel compiles stay out of the timings
        argv += ["--warmup-levels"]
    if a.quick:
        argv += ["--concurrency", "1,4", "--requests", "4", "--repeat", "1"]
    else:
        argv += ["--concurrency", "1,4,16,64", "--repeat", "3"]
    return bench_main(argv + a.rest)


if __name__ == "__main__":
    sys.exit(main())
