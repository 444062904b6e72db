"""Calibration text for GPTQ and the sensitivity allocator.

Default: the built-in quantize/data/calibration.txt (prose, code, dialogue, a little multilingual
text) followed by slices of many Python docs files (a fixed shuffled order) when the docs are installed;
the files the evaluation reads (the start of the sorted docs) are never used. A user file replaces both.
An earlier default took one contiguous slice from the end of the docs (whatsnew/*): GPTQ fitted that one
kind of text and lost on others (bench/results/quality-qwen2.5-coder.json).
"""

from __future__ import annotations

import random
from pathlib import Path

BUILTIN = Path(__file__).parent / "data" / "calibration.txt"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_TOKENS = 4096
EVAL_CHARS = 400_000  # evaluate.load_text reads at most this much of the sorted docs
FILE_CHARS = 8_000  # per docs file: many short slices cover more kinds of text than a few long ones


def default_text(max_chars: int = 60_000) -> str:
    """The built-in text, then up to `max_chars` of the Python docs sources when installed: the first
    FILE_CHARS characters of each file, over files in a fixed shuffled order, skipping the files that
    evaluation reads (the sorted docs' first EVAL_CHARS characters)."""
    text = BUILTIN.read_text(encoding="utf-8")
    if DOCS.is_dir():
        files = sorted(DOCS.rglob("*.rst.txt"))
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
        text += "\n\n" + "".join(parts)[:max_chars]
    return text


def source_tokenizer(source):
    tok = getattr(source, "tokenizer", None)
    if tok is not None:
        return tok
    from jang_serve.engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(source.path)


def calibration_tokens(source, calib=None, n_tokens: int = DEFAULT_TOKENS) -> list[int]:
    """Token ids of the calibration text (calib: a file path, or None for the default)."""
    if calib is None:
        text = default_text(max(60_000, 5 * n_tokens))  # ~4 characters per token; more for long budgets
    else:
        p = Path(calib)
        if not p.is_file():
            raise FileNotFoundError(f"calibration file {p} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
    ids = source_tokenizer(source).encode(text)
    if len(ids) < 64:
        raise ValueError(f"calibration text is too short ({len(ids)} tokens; need at least 64)")
    return ids[:n_tokens]
