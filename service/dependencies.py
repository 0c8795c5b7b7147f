"""FastAPI dependencies: settings, queue, API-key auth and job ownership.

``owned_job`` is what other routers (service.web's heatmap) use to read a job: it applies auth
and returns the Job JSON with the full result, or raises 404 (unknown, expired, or another key's
job) / 401 (missing or wrong key when keys are configured).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request

from service.jobs import Job
from service.queue import JobQueue
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def owner_tag(key: str, secret: bytes) -> str:
    """What a job stores about the key that created it: an HMAC with the server's secret, so a copy
    of Redis does not let anyone test guesses of the keys."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def api_key_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str | None:
    """With API keys configured: check ``Authorization: Bearer <key>`` and return the key's hash.

    Without keys: None (everyone may use the service). Keys are compared in constant time and
    never logged or echoed.
    """
    if not settings.keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    token = token.strip()
    matched = False
    for key in settings.keys:  # compare with all keys: the time does not depend on which one matches
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return owner_tag(token, settings.owner_key)


Owner = Annotated[str | None, Depends(api_key_owner)]
Queue = Annotated[JobQueue, Depends(get_queue)]
AppSettings = Annotated[Settings, Depends(get_settings)]


async def owned_job_record(job_id: Annotated[str, Path(max_length=64)], owner: Owner, queue: Queue) -> Job:
    job = await queue.get(job_id)
    if job is None or not hmac.compare_digest(job.owner or "", owner or ""):
        raise HTTPException(404, f"no job {job_id!r}: unknown, expired or lost, or created with another "
                                 "API key")
    return job


async def owned_job(job: Annotated[Job, Depends(owned_job_record)]) -> dict[str, Any]:
    """The Job JSON (with the full result) of a job the caller may read."""
    return job.to_public()
