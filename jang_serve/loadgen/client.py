"""One streaming request against an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    """What one request did. Times are seconds from time.perf_counter()."""

    index: int
    ok: bool = False
    error: str | None = None
    status: int | None = None
    start: float = 0.0
    first_token: float | None = None  # arrival of the first chunk carrying text
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every text-carrying chunk
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # from the server's usage, when it sends one
    completion_tokens: int | None = None
    aborted: bool = False  # the client hung up on purpose (soak tests)
    response_id: str | None = None  # the "id" of the streamed chunks
    attempts: int = 1  # > 1 when the connection failed before any response and was retried

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the server's usage if given, else the number of text chunks."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (end - first token) / (tokens - 1)."""
        n = self.output_tokens
        if self.first_token is None or n < 2:
            return None
        return (self.chunk_times[-1] - self.first_token) / (n - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive text chunks (inter-token latencies)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    def to_json(self) -> dict:
        return {
            "index": self.index, "ok": self.ok, "error": self.error, "status": self.status,
            "aborted": self.aborted, "ttft_s": self.ttft, "tpot_s": self.tpot, "latency_s": self.latency,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "chunks": len(self.chunk_times), "finish_reason": self.finish_reason, "attempts": self.attempts, "id": self.response_id,
            "text_sha1": hashlib.sha1(self.text.encode()).hexdigest()[:16] if self.ok else None,
            "text_head": self.text[:200],
        }


def _chunk_text(obj: dict, chat: bool) -> tuple[str | None, str | None]:
    """(text, finish_reason) of one streamed chunk; text None when the chunk has no choice."""
    choices = obj.get("choices") or []
    if not choices:
        return None, None
    c = choices[0]
    if chat:
        delta = c.get("delta") or {}
        text = delta.get("content")
        if text is None and delta.get("reasoning_content") is not None:
            text = delta.get("reasoning_content")
    else:
        text = c.get("text")
    return text, c.get("finish_reason")


# Failures of the connection itself, before the server sent a status line: a client retries these
# (the openai SDK does, twice by default). Anything after the status line is an error, never retried.
_RETRYABLE = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, index: int = 0,
                         abort_after: int | None = None, timeout: float = 600.0,
                         retries: int = 2) -> RequestResult:
    """POST `body` with stream=True to `url` (a /v1/completions or /v1/chat/completions URL).

    Records the arrival time of each chunk that carries text. With `abort_after=k` the client closes
    the connection after k text chunks (a mid-stream disconnect). A connection refused or reset before
    the response started is retried up to `retries` times (times still count from the first try).
    Never raises: errors land in the result.
    """
    r = RequestResult(index=index, start=time.perf_counter())
    while True:
        try:
            return await _stream_once(client, url, body, r, abort_after, timeout)
        except _RETRYABLE as e:
            if r.status is not None or r.attempts > retries:
                r.error = f"{type(e).__name__}: {e}"
                r.end = time.perf_counter()
                return r
            await asyncio.sleep(0.05 * 2 ** (r.attempts - 1))
            r.attempts += 1


async def _stream_once(client, url, body, r: RequestResult, abort_after, timeout) -> RequestResult:
    chat = url.rstrip("/").endswith("chat/completions")
    body = dict(body, stream=True)
    body.setdefault("stream_options", {"include_usage": True})
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                r.error = f"HTTP {resp.status_code}: {raw[:500]}"
                return r
            parts: list[str] = []
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    r.error = f"stream error: {json.dumps(obj['error'])[:500]}"
                    return r
                if r.response_id is None:
                    r.response_id = obj.get("id")
                text, finish = _chunk_text(obj, chat)
                if text:
                    parts.append(text)
                    r.chunk_times.append(now)
                    if r.first_token is None:
                        r.first_token = now
                if finish:
                    r.finish_reason = finish
                usage = obj.get("usage")
                if usage:
                    r.prompt_tokens = usage.get("prompt_tokens")
                    r.completion_tokens = usage.get("completion_tokens")
                if abort_after is not None and len(r.chunk_times) >= abort_after:
                    r.aborted = True
                    break
            r.text = "".join(parts)
            if r.aborted:
                return r
            if not done:
                r.error = "stream ended without [DONE]"
                return r
            r.ok = True
    except _RETRYABLE:
        if r.status is None:
            raise  # nothing was received: the caller may retry
        r.error = "connection lost mid-stream"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.end = time.perf_counter()
    return r
