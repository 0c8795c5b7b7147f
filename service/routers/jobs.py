"""``POST /explain`` (waits for the result), ``POST /jobs`` (asynchronous), ``GET``/``DELETE /jobs/{id}``."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service import metrics
from service.dependencies import AppSettings, OwnedJob, Owner, Queue, Served
from service.errors import QUEUE_DOWN, RequestInvalid, failed_job_status
from service.jobs import Job, JobStatus
from service.parsing import parse_request
from service.queue import JobQueue
from service.schemas import UNAUTHORIZED, ErrorOut, ExplainJSON, JobOut, form_schema, inline_schema
from service.served import ServedCache
from service.settings import Settings
from service.validation import build_job, upload_size

router = APIRouter(tags=["jobs"], responses=UNAUTHORIZED)  # every route takes the API key
log = logging.getLogger("exclip.api")

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": form_schema()},
            "application/json": {"schema": inline_schema(ExplainJSON)},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in [
        (400, "malformed body"),
        (413, "upload too large"),
        (415, "unsupported content type"),
        (422, "invalid request"),
        (429, "queue full"),
        (503, "queue or workers unavailable"),
    ]
}


async def _submit(
    request: Request, owner: str | None, queue: JobQueue, settings: Settings, serving: ServedCache
) -> tuple[Job, float]:
    inp = await parse_request(request, settings)
    served = await serving.required()
    size = await run_in_threadpool(upload_size, inp.image, settings)
    job = await run_in_threadpool(build_job, inp, served, settings, size, owner)
    try:
        await queue.enqueue(job, inp.image, max_depth=settings.max_queue, depth_models=list(served))
    except QUEUE_DOWN as exc:  # the reply may be what was lost: say which job to look for
        log.warning("enqueue of job %s failed: %s", job.id, exc)
        raise RequestInvalid(
            f"the job queue (Redis) is unreachable right now; retry later (if job "
            f"{job.id} was queued before the connection failed, GET /jobs/{job.id} "
            "finds it)",
            503,
        ) from None
    wait = settings.wait_max_s if inp.options.wait is None else min(inp.options.wait, settings.wait_max_s)
    return job, wait


def _accepted(job: Job, detail: str | None = None) -> JSONResponse:
    body = job.to_public() if detail is None else {"detail": detail, **job.to_public()}
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}", "Retry-After": "1"})


def _finished(job: Job) -> JSONResponse:
    """200 for a done (or cancelled) job; a failed one with the status of its fault (errors.py)."""
    if job.status is JobStatus.FAILED:
        body = {"detail": (job.error or {}).get("message", "the job failed"), **job.to_public()}
        return JSONResponse(body, status_code=failed_job_status(job.fault))
    if job.evicted:
        return _evicted(job)
    return JSONResponse(job.to_public())


def _lost(job_id: str) -> JSONResponse:
    return JSONResponse(
        {"detail": f"no job {job_id!r}: unknown or lost (expired, or Redis lost its data)"}, status_code=404
    )


def _evicted(job: Job) -> JSONResponse:
    detail = (
        f"the result of job {job.id} was dropped to keep the stored bytes within their budget "
        "(EXCLIP_MAX_STORED_BYTES); submit the job again"
    )
    return JSONResponse({"detail": detail, **job.to_public()}, status_code=410)


async def _wait(queue: JobQueue, job: Job, wait_s: float) -> JSONResponse:
    """The job once finished within ``wait_s``, else 202 with its handle — whatever fails meanwhile."""
    try:
        latest = await queue.wait_finished(job.id, wait_s)
    except Exception as exc:  # noqa: BLE001 - the job is queued: never lose its handle over a wait
        log.warning("waiting for job %s failed (%s: %s); answering 202", job.id, type(exc).__name__, exc)
        return _accepted(
            job,
            f"the job is queued but the queue stopped answering while waiting "
            f"({type(exc).__name__}); poll GET /jobs/{job.id}",
        )
    if latest is None:
        return _lost(job.id)
    return _finished(latest) if latest.status.finished else _accepted(latest)


@router.post(
    "/explain",
    openapi_extra=_BODY,
    status_code=200,
    responses={
        200: {"model": JobOut, "description": "done within `wait`"},
        202: {"model": JobOut, "description": "still running: poll Location"},
        410: {"model": ErrorOut, "description": "the job's image expired before it ran"},
        **_ERRORS,
    },
)
async def explain(
    request: Request, owner: Owner, queue: Queue, settings: AppSettings, served: Served
) -> JSONResponse:
    """Explain one image with one or more captions; wait up to `wait` seconds for the result."""
    job, wait = await _submit(request, owner, queue, settings, served)
    return await _wait(queue, job, wait)


@router.post(
    "/jobs",
    openapi_extra=_BODY,
    status_code=202,
    responses={202: {"model": JobOut, "description": "queued: poll Location"}, **_ERRORS},
)
async def submit_job(
    request: Request, owner: Owner, queue: Queue, settings: AppSettings, served: Served
) -> JSONResponse:
    """Queue an explanation and return at once (same body as POST /explain)."""
    job, _ = await _submit(request, owner, queue, settings, served)
    return _accepted(job)


_WAIT = "seconds to wait for the job to finish (long poll; at most EXCLIP_WAIT_MAX_S)"


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses={404: {"model": ErrorOut}, 410: {"model": ErrorOut, "description": "result evicted"}},
)
async def get_job(
    job: OwnedJob,
    queue: Queue,
    settings: AppSettings,
    wait: Annotated[float | None, Query(ge=0, allow_inf_nan=False, description=_WAIT)] = None,
) -> JSONResponse:
    """The job's status, and its result when done or its error when failed; `wait` long-polls."""
    if wait and not job.status.finished:
        latest = await queue.wait_finished(job.id, min(wait, settings.wait_max_s))
        if latest is None:
            return _lost(job.id)
        job = latest
    return _evicted(job) if job.evicted else JSONResponse(job.to_public())


@router.delete(
    "/jobs/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}}
)
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
