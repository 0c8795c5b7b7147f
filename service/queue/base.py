"""The job queue protocols both back-ends implement (Redis Streams and in-memory), one per role.

``JobStore``: the API enqueues, reads, waits for and cancels jobs; a worker starts them (the
cancellation check) and stores their outcome. ``Consumer``: a worker reads deliveries, claims those a
dead worker left unacknowledged, renews and acknowledges them. ``WorkerRegistry``: heartbeats.
``MetricsStore``: shared counters. ``ImageStore``: the uploads. ``Connection``: ping, warm-up, close.
``JobQueue`` is all of them. Both back-ends pass the same contract tests, grouped by role
(tests/service/test_queue_contract.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from service.jobs import Job


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a worker; acknowledge it once the job's outcome is stored."""

    entry_id: str
    job_id: str
    model: str
    batch_tag: str = ""  # the job's ``Job.batch_tag``, so grouping needs no read of the record


@runtime_checkable
class Connection(Protocol):
    """The link to the back-end, as the API's health check and both sides' start and stop use it."""

    async def ping(self) -> None:
        """Raise if the queue cannot be reached, or ``WritesRefused`` if it could not take a job now."""

    async def warm_up(self) -> None:
        """Prepare what the first job would otherwise wait for (scripts, the finish subscription)."""

    async def close(self) -> None:
        """Release connections."""


@runtime_checkable
class JobStore(Protocol):
    """Job records through their life: the API enqueues, reads, waits for and cancels them; a worker
    starts them (the cancellation check) and stores their outcome."""

    async def enqueue(self, job: Job, image: bytes, *, max_depth: int, depth_models: list[str]) -> None:
        """Store the job record and image (with expiry) and add a stream entry for the job's model.

        Raises ``QueueFull`` when ``depth(depth_models)`` is already ``max_depth`` or more, and
        ``WritesRefused`` when the store has too little room left for the job to run to its end.
        """

    async def get(self, job_id: str) -> Job | None:
        """The job record, or None when unknown or expired."""

    async def wait_finished(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it is finished, or its record after ``timeout_s``; None when unknown or lost.

        Woken by the worker's finish (an event in memory, a pub/sub message in Redis), with a slow
        poll as the safety net for a missed message.
        """

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job (atomically, so a worker cannot start it meanwhile); return the record."""

    async def depth(self, models: list[str]) -> int:
        """Jobs of these models waiting to be read or read but not yet acknowledged."""

    async def start(self, job_id: str) -> Job | None:
        """Mark a queued (or re-delivered running) job running and count the delivery.

        Returns the updated record; a finished (e.g. cancelled) job is returned unchanged; None
        when the record is gone. The caller computes the job only if the returned status is running.
        """

    async def finish(self, job: Job) -> None:
        """Store the outcome fields (``Job.OUTCOME_FIELDS``) of a job that still exists, drop its image
        from the queued bytes (it stays for heatmaps within the byte budget) and wake its waiters."""


@runtime_checkable
class Consumer(Protocol):
    """Deliveries of queued jobs to workers: read, taken over from dead workers, renewed, acknowledged."""

    async def read(self, consumer: str, models: list[str], count: int, block_ms: int) -> list[Delivery]:
        """New entries for these models, at most ``count``, waiting up to ``block_ms`` for the first."""

    async def claim_stale(
        self, consumer: str, models: list[str], min_idle_s: float, count: int
    ) -> list[Delivery]:
        """Take over entries delivered to any consumer but unacknowledged for ``min_idle_s`` or more."""

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Reset the idle time of entries this consumer still holds, so a long batch is not taken over.

        Entries another consumer has claimed meanwhile are left alone.
        """

    async def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge entries (and drop the stream entries no one needs any more)."""


@runtime_checkable
class WorkerRegistry(Protocol):
    """Which workers live and what they hold: their heartbeats."""

    async def heartbeat(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        """Advertise a live worker for ``ttl_s`` seconds."""

    async def remove_worker(self, name: str) -> None:
        """Withdraw a worker's heartbeat (clean shutdown)."""

    async def workers(self) -> list[dict[str, Any]]:
        """The heartbeats of live workers (each: name, models, ...)."""


@runtime_checkable
class MetricsStore(Protocol):
    """The counters every worker and API replica adds to (see service.metrics)."""

    async def add_metrics(self, increments: dict[str, float]) -> None:
        """Add to the shared counters that /metrics exposes."""

    async def read_metrics(self) -> dict[str, float]:
        """All shared counters."""


@runtime_checkable
class ImageStore(Protocol):
    """The uploaded images, stored once per job (``enqueue``) and kept within the byte budget."""

    async def image(self, job_id: str) -> bytes | None:
        """The job's image bytes."""


@runtime_checkable
class JobQueue(Connection, JobStore, Consumer, WorkerRegistry, MetricsStore, ImageStore, Protocol):
    """Every role together: what each back-end implements, and what the app and a worker hold."""


ROLES: tuple[type, ...] = (Connection, JobStore, Consumer, WorkerRegistry, MetricsStore, ImageStore)
"""The roles a back-end plays; code that needs one role takes that protocol (e.g. ``ServedCache``)."""


class FinishWaiters:
    """Per-job events set when a job finishes, so waiting requests wake at once instead of polling."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(job_id, set())
            events.discard(event)
            if not events:
                self._events.pop(job_id, None)

    def notify(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()

    def notify_all(self) -> None:
        """Wake every waiter to look again (after a reconnect, when a notification may be lost)."""
        for events in self._events.values():
            for event in events:
                event.set()


async def wait_notified(
    get: Callable[[str], Awaitable[Job | None]],
    waiters: FinishWaiters,
    job_id: str,
    timeout_s: float,
    safety_poll_s: float,
) -> Job | None:
    """Read the job whenever its finish is notified (or every ``safety_poll_s`` in case a notification
    was missed) until it is finished or ``timeout_s`` passed; return its last record."""
    deadline = time.monotonic() + timeout_s
    with waiters.watch(job_id) as finished:
        while True:
            finished.clear()  # before reading: a notification after the read is not lost
            job = await get(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.status.finished or remaining <= 0:
                return job
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished.wait(), min(safety_poll_s, remaining))
