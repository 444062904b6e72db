"""The engine's tokenizer: a `tokenizers.Tokenizer` plus what a model folder says around it
(special tokens, end-of-sequence ids, the chat template).

Build one with `Tokenizer.from_dir(path)` (an HF folder with tokenizer.json), from a GGUF file
(`engine.loader.gguf.read_gguf`), or directly from a backend. `save(dir)` writes the files that
`from_dir` (and transformers' AutoTokenizer) read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from . import chat_template as _chat


class TokenizerError(ValueError):
    pass


def _token_text(tok) -> str | None:
    """A special token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        eos_token_ids: set[int] | list[int] | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        model_max_length: int | None = None,
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.model_max_length = model_max_length
        ids = set(eos_token_ids or ())
        if eos_token is not None and self.token_to_id(eos_token) is not None:
            ids.add(self.token_to_id(eos_token))
        self.eos_token_ids: set[int] = ids
        self.bos_token_id = self.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token is not None else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token is not None else None
        added = backend.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, t in added.items() if t.special}
        self._bytes_table = None

    # -- basic API
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # -- raw bytes per token (for the incremental detokenizer)
    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """The bytes this token contributes to decoded text (b"" for special tokens when skipped).

        Byte-level BPE tokens map back through the GPT-2 byte alphabet; SentencePiece tokens turn
        "\u2581" into a space and "<0xNN>" into one byte. Joining the bytes of a sequence and decoding
        them as UTF-8 gives `decode(ids)` (except the one leading space a Metaspace decoder strips).
        """
        if self._bytes_table is None:
            self._bytes_table = _ByteTable(self.backend)
        if token_id in self.special_ids:
            return b"" if skip_special_tokens else self.backend.id_to_token(token_id).encode()
        return self._bytes_table.get(token_id)

    @property
    def strips_leading_space(self) -> bool:
        """True when the decoder drops the space the normalizer prepended to the first token."""
        if self._bytes_table is None:
            self._bytes_table = _ByteTable(self.backend)
        return self._bytes_table.strip_first_space

    # -- chat
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, chat_template: str | None = None, **kw) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise TokenizerError("this model has no chat template (and none was given)")
        specials = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                        pad_token=self.pad_token or "", unk_token=self.unk_token or "")
        return _chat.render(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                            **{**specials, **kw})

    # -- files
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: missing (a model folder needs tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif template is None and (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        gen = _read_json(path / "generation_config.json")
        eos_ids = gen.get("eos_token_id", [])
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        model_cfg = _read_json(path / "config.json")
        if not eos_ids and model_cfg.get("eos_token_id") is not None:
            e = model_cfg["eos_token_id"]
            eos_ids = [e] if isinstance(e, int) else list(e)
        return cls(
            backend,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            pad_token=_token_text(cfg.get("pad_token")),
            unk_token=_token_text(cfg.get("unk_token")),
            eos_token_ids=eos_ids,
            chat_template=template,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            add_eos_token=bool(cfg.get("add_eos_token", False)),
            model_max_length=cfg.get("model_max_length"),
        )

    def save(self, out: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and the eos ids of
        generation_config.json (merged into an existing one)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        gen_path = out / "generation_config.json"
        gen = _read_json(gen_path)
        gen["eos_token_id"] = sorted(self.eos_token_ids)
        if self.bos_token_id is not None:
            gen["bos_token_id"] = self.bos_token_id
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{p}: invalid JSON ({e})") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _ByteTable:
    """Token id -> bytes, built lazily, by the kind of decoder the backend has."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        self.cache: dict[int, bytes] = {}
        dec = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
        kinds = _decoder_kinds(dec)
        self.byte_level = "ByteLevel" in kinds
        self.metaspace = "Metaspace" in kinds or "Replace" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.strip_first_space = "Strip" in kinds or (
            "Metaspace" in kinds and _metaspace_prepends(dec))
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}

    def get(self, i: int) -> bytes:
        b = self.cache.get(i)
        if b is None:
            b = self.cache[i] = self._compute(i)
        return b

    def _compute(self, i: int) -> bytes:
        if i in self.added:
            return self.added[i].encode()
        tok = self.backend.id_to_token(i)
        if tok is None:
            return b""
        if self.byte_level:
            try:
                return bytes(self.unicode_to_byte[c] for c in tok)
            except KeyError:
                return tok.encode()
        if self.byte_fallback and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            return bytes([int(tok[3:5], 16)])
        if self.metaspace:
            return tok.replace("\u2581", " ").encode()
        return self.backend.decode([i]).encode()


def _decoder_kinds(dec: dict) -> set[str]:
    if not dec:
        return set()
    kinds = {dec.get("type")}
    for sub in dec.get("decoders", []) or []:
        kinds |= _decoder_kinds(sub)
    return kinds


def _metaspace_prepends(dec: dict) -> bool:
    if dec.get("type") == "Metaspace":
        return dec.get("prepend_scheme", "always") != "never" and dec.get("add_prefix_space", True)
    return any(_metaspace_prepends(s) for s in dec.get("decoders", []) or [])
