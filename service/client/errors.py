"""What the client raises: one ``ClientError`` hierarchy carrying the HTTP status and the server's detail.

``detail`` is the ``detail`` of the service's error JSON: a message, or FastAPI's list of field errors
for a query parameter of the wrong type. ``status`` is None when no HTTP answer came (a connection
failure, a job that did not finish in time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.results import Job


class ClientError(Exception):
    """Any failure of a client call; ``status`` (HTTP, or None) and ``detail`` (the server's words)."""

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail if detail is not None else message


class RequestRejected(ClientError):
    """A 4xx other than 429: the request itself is wrong (bad option, unknown job, bad API key...)."""


class ServerError(ClientError):
    """A 5xx other than 503: the service failed."""


class ServiceBusy(ClientError):
    """429 (queue full) or 503 (no worker, queue down, render slots busy) still answered once the
    retry budget (``RetryPolicy.max_wait_s``) was spent; ``retry_after`` is the server's last hint."""

    def __init__(self, message: str, *, status: int, detail: Any, retry_after: float | None) -> None:
        super().__init__(message, status=status, detail=detail)
        self.retry_after = retry_after


class JobFailed(ClientError):
    """The job ended failed or cancelled, or its result was evicted; ``job`` is its last state."""

    def __init__(self, message: str, *, job: Job, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message, status=status, detail=detail)
        self.job = job


class WaitTimeout(ClientError):
    """The job did not finish within the client's wait; ``job`` is its last state (poll it later)."""

    def __init__(self, message: str, *, job: Job) -> None:
        super().__init__(message)
        self.job = job


class ConnectionFailed(ClientError):
    """No HTTP answer: the service could not be reached, or a read timed out."""
