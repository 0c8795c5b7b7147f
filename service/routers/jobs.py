"""``POST /explain`` (waits for the result), ``POST /jobs`` (asynchronous), ``GET``/``DELETE /jobs/{id}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from attribution import errors
from service import metrics
from service.catalog import served_models
from service.dependencies import AppSettings, OwnedJob, Owner, Queue
from service.errors import RequestInvalid
from service.jobs import Job, JobStatus
from service.parsing import parse_request
from service.queue import JobQueue, wait_finished
from service.schemas import ErrorOut, ExplainJSON, JobOut, form_schema, inline_schema
from service.settings import Settings
from service.validation import build_job, image_size

router = APIRouter(tags=["jobs"])

_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": form_schema()},
    "application/json": {"schema": inline_schema(ExplainJSON)},
}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in [
        (400, "malformed body"), (401, "missing or wrong API key"), (413, "upload too large"),
        (415, "unsupported content type"), (422, "invalid request"), (429, "queue full"),
        (503, "queue or workers unavailable")]}


async def _submit(request: Request, owner: str | None, queue: JobQueue,
                  settings: Settings) -> tuple[Job, float]:
    inp = await parse_request(request, max_selections=settings.max_selections)
    served = served_models(await queue.workers())
    if not served:
        raise RequestInvalid("no worker is serving a model right now; retry in a few seconds", 503)
    size = await run_in_threadpool(image_size, inp.image, settings)
    job = await run_in_threadpool(build_job, inp, served, settings, size, owner)
    await queue.enqueue(job, inp.image, max_depth=settings.max_queue, depth_models=list(served))
    wait = settings.wait_max_s if inp.options.wait is None else min(inp.options.wait, settings.wait_max_s)
    return job, wait


def _accepted(job: Job) -> JSONResponse:
    return JSONResponse(job.to_public(), status_code=202,
                        headers={"Location": f"/jobs/{job.id}", "Retry-After": "1"})


def _finished(job: Job) -> JSONResponse:
    """200 for a done (or cancelled) job; a failed one: 422 if the input was at fault, else 500."""
    if job.status is not JobStatus.FAILED:
        return JSONResponse(job.to_public())
    kind = getattr(errors, (job.error or {}).get("type", ""), None)
    input_error = isinstance(kind, type) and issubclass(kind, errors.AttributionError)
    body = {"detail": (job.error or {}).get("message", "the job failed"), **job.to_public()}
    return JSONResponse(body, status_code=422 if input_error else 500)


@router.post("/explain", openapi_extra=_BODY, status_code=200,
             responses={200: {"model": JobOut, "description": "done within `wait`"},
                        202: {"model": JobOut, "description": "still running: poll Location"}, **_ERRORS})
async def explain(request: Request, owner: Owner, queue: Queue, settings: AppSettings) -> JSONResponse:
    """Explain one image with one or more captions; wait up to `wait` seconds for the result."""
    job, wait = await _submit(request, owner, queue, settings)
    latest = await wait_finished(queue, job.id, wait)
    if latest is not None and latest.status.finished:
        return _finished(latest)
    return _accepted(latest or job)


@router.post("/jobs", openapi_extra=_BODY, status_code=202,
             responses={202: {"model": JobOut, "description": "queued: poll Location"}, **_ERRORS})
async def submit_job(request: Request, owner: Owner, queue: Queue, settings: AppSettings) -> JSONResponse:
    """Queue an explanation and return at once (same body as POST /explain)."""
    job, _ = await _submit(request, owner, queue, settings)
    return _accepted(job)


@router.get("/jobs/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}})
async def get_job(job: OwnedJob) -> JSONResponse:
    """The job's status, and its result when done or its error when failed."""
    return JSONResponse(job.to_public())


@router.delete("/jobs/{job_id}", response_model=JobOut,
               responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}})
async def cancel_job(job: OwnedJob, queue: Queue) -> JSONResponse:
    """Cancel a job that has not started; a running or finished job is not changed (409)."""
    if job.status is JobStatus.CANCELLED:
        return JSONResponse(job.to_public())
    latest = await queue.cancel(job.id)
    if latest is None:
        return JSONResponse({"detail": f"no job {job.id!r}: it expired"}, status_code=404)
    if latest.status is not JobStatus.CANCELLED:
        running = latest.status is JobStatus.RUNNING
        what = "is running and will finish" if running else f"is already {latest.status.value}"
        message = f"job {job.id} {what}; only queued jobs can be cancelled"
        return JSONResponse({"detail": message}, status_code=409)
    await queue.add_metrics(metrics.outcome("cancelled"))
    return JSONResponse(latest.to_public())
