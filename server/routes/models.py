"""GET /v1/models, GET /v1/models/{id} (with the context length), /health."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..auth import require_api_key
from ..errors import model_not_found

router = APIRouter()


def _card(entry) -> dict:
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "jang-serve",
            "context_length": entry.context_length, "max_model_len": entry.context_length,
            "format": entry.info.get("format"), "quantization": entry.info.get("quantization"),
            "sampling_defaults": entry.sampling}


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request):
    entries = [e for e in request.app.state.models.entries() if e.state == "ready"]
    return {"object": "list", "data": [_card(e) for e in entries]}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, request: Request):
    models = request.app.state.models
    for e in models.entries():
        if e.name == model_id and e.state == "ready":
            return _card(e)
    raise model_not_found(model_id, models.names())


@router.get("/health")
async def health(request: Request):
    models = request.app.state.models
    entries = models.entries()
    detail = {e.name: ({"state": e.state, "error": e.error} if e.error else {"state": e.state, "active": e.active})
              for e in entries}
    if any(e.state == "loading" for e in entries):
        return JSONResponse({"status": "loading", "models": detail}, status_code=503,
                            headers={"Retry-After": "5"})
    if entries and all(e.state == "failed" for e in entries):
        return JSONResponse({"status": "error", "models": detail}, status_code=503)
    return {"status": "ok", "models": detail}
