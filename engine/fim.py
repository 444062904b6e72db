"""Fill-in-the-middle (FIM) prompts for code models: `/v1/completions` with a `suffix`.

Code models are trained to write the text between a prefix and a suffix when shown
    <prefix token> prefix <suffix token> suffix <middle token>
(the "PSM" order), and to end the middle with an end-of-text, padding or file-separator token.
The three marker tokens differ by family; a model supports FIM when its vocabulary has one family's
three markers as special tokens. Known families (checked in order):
  Qwen2.5-Coder, CodeGemma:        <|fim_prefix|>  <|fim_suffix|>  <|fim_middle|>
  StarCoder / SantaCoder / Refact: <fim_prefix>    <fim_suffix>    <fim_middle>
  DeepSeek-Coder:                  <｜fim▁begin｜>  <｜fim▁hole｜>   <｜fim▁end｜>
"""

from __future__ import annotations

from dataclasses import dataclass

_FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)
# Tokens that end an infill besides the model's end-of-sequence ids (those present are used).
_ENDS = ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|endoftext|>", "<|file_separator|>",
         "<fim_pad>", "<file_sep>", "<｜end▁of▁sentence｜>")


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int
    ends: tuple[int, ...]  # stop ids of an infill, beyond the tokenizer's eos ids


def fim_tokens(tokenizer) -> FimTokens | None:
    """The model's FIM markers, or None when its vocabulary has no known family of them."""
    for names in _FAMILIES:
        ids = [tokenizer.token_to_id(n) for n in names]
        if all(i is not None for i in ids):
            ends = tuple(sorted({i for i in (tokenizer.token_to_id(n) for n in _ENDS) if i is not None}))
            return FimTokens(*ids, ends=ends)
    return None


def fim_prompt(tokenizer, fim: FimTokens, prefix: str | list[int], suffix: str) -> list[int]:
    """Token ids of an infill prompt in PSM order; `prefix` is text or already token ids. A BOS
    goes first when the tokenizer adds one to plain prompts."""
    pre = list(prefix) if isinstance(prefix, list) else tokenizer.encode(prefix)
    ids = [fim.prefix, *pre, fim.suffix, *tokenizer.encode(suffix), fim.middle]
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        ids.insert(0, bos)
    return ids
