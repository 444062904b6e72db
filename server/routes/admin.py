"""Admin REST API for conversion jobs (needs --admin-key):

  POST   /admin/convert      {source, profile | bits, method, group_size, output, load_after} -> 202 + job
  GET    /admin/jobs         all jobs
  GET    /admin/jobs/{id}    one job: state, percent, current tensor, ETA, log tail, result
  DELETE /admin/jobs/{id}    cancel a queued or running job
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..admin.paths import classify_source, default_output_name, resolve_output
from ..admin.store import public_view
from ..auth import require_admin_key
from ..errors import APIError, bad_request
from ..schemas import ConvertRequest

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)])


def _check_profile(profile: str | None, bits: float | None) -> None:
    """Reject unknown profiles and out-of-range budgets now, not in the child."""
    try:
        from jang_serve.quantize.profiles import ProfileError, resolve
    except ImportError:
        return  # the child reports it
    try:
        resolve(profile, bits)
    except ProfileError as e:
        raise bad_request(str(e), param="profile" if profile is not None else "bits", code="invalid_profile") from None


@router.post("/convert", status_code=202)
async def convert(body: ConvertRequest, request: Request):
    runner = request.app.state.jobs
    kind, source = classify_source(body.source)
    _check_profile(body.profile, body.bits)
    name = body.output or default_output_name(body.source, body.profile, body.bits)
    resolve_output(runner.models_dir, name)
    for job in runner.store.list():
        if job["output"] == name and job["state"] in ("queued", "running"):
            raise APIError(409, f"job {job['id']} is already writing {name!r}", param="output", code="output_exists")
    if body.load_after and name in request.app.state.models.names():
        raise APIError(409, f"a model named {name!r} is already served", param="output", code="model_exists")
    profile = body.profile
    if profile is None and body.bits is None:
        from ..default_model import serve_profile

        profile = serve_profile()
    spec = {"source": source, "source_kind": kind, "profile": profile, "bits": body.bits, "method": body.method,
            "group_size": body.group_size, "load_after": body.load_after}
    job = runner.submit(spec, name)
    return JSONResponse(public_view(job), status_code=202, headers={"Location": f"/admin/jobs/{job['id']}"})


@router.get("/jobs")
async def list_jobs(request: Request):
    return {"object": "list", "data": [public_view(j) for j in request.app.state.jobs.store.list()]}


def _job_or_404(request: Request, job_id: str) -> dict:
    job = request.app.state.jobs.store.get(job_id)
    if job is None:
        raise APIError(404, f"no job with id {job_id!r}", param="job_id", code="job_not_found")
    return job


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request):
    return public_view(_job_or_404(request, job_id))


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    job = _job_or_404(request, job_id)
    if job["state"] in ("completed", "failed", "cancelled", "interrupted"):
        raise APIError(409, f"job {job_id} already ended ({job['state']}); nothing to cancel", code="job_finished")
    runner = request.app.state.jobs
    await run_in_threadpool(runner.cancel, job_id)
    return public_view(runner.store.get(job_id))
