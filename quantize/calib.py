"""Calibration text for GPTQ and the sensitivity allocator.

Default: the built-in quantize/data/calibration.txt (prose, code, dialogue, a little multilingual
text) followed by a slice from the *end* of the Python docs sources when they are installed (the
evaluation uses the start of the same text, so the two never overlap). A user file replaces both.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN = Path(__file__).parent / "data" / "calibration.txt"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_TOKENS = 4096


def default_text(max_chars: int = 60_000) -> str:
    text = BUILTIN.read_text(encoding="utf-8")
    if DOCS.is_dir():
        files = sorted(DOCS.rglob("*.rst.txt"))
        tail, size = [], 0
        for p in reversed(files):  # the last files of the sorted docs (whatsnew/...), far from the eval text
            t = p.read_text(encoding="utf-8", errors="replace")
            tail.append(t)
            size += len(t)
            if size >= max_chars:
                break
        text += "\n\n" + "".join(reversed(tail))[-max_chars:]
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
