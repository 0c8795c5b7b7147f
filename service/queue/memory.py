"""In-memory back-end for embedded mode (``serve`` without ``REDIS_URL``): API and worker in one process.

Same semantics as the Redis Streams back-end — per-model entry queues, a pending list with delivery
times that ``claim_stale`` takes over, atomic cancel/start, expiring records, a byte budget for
stored images and results — but plain dicts on one event loop, so there is no locking: every method
runs without awaiting in the middle of a change. Expired records are dropped at least once a second
(the worker's read loop), not only when someone reads them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, TypeVar

from service.errors import QueueFull
from service.jobs import Job, JobStatus
from service.queue.base import Delivery, FinishWaiters, JobQueue, wait_notified

PURGE_EVERY_S = 1.0


@dataclass
class _Pending:
    delivery: Delivery
    consumer: str
    delivered_at: float


class MemoryQueue(JobQueue):
    """``JobQueue`` in process memory; records and images expire after ``ttl_s`` like in Redis.

    Images and results together are kept within ``max_stored_bytes``: above it, finished jobs give
    up their images (oldest finished first; their heatmaps answer 410), then their results (the job
    answers 410); a new job whose image does not fit beside the unfinished ones is refused.
    """

    def __init__(self, *, ttl_s: int, max_stored_bytes: int = 2**62) -> None:
        self.ttl_s, self.max_stored_bytes = ttl_s, max_stored_bytes
        self._jobs: dict[str, tuple[dict[str, str], float]] = {}  # id -> (fields, expires_at)
        self._images: dict[str, tuple[bytes, float]] = {}
        self._new: dict[str, deque[Delivery]] = {}  # model -> undelivered entries
        self._pending: dict[str, _Pending] = {}  # entry id -> delivery not yet acknowledged
        self._workers: dict[str, tuple[dict[str, Any], float]] = {}
        self._metrics: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()
        self._waiters = FinishWaiters()
        self._purged_at = 0.0

    def _purge(self) -> None:
        now = time.monotonic()
        self._purged_at = now
        for store in (self._jobs, self._images, self._workers):
            for key in [k for k, (_, exp) in store.items() if exp <= now]:
                del store[key]

    def stored_bytes(self) -> int:
        """Bytes of images and results held (the quantity ``max_stored_bytes`` bounds)."""
        return sum(len(data) for data, _ in self._images.values()) + sum(
            len(fields.get("result", "")) for fields, _ in self._jobs.values()
        )

    def _evict(self, needed: int = 0) -> int:
        """Drop finished jobs' images, then results, oldest finished first, until ``needed`` more bytes
        fit in the budget; return how many bytes are still missing."""
        over = self.stored_bytes() + needed - self.max_stored_bytes
        if over <= 0:
            return 0
        finished = sorted(
            (float(f["finished_at"]), job_id) for job_id, (f, _) in self._jobs.items() if "finished_at" in f
        )
        for _, job_id in finished:
            if over > 0 and job_id in self._images:
                over -= len(self._images.pop(job_id)[0])
        for _, job_id in finished:
            fields, _ = self._jobs[job_id]
            if over > 0 and "result" in fields:
                over -= len(fields.pop("result"))
                fields["evicted"] = "1"
        return max(over, 0)

    def _load(self, job_id: str) -> Job | None:
        self._purge()
        entry = self._jobs.get(job_id)
        return Job.from_fields(entry[0]) if entry else None

    def _save(self, job: Job) -> None:
        self._jobs[job.id] = (job.to_fields(), time.monotonic() + self.ttl_s)

    # --- API side -------------------------------------------------------------------------------
    async def ping(self) -> None:
        return None

    async def warm_up(self) -> None:
        return None

    async def enqueue(self, job: Job, image: bytes, *, max_depth: int, depth_models: list[str]) -> None:
        if await self.depth(depth_models) >= max_depth:
            raise QueueFull(f"the queue holds {max_depth} or more jobs (EXCLIP_MAX_QUEUE); retry later")
        self._purge()
        if self._evict(len(image)):
            raise QueueFull(
                f"the images of unfinished jobs fill the stored-bytes budget of "
                f"{self.max_stored_bytes} bytes (EXCLIP_MAX_STORED_BYTES); retry later"
            )
        self._save(job)
        self._images[job.id] = (image, time.monotonic() + self.ttl_s)
        self._new.setdefault(job.model, deque()).append(
            Delivery(f"{next(self._ids)}-0", job.id, job.model, job.batch_tag)
        )
        self._metrics["jobs_enqueued"] = self._metrics.get("jobs_enqueued", 0.0) + 1
        self._arrived.set()

    async def get(self, job_id: str) -> Job | None:
        return self._load(job_id)

    async def wait_finished(self, job_id: str, timeout_s: float) -> Job | None:
        return await wait_notified(self.get, self._waiters, job_id, timeout_s, safety_poll_s=1.0)

    async def cancel(self, job_id: str) -> Job | None:
        job = self._load(job_id)
        if job is not None and job.status is JobStatus.QUEUED:
            job.status, job.finished_at = JobStatus.CANCELLED, time.time()
            self._save(job)
            self._images.pop(job_id, None)  # no worker will read it, and a cancelled job has no heatmap
            self._waiters.notify(job_id)
        return job

    async def depth(self, models: list[str]) -> int:
        wanted = set(models)
        waiting = sum(len(self._new.get(m, ())) for m in wanted)
        return waiting + sum(1 for p in self._pending.values() if p.delivery.model in wanted)

    async def workers(self) -> list[dict[str, Any]]:
        self._purge()
        return [info for info, _ in self._workers.values()]

    async def add_metrics(self, increments: dict[str, float]) -> None:
        for name, value in increments.items():
            self._metrics[name] = self._metrics.get(name, 0.0) + value

    async def read_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # --- worker side ----------------------------------------------------------------------------
    def _take(self, consumer: str, models: list[str], count: int) -> list[Delivery]:
        taken: list[Delivery] = []
        for model in models:
            entries = self._new.get(model)
            while entries and len(taken) < count:
                d = entries.popleft()
                self._pending[d.entry_id] = _Pending(d, consumer, time.monotonic())
                taken.append(d)
        return taken

    async def read(self, consumer: str, models: list[str], count: int, block_ms: int) -> list[Delivery]:
        if time.monotonic() - self._purged_at >= PURGE_EVERY_S:  # the worker reads at least once a second
            self._purge()
        deadline = time.monotonic() + block_ms / 1000
        while True:
            taken = self._take(consumer, models, count)
            remaining = deadline - time.monotonic()
            if taken or remaining <= 0:
                return taken
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def claim_stale(
        self, consumer: str, models: list[str], min_idle_s: float, count: int
    ) -> list[Delivery]:
        now = time.monotonic()
        stale = [
            p
            for p in self._pending.values()
            if p.delivery.model in models and now - p.delivered_at >= min_idle_s
        ][:count]
        for p in stale:
            p.consumer, p.delivered_at = consumer, now
        return [p.delivery for p in stale]

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        for d in deliveries:
            pending = self._pending.get(d.entry_id)
            if pending is not None and pending.consumer == consumer:
                pending.delivered_at = now
            # In-flight jobs do not expire under their worker.
            _extend(self._jobs, d.job_id, now + self.ttl_s)
            _extend(self._images, d.job_id, now + self.ttl_s)

    async def start(self, job_id: str) -> Job | None:
        job = self._load(job_id)
        if job is not None and job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            job.status, job.started_at = JobStatus.RUNNING, time.time()
            job.deliveries += 1
            self._save(job)
        return job

    async def image(self, job_id: str) -> bytes | None:
        self._purge()
        entry = self._images.get(job_id)
        return entry[0] if entry else None

    async def finish(self, job: Job) -> None:
        stored = self._load(job.id)
        if stored is None:
            return
        stored.status, stored.result, stored.error = job.status, job.result, job.error
        stored.fault, stored.finished_at = job.fault, job.finished_at
        self._save(stored)
        if job.id in self._images:
            if job.status is JobStatus.DONE:  # kept for its heatmap, within the budget
                self._images[job.id] = (self._images[job.id][0], time.monotonic() + self.ttl_s)
            else:
                del self._images[job.id]
        self._evict()
        self._waiters.notify(job.id)

    async def ack(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            self._pending.pop(d.entry_id, None)

    async def heartbeat(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        self._workers[name] = (info, time.monotonic() + ttl_s)

    async def remove_worker(self, name: str) -> None:
        self._workers.pop(name, None)

    async def close(self) -> None:
        return None


_Stored = TypeVar("_Stored")


def _extend(store: dict[str, tuple[_Stored, float]], key: str, expires_at: float) -> None:
    """Give a stored entry a new expiry time, if it is there."""
    if key in store:
        store[key] = (store[key][0], expires_at)
