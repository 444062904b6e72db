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


def data(obj) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}


def done() -> dict:
    return {"data": "[DONE]"}


def event(name: str, obj) -> dict:
    return {"event": name, "data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}


def error_chunk(exc: BaseException) -> dict:
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
