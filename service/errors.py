"""The service's own exceptions and the one mapping from errors and job failures to HTTP statuses.

Library errors (``attribution.errors``) are the client's fault when they reach the API; these are the
service's: a refused request, a full queue, a computation over its time limit, a configuration that
cannot work. A failed job records its ``Fault`` (decided by the worker, which saw the exception), and
``failed_job_status`` turns that into the HTTP status; ``install_handlers`` maps raised exceptions.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("exclip.api")

QUEUE_DOWN = (RedisConnectionError, RedisTimeoutError)
"""Errors that mean "the queue (Redis) cannot be reached right now" (the API answers 503, workers retry).

redis-py wraps its sockets' ``OSError``s in these; any other ``OSError`` is not Redis's and is not
reported as such.
"""


class WritesRefused(Exception):
    """Redis refuses writes, or has too little memory left to run a new job to its end.

    Raised by the queue before it accepts a job that could not run (see ``write_refusal``); Redis's own
    refusals (``OOM``, ``MISCONF``) arrive as redis-py errors that ``write_refusal`` recognises.
    """


def write_refusal(exc: BaseException) -> str | None:
    """Why Redis refused a write, if ``exc`` is such a refusal: its memory is full (``maxmemory`` with
    ``noeviction``), or it cannot persist (a full disk under AOF or RDB: ``MISCONF``). None otherwise.

    Both pass without an operator once memory or disk is freed (results expire, jobs finish).
    """
    if isinstance(exc, WritesRefused):
        return str(exc)
    if isinstance(exc, RedisOutOfMemoryError):
        return "Redis is out of memory (maxmemory reached) and refuses writes"
    if isinstance(exc, RedisResponseError) and "MISCONF" in str(exc)[:40]:
        return "Redis cannot persist its data (disk full or unwritable) and refuses writes"
    return None


class RequestInvalid(Exception):
    """A request the API refuses; ``status`` is the HTTP status, the message says what is allowed."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class QueueFull(Exception):
    """More jobs (or bytes of queued images) than ``EXCLIP_MAX_QUEUE`` / the byte budget allow."""


class JobTimeout(Exception):
    """Raised inside the computing thread when a batch exceeds its compute time limit."""


class ConfigError(Exception):
    """Settings the service cannot run with (e.g. an unreadable keys file); it refuses to start."""


class Fault(str, Enum):
    """Whose fault a failed job is, as the worker saw it; decides the status ``POST /explain`` answers."""

    CLIENT = "client"  # the input (image, caption, selection) cannot be computed: 422
    GONE = "gone"  # the job's data expired or was evicted before it was computed: 410
    SERVER = "server"  # out of memory, time limit, crash, bug: 500


_FAULT_STATUS = {Fault.CLIENT: 422, Fault.GONE: 410, Fault.SERVER: 500}


def failed_job_status(fault: Fault | None) -> int:
    """The HTTP status of a failed job (records written before faults were stored count as server)."""
    return _FAULT_STATUS[fault or Fault.SERVER]


def install_handlers(app: FastAPI) -> None:
    """Answer the service's exceptions with their status, a ``detail`` message and ``Retry-After``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def answer(message: str, status: int, retry_after: int | None = None) -> JSONResponse:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status if isinstance(exc, RequestInvalid) else 422
        return answer(str(exc), status, 5 if status == 503 else None)

    async def full(request: Request, exc: Exception) -> JSONResponse:
        return answer(str(exc), 429, 10)

    async def queue_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("queue unavailable: %s", exc)
        return answer("the job queue (Redis) is unreachable right now; retry later", 503, 5)

    async def redis_error(request: Request, exc: Exception) -> JSONResponse:
        reason = write_refusal(exc)
        if reason is None:
            raise exc  # any other Redis error is a bug: the server error handler logs it (500)
        log.warning("%s %s: %s (%s)", request.method, request.url.path, reason, exc)
        return answer(f"{reason}; retry later", 503, 10)

    app.add_exception_handler(RequestInvalid, invalid)
    app.add_exception_handler(QueueFull, full)
    for exc_type in QUEUE_DOWN:
        app.add_exception_handler(exc_type, queue_down)
    for refusal in (WritesRefused, RedisResponseError):  # every route, whatever it writes
        app.add_exception_handler(refusal, redis_error)
