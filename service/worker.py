"""The batching worker: reads jobs, computes compatible ones in one engine call, stores the results.

One loop, top to bottom (``Worker.run``):

1. every so often, take over deliveries a dead worker left unacknowledged (visibility timeout);
   otherwise read new entries, waiting up to ``max_wait_ms`` after the first one to fill a batch;
2. start each job — the cancellation check: only a job still queued (or re-delivered) runs — and
   fail the ones delivered more than ``max_deliveries`` times (poison jobs);
3. group the jobs by model, layers, steps and precision, and compute each group with ONE
   ``explain_requests`` call; if that call fails the group is split (halves on out-of-memory, one
   job at a time otherwise) so one bad job cannot sink the others;
4. store each outcome, then acknowledge (a crash before the ack means another worker redoes it).

A heartbeat task advertises the models while the loop runs and renews the deliveries being computed,
so only a worker that stopped heartbeating (dead) loses its jobs to the visibility timeout.
``stop()`` (SIGTERM) ends the loop after the current batch is stored and acknowledged. The per-job
compute limit is enforced by raising ``JobTimeout`` inside the computing thread (between tensor
operations).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from itertools import groupby
from typing import Any, TypeVar

from attribution.errors import AttributionError
from attribution.images import decode_image
from attribution.models import LoadedModel
from attribution.pipeline import ExplainRequest, explain_requests
from attribution.selections import Box, Span, TokenRange
from service import metrics
from service.connections import QUEUE_DOWN
from service.errors import JobTimeout
from service.jobs import Job, JobStatus, error_dict
from service.queue import Delivery, JobQueue
from service.settings import Settings

log = logging.getLogger("exclip.worker")

T = TypeVar("T")


@dataclass
class _Item:
    delivery: Delivery
    job: Job
    request: ExplainRequest | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None


def _is_oom(exc: BaseException) -> bool:
    import torch

    # CUDA says "out of memory"; the CPU allocator says "can't allocate memory" (or MemoryError).
    message = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message))


def _selection(d: dict[str, Any]) -> Span | TokenRange | Box:
    if d["kind"] == "span":
        return Span(d["start"], d["end"])
    if d["kind"] == "tokens":
        return TokenRange(d["start"], d["end"])
    return Box(*d["box"])


def _call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` in this thread; raise ``JobTimeout`` in it if it runs longer than ``timeout_s``.

    A timer thread injects the exception with ``PyThreadState_SetAsyncExc``; it lands at the next
    Python bytecode, i.e. between tensor operations. The lock and flag make sure it is never
    injected after ``fn`` returned, and the ``except`` here catches it wherever it lands.
    """
    ident, lock, state = threading.get_ident(), threading.Lock(), {"finished": False}

    def expire() -> None:
        with lock:
            if not state["finished"]:
                inject = ctypes.pythonapi.PyThreadState_SetAsyncExc
                inject(ctypes.c_ulong(ident), ctypes.py_object(JobTimeout))

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        try:
            out = fn()
            with lock:
                state["finished"] = True
            return out
        finally:
            timer.cancel()
    except JobTimeout:
        raise JobTimeout(f"computing took longer than the limit of {timeout_s:g} s per job "
                         "(EXCLIP_JOB_TIMEOUT_S); use fewer steps, captions or a smaller image") from None


class Worker:
    """Computes jobs for the models it holds until ``stop()`` is called."""

    def __init__(self, queue: JobQueue, models: list[LoadedModel], settings: Settings) -> None:
        self.queue, self.settings = queue, settings
        self.models = {m.name: m for m in models}
        self.name = settings.worker_name
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._in_flight: list[Delivery] = []  # renewed by the heartbeat while a batch computes
        self.info = {"name": self.name, "pid": os.getpid(), "started_at": time.time(),
                     "max_batch": settings.max_batch, "models": [m.describe() for m in models]}

    def stop(self) -> None:
        """Finish the current batch, then leave ``run``."""
        self._stopping.set()

    async def run(self) -> None:
        log.info("worker %s serving %s", self.name, ", ".join(self.models))
        beat = asyncio.create_task(self._heartbeat_forever())
        backoff = 0.2
        try:
            while not self._stopping.is_set():
                try:
                    deliveries = await self._next_deliveries()
                    if deliveries:
                        self._in_flight = deliveries
                        try:
                            await self._process(deliveries)
                        finally:
                            self._in_flight = []
                    backoff = 0.2
                except QUEUE_DOWN as exc:
                    log.warning("queue unavailable (%s); retrying in %.1f s", exc, backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            beat.cancel()
            with suppress(Exception):
                await self.queue.remove_worker(self.name)
            log.info("worker %s stopped", self.name)

    # --- 1. reading -----------------------------------------------------------------------------
    async def _next_deliveries(self) -> list[Delivery]:
        s, names = self.settings, list(self.models)
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + min(max(s.visibility_timeout_s / 4, 0.2), 10.0)
            stale = await self.queue.claim_stale(self.name, names, s.visibility_timeout_s, s.max_batch)
            if stale:
                log.warning("took over %d job(s) left unacknowledged by another worker", len(stale))
                return stale
        idle_block_ms = int(min(1.0, s.redis_timeout_s / 2) * 1000)  # below the socket timeout
        deliveries = await self.queue.read(self.name, names, s.max_batch, idle_block_ms)
        fill_until = time.monotonic() + s.max_wait_ms / 1000
        while deliveries and len(deliveries) < s.max_batch and not self._stopping.is_set():
            remaining_ms = int((fill_until - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            deliveries += await self.queue.read(self.name, names, s.max_batch - len(deliveries), remaining_ms)
        return deliveries

    # --- 2. starting ----------------------------------------------------------------------------
    async def _process(self, deliveries: list[Delivery]) -> None:
        skipped: list[Delivery] = []
        items: list[_Item] = []
        for d in deliveries:
            job = await self.queue.start(d.job_id)
            if job is None or job.status is not JobStatus.RUNNING:  # expired, cancelled or finished
                skipped.append(d)
            elif job.deliveries > self.settings.max_deliveries:
                item = _Item(d, job, error=error_dict(
                    f"the job was delivered {job.deliveries - 1} times and never finished (its worker "
                    f"crashed or was stopped each time); given up after EXCLIP_MAX_DELIVERIES="
                    f"{self.settings.max_deliveries}", "PoisonJob"))
                await self._store([item])
            else:
                items.append(_Item(d, job))
        await self.queue.ack(skipped)
        items.sort(key=lambda i: i.job.batch_key)
        for _, group in groupby(items, key=lambda i: i.job.batch_key):
            await self._compute_batch(list(group))

    # --- 3. computing ---------------------------------------------------------------------------
    async def _compute_batch(self, items: list[_Item]) -> None:
        for item in items:
            data = await self.queue.image(item.job.id)
            if data is None:
                item.error = error_dict("the job's image expired before it was computed", "ImageExpired")
                continue
            try:
                item.request = await asyncio.to_thread(self._prepare, item.job, data)
            except AttributionError as exc:
                item.error = error_dict(exc)
        ready = [i for i in items if i.error is None]
        if ready:
            await self._compute(ready)
        await self._store(items)

    def _prepare(self, job: Job, data: bytes) -> ExplainRequest:
        captions = job.request["captions"]
        return ExplainRequest(
            image=decode_image(data, max_pixels=self.settings.max_pixels),
            captions=[c["text"] for c in captions],
            selections=[[_selection(s) for s in c["selections"]] for c in captions],
        )

    async def _compute(self, items: list[_Item]) -> None:
        """One engine call for ``items``; on failure split (halves on OOM, singles otherwise)."""
        job = items[0].job
        loaded = self.models[job.model]
        options = {k: job.request[k] for k in ("text_layer", "image_layer", "steps", "precision")}
        requests = [i.request for i in items]
        t0 = time.monotonic()
        try:
            explanations = await asyncio.to_thread(
                _call_with_deadline,
                lambda: explain_requests(loaded, requests, **options),
                self.settings.job_timeout_s * len(items),
            )
        except Exception as exc:  # noqa: BLE001 - every failure is either retried smaller or reported
            if len(items) > 1:
                log.warning("batch of %d failed (%s: %s); retrying it in parts", len(items),
                            type(exc).__name__, exc)
                half = len(items) // 2 if _is_oom(exc) else 1
                for start in range(0, len(items), half):
                    await self._compute(items[start:start + half])
                return
            items[0].error = self._describe_failure(exc, loaded)
            return
        compute_ms = (time.monotonic() - t0) * 1000
        await self.queue.add_metrics(metrics.merge(
            metrics.observe("batch_size", len(items)), metrics.observe("compute_seconds", compute_ms / 1000)))
        for item, per_caption in zip(items, explanations, strict=True):
            queued_ms = ((item.job.started_at or item.job.created_at) - item.job.created_at) * 1000
            timings = {"queued_ms": queued_ms, "compute_ms": compute_ms}
            fmt = item.job.request["format"]
            item.result = {"captions": [{**e.to_dict(matrix_format=fmt), "timings": timings}
                                        for e in per_caption]}

    def _describe_failure(self, exc: BaseException, loaded: LoadedModel) -> dict[str, str]:
        if _is_oom(exc):
            with suppress(Exception):
                import torch

                torch.cuda.empty_cache()
            return error_dict(f"out of memory computing this job alone on {loaded.device}: {exc}. Use fewer "
                              "steps or captions, or a worker with more memory", "OutOfMemory")
        if isinstance(exc, AttributionError | JobTimeout):
            return error_dict(exc)
        log.exception("job failed", exc_info=exc)
        return error_dict(f"{type(exc).__name__}: {exc}", "InternalError")

    # --- 4. storing -----------------------------------------------------------------------------
    async def _store(self, items: list[_Item]) -> None:
        increments: list[dict[str, float]] = []
        for item in items:
            job = item.job
            job.status = JobStatus.DONE if item.error is None else JobStatus.FAILED
            job.result, job.error, job.finished_at = item.result, item.error, time.time()
            await self.queue.finish(job)
            increments += [metrics.outcome(job.status.value),
                           metrics.observe("queue_wait_seconds", (job.started_at or job.created_at)
                                           - job.created_at)]
        await self.queue.add_metrics(metrics.merge(*increments))
        await self.queue.ack([i.delivery for i in items])

    # --- heartbeat ------------------------------------------------------------------------------
    async def _heartbeat_forever(self) -> None:
        period = self.settings.heartbeat_s
        while True:
            try:
                await self.queue.heartbeat(self.name, {**self.info, "at": time.time()}, ttl_s=3 * period)
                if self._in_flight:  # a batch longer than the visibility timeout stays ours
                    await self.queue.renew(self.name, self._in_flight)
            except QUEUE_DOWN as exc:
                log.warning("heartbeat failed (%s)", exc)
            await asyncio.sleep(period)

    async def _sleep(self, seconds: float) -> None:
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
