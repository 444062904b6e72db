"""OpenAI-shaped errors: every failure leaves the server as {"error": {message, type, param, code}}.

Routes raise `APIError`; the handlers installed by `install_error_handlers` turn it, FastAPI's
validation errors, Starlette's HTTP errors (404 route, 405 method, 400 unparsable body) and any
unexpected exception into that shape. Client mistakes never become a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("jang_serve.server")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with an HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, available: list[str]) -> APIError:
    have = ", ".join(available) or "none"
    return APIError(404, f"The model {name!r} does not exist. Models served here: {have}.",
                    param="model", code="model_not_found")


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return APIError(status, message, **kw).response()


def _loc_to_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        return bad_request(f"The request body is not valid JSON: {ctx.get('error', 'parse error')}.",
                           code="invalid_json")
    if kind == "missing" and tuple(first.get("loc", ())) == ("body",):
        return bad_request("The request body is missing; send a JSON object.", code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
        return bad_request("The request body must be a JSON object, sent with Content-Type: application/json.",
                           code="invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = f"'{param}'" if param else "the request body"
    extra = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for {where}: {msg}{extra}.", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404:
            msg, code = f"Unknown route: {request.method} {request.url.path}.", "not_found"
        elif status == 405:
            msg, code = f"Method {request.method} is not allowed on {request.url.path}.", "method_not_allowed"
        elif status == 400 and "parsing the body" in detail:
            msg, code = "The request body could not be decoded: send UTF-8 encoded JSON.", "invalid_json"
        else:
            msg, code = detail, None
        return APIError(status, msg, code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}", code="internal_error").response()
