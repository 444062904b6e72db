"""Incremental detokenization for streaming: token ids in, safe text pieces out.

Each token contributes raw bytes (`Tokenizer.token_bytes`); an incremental UTF-8 decoder keeps
back the bytes of a character that a later token completes, so a piece never ends in a broken
character. Text that could be the beginning of a stop string is held until it either completes
the stop string (then generation stops and the stop string is never emitted) or cannot anymore.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer.strips_leading_space
        self.text = ""  # everything decoded so far (cut at the stop string once stopped)
        self.token_ids: list[int] = []
        self._emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self.stop_string: str | None = None

    def add(self, token_id: int) -> str:
        """Feed one token; returns the newly safe text (possibly "")."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        data = self.tokenizer.token_bytes(token_id, self.skip_special_tokens)
        if self._strip_space and len(self.token_ids) == 1 and data.startswith(b" "):
            data = data[1:]
        self.text += self._utf8.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        """The remaining text at the end of generation (held-back text included, minus a stop string)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = self._emitted
        if not self.stopped and self.stop:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                idx, s = min(hits)
                self.text, self.stopped, self.stop_string = self.text[:idx], True, s
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        out = self.text[start:end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the unreleased text that starts some stop string."""
        tail = self.text[self._emitted:]
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best
