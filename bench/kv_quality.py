"""KV cache quantization quality: perplexity with KV auto / q8 / q4 through the engine's paged path.

    .venv/bin/python bench/kv_quality.py [--model PATH] [--tokens 4096] [--windows 512,2048]
                                         [--out bench/results/kv-quality-smollm2.json]

The text (the Python docs, from "The Python Tutorial") is cut into non-overlapping windows of W
tokens; each window starts from an empty pool and is prefilled in chunks through PagedBackend, so
every query reads all keys and values back from the (possibly quantized) pool, as in serving.
Perplexity is over every predicted token of every window. Reports the change against KV auto.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jang_serve._blas  # noqa: F401  (first: a real BLAS for MLX on Linux)
import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import realdata  # noqa: E402
from jang_serve.engine.engine_config import EngineConfig  # noqa: E402
from jang_serve.engine.kv_pool import KVPool  # noqa: E402
from jang_serve.engine.loader import load_model  # noqa: E402
from jang_serve.engine.paged_attention import PagedBackend  # noqa: E402

BLOCK = 16


def docs_ids(tok, n: int) -> list[int]:
    text = realdata.python_docs_text()
    start = text.index("The Python Tutorial")
    ids = tok.encode(text[start:start + 8 * n])
    if len(ids) < n:
        raise ValueError(f"the docs text gives only {len(ids)} tokens, {n} asked")
    return ids[:n]


def window_nll(model, pool: KVPool, ids: list[int], chunk: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given the prefix, prefilled in chunks through the
    pool (which must hold len(ids) tokens and is overwritten from slot 0)."""
    table = mx.array([list(range(pool.num_blocks))], dtype=mx.int32)
    nll = 0.0
    for s in range(0, len(ids), chunk):
        e = min(s + chunk, len(ids))
        be = PagedBackend(pool, mx.arange(s, e, dtype=mx.int32), table, [e - s], [e])
        logits = model(mx.array(ids[s:e], dtype=mx.int32), mx.arange(s, e), be).astype(mx.float32)
        tgt = mx.array(ids[s + 1:e + 1], dtype=mx.int32)
        rows = logits[: tgt.shape[0]]
        lp = mx.take_along_axis(rows, tgt[:, None], axis=-1)[:, 0] - mx.logsumexp(rows, axis=-1)
        nll -= lp.sum().item()
    return nll, len(ids) - 1


VARIANTS = {"": {}, "plain": dict(kv_transform=False), "nocenter": dict(kv_center="none"),
            "k": dict(kv_center="k")}


def perplexity(model, tokenizer, dtype, ids: list[int], window: int, kv: str, chunk: int) -> float:
    """kv: auto | q8 | q4, with "-plain" for no change of basis (EngineConfig.kv_transform=False),
    "-nocenter" for the change of basis without centring, "-k" for centring keys only."""
    kv_dtype, _, variant = kv.partition("-")
    cfg = EngineConfig(num_blocks=-(-window // BLOCK), kv_dtype=kv_dtype, **VARIANTS[variant])
    pool = KVPool.for_model(model, cfg, dtype, tokenizer)
    nll = n = 0
    for w in range(0, len(ids) - window + 1, window):
        a, b = window_nll(model, pool, ids[w:w + window], chunk)
        nll, n = nll + a, n + b
    return math.exp(nll / n)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(realdata.smollm2_gguf()))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--windows", default="512,2048", help="window lengths (tokens), comma separated")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk inside a window")
    ap.add_argument("--kv", default="auto,q8,q4",
                    help="auto, q8, q4; q4-plain: without kv_transform; q4-nocenter / q4-k: without centring / keys only")
    ap.add_argument("--out", default=str(ROOT / "bench/results/kv-quality-smollm2.json"))
    ap.add_argument("--merge", action="store_true", help="add these rows to an existing --out file")
    args = ap.parse_args()

    lm = load_model(args.model)
    dtype = mx.float32
    ids = docs_ids(lm.tokenizer, args.tokens)
    rows = []
    for window in [int(w) for w in args.windows.split(",")]:
        if args.tokens % window:
            raise ValueError(f"--tokens {args.tokens} is not a multiple of the window {window}")
        ppl = {}
        for kv in args.kv.split(","):
            t = time.perf_counter()
            ppl[kv] = perplexity(lm.model, lm.tokenizer, dtype, ids, window, kv, min(args.chunk, window))
            print(f"window {window} kv {kv}: ppl {ppl[kv]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        base = ppl.get("auto")
        if base is None and args.merge and Path(args.out).is_file():  # the auto row of an earlier run
            old = json.loads(Path(args.out).read_text())["results"]
            base = next((r["perplexity"] for r in old if r["window"] == window and r["kv"] == "auto"), None)
        for kv, p in ppl.items():
            rows.append(dict(window=window, kv=kv, perplexity=round(p, 4),
                             change_pct=None if base is None else round(100 * (p / base - 1), 3)))
    result = dict(
        benchmark="kv_quality",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        device=dict(kind=str(mx.default_device()), machine=platform.machine(), cpu_count=__import__("os").cpu_count(),
                    blas=jang_serve._blas.loaded or "the mlx[cpu] wheel's reference BLAS",
                    note="shared 2-core machine (quality numbers do not depend on load)"),
        versions=dict(mlx=version("mlx"), python=platform.python_version()),
        model=dict(path=str(args.model), format=lm.format, activations="float32"),
        text=dict(source="python3.11-doc, from 'The Python Tutorial'", tokens=len(ids)),
        settings=dict(block_size=BLOCK, prefill_chunk=args.chunk,
                      q8="group 64, float16 scales/biases", q4="group 32, float16 scales/biases, smoothed + Hadamard-rotated basis "
                      "(engine/kv_transform.py), keys centred on calibration means with measured scales "
                      "(engine/kv_calibration.py)", variants="q4-nocenter: no calibration pass "
                      "(weights' scale estimate only); q4-plain: no change of basis at all"),
        acceptance=dict(q8_max_change_pct=0.5, q4_max_change_pct=3.0),
        results=rows,
        passed=all(abs(r["change_pct"]) <= (0.5 if r["kv"] == "q8" else 3.0) for r in rows
                   if r["kv"] in ("q8", "q4") and r["change_pct"] is not None),
    )
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        rows = old["results"] + [r for r in rows if (r["window"], r["kv"]) not in
                                 {(o["window"], o["kv"]) for o in old["results"]}]
        result["results"] = rows
        result["passed"] = old["passed"]
        result["notes"] = old.get("notes", []) + [f"rows {args.kv} added {result['date']} at {result['commit']}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
