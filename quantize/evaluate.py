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


def _run(model, windows, per, kl_windows, ref_store=None, keep=False, log=None, label=""):
    """One model over all windows: (nll sum, count, kl sum, agree, kl count, stored ref log-probs)."""
    nll_sum, n, kl_sum, agree, nk = 0.0, 0, 0.0, 0, 0
    stored = []
    t0 = time.time()
    for bi, b in enumerate(range(0, len(windows), per)):
        chunk = windows[b : b + per]
        tgt = mx.array([w[1:] for w in chunk])
        outs = batch_logits(model, chunk)
        lp = mx.stack([o[:-1] for o in outs])
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
        nll_sum += float(nll.sum())
        n += nll.size
        k = max(0, min(len(chunk), kl_windows - b))
        if k and keep:
            stored.append(lp[:k].astype(_store_dtype(lp)))
            mx.eval(stored[-1])
        if k and ref_store is not None:
            r = ref_store[bi].astype(mx.float32)
            q = lp[:k]
            kl = mx.sum(mx.exp(r) * (r - q), axis=-1)
            kl_sum += float(kl.sum())
            agree += int((mx.argmax(r, -1) == mx.argmax(q, -1)).sum())
            nk += kl.size
        if log:
            log(f"{label}: windows {b + len(chunk)}/{len(windows)} ({time.time() - t0:.0f}s)")
    return nll_sum, n, kl_sum, agree, nk, stored


_STORE = {"dtype": mx.float32}


def _store_dtype(lp):
    return _STORE["dtype"]


def evaluate(paths: list, ref=None, text: str | None = None, tokens: int = 16384, kl_tokens: int = 8192,
             window: int = 512, batch_tokens: int = 2048, ids: list[int] | None = None, log=None) -> dict:
    """Metrics for each model path (and the reference, if given). Models are loaded one at a time; the
    reference's log-probabilities over the KL windows are kept (float32, or float16 past 3 GB)."""
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
    per = max(1, batch_tokens // window)
    res = {}
    ref_store = None
    if ref:
        refm = _load(ref, True)
        vocab = int(refm.args.vocab_size) if hasattr(refm, "args") else 0
        _STORE["dtype"] = mx.float16 if kl_windows * window * vocab * 4 > 3e9 else mx.float32
        nll, n, _, _, _, ref_store = _run(refm, windows, per, kl_windows, keep=True, log=log, label="reference")
        del refm
        bits, size = model_bits(ref)
        res["reference"] = {"path": str(ref), "ppl": math.exp(nll / n), "average_bits": bits, "size_bytes": size,
                            "kl": 0.0, "top1": 1.0}
    for p in paths:
        m = _load(p, False)
        nll, n, kl, agree, nk, _ = _run(m, windows, per, kl_windows, ref_store=ref_store, log=log, label=str(p))
        del m
        bits, size = model_bits(p)
        row = {"path": str(p), "ppl": math.exp(nll / n), "average_bits": bits, "size_bytes": size}
        if ref:
            row["kl"] = kl / nk if nk else 0.0
            row["top1"] = agree / nk if nk else 1.0
        res[str(p)] = row
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
