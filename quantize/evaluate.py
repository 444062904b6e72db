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
import os
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


def _log_softmax(logits: mx.array):
    """Row-wise log-softmax of MLX logits, done in torch when available (MLX's CPU exp is ~5x slower
    on vocab-sized rows); returns a float32 torch tensor or an MLX array."""
    try:
        import numpy as np
        import torch
    except ImportError:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return torch.log_softmax(torch.from_numpy(np.array(logits, copy=True)), dim=-1)


def _run(model, windows, per, kl_windows, ref=None, keep=None, log=None, label=""):
    """One model over all windows: (nll sum, count, kl sum, agree, kl count). `keep(i, lp)` receives
    the log-probs [T-1, V] of each KL window i (reference pass); `ref(i)` returns them (others)."""
    import numpy as np

    nll_sum, n, kl_sum, agree, nk = 0.0, 0, 0.0, 0, 0
    t0 = time.time()
    for b in range(0, len(windows), per):
        chunk = windows[b : b + per]
        outs = batch_logits(model, chunk)
        for j, o in enumerate(outs):
            i = b + j
            lp = _log_softmax(o[:-1])
            tgt = windows[i][1:]
            if isinstance(lp, mx.array):
                nll = -mx.take_along_axis(lp, mx.array(tgt)[:, None], axis=-1)
                nll_sum += float(nll.sum())
                lp = np.array(lp)
            else:
                import torch

                nll_sum += -float(lp.gather(1, torch.tensor(tgt)[:, None]).sum())
                lp = lp.numpy()
            n += len(tgt)
            if i >= kl_windows:
                continue
            if keep is not None:
                keep(i, lp)
            if ref is not None:
                kl, ag = _kl_top1(np.asarray(ref(i), dtype=np.float32), lp)
                kl_sum += kl
                agree += ag
                nk += lp.shape[0]
        if log:
            log(f"{label}: windows {b + len(chunk)}/{len(windows)} ({time.time() - t0:.0f}s)")
    return nll_sum, n, kl_sum, agree, nk


def _kl_top1(r, q) -> tuple[float, int]:
    """(sum over rows of KL(r || q), rows where argmax agrees) for log-prob arrays [T, V]."""
    try:
        import torch

        rt, qt = torch.from_numpy(r), torch.from_numpy(q)
        kl = float((rt.exp() * (rt - qt)).sum())
        return kl, int((rt.argmax(-1) == qt.argmax(-1)).sum())
    except ImportError:
        import numpy as np

        return float((np.exp(r) * (r - q)).sum()), int((r.argmax(-1) == q.argmax(-1)).sum())


class RefStore:
    """The reference's log-probs over the KL windows, float16, in memory or in a .npy file on disk
    (`cache_dir`), so several evaluations of one model share one reference pass."""

    def __init__(self, key: dict, cache_dir=None):
        import hashlib

        self.key = key
        self.dir = Path(cache_dir) if cache_dir else None
        self.tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.arr = None
        self.meta = None
        self.n = 0
        if self.dir and (self.dir / f"ref-{self.tag}.json").is_file():
            import numpy as np

            self.meta = json.loads((self.dir / f"ref-{self.tag}.json").read_text())
            self.arr = np.load(self.dir / f"ref-{self.tag}.npy", mmap_mode="r")

    def create(self, n: int, rows: int, vocab: int):
        import numpy as np

        self.n = n

        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.arr = np.lib.format.open_memmap(self.dir / f"ref-{self.tag}.part.npy", mode="w+",
                                                 dtype=np.float16, shape=(n, rows, vocab))
        else:
            self.arr = np.empty((n, rows, vocab), np.float16)

    def put(self, i, lp):
        if self.arr is None:
            self.create(self.n, lp.shape[0], lp.shape[1])
        self.arr[i] = lp.astype("float16")

    def get(self, i):
        return self.arr[i]

    def finish(self, meta: dict):
        self.meta = meta
        if self.dir:
            import numpy as np

            self.arr.flush()
            del self.arr
            os.replace(self.dir / f"ref-{self.tag}.part.npy", self.dir / f"ref-{self.tag}.npy")
            (self.dir / f"ref-{self.tag}.json").write_text(json.dumps({**meta, "key": self.key}, indent=1))
            self.arr = np.load(self.dir / f"ref-{self.tag}.npy", mmap_mode="r")


def evaluate(paths: list, ref=None, text: str | None = None, tokens: int = 16384, kl_tokens: int = 8192,
             window: int = 512, batch_tokens: int = 2048, ids: list[int] | None = None, log=None,
             ref_cache=None) -> dict:
    """Metrics for each model path (and the reference, if given). Models are loaded one at a time; the
    reference's log-probabilities over the KL windows are kept as float16 (in `ref_cache`, a folder,
    when given: a later call with the same reference, tokens and windows reuses them)."""
    import hashlib

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
    store = None
    if ref:
        key = {"ref": str(Path(ref).resolve()), "ids": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
               "window": window, "kl_windows": kl_windows, "tokens": nwin * window}
        store = RefStore(key, ref_cache)
        if store.meta is None:
            refm = _load(ref, True)
            store.n = kl_windows
            nll, n, _, _, _ = _run(refm, windows, per, kl_windows, keep=store.put, log=log, label="reference")
            del refm
            store.finish({"ppl": math.exp(nll / n)})
        elif log:
            log(f"reference log-probs from {store.dir}/ref-{store.tag}.npy")
        bits, size = model_bits(ref)
        res["reference"] = {"path": str(ref), "ppl": store.meta["ppl"], "average_bits": bits, "size_bytes": size,
                            "kl": 0.0, "top1": 1.0}
    for p in paths:
        m = _load(p, False)
        nll, n, kl, agree, nk = _run(m, windows, per, kl_windows, ref=store.get if store else None, log=log,
                                     label=str(p))
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
