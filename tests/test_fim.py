"""engine/fim.py: which vocabularies have fill-in-the-middle markers, and the PSM prompt built from them."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers

from jang_serve.engine.fim import fim_prompt, fim_tokens
from jang_serve.engine.tokenizer import Tokenizer


def tokenizer(specials: list[str], bos: str | None = None, add_bos: bool = False) -> Tokenizer:
    words = ["def", "f", "(", ")", ":", "return", "x"]
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="x"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials + ([bos] if bos else [])])
    return Tokenizer(backend, bos_token=bos, add_bos_token=add_bos)


FAMILIES = [
    (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>", "<|endoftext|>"], 3),
    (["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<file_sep>"], 2),
    (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<｜end▁of▁sentence｜>"], 1),
]


@pytest.mark.parametrize("specials,n_ends", FAMILIES, ids=["qwen", "starcoder", "deepseek"])
def test_families_and_psm_prompt(specials, n_ends):
    tok = tokenizer(specials)
    fim = fim_tokens(tok)
    assert (fim.prefix, fim.suffix, fim.middle) == tuple(tok.token_to_id(t) for t in specials[:3])
    assert fim.ends == tuple(sorted(tok.token_to_id(t) for t in specials[3:])) and len(fim.ends) == n_ends
    pre, suf = "def f ( x ) :", "return x"
    ids = fim_prompt(tok, fim, pre, suf)
    assert ids == tok.encode(f"{specials[0]} {pre} {specials[1]} {suf} {specials[2]}")
    assert fim_prompt(tok, fim, tok.encode(pre), suf) == ids  # token-id prefixes are used as given


def test_no_markers_or_an_incomplete_family_is_none():
    assert fim_tokens(tokenizer([])) is None
    assert fim_tokens(tokenizer(["<|fim_prefix|>", "<|fim_suffix|>"])) is None  # no middle marker


def test_bos_goes_first_only_when_the_tokenizer_adds_one():
    specials = FAMILIES[1][0]
    with_bos = tokenizer(specials, bos="<s>", add_bos=True)
    ids = fim_prompt(with_bos, fim_tokens(with_bos), "f", "x")
    assert ids[0] == with_bos.token_to_id("<s>") and ids[1] == with_bos.token_to_id("<fim_prefix>")
    without = tokenizer(specials, bos="<s>", add_bos=False)
    assert fim_prompt(without, fim_tokens(without), "f", "x")[0] == without.token_to_id("<fim_prefix>")
