"""Grammar-constrained decoding with llguidance: json_object / json_schema response formats.

A GrammarFactory wraps the model's tokenizer once (llguidance.LLTokenizer from the HF tokenizers
JSON), compiles response formats to grammars (cached) and gives each sequence an LLMatcher. Every
step the matcher yields the set of allowed next tokens; the sampler masks out the rest, so the
output is always a prefix of a valid document and ends only where the grammar allows EOS.
"""

from __future__ import annotations

import copy
import json
import threading

import numpy as np

import llguidance


class GrammarError(ValueError):
    pass


def schema_of(response_format: dict) -> dict:
    """The JSON schema a response_format asks for ({"type": "object"} for json_object)."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema", response_format)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("response_format json_schema needs a 'schema' object "
                               "(response_format.json_schema.schema)")
        return schema
    raise GrammarError(f"response_format type {kind!r} has no grammar")


class GrammarFactory:
    def __init__(self, tokenizer, vocab_size: int | None = None, eos_ids=()):
        backend = getattr(tokenizer, "backend", tokenizer)
        if not hasattr(backend, "to_str"):
            raise GrammarError("grammar-constrained output needs a tokenizers.Tokenizer backend")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        n_vocab = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        eos = sorted(eos_ids) or None
        self.lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)
        self.n_vocab = self.lltok.vocab_size
        self._grammars: dict[str, str] = {}
        self._lock = threading.Lock()

    def grammar(self, response_format: dict) -> str:
        """The compiled, validated grammar of a response format (raises GrammarError)."""
        schema = schema_of(response_format)
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            g = self._grammars.get(key)
        if g is not None:
            return g
        try:
            g = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:
            raise GrammarError(f"bad JSON schema in response_format: {e}") from e
        err, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(g, self.lltok)
        if err:
            raise GrammarError(f"bad JSON schema in response_format: {msgs[0] if msgs else 'invalid'}")
        with self._lock:
            self._grammars[key] = g
        return g

    def matcher(self, response_format: dict) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self.lltok, self.grammar(response_format), log_level=0)
        if m.is_error():
            raise GrammarError(f"grammar error: {m.get_error()}")
        return m

    def allowed(self, matcher: llguidance.LLMatcher, vocab: int) -> np.ndarray:
        """Bool [vocab]: tokens the grammar allows next."""
        words = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        if bits.shape[0] >= vocab:
            return bits[:vocab]
        return np.concatenate([bits, np.zeros(vocab - bits.shape[0], dtype=bool)])

    def consume(self, matcher: llguidance.LLMatcher, token: int) -> None:
        matcher.consume_token(token)

    def finished(self, matcher: llguidance.LLMatcher) -> bool:
        return matcher.is_stopped() or matcher.is_error()
