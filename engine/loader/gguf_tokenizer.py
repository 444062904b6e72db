"""Build a `tokenizers` tokenizer from the vocabulary a GGUF file carries.

Two kinds, by `tokenizer.ggml.model`:
  "gpt2"   byte-level BPE (SmolLM2, Qwen2.5, Llama-3): tokens in GPT-2's byte alphabet, merges
           from the file, text split first by the regex llama.cpp uses for `tokenizer.ggml.pre`.
  "llama"  SentencePiece-style BPE (Gemma, Llama-2, Mistral v0.1): spaces become "\u2581", unknown
           bytes fall back to <0xNN> tokens; merges are not stored, so they are rebuilt from the
           vocabulary (every split of a token into two tokens), best first.
Tokens of type CONTROL become special added tokens, USER_DEFINED ones plain added tokens (matched
whole in the text, as llama.cpp does).
"""

from __future__ import annotations

import logging

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ..tokenizer import Tokenizer
from .gguf_file import GGUFFormatError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = r"\p{N}"

# tokenizer.ggml.pre -> regexes applied in turn (as llama.cpp's llama-vocab.cpp does)
PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2], "gpt-2": [_GPT2], "gpt2": [_GPT2], "phi-2": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    "mpt": [_GPT2],
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "falcon3": [_LLAMA3],
    "smaug-bpe": [_LLAMA3], "dbrx": [_LLAMA3], "pixtral": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2], "megrez": [_QWEN2],
    "smollm": [_DIGIT, _GPT2], "starcoder": [_DIGIT, _GPT2], "refact": [_DIGIT, _GPT2],
    "command-r": [_DIGIT, _GPT2], "codeshell": [_DIGIT, _GPT2], "exaone": [_DIGIT, _GPT2],
    "minerva-7b": [_DIGIT, _GPT2],
}

# Texts llama.cpp treats as end-of-turn tokens even when the file does not list them as eos/eot.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
               "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|eom_id|>")


class GGUFTokenizerError(GGUFFormatError):
    pass


def tokenizer_from_gguf(fields: dict, chat_template: str | None = None, source: str = "GGUF") -> Tokenizer:
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFTokenizerError(f"{source}: no tokenizer vocabulary (tokenizer.ggml.model/tokens) in the metadata")
    types = fields.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    arch = fields.get("general.architecture", "")
    if kind == "gpt2":
        backend, vocab_tokens = _byte_level(tokens, types, fields, source)
        add_space_prefix = False
    elif kind == "llama":
        add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", not arch.startswith("gemma")))
        backend, vocab_tokens = _sentencepiece(tokens, types, fields, arch, add_space_prefix)
    else:
        raise GGUFTokenizerError(f"{source}: tokenizer model {kind!r} is not supported (gpt2 and llama are)")

    _add_special(backend, vocab_tokens, types)

    def tok(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not (0 <= int(i) < len(tokens)) else int(i)

    bos, eos, eot, eom = tok("bos"), tok("eos"), tok("eot"), tok("eom")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    _set_post_processor(backend, vocab_tokens, bos if add_bos else None, eos if add_eos else None)

    eos_ids = {i for i in (eos, eot, eom) if i is not None}
    eos_ids |= {i for i, t in enumerate(tokens) if types[i] == CONTROL and t in END_OF_TURN}
    name = lambda i: vocab_tokens[i] if i is not None else None  # noqa: E731
    return Tokenizer(
        backend,
        bos_token=name(bos), eos_token=name(eos), pad_token=name(tok("padding")), unk_token=name(tok("unknown")),
        eos_token_ids=eos_ids, chat_template=chat_template, add_bos_token=add_bos, add_eos_token=add_eos,
    )


def _byte_level(tokens, types, fields, source):
    merges = fields.get("tokenizer.ggml.merges")
    if merges is None:
        raise GGUFTokenizerError(f"{source}: a gpt2 (byte-level BPE) vocabulary needs tokenizer.ggml.merges")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_char = dict(zip(range(256), _gpt2_chars()))
    vocab_tokens = []
    for t, ty in zip(tokens, types):
        # normal tokens are spelled in the byte alphabet already; respell any that is not
        if ty in (NORMAL, UNKNOWN, BYTE) and not set(t) <= alphabet:
            t = "".join(byte_char[b] for b in t.encode("utf-8"))
        vocab_tokens.append(t)
    vocab = _vocab(vocab_tokens)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    pre = fields.get("tokenizer.ggml.pre", "default")
    splits = PRE_SPLITS.get(pre)
    if splits is None:
        log.warning("%s: unknown pre-tokenizer %r, using GPT-2's split", source, pre)
        splits = [_GPT2]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab_tokens


def _gpt2_chars() -> list[str]:
    from ..tokenizer import _bytes_to_unicode

    m = _bytes_to_unicode()
    return [m[b] for b in range(256)]


def _sentencepiece(tokens, types, fields, arch, add_space_prefix):
    # Gemma files store whitespace-run tokens with real spaces; the text side sees "\u2581" runs.
    vocab_tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = _vocab(vocab_tokens)
    if arch.startswith("gemma"):
        # Gemma's scores do not follow its merge order; the order of the tokens in the file does.
        priority = [-float(i) for i in range(len(tokens))]
    else:
        scores = fields.get("tokenizer.ggml.scores")
        priority = [float(s) for s in scores] if scores is not None else [-float(i) for i in range(len(tokens))]
    merges = _merges_from_vocab(vocab_tokens, types, vocab, priority)
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(BPE(vocab, merges, unk_token=vocab_tokens[int(unk)] if unk is not None else None,
                              fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
        dec.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = normalizers.Sequence(norm)
    backend.decoder = decoders.Sequence(dec)
    return backend, vocab_tokens


def _merges_from_vocab(tokens, types, vocab, priority):
    """Every (left, right) with left+right a mergeable token and both halves in the vocabulary,
    ordered by the merged token's priority (best first, then lower id), then longer left part."""
    order = sorted(range(len(tokens)), key=lambda i: (-priority[i], i))
    ok = (NORMAL, USER_DEFINED)
    merges = []
    add = merges.append
    for i in order:
        t = tokens[i]
        if len(t) < 2 or types[i] not in ok or vocab.get(t) != i:
            continue
        for k in range(len(t) - 1, 0, -1):
            left = t[:k]
            if left in vocab:
                right = t[k:]
                if right in vocab:
                    add((left, right))
    return merges


def _vocab(tokens) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate spelling keeps its first id
    return vocab


def _add_special(backend, vocab_tokens, types):
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(vocab_tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(vocab_tokens, types)
            if ty == USER_DEFINED and t.strip(" \u2581")]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _set_post_processor(backend, vocab_tokens, bos, eos):
    if bos is None and eos is None:
        return
    single, pair, specials = "$A", "$A $B:1", []
    if bos is not None:
        b = vocab_tokens[bos]
        single, pair = f"{b} {single}", f"{b} $A {b}:1 $B:1"
        specials.append((b, bos))
    if eos is not None:
        e = vocab_tokens[eos]
        single, pair = f"{single} {e}", f"{pair} {e}:1"
        specials.append((e, eos))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
