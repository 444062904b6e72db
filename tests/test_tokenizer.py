"""Tokenizers built from GGUF vocabularies vs transformers' own GGUF tokenizers, on a few hundred
strings with unicode and whitespace edge cases; round trips; from_dir/save."""

from __future__ import annotations

import json
import random

import pytest

import gguf_ref
import realdata
from jang_serve.engine.tokenizer import Tokenizer, TokenizerError

EDGE = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\tx", "a\tb\tc", "x\n\n\ny", "a  b   c    d",
    "Hello world", " Hello world", "  Hello world", "Hello world ", "Hello  world", "hello\nworld\n",
    "I'm", "I'LL", "don't", "we've", "they'RE", "it's O'Neil's", "'s", "''", "\"quoted\"",
    "12345", "3.14159", "1,000,000", "x = 12345 + 678", "v1.2.3-rc4", "0x1F600", "1e-5", "٣٤٥", "²³",
    "def f(x):\n    return x ** 2\n", "for i in range(10):\n\tprint(i)", "if (a && b) { c++; }",
    "#include <stdio.h>\nint main(void) { return 0; }", "SELECT * FROM t WHERE id = 3;",
    "<html><body><p>hi</p></body></html>", "https://example.com/path?q=1&r=2#frag", "user@example.com",
    "日本語のテキスト", "中文字符测试", "한국어 텍스트", "ภาษาไทย", "हिन्दी पाठ", "Ελληνικά", "Русский текст",
    "مرحبا بالعالم", "שלום עולם", "abc مرحبا def", "\u202eRTL override\u202c", "العربية 123",
    "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "I ❤️ Python 🐍", "a😀b", " 😀", "✨ sparkles ✨",
    "e\u0301", "Zalgo: Z\u0351\u0352a\u0353l\u0354g\u0355o", "n\u0303o\u0308", "ﬁ ligature", "Å vs A\u030a",
    "\u00a0nbsp\u00a0", "zero\u200bwidth", "soft\u00adhyphen", "line\u2028sep", "tab\u3000ideographic space",
    "\U00020000 rare CJK", "\ue000 private use", "\x00nul", "\x7fdel", "bell\x07", "\ufeffBOM",
    "▁metaspace▁", "Ġ byte-level Ġ", "<0x0A>", "<unk>", "[multimodal]",
    "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<start_of_turn>model\n", "<bos>",
    "text<|im_end|>text", "<|im_start", "im_start|>", "<think>ok</think>", "<tool_call>{}</tool_call>",
    "CamelCaseIdentifier", "snake_case_identifier", "ALLCAPS", "MiXeD cAsE", "....", "!!!???", "---===---",
    "a" * 100, "ab" * 60, " " * 40, "\n" * 20, "😀" * 10, "日本" * 30, "-" * 80,
]


def _doc_chunks(n: int, seed: int = 0) -> list[str]:
    """Chunks of the Python docs text (real prose, reST markup, code) of random length and offset."""
    text = realdata.python_docs_text()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(text) - 2000)
        out.append(text[start : start + rng.choice([1, 2, 5, 17, 60, 200, 700])])
    return out


def _variants(strings: list[str]) -> list[str]:
    """Leading/trailing whitespace and newline variants of some strings."""
    out = []
    for s in strings[:40]:
        out += [" " + s, s + "\n", "\t" + s + "  "]
    return out


TEXTS = EDGE + _variants(EDGE[13:]) + _doc_chunks(160)


@pytest.fixture(scope="module", params=["smollm2", "qwen25", "gemma3"])
def model(request):
    return request.param


def test_corpus_size():
    assert len(TEXTS) >= 300


def test_ids_match_transformers(model):
    tok = gguf_ref.ours(model).tokenizer
    ref = gguf_ref.reference_ids(model, TEXTS)
    ours = tok.encode_batch(TEXTS)
    bad = [(t, o, r) for t, o, r in zip(TEXTS, ours, ref) if o != r]
    assert not bad, f"{len(bad)}/{len(TEXTS)} differ, first: {bad[:3]}"


def test_round_trip(model):
    tok = gguf_ref.ours(model).tokenizer
    sentencepiece = model == "gemma3"
    for t in TEXTS:
        ids = tok.encode(t)
        want = t.replace("\u2581", " ") if sentencepiece else t  # "▁" is how SentencePiece spells a space
        assert tok.decode(ids) == want, (t, ids)


def test_special_tokens_and_eos(model):
    g = gguf_ref.ours(model)
    tok = g.tokenizer
    expected = {
        "smollm2": ("<|im_start|>", {"<|im_end|>", "<|endoftext|>"}, False),
        "qwen25": ("<|endoftext|>", {"<|im_end|>", "<|endoftext|>"}, False),
        "gemma3": ("<bos>", {"<eos>", "<end_of_turn>"}, True),
    }[model]
    bos, eos_texts, add_bos = expected
    assert tok.bos_token == bos
    assert {tok.id_to_token(i) for i in tok.eos_token_ids} == eos_texts
    assert tok.add_bos_token == add_bos
    ids = tok.encode("Hi", add_special_tokens=True)
    assert (ids[0] == tok.bos_token_id) == add_bos
    # a control token in the text is one token, and decodes back unless skipped
    eos = tok.eos_token
    ids = tok.encode(f"a{eos}b")
    assert tok.eos_token_id in ids
    assert tok.decode(ids) == f"a{eos}b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_add_special_tokens_matches_transformers(model):
    tok = gguf_ref.ours(model).tokenizer
    texts = ["Hello world", "<|im_start|>user\nHi", " x"]
    ref = gguf_ref.cached_json(model, "ids+special", texts,
                               lambda: [gguf_ref.hf_tokenizer(model).encode(t) for t in texts])
    assert [tok.encode(t, add_special_tokens=True) for t in texts] == ref


def test_token_bytes_join_to_decode(model):
    """The per-token bytes the detokenizer uses reassemble exactly into decode()."""
    tok = gguf_ref.ours(model).tokenizer
    for t in TEXTS[:150]:
        ids = tok.encode(t)
        raw = b"".join(tok.token_bytes(i, skip_special_tokens=False) for i in ids)
        assert raw.decode("utf-8", errors="replace") == tok.decode(ids), t


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])  # one byte-level, one SentencePiece
def test_save_and_from_dir(name, tmp_path):
    g = gguf_ref.ours(name)
    tok = g.tokenizer
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    back = Tokenizer.from_dir(tmp_path)
    assert back.eos_token_ids == tok.eos_token_ids
    assert (back.bos_token, back.eos_token, back.add_bos_token) == (tok.bos_token, tok.eos_token, tok.add_bos_token)
    assert back.chat_template == tok.chat_template
    sample = TEXTS[::7]
    assert back.encode_batch(sample) == tok.encode_batch(sample)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == tok.eos_token_ids


def test_saved_bundle_reads_in_transformers(tmp_path):
    """The saved files are a valid HF tokenizer folder: transformers reads them to the same ids."""
    from transformers import AutoTokenizer

    tok = gguf_ref.ours("smollm2").tokenizer
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    sample = TEXTS[::5]
    assert [hf.encode(t, add_special_tokens=False) for t in sample] == tok.encode_batch(sample)
    msgs = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True)


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
