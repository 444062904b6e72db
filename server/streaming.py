"""Server-sent events (sse-starlette): `data: {json}` chunks, `data: [DONE]`, comment keep-alives.

Keep-alives are SSE comment lines (`: ping ...`) sent every `sse_keepalive_s` seconds, so a long
prefill never leaves the connection silent and proxies and clients do not time out. When the client
goes away, sse-starlette cancels the generator; the generators in the routes abort their engine
request in a `finally`, so the request stops using the engine at once.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from .errors import APIError

log = logging.getLogger("jang_serve.server")


# Events are encoded to bytes here, once: sse-starlette sends bytes as they are (no per-chunk
# ServerSentEvent object and line splitting). JSON never holds a raw newline, so one `data:` line is
# always a whole event.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_DONE = b"data: [DONE]\n\n"


def data(obj) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def done() -> bytes:
    return _DONE


def event(name: str, obj) -> bytes:
    return f"event: {name}\ndata: {_dumps(obj)}\n\n".encode()


class Chunks:
    """Stream chunks that share every field but `choices` (and `usage`): the shared head is encoded
    once per response, each chunk only encodes its choices. Same bytes as data({**head, choices, usage})."""

    def __init__(self, head: dict, include_usage: bool):
        self._head = b"data: " + _dumps(head)[:-1].encode() + b',"choices":'
        self._usage = include_usage

    def __call__(self, choices: list, usage_=None) -> bytes:
        tail = _dumps(choices) + (',"usage":' + _dumps(usage_) if self._usage else "")
        return self._head + tail.encode() + b"}\n\n"


def error_chunk(exc: BaseException) -> bytes:
    if isinstance(exc, APIError):
        return data(exc.body())
    log.exception("error while streaming", exc_info=exc)
    return data(APIError(500, f"Internal error while generating: {type(exc).__name__}: {exc}",
                         code="internal_error").body())


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment=f"ping {datetime.now(timezone.utc).isoformat(timespec='seconds')}")


def sse_response(request: Request, gen: AsyncIterator[dict]) -> EventSourceResponse:
    ping = request.app.state.config.sse_keepalive_s  # 0 turns keep-alives off
    return EventSourceResponse(gen, ping=ping, ping_message_factory=_ping, sep="\n",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
