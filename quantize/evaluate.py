"""`jangq eval`: perplexity, KL(ref || model) and top-1 agreement on a text, multiple-choice accuracy.

Method (docs/quantizer.md, /work/shared/QUALITY_ANCHORS.md): the text is tokenized with the model's
tokenizer; perplexity over the first `tokens` tokens in non-overlapping windows of `window` tokens,
token 0 of each window being context only; KL and top-1 agreement against the reference over the
first `kl_tokens` tokens. Forward passes in float32. All models run window batch by window batch in
lockstep with the reference, so no logits are kept beyond one batch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlx.core as mx

from .bundle import batch_logits, load_bundle


def load_text(path=None, max_chars: int = 400_000) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    from .calib import DOCS

    if not DOCS.is_dir():
        raise FileNotFoundError(f"{DOCS} is missing: apt-get install python3.11-doc, or pass --text")
    out, size = [], 0
    for p in sorted(DOCS.rglob("*.rst.txt")):
        t = p.read_text(encoding="utf-8", errors="replace")
        out.append(t)
        size += len(t)
        if size >= max_chars:
            break
    return "".join(out)


def tokenizer_for(path):
    from jang_serve.engine.tokenizer import Tokenizer

    p = Path(path)
    if p.is_dir():
        return Tokenizer.from_dir(p)
    from jang_serve.engine.loader.gguf import read_gguf

    return read_gguf(p, with_weights=False).tokenizer


def model_bits(path) -> tuple[float, int]:
    """(stored bits per weight, bytes of weights) of a bundle; (16, size) for float sources."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        from .inspect import inspect_bundle

        info = inspect_bundle(p)
        return info["average_bits"], info["size_bytes"]
    return 16.0, p.stat().st_size


def _load(path, bf16_round: bool):
    model, cfg = load_bundle(path, dequantize=True)
    if bf16_round:  # the reference of QUALITY_ANCHORS.md: dequantized to bf16, run in float32
        from mlx.utils import tree_flatten

        model.load_weights([(k, v.astype(mx.bfloat16).astype(mx.float32)) for k, v in tree_flatten(model.parameters())
                            if v.dtype == mx.float32], strict=False)
        mx.eval(model.parameters())
    return model


def evaluate(paths: list, ref=None, text: str | None = None, tokens: int = 16384, kl_tokens: int = 8192,
             window: int = 512, batch_tokens: int = 2048, ids: list[int] | None = None, log=None) -> dict:
    """Metrics for each model path (and the reference, if given). Returns {"models": {...}, ...}."""
    t0 = time.time()
    first = ref or paths[0]
    if ids is None:
        ids = tokenizer_for(first).encode(text if text is not None else load_text())
    ids = ids[:tokens]
    nwin = len(ids) // window
    if nwin == 0:
        raise ValueError(f"text has {len(ids)} tokens; need at least one window of {window}")
    windows = [ids[i * window : (i + 1) * window] for i in range(nwin)]
    kl_windows = min(nwin, max(1, kl_tokens // window))
    names = [str(p) for p in paths]
    models = {str(p): _load(p, False) for p in paths}
    refm = _load(ref, True) if ref else None
    stats = {n: {"nll": 0.0, "n": 0, "kl": 0.0, "agree": 0, "nk": 0} for n in names}
    if ref:
        stats["__ref__"] = {"nll": 0.0, "n": 0, "kl": 0.0, "agree": 0, "nk": 0}
    per = max(1, batch_tokens // window)
    for b in range(0, nwin, per):
        chunk = windows[b : b + per]
        tgt = mx.array([w[1:] for w in chunk])
        ref_lp = None
        items = ([("__ref__", refm)] if ref else []) + [(n, models[n]) for n in names]
        for name, m in items:
            outs = batch_logits(m, chunk)
            lp = mx.stack([o[:-1] for o in outs])
            lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
            nll = -mx.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
            s = stats[name]
            s["nll"] += float(nll.sum())
            s["n"] += nll.size
            if name == "__ref__":
                ref_lp = lp
            elif ref_lp is not None:
                k = max(0, min(len(chunk), kl_windows - b))
                if k:
                    r, q = ref_lp[:k], lp[:k]
                    kl = mx.sum(mx.exp(r) * (r - q), axis=-1)
                    s["kl"] += float(kl.sum())
                    s["agree"] += int((mx.argmax(r, -1) == mx.argmax(q, -1)).sum())
                    s["nk"] += kl.size
            mx.eval(lp)
        if log:
            log(f"windows {b + len(chunk)}/{nwin} ({time.time() - t0:.0f}s)")
    res = {}
    for name in (["__ref__"] if ref else []) + names:
        s = stats[name]
        path = ref if name == "__ref__" else name
        bits, size = model_bits(path)
        row = {"path": str(path), "ppl": math.exp(s["nll"] / s["n"]), "average_bits": bits, "size_bytes": size}
        if ref:
            row["kl"] = s["kl"] / s["nk"] if s["nk"] else 0.0
            row["top1"] = s["agree"] / s["nk"] if s["nk"] else 1.0
        res["reference" if name == "__ref__" else name] = row
    return {"models": res, "tokens": nwin * window, "window": window, "kl_tokens": kl_windows * window,
            "seconds": round(time.time() - t0, 1)}


def multiple_choice(path, jsonl) -> dict:
    """Accuracy on {question, choices, answer} rows scored by the logits of the option letters."""
    model = _load(path, False)
    tok = tokenizer_for(path)
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    correct = 0
    for r in rows:
        letters = [chr(65 + i) for i in range(len(r["choices"]))]
        prompt = r["question"].strip() + "\n" + "".join(f"{l}. {c}\n" for l, c in zip(letters, r["choices"])) + "Answer:"
        ids = tok.encode(prompt)
        logits = batch_logits(model, [ids])[0][-1]
        opts = [tok.encode(" " + l)[-1] for l in letters]
        pick = int(mx.argmax(logits[mx.array(opts)]))
        ans = r["answer"]
        ans = letters.index(ans.strip().upper()) if isinstance(ans, str) else int(ans)
        correct += pick == ans
    return {"path": str(path), "questions": len(rows), "accuracy": correct / max(len(rows), 1)}


def plot(results: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["models"].items():
        ax.scatter(r["average_bits"], r["ppl"])
        ax.annotate(Path(name).name, (r["average_bits"], r["ppl"]), fontsize=7)
    ax.set_xlabel("stored bits per weight")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def run_cli(a) -> int:
    for p in a.paths + ([a.ref] if a.ref else []):
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such model")
    text = load_text(a.text) if a.text else None
    res = evaluate(a.paths, ref=a.ref, text=text, tokens=a.tokens, kl_tokens=a.kl_tokens, window=a.window)
    if a.mc:
        res["multiple_choice"] = [multiple_choice(p, a.mc) for p in a.paths]
    if a.plot:
        plot(res, a.plot)
        res["plot"] = a.plot
    s = json.dumps(res, indent=1)
    if a.output:
        Path(a.output).write_text(s + "\n")
    print(s)
    return 0
