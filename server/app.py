"""The FastAPI app factory: routes, error handlers, middlewares (body limit, metrics, CORS), and the
lifespan that loads the model(s) in the background and runs the admin job runner."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .admin.runner import JobRunner
from .admin.store import JobStore
from .config import ServerConfig
from .errors import error_response, install_error_handlers
from .metrics import Metrics
from .registry import ModelRegistry
from .routes import admin, chat, completions, models, responses

log = logging.getLogger("jang_serve.server")

_BODY_METHODS = ("POST", "PUT", "PATCH")


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or, for chunked bodies, by counting."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await error_response(400, "Content-Length is not a number.")(scope, receive, send)
            if n > self.max:
                await _drain(receive)
                return await self._too_big(scope, receive, send, n)
            return await self.app(scope, receive, send)
        # chunked: read it all here (within the limit), then replay it
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total <= self.max:
                chunks.append(body)
            if not msg.get("more_body"):
                break
        if total > self.max:
            return await self._too_big(scope, receive, send, total)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_big(self, scope, receive, send, n: int):
        resp = error_response(413, f"The request body is {n} bytes; this server accepts at most {self.max} bytes "
                                   "(max_body_mb).", code="request_too_large")
        await resp(scope, receive, send)


async def _drain(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect" or not msg.get("more_body"):
            return


class CountRequests:
    """Counts every HTTP request by route template, method and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope["method"], str(status[0])).inc()


def create_app(cfg: ServerConfig | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    registry = ModelRegistry(cfg)
    metrics = Metrics(registry)
    store = JobStore(cfg.jobs_path)
    runner = JobRunner(store, cfg.models_path, cfg.max_jobs, on_completed=None)

    def after_job(job: dict) -> None:
        if job["spec"].get("load_after"):
            registry.add_path(job["result"]["path"], name=job["output"])

    runner.on_completed = after_job

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        _start_models(cfg, registry)
        try:
            yield
        finally:
            runner.shutdown()
            registry.close()
            store.close()

    app = FastAPI(title="jang-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for JANG mixed-precision models on MLX")
    app.state.config = cfg
    app.state.models = registry
    app.state.metrics = metrics
    app.state.jobs = runner
    install_error_handlers(app)
    for r in (chat.router, completions.router, models.router, responses.router, admin.router):
        app.include_router(r)

    @app.get("/metrics", include_in_schema=False)
    async def scrape(request: Request):
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    return app


def _start_models(cfg: ServerConfig, registry: ModelRegistry) -> None:
    if cfg.model:
        registry.add_path(cfg.model, name=cfg.served_model_name, startup=True)
    elif cfg.default_model:
        from .default_model import DEFAULT_MODEL_NAME, ensure_default_model

        registry.add(cfg.served_model_name or DEFAULT_MODEL_NAME, ensure_default_model, source="default model",
                     startup=True)
