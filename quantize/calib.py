"""Calibration text for GPTQ and the sensitivity allocator.

Default: the built-in quantize/data/calibration.txt (prose, code, dialogue, a little multilingual
text) followed by a slice from the *end* of the Python docs sources when they are installed (the
evaluation uses the start of the same text, so the two never overlap). "docs-mix" instead takes slices
of many docs files (see default_text). A user file replaces both.
"""

from __future__ import annotations

import random
from pathlib import Path

BUILTIN = Path(__file__).parent / "data" / "calibration.txt"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_TOKENS = 4096
EVAL_CHARS = 400_000  # evaluate.load_text reads at most this much of the sorted docs
FILE_CHARS = 8_000  # per docs file: many short slices cover more kinds of text than a few long ones


def default_text(max_chars: int = 60_000, mix: bool = False) -> str:
    """The built-in text, then up to `max_chars` of the Python docs sources when installed.

    Default: the *last* `max_chars` characters of the sorted docs (whatsnew/...), far from the eval text.
    mix=True ("--calib docs-mix"): the first FILE_CHARS characters of each file, over files in a fixed
    shuffled order, skipping the files that evaluation reads (the sorted docs' first EVAL_CHARS characters).
    On Qwen2.5-Coder-0.5B JANG_2S (gptq, 4,096 tokens) the mix was no better than the tail on held-out
    text (bench/results/quality-qwen2.5-coder.json), so the tail stays the default."""
    text = BUILTIN.read_text(encoding="utf-8")
    if not DOCS.is_dir():
        return text
    files = sorted(DOCS.rglob("*.rst.txt"))
    if not mix:
        tail, size = [], 0
        for p in reversed(files):
            t = p.read_text(encoding="utf-8", errors="replace")
            tail.append(t)
            size += len(t)
            if size >= max_chars:
                break
        return text + "\n\n" + "".join(reversed(tail))[-max_chars:]
    seen = 0
    while files and seen < EVAL_CHARS:  # evaluate.load_text's share of the docs
        seen += len(files.pop(0).read_text(encoding="utf-8", errors="replace"))
    random.Random(0).shuffle(files)
    parts, size = [], 0
    for p in files:
        t = p.read_text(encoding="utf-8", errors="replace")[:FILE_CHARS]
        parts.append(t)
        size += len(t)
        if size >= max_chars:
            break
    return text + "\n\n" + "".join(parts)[:max_chars]


def source_tokenizer(source):
    tok = getattr(source, "tokenizer", None)
    if tok is not None:
        return tok
    from jang_serve.engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(source.path)


def calibration_tokens(source, calib=None, n_tokens: int = DEFAULT_TOKENS) -> list[int]:
    """Token ids of the calibration text (calib: a file path, "docs-mix", or None for the default)."""
    if calib is None or calib == "docs-mix":  # ~4 characters per token; more text for long budgets
        text = default_text(max(60_000, 5 * n_tokens), mix=calib == "docs-mix")
    else:
        p = Path(calib)
        if not p.is_file():
            raise FileNotFoundError(f"calibration file {p} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
    ids = source_tokenizer(source).encode(text)
    if len(ids) < 64:
        raise ValueError(f"calibration text is too short ({len(ids)} tokens; need at least 64)")
    return ids[:n_tokens]
