"""Quality of our quantizer against the reference `jang` 2.5.50 and mlx-lm on real small models.

    python bench/quality.py --model smollm2 [--tokens 16384 --kl-tokens 8192] [--only NAME ...]

Method (QUALITY_ANCHORS.md): reference = the GGUF dequantized to bf16, run in float32; perplexity on
the Python 3.11 docs sources (sorted, concatenated) over the first `--tokens` tokens in 512-token
windows (token 0 of each window is context only); KL(reference || model) and top-1 agreement over the
first `--kl-tokens` tokens. "bits" = stored bits per weight over all weight matrices incl. scales and
biases. Conversions are cached under .cache/quality/<model>/; the JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import jang_serve  # noqa: E402,F401  (loads OpenBLAS for MLX before MLX is imported)
import mlx.core as mx  # noqa: E402

from jang_serve.quantize import convert  # noqa: E402
from jang_serve.quantize.evaluate import evaluate, load_text, tokenizer_for  # noqa: E402

MODELS = {"smollm2": "smollm2_gguf", "qwen2.5-coder": "qwen25_coder_gguf"}

# name -> (kind, kwargs)
OURS = {
    "ours JANG_2S (gptq)": ("ours", {"profile": "JANG_2S", "method": "gptq"}),
    "ours JANG_2S (mse)": ("ours", {"profile": "JANG_2S", "method": "mse"}),
    "ours JANG_3M (mse)": ("ours", {"profile": "JANG_3M", "method": "mse"}),
    "ours JANG_4M (mse)": ("ours", {"profile": "JANG_4M", "method": "mse"}),
    "ours JANG_4K (mse)": ("ours", {"profile": "JANG_4K", "method": "mse"}),
    "ours JANG_4K (rtn)": ("ours", {"profile": "JANG_4K", "method": "rtn"}),
    "ours bits=2.5 (rtn)": ("ours", {"bits": 2.5, "method": "rtn"}),
    "ours bits=3.0 (rtn)": ("ours", {"bits": 3.0, "method": "rtn"}),
    "ours bits=4.0 (rtn)": ("ours", {"bits": 4.0, "method": "rtn"}),
    "ours bits=3.0 (gptq)": ("ours", {"bits": 3.0, "method": "gptq"}),
    "ours JANG_4M:mse:g32": ("ours", {"profile": "JANG_4M:mse:g32"}),
    "ours JANG_4L:mse:g32 (default serve)": ("ours", {"profile": "JANG_4L:mse:g32"}),
}
PEERS = {
    "jang 2.5.50 JANG_2S": ("jang", {"profile": "JANG_2S"}),
    "jang 2.5.50 JANG_4K": ("jang", {"profile": "JANG_4K"}),
    "mlx-lm uniform 4-bit": ("mlx", {"bits": 4}),
    "mlx-lm mixed_2_6": ("mlx", {"recipe": "mixed_2_6"}),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def hf_dir(gguf: Path, out: Path) -> Path:
    """The GGUF dequantized to an HF bf16 safetensors folder (input of the jang / mlx-lm converters)."""
    if out.exists():
        return out
    from jang_serve.quantize.sources import open_source

    src = open_source(gguf)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {}
    for _, g in src.groups():
        weights.update({k: v.astype(mx.bfloat16) for k, v in g.items()})
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    cfg = dict(src.config)
    cfg.setdefault("architectures", [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(cfg["model_type"], "X")])
    cfg["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    src.save_tokenizer(tmp)
    tmp.rename(out)
    return out


def build(kind: str, kw: dict, gguf: Path, hf: Path, out: Path, log) -> float:
    if out.exists():
        return 0.0
    t = time.time()
    if kind == "ours":
        convert(gguf, out, progress=None, **kw)
    elif kind == "jang":
        r = subprocess.run([sys.executable, "-m", "jang_tools", "convert", str(hf), "-o", str(out), "-p", kw["profile"],
                            "-m", "rtn"], capture_output=True, text=True)
        if not (out / "jang_config.json").exists():
            raise RuntimeError(f"jang convert failed: {r.stderr[-2000:]}")
    elif kind == "mlx":
        from mlx_lm import convert as mlx_convert

        if "recipe" in kw:
            mlx_convert(str(hf), str(out), quantize=True, quant_predicate=kw["recipe"], q_group_size=64)
        else:
            mlx_convert(str(hf), str(out), quantize=True, q_bits=kw["bits"], q_group_size=64)
    dt = time.time() - t
    log(f"built {out.name} in {dt:.0f}s")
    return dt


# Peers' numbers from /work/shared/QUALITY_ANCHORS.md (16,384 tokens / KL on 8,192), for the plot.
ANCHORS = {
    "smollm2": [(8.50, "mlx-lm uniform 8-bit", 12.15), (5.50, "mlx-lm uniform 5-bit", 13.89),
                (5.29, "jang JANG_4M", 16.64), (4.53, "jang JANG_2L", 1620), (4.50, "mlx-lm uniform 4-bit", 17.87),
                (4.49, "jang JANG_3M", 52.71), (4.42, "jang JANG_4K", 24.82), (4.11, "jang JANG_2M", 2380),
                (3.81, "mlx-lm mixed_3_6", 72.64), (3.71, "jang JANG_2S", 2380), (3.50, "mlx-lm uniform 3-bit", 115.73),
                (3.42, "jang JANG_3K", 2490), (2.91, "mlx-lm mixed_2_6", 3.96e6), (2.50, "mlx-lm uniform 2-bit", 2.3e7)],
}


def merge(files: list[str], dest: Path) -> dict:
    """Combine runs made in parallel (same method and tokens) into one results file."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    out = dict(runs[0])
    seen, rows = set(), []
    for r in runs:
        for row in r["results"]:
            if row["variant"] not in seen:
                seen.add(row["variant"])
                rows.append(row)
        out["failed"] = {**out.get("failed", {}), **r.get("failed", {})}
    refs = [row["ppl"] for r in runs for row in r["results"] if row["variant"].startswith("reference")]
    out["reference_ppl_per_run"] = refs
    out["results"] = sorted(rows, key=lambda r: -r["average_bits"])
    out["eval_seconds"] = sum(r["eval_seconds"] for r in runs)
    out["merged_from"] = len(runs)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    return out


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ref = next(r["ppl"] for r in res["results"] if r["variant"].startswith("reference"))
    groups = {"ours": ("tab:green", "o"), "jang": ("tab:red", "s"), "mlx-lm": ("tab:blue", "^")}
    for r in res["results"]:
        if r["variant"].startswith("reference"):
            continue
        kind = r["variant"].split()[0]
        c, m = groups.get(kind, ("gray", "x"))
        ax.scatter(r["average_bits"], r["ppl"] / ref, color=c, marker=m, s=40)
        ax.annotate(r["variant"].replace("ours ", ""), (r["average_bits"], r["ppl"] / ref), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    anchor_ref = {"smollm2": 12.18, "qwen2.5-coder": 7.50}.get(res["model"])
    for bits, name, ppl in ANCHORS.get(res["model"], []):
        kind = "jang" if name.startswith("jang") else "mlx-lm"
        c, m = groups[kind]
        ax.scatter(bits, ppl / anchor_ref, facecolors="none", edgecolors=c, marker=m, s=40)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (incl. scales/biases)")
    ax.set_ylabel("perplexity / reference perplexity")
    ax.set_title(f"{res['model']}: ours (green) vs jang 2.5.50 (red) vs mlx-lm (blue); hollow = QUALITY_ANCHORS")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


def main() -> int:
    if sys.argv[1:2] == ["--merge"]:
        dest = Path(sys.argv[2])
        res = merge(sys.argv[3:], dest)
        plot(res, dest.with_suffix(".png"))
        print(f"wrote {dest} and {dest.with_suffix('.png')}")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=list(MODELS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--kl-tokens", type=int, default=8192)
    ap.add_argument("--only", nargs="*", help="variant names to include (default: all)")
    ap.add_argument("--out", help="JSON path (default bench/results/quality-<model>.json)")
    a = ap.parse_args()
    import realdata

    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    gguf = getattr(realdata, MODELS[a.model])()
    work = REPO / ".cache" / "quality" / a.model
    work.mkdir(parents=True, exist_ok=True)
    hf = hf_dir(gguf, work / "hf-bf16")
    variants = {**OURS, **PEERS}
    if a.only:
        variants = {k: v for k, v in variants.items() if k in a.only}
    paths, times = {}, {}
    for name, (kind, kw) in variants.items():
        out = work / slug(name)
        try:
            times[name] = build(kind, kw, gguf, hf, out, log)
            paths[name] = out
        except Exception as e:  # noqa: BLE001 - record the failure in the results
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            times[name] = f"failed: {type(e).__name__}: {e}"[:500]
    ids = tokenizer_for(gguf).encode(load_text())
    log(f"evaluating {len(paths)} models on {a.tokens} tokens")
    res = evaluate(list(paths.values()), ref=gguf, ids=ids, tokens=a.tokens, kl_tokens=a.kl_tokens, log=log)
    rows = [{"variant": "reference (GGUF dequantized, bf16)", **res["models"]["reference"]}]
    for name, p in paths.items():
        r = res["models"][str(p)]
        jc = p / "jang_config.json"
        extra = {}
        if jc.exists() and name.startswith("ours"):
            q = json.loads(jc.read_text())["quantization"]
            extra = {"profile": q["profile"], "method": q["method"], "nominal_bits": q["nominal_bits"],
                     "target_bits": q["target_bits"]}
        rows.append({"variant": name, **r, "mb": round(r["size_bytes"] / 1e6, 1), "convert_s": times[name], **extra})
    rows.sort(key=lambda r: -r["average_bits"])
    deviation = None
    if a.tokens != 16384 or a.kl_tokens != 8192:
        deviation = (f"reduced token counts for CPU time: perplexity on {res['tokens']} tokens, KL/top-1 on "
                     f"{res['kl_tokens']} tokens (method: 16384 / 8192)")
    out = {
        "model": a.model, "source": gguf.name, "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
        "versions": {"mlx": mx.__version__, "python": platform.python_version()},
        "method": {"text": "Python 3.11 docs _sources/**/*.rst.txt sorted, concatenated", "window": res["window"],
                   "tokens": res["tokens"], "kl_tokens": res["kl_tokens"], "forward": "float32, dequantized weights",
                   "bits": "stored bits per weight over all weight matrices incl. scales/biases"},
        "deviation": deviation, "eval_seconds": res["seconds"], "results": rows,
        "failed": {k: v for k, v in times.items() if isinstance(v, str)},
    }
    dest = Path(a.out) if a.out else REPO / "bench" / "results" / f"quality-{a.model}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {dest}")
    for r in rows:
        print(f"{r['average_bits']:6.2f}  {r['variant']:40s} ppl {r['ppl']:10.2f}  KL {r.get('kl', 0):.3f}  "
              f"top1 {r.get('top1', 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
