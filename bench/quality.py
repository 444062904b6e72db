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

# name -> (kind, kwargs). Each model evaluates the variants its list names (CPU time is the limit).
OURS = {
    "ours JANG_2S (gptq)": ("ours", {"profile": "JANG_2S", "method": "gptq"}),
    # built by hand with gptq.MIN_SHRINK[2] = 1.0 (plain min/max group ranges for the 2-bit tensors)
    "ours JANG_2S (gptq, min/max ranges at 2 bits)": ("ours", {"profile": "JANG_2S", "method": "gptq"}),
    "ours JANG_2S (mse)": ("ours", {"profile": "JANG_2S", "method": "mse"}),
    "ours JANG_3L (gptq)": ("ours", {"profile": "JANG_3L", "method": "gptq"}),
    "ours JANG_4S (gptq)": ("ours", {"profile": "JANG_4S", "method": "gptq"}),
    "ours JANG_3M (gptq)": ("ours", {"profile": "JANG_3M", "method": "gptq"}),
    "ours JANG_2M (gptq)": ("ours", {"profile": "JANG_2M", "method": "gptq"}),
    "ours JANG_2L (gptq)": ("ours", {"profile": "JANG_2L", "method": "gptq"}),
    "ours JANG_4K = bits=4.0 (gptq)": ("ours", {"profile": "JANG_4K", "method": "gptq"}),
    "ours JANG_4K = bits=4.0 (mse)": ("ours", {"profile": "JANG_4K", "method": "mse"}),
    "ours bits=2.5 (gptq)": ("ours", {"bits": 2.5, "method": "gptq"}),
    "ours bits=3.0 (gptq)": ("ours", {"bits": 3.0, "method": "gptq"}),
    "ours bits=2.5 (mse)": ("ours", {"bits": 2.5, "method": "mse"}),
    "ours bits=3.0 (mse)": ("ours", {"bits": 3.0, "method": "mse"}),
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


def build(kind: str, kw: dict, gguf: Path, hf: Path | None, out: Path, log) -> float:
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
    "qwen2.5-coder": [(8.50, "mlx-lm uniform 8-bit", 7.50), (5.64, "jang JANG_4M", 7.86), (5.50, "mlx-lm uniform 5-bit", 7.64),
                      (5.08, "jang JANG_2L", 21.75), (4.93, "jang JANG_3M", 9.03), (4.60, "jang JANG_4K", 9.03),
                      (4.50, "mlx-lm uniform 4-bit", 8.19), (4.40, "mlx-lm mixed_3_6", 9.93), (4.08, "jang JANG_2S", 22.63),
                      (3.70, "mlx-lm mixed_2_6", 278.47), (3.59, "jang JANG_3K", 23.79), (3.50, "mlx-lm uniform 3-bit", 11.91),
                      (2.50, "mlx-lm uniform 2-bit", 5.02e3)],
}
# KL / top-1 of the anchors (same order as ANCHORS), for the cited rows of the JSON
ANCHOR_KL = {
    "smollm2": [(0.003, 0.973), (0.114, 0.830), (0.314, 0.742), (4.692, 0.167), (0.428, 0.703), (1.500, 0.419),
                (0.757, 0.617), (5.039, 0.152), (1.750, 0.378), (5.036, 0.145), (2.285, 0.277), (5.030, 0.143),
                (12.043, 0.007), (14.144, 0.004)],
    "qwen2.5-coder": [(0.001, 0.990), (0.036, 0.914), (0.016, 0.938), (1.130, 0.583), (0.176, 0.825), (0.172, 0.823),
                      (0.085, 0.863), (0.400, 0.765), (1.102, 0.576), (3.875, 0.241), (1.255, 0.570), (0.571, 0.700),
                      (6.676, 0.070)],
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
        if r["variant"].startswith("reference") or r.get("source", "").startswith("cited"):
            continue  # cited rows are drawn hollow from ANCHORS below
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
        if bits <= 6.2:
            ax.annotate(name.replace("mlx-lm ", "").replace("jang ", ""), (bits, ppl / anchor_ref), fontsize=5,
                        color=c, xytext=(3, -7), textcoords="offset points")
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color=c, marker=m, ls="", label={"ours": "ours (jang-serve)", "jang": "jang 2.5.50"}.get(k, k))
                       for k, (c, m) in groups.items()] +
              [Line2D([], [], color="gray", marker="o", ls="", markerfacecolor="none",
                      label="hollow: QUALITY_ANCHORS.md (16,384 tokens)")], fontsize=7, loc="upper right")
    ax.set_xlim(2.3, 6.2)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (incl. scales/biases)")
    ax.set_ylabel("perplexity / reference perplexity")
    ax.set_title(f"{res['model']}: perplexity (first {res['method']['tokens']} tokens) / reference perplexity; filled = measured here")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


def eval_ids(gguf: Path, tokenizer: str) -> list[int]:
    """Token ids of the evaluation text. 'ours': jang-serve's tokenizer read from the GGUF (the model's
    own pre-tokenizer, e.g. SmolLM2 isolates digits); 'hf-gguf': transformers' GGUF tokenizer, which
    QUALITY_ANCHORS.md used (it drops that digit split)."""
    text = load_text()
    if tokenizer == "ours":
        return tokenizer_for(gguf).encode(text)
    from transformers import AutoTokenizer

    ht = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return ht(text, add_special_tokens=False)["input_ids"]


RULE = ("each allocator row (--bits B, gptq) against every measured fixed JANG profile converted with the same "
        "method (gptq) whose stored bits are >= the allocator's and at most 0.5 above, or, when there is none, the "
        "nearest one above; 'wins' = lower perplexity and lower KL")


# fixed profiles inside a comparison window that CPU time did not allow converting and evaluating
NOT_MEASURED = {
    "smollm2": None,  # JANG_1L/2L/3L (gptq) were measured by bench/quality_gpu.py (H100), merged into the JSON
    "qwen2.5-coder": "this CPU script's Qwen rows were on 4,096 tokens; the committed JSON comes from "
                     "bench/quality_gpu.py (full method on an H100)",
}


def allocator_comparison(results: list[dict]) -> dict:
    alloc = [r for r in results if r["variant"].startswith("ours") and "bits=" in r["variant"] and "(gptq)" in r["variant"]]
    fixed = [r for r in results if r["variant"].startswith("ours JANG_") and "K" not in r["variant"].split()[1]
             and r["variant"].endswith("(gptq)")]
    out = {"rule": RULE, "rows": []}
    for a in alloc:
        above = sorted((f for f in fixed if f["average_bits"] >= a["average_bits"] - 1e-6), key=lambda f: f["average_bits"])
        window = [f for f in above if f["average_bits"] <= a["average_bits"] + 0.5] or above[:1]
        for f in window:
            out["rows"].append({"allocator": a["variant"], "bits": a["average_bits"], "ppl": round(a["ppl"], 3),
                                "kl": round(a["kl"], 4), "fixed": f["variant"], "fixed_bits": f["average_bits"],
                                "fixed_ppl": round(f["ppl"], 3), "fixed_kl": round(f["kl"], 4),
                                "wins": a["ppl"] <= f["ppl"] and a["kl"] <= f["kl"]})
    return out


def stamp(path: Path) -> float:
    f = path / "config.json"
    return f.stat().st_mtime if f.exists() else 0.0


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
    ap.add_argument("--tokenizer", default="hf-gguf", choices=["ours", "hf-gguf"])
    ap.add_argument("--only", nargs="*", help="variant names to evaluate now (default: all)")
    ap.add_argument("--build-only", action="store_true", help="convert, do not evaluate")
    ap.add_argument("--out", help="JSON path (default bench/results/quality-<model>.json)")
    a = ap.parse_args()
    import realdata

    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    gguf = getattr(realdata, MODELS[a.model])()
    work = REPO / ".cache" / "quality" / a.model
    work.mkdir(parents=True, exist_ok=True)
    variants = {**OURS, **PEERS}
    if a.only is not None:
        unknown = [k for k in a.only if k not in variants]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {list(variants)}")
        variants = {k: variants[k] for k in a.only}  # in the order given
    ids = eval_ids(gguf, a.tokenizer)
    # every evaluated row is kept per (tokens, KL tokens, tokenizer), so runs add up
    rfile = work / f"rows-{a.tokens}-{a.kl_tokens}-{a.tokenizer}.json"
    rows = json.loads(rfile.read_text()) if rfile.exists() else {}
    failed = {}
    for name, (kind, kw) in variants.items():
        out = work / slug(name)
        try:
            dt = build(kind, kw, gguf, hf_dir(gguf, work / "hf-bf16") if kind != "ours" else None, out, log)
        except Exception as e:  # noqa: BLE001 - record the failure in the results
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            failed[name] = f"failed: {type(e).__name__}: {e}"[:500]
            continue
        if a.build_only or (name in rows and rows[name].get("stamp") == stamp(out)):
            continue
        res = evaluate([out], ref=gguf, ids=ids, tokens=a.tokens, kl_tokens=a.kl_tokens, log=log,
                       ref_cache=work / "ref")
        r = res["models"][str(out)]
        jc = out / "jang_config.json"
        extra = {}
        if jc.exists() and name.startswith("ours"):
            q = json.loads(jc.read_text())["quantization"]
            extra = {"profile": q["profile"], "method": q["method"], "nominal_bits": q["nominal_bits"],
                     "target_bits": q["target_bits"]}
        if rfile.exists():  # other runs of this model may have added rows meanwhile
            rows = {**json.loads(rfile.read_text()), **{k: v for k, v in rows.items() if k not in json.loads(rfile.read_text())}}
        rows["reference (GGUF dequantized, bf16)"] = {**res["models"]["reference"], "stamp": 0.0}
        rows[name] = {**r, "mb": round(r["size_bytes"] / 1e6, 1), "convert_s": round(dt, 1) or None,
                      "eval_s": res["seconds"], "stamp": stamp(out), **extra}
        rfile.write_text(json.dumps(rows, indent=1))
        log(f"{name}: ppl {r['ppl']:.2f} KL {r['kl']:.3f} top1 {r['top1']:.3f} ({res['seconds']:.0f}s)")
    if a.build_only:
        return 0
    results = [{"variant": k, **{x: y for x, y in v.items() if x != "stamp"}, "source": "measured here"}
               for k, v in rows.items()]
    measured = {r["variant"] for r in results}
    for (bits, name, ppl), (kl, top1) in zip(ANCHORS.get(a.model, []), ANCHOR_KL.get(a.model, [])):
        full = name.replace("jang ", "jang 2.5.50 ")
        if full in measured:
            continue
        results.append({"variant": full, "ppl": ppl, "kl": kl, "top1": top1, "average_bits": bits,
                        "source": "cited from /work/shared/QUALITY_ANCHORS.md (same method, transformers' GGUF "
                                  "tokenizer, reference ppl %.2f)" % {"smollm2": 12.18, "qwen2.5-coder": 7.50}[a.model]})
    ref_ppl = rows.get("reference (GGUF dequantized, bf16)", {}).get("ppl")
    anchor_ref = {"smollm2": 12.18, "qwen2.5-coder": 7.50}[a.model]
    for r in results:  # the ratio to the reference is what compares across token ranges
        cited = r["source"].startswith("cited")
        r["tokens"] = 16384 if cited else a.tokens
        base = anchor_ref if cited else ref_ppl
        if base:
            r["ppl_over_reference"] = round(r["ppl"] / base, 4)
    results.sort(key=lambda r: -r["average_bits"])
    deviation = None
    if a.tokens != 16384 or a.kl_tokens != 8192:
        deviation = (f"reduced token counts for CPU time: the rows measured here use perplexity on {a.tokens} tokens and "
                     f"KL/top-1 on {a.kl_tokens} (method: 16384 / 8192); cited rows are on 16384 / 8192, so compare "
                     "them through ppl_over_reference, not absolute ppl")
    out = {
        "model": a.model, "source": gguf.name, "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with 4 other "
                  "engineers' jobs; untimed evals ran under nice -n 15)",
        "versions": {"mlx": mx.__version__, "python": platform.python_version()},
        "method": {"text": "Python 3.11 docs _sources/**/*.rst.txt sorted, concatenated", "window": 512,
                   "tokens": a.tokens, "kl_tokens": a.kl_tokens, "forward": "float32, dequantized weights",
                   "reference": "the GGUF dequantized, rounded to bf16, run in float32",
                   "tokenizer": {"hf-gguf": "transformers' GGUF tokenizer (as QUALITY_ANCHORS.md)",
                                 "ours": "jang-serve's GGUF tokenizer"}[a.tokenizer],
                   "bits": "stored bits per weight over all weight matrices incl. scales/biases"},
        "deviation": deviation, "results": results, "failed": failed,
    }
    out["allocator_vs_fixed"] = allocator_comparison(results)
    out["allocator_vs_fixed"]["not_measured"] = NOT_MEASURED.get(a.model)
    dest = Path(a.out) if a.out else REPO / "bench" / "results" / f"quality-{a.model}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, dest.with_suffix(".png"))
    log(f"wrote {dest} and its .png")
    for r in results:
        print(f"{r['average_bits']:6.2f}  {r['variant']:40s} ppl {r['ppl']:10.2f}  KL {r.get('kl', 0):.3f}  "
              f"top1 {r.get('top1', 1):.3f}  {r['source'][:8]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
