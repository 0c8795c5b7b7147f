"""A Python client of the service: ``Client`` (blocking) and ``AsyncClient`` (asyncio), over httpx.

    from service.client import Client, Span

    with Client("http://127.0.0.1:8000") as client:
        job = client.explain("photo.jpg", "a red ball", selections=[Span(2, 10)], steps=5)
        explanation = job.explanations[0]  # attribution.pipeline.Explanation
        png = client.heatmap(job, selection=Span(2, 10))

Both share one implementation (service.client.flows: request bodies, retries on 429/503 honouring
``Retry-After``, polling, decoding); errors are ``ClientError`` subclasses (service.client.errors).
"""

from attribution.pipeline import Explanation
from attribution.selections import Box, Span, TokenRange
from service.client.aio import AsyncClient
from service.client.errors import (
    ClientError,
    ConnectionFailed,
    JobFailed,
    RequestRejected,
    ServerError,
    ServiceBusy,
    WaitTimeout,
)
from service.client.results import Job, ServedModel, ServedModels
from service.client.retry import RetryPolicy
from service.client.sync import Client
from service.jobs import JobStatus

__all__ = [
    "AsyncClient",
    "Box",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "Explanation",
    "Job",
    "JobFailed",
    "JobStatus",
    "RequestRejected",
    "RetryPolicy",
    "ServedModel",
    "ServedModels",
    "ServerError",
    "ServiceBusy",
    "Span",
    "TokenRange",
    "WaitTimeout",
]
