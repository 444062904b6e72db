"""Shared by the GGUF/tokenizer tests: our readers and transformers' references, built once per
test session, and an on-disk cache of reference outputs.

transformers' GGUF reader takes ~7/16/25 s to parse the SmolLM2/Qwen/Gemma vocabularies (it makes
a numpy view per token), so reference outputs (token ids, logits) are cached under
.cache/tests/refs, keyed by the GGUF file (name, size, mtime), the transformers version and a
hash of the inputs. Delete that folder (or set JANG_TEST_REFRESH=1) to recompute them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

import realdata

MODELS = {
    "smollm2": realdata.smollm2_gguf,
    "qwen25": realdata.qwen25_coder_gguf,
    "gemma3": realdata.gemma3_gguf,
}

REFS = realdata.CACHE / "refs"


def gguf_path(name: str) -> Path:
    return MODELS[name]()


@functools.lru_cache(maxsize=None)
def ours(name: str):
    """Our GGUFModel without weights (config + tokenizer)."""
    from jang_serve.engine.loader.gguf import read_gguf

    return read_gguf(gguf_path(name), with_weights=False)


@functools.lru_cache(maxsize=None)
def hf_tokenizer(name: str):
    from transformers import AutoTokenizer

    p = gguf_path(name)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _key(name: str, kind: str, payload) -> str:
    import transformers

    p = gguf_path(name)
    st = p.stat()
    h = hashlib.sha256(json.dumps([p.name, st.st_size, int(st.st_mtime), transformers.__version__, kind, payload],
                                  ensure_ascii=False).encode()).hexdigest()[:20]
    return f"{name}-{kind}-{h}"


def cached_json(name: str, kind: str, payload, compute):
    """compute() -> JSON-able value, cached on disk under a key built from the inputs."""
    path = REFS / (_key(name, kind, payload) + ".json")
    if path.is_file() and not os.environ.get("JANG_TEST_REFRESH"):
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    tmp.rename(path)
    return value


def cached_npz(name: str, kind: str, payload, compute) -> dict[str, np.ndarray]:
    """compute() -> dict of numpy arrays, cached on disk like cached_json."""
    path = REFS / (_key(name, kind, payload) + ".npz")
    if path.is_file() and not os.environ.get("JANG_TEST_REFRESH"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **value)
    tmp.rename(path)
    return value


def digit_pieces(text: str) -> list[str]:
    """llama.cpp's first split for tokenizer.ggml.pre == "smollm": every number character alone."""
    import regex

    return [p for p in regex.split(r"(\p{N})", text) if p]


def reference_ids(name: str, texts: list[str]) -> list[list[int]]:
    r"""transformers' token ids (no special tokens added) for each text.

    SmolLM2: transformers' GGUF tokenizer has no entry for llama.cpp's "smollm" pre-tokenizer and
    falls back to GPT-2's split, which keeps digit runs (and a space before them) together. SmolLM2
    was trained with digits split one by one (its tokenizer.json: Digits(individual_digits) then
    ByteLevel; llama.cpp: `\p{N}` then the GPT-2 regex). So its reference is transformers' tokenizer
    applied to the digit-isolated pieces of the text."""
    hf = lambda: hf_tokenizer(name)  # noqa: E731
    if name == "smollm2":
        return cached_json(name, "ids-digits", texts, lambda: [
            [i for p in digit_pieces(t) for i in hf().encode(p, add_special_tokens=False)] for t in texts])
    return cached_json(name, "ids", texts, lambda: [hf().encode(t, add_special_tokens=False) for t in texts])
