"""The service's own exceptions, each with the HTTP status the API answers it with.

Library errors (``attribution.errors``) are the client's fault when they reach the API; these are the
service's: a refused request, a full queue, a computation over its time limit.
"""

from __future__ import annotations


class RequestInvalid(Exception):
    """A request the API refuses; ``status`` is the HTTP status, the message says what is allowed."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class QueueFull(Exception):
    """More jobs are queued or running than ``EXCLIP_MAX_QUEUE`` allows."""


class JobTimeout(Exception):
    """Raised inside the computing thread when a batch exceeds its compute time limit."""
