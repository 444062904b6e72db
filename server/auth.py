"""Bearer-key checks: --api-key guards /v1/*, --admin-key guards /admin/* (admin is off without one).

Keys are compared with hmac.compare_digest so the time taken does not leak how much of a key matched.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def _matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


async def require_api_key(request: Request) -> None:
    expected = request.app.state.config.api_key
    if not expected:
        return
    given = _bearer(request)
    if not _matches(given, expected):
        what = "No API key provided" if given is None else "Incorrect API key provided"
        raise APIError(401, f"{what}: send 'Authorization: Bearer <key>' with the key given to --api-key.",
                       type="invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def require_admin_key(request: Request) -> None:
    expected = request.app.state.config.admin_key
    if not expected:
        raise APIError(403, "The admin API is disabled: start the server with --admin-key to enable it.",
                       code="admin_disabled")
    if not _matches(_bearer(request), expected):
        raise APIError(401, "Incorrect or missing admin key: send 'Authorization: Bearer <admin key>'.",
                       type="invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
