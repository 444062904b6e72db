"""IncrementalDetokenizer with the real SmolLM2 (byte-level BPE) and Gemma-3 (SentencePiece with
byte fallback) tokenizers: streamed text equals decode(), no piece carries a broken character,
stop strings are held back, cut at the earliest match and never emitted."""

from __future__ import annotations

import pytest

import gguf_ref
from jang_serve.engine.detokenizer import IncrementalDetokenizer
from test_tokenizer import TEXTS


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tok(request):
    return gguf_ref.ours(request.param).tokenizer


def stream(tok, ids, stop=()):
    d = IncrementalDetokenizer(tok, stop=stop)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    return d, pieces


def test_stream_equals_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        d, pieces = stream(tok, ids)
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == full, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
        assert not d.stopped


def test_split_characters_are_held_until_complete(tok):
    """Emoji and rare CJK take several byte tokens: after every token exactly the complete
    characters so far are out, never half of one."""
    texts = ["😀👍🏽", "👨‍👩‍👧‍👦 family", "\U00020000\U0002a6d6 rare", "e\u0301 café", "\ue000\U0001f9ec🧬"]
    split_seen = False
    for text in texts:
        ids = tok.encode(text)
        d, raw, out = IncrementalDetokenizer(tok), b"", ""
        for i in ids:
            raw += tok.token_bytes(i)
            out += d.add(i)
            assert out == _complete_prefix(raw), (text, out)
            split_seen |= _complete_prefix(raw).encode() != raw
        assert out + d.flush() == text
    assert split_seen  # some token really ended inside a character


def _complete_prefix(raw: bytes) -> str:
    """The text of the longest prefix of raw that is whole UTF-8 characters."""
    for cut in range(len(raw), max(len(raw) - 4, -1), -1):
        try:
            return raw[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"not UTF-8: {raw!r}")


def test_stop_string_cut_and_never_emitted(tok):
    text = "The answer is 42.\nUser: and then?\nUser: more"
    ids = tok.encode(text)
    d, pieces = stream(tok, ids, stop=["\nUser:"])
    assert d.stopped and d.stop_string == "\nUser:"
    assert "".join(pieces) == "The answer is 42."
    # while the stop string was forming, none of it was handed out
    emitted = ""
    for p in pieces:
        emitted += p
        assert "\nU" not in emitted and not emitted.endswith("\n")
    assert d.add(ids[0]) == ""  # nothing after stopping


def test_earliest_stop_wins(tok):
    ids = tok.encode("alpha beta gamma delta")
    d, pieces = stream(tok, ids, stop=["delta", "beta", "gamma"])
    assert "".join(pieces) == "alpha "
    assert d.stop_string == "beta"


def test_held_back_prefix_released(tok):
    """Text that only looked like the start of a stop string comes out once it cannot match."""
    text = "abc xy abc xyz"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, stop=["xyz!"])
    out = ""
    for i in ids:
        out += d.add(i)
        assert not out.endswith("x") and not out.endswith("xy") and not out.endswith("xyz")
    assert out + d.flush() == text
    assert not d.stopped


def test_stop_inside_one_token_and_multibyte_stop(tok):
    d, pieces = stream(tok, tok.encode("Hello world"), stop=["lo w"])
    assert "".join(pieces) == "Hel"
    d, pieces = stream(tok, tok.encode("ok 😀 then more"), stop=["😀"])
    assert "".join(pieces) == "ok "


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hi") + [tok.eos_token_id]
    assert "".join(stream(tok, ids)[1]) == "hi"
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join([d.add(i) for i in ids] + [d.flush()]) == "hi" + tok.eos_token
