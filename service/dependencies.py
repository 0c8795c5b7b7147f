"""FastAPI dependencies: settings, queue, served models, API-key auth and job ownership.

``OwnedJob`` is how a route reads a job: it applies auth and gives the ``Job`` (with its result),
or raises 404 (unknown, expired, or another key's job) / 401 (missing or wrong key when keys are
configured).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.jobs import Job
from service.queue import JobQueue
from service.served import ServedCache
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_served(request: Request) -> ServedCache:
    """What the live workers serve: ``await .read()`` (at most one heartbeat read a second), or
    ``await .required()`` for the models with the "no worker" 503."""
    return request.app.state.served


def owner_tag(key: str, secret: bytes) -> str:
    """What a job stores about the key that created it: an HMAC with the server's secret, so a copy
    of Redis does not let anyone test guesses of the keys."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


# Declares the key in the OpenAPI schema (securitySchemes, a lock on each route that needs it) so the
# /docs page can send it. It never refuses anything (auto_error=False) and its value is not used:
# api_key_owner reads the header itself, with its own messages.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key, sent as `Authorization: Bearer <key>`; needed only when the service has "
    "keys configured (EXCLIP_API_KEYS / EXCLIP_API_KEYS_FILE), else ignored",
)


def api_key_owner(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
) -> str | None:
    """With API keys configured: check ``Authorization: Bearer <key>`` and return the key's hash.

    Without keys: None (everyone may use the service). Keys are compared in constant time and
    never logged or echoed. ``_scheme`` only documents the key in the OpenAPI schema (``bearer_scheme``).
    """
    if not settings.keys:
        return None
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise HTTPException(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # RFC 7235: scheme, then one or more spaces or tabs, then the credentials.
    scheme, _, token = header.strip().replace("\t", " ").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            401,
            "malformed Authorization header: send the API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return _key_owner(token, settings, "Bearer")


def _key_owner(token: str, settings: Settings, scheme: str) -> str:
    matched = False
    for key in settings.keys:  # compare with all keys: the time does not depend on which one matches
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": scheme})
    return owner_tag(token, settings.owner_key)


def basic_or_bearer_owner(
    request: Request, settings: Annotated[Settings, Depends(get_settings)]
) -> str | None:
    """``api_key_owner`` that also takes Basic auth whose password is the key (any user name).

    Label Studio can send only Basic auth to an ML backend, so the ``/label-studio`` routes use this.
    """
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not settings.keys or scheme.lower() != "basic":
        return api_key_owner(request, settings)
    try:
        user_pass = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        user_pass = ""
    _, colon, password = user_pass.partition(":")
    if not colon or not password:
        raise HTTPException(
            401,
            "malformed Basic credentials: the password must be an API key",
            headers={"WWW-Authenticate": "Basic"},
        )
    return _key_owner(password, settings, "Basic")


Owner = Annotated[str | None, Depends(api_key_owner)]
Queue = Annotated[JobQueue, Depends(get_queue)]
Served = Annotated[ServedCache, Depends(get_served)]
AppSettings = Annotated[Settings, Depends(get_settings)]


async def owned_job(job_id: Annotated[str, Path(max_length=64)], owner: Owner, queue: Queue) -> Job:
    """The job, if the caller may read it."""
    job = await queue.get(job_id)
    if job is None or not hmac.compare_digest(job.owner or "", owner or ""):
        raise HTTPException(
            404, f"no job {job_id!r}: unknown, expired or lost, or created with another API key"
        )
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]
