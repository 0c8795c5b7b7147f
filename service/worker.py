"""The batching worker: reads jobs, computes compatible ones in one engine call, stores the results.

One loop, top to bottom (``Worker.run``):

1. every so often, take over deliveries a dead worker left unacknowledged (visibility timeout);
   otherwise read new entries, waiting up to ``max_wait_ms`` after the first one to fill a batch;
2. group the jobs by model, layers, steps and precision; right before a group computes, start each
   of its jobs — the cancellation check: only a job still queued (or re-delivered) runs — and fail
   the ones delivered more than ``max_deliveries`` times (poison jobs);
3. compute each group with ONE ``explain_requests`` call; if that call fails the group is retried
   one job at a time so one bad job cannot sink the others (also on out-of-memory: the engine computes
   each job on its own, so a smaller batch needs no less memory, and only the job too big alone fails);
4. store each outcome, then acknowledge (a crash before the ack means another worker redoes it).

A heartbeat task advertises the models while the loop runs and renews the deliveries being computed,
so only a worker that stopped heartbeating (dead) loses its jobs to the visibility timeout.
``stop()`` (SIGTERM) ends the loop after the current batch is stored and acknowledged. The per-job
compute limit is service.timeouts. Before its first heartbeat the worker computes one warm-up
explanation per model, so it is never advertised cold. Nothing Redis can do to the streams ends the
loop: the queue recreates what is missing, and anything else is logged and retried.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from PIL import Image

from attribution.errors import AttributionError
from attribution.explainer import DEFAULT_STEPS
from attribution.images import prepare_image
from attribution.models import LoadedModel
from attribution.pipeline import ExplainRequest, explain_requests
from service import metrics
from service.errors import QUEUE_DOWN, Fault, JobTimeout, write_refusal
from service.jobs import Job, JobResult, JobStatus
from service.queue import Delivery, JobQueue
from service.settings import Settings
from service.timeouts import call_with_deadline

log = logging.getLogger("exclip.worker")

T = TypeVar("T")
# For tests only: while the file this variable names exists, a started batch waits before it computes,
# so a test holds jobs "running" for as long as it needs, however fast the machine computes.
TEST_HOLD_FILE_ENV = "EXCLIP_TEST_HOLD_FILE"


@dataclass
class _Item:
    delivery: Delivery
    job: Job
    request: ExplainRequest | None = None
    result: JobResult | None = None

    @property
    def failed(self) -> bool:
        return self.job.error is not None


def _is_oom(exc: BaseException) -> bool:
    import torch

    # CUDA says "out of memory"; the CPU allocator says "can't allocate memory" (or MemoryError); with
    # the address space exhausted, the next thread's stack cannot be mapped ("can't start new thread").
    message = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError)
        and any(s in message for s in ("out of memory", "can't allocate memory", "can't start new thread"))
    )


class Worker:
    """Computes jobs for the models it holds until ``stop()`` is called."""

    def __init__(self, queue: JobQueue, models: list[LoadedModel], settings: Settings) -> None:
        self.queue, self.settings = queue, settings
        self.models = {m.name: m for m in models}
        self.name = settings.worker_name
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._in_flight: list[Delivery] = []  # renewed by the heartbeat while a batch computes
        self._advertised = asyncio.Event()  # cleared while Redis refuses to store the heartbeat
        self._metrics: list[dict[str, float]] = []  # engine-call observations not yet sent
        self._test_hold_file = os.environ.get(TEST_HOLD_FILE_ENV)
        self.info = {
            "name": self.name,
            "pid": os.getpid(),
            "started_at": time.time(),
            "max_batch": settings.max_batch,
            "models": [m.describe() for m in models],
        }

    def stop(self) -> None:
        """Finish the current batch, then leave ``run``."""
        log.info("worker %s stopping after the current batch", self.name)
        self._stopping.set()

    async def run(self) -> None:
        await asyncio.to_thread(self.warm_up)  # before the first heartbeat: /readyz means warm
        with suppress(*QUEUE_DOWN):
            await self.queue.warm_up()
        log.info("worker %s serving %s", self.name, ", ".join(self.models))
        self._advertised.set()
        beat = asyncio.create_task(self._heartbeat_forever())
        backoff = 0.2
        try:
            while not self._stopping.is_set():
                if not self._advertised.is_set():
                    await self._until_advertised()
                    continue
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
                except Exception as exc:  # noqa: BLE001 - e.g. Redis lost the stream: log, back off, go on
                    if reason := write_refusal(exc):
                        log.warning("%s; retrying in %.1f s", reason, backoff)
                    else:
                        log.exception("queue operation failed; retrying in %.1f s", backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            beat.cancel()
            with suppress(Exception):
                await self.queue.remove_worker(self.name)
            log.info("worker %s stopped", self.name)

    def warm_up(self) -> None:
        """One explanation per model (its default layers and steps), so the first user's is not cold.

        The first call in a process pays for lazy initialisation (kernels, allocator pools, cached
        references); this worker does not advertise itself before that is done.
        """
        for loaded in self.models.values():
            t0 = time.monotonic()
            buf = io.BytesIO()  # an encoded upload of another size: decoding, resizing, cropping warm up
            Image.new("RGB", (320, 240), (127, 127, 127)).save(buf, format="JPEG")
            image = prepare_image(buf.getvalue(), loaded, max_pixels=self.settings.max_pixels)
            explain_requests(loaded, [ExplainRequest(image, ["a photo of a dog"])], steps=DEFAULT_STEPS)
            log.info("warmed up %s in %.0f ms", loaded.name, (time.monotonic() - t0) * 1000)

    # --- 1. reading -----------------------------------------------------------------------------
    async def _next_deliveries(self) -> list[Delivery]:
        s, names = self.settings, list(self.models)
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + min(max(s.visibility_timeout_s / 4, 0.2), 10.0)
            stale = await self.queue.claim_stale(self.name, names, s.visibility_timeout_s, s.max_batch)
            if stale:
                log.warning("took over %d job(s) left unacknowledged by another worker", len(stale))
                return stale
        max_block_ms = int(min(1.0, s.redis_timeout_s / 2) * 1000)  # below the socket timeout
        deliveries = await self.queue.read(self.name, names, s.max_batch, max_block_ms)
        fill_until = time.monotonic() + s.max_wait_ms / 1000
        while deliveries and len(deliveries) < s.max_batch and not self._stopping.is_set():
            remaining_ms = min(int((fill_until - time.monotonic()) * 1000), max_block_ms)
            if remaining_ms <= 0:
                break
            try:
                deliveries += await self.queue.read(
                    self.name, names, s.max_batch - len(deliveries), remaining_ms
                )
            except QUEUE_DOWN as exc:  # compute what was read rather than leave it to the visibility timeout
                log.warning(
                    "queue unavailable while filling a batch (%s); computing %d job(s)", exc, len(deliveries)
                )
                break
        return deliveries

    # --- 2. starting ----------------------------------------------------------------------------
    async def _process(self, deliveries: list[Delivery]) -> None:
        """Group the deliveries by batch key, then start and compute one group after the other.

        A job is started (marked running) only right before its group computes, so a job waiting
        behind another group can still be cancelled.
        """
        by_tag: dict[str, list[Delivery]] = {}
        for d in deliveries:
            by_tag.setdefault(d.batch_tag, []).append(d)
        for group in by_tag.values():
            started = await self._start(group)
            by_key: dict[tuple, list[_Item]] = {}  # the same as by tag, unless an entry had no tag
            for item in started:
                by_key.setdefault(item.job.batch_key, []).append(item)
            for items in by_key.values():
                await self._compute_batch(items)

    async def _start(self, deliveries: list[Delivery]) -> list[_Item]:
        """Start each job (the cancellation check); fail poison jobs; acknowledge the ones not to run."""
        skipped: list[Delivery] = []
        items: list[_Item] = []
        for d in deliveries:
            job = await self._write(partial(self.queue.start, d.job_id))
            if job is None or job.status is not JobStatus.RUNNING:  # lost, expired, cancelled or finished
                if job is None:
                    log.warning("job %s is gone (expired, or lost with Redis's data); not computed", d.job_id)
                skipped.append(d)
            elif job.deliveries > self.settings.max_deliveries:
                job.fail(
                    f"the job was delivered {job.deliveries - 1} times and never finished (its worker "
                    f"crashed or was stopped each time); given up after EXCLIP_MAX_DELIVERIES="
                    f"{self.settings.max_deliveries}",
                    "PoisonJob",
                    Fault.SERVER,
                )
                await self._store([_Item(d, job)])
            else:
                items.append(_Item(d, job))
        await self.queue.ack(skipped)
        return items

    # --- 3. computing ---------------------------------------------------------------------------
    async def _compute_batch(self, items: list[_Item]) -> None:
        if not items:
            return
        for item in items:
            data = await self.queue.image(item.job.id)
            if data is None:
                item.job.fail("the job's image expired before it was computed", "ImageExpired", Fault.GONE)
                continue
            try:
                item.request = await asyncio.to_thread(self._prepare, item.job, data)
            except AttributionError as exc:
                item.job.fail(str(exc), type(exc).__name__, Fault.CLIENT)
        ready = [i for i in items if not i.failed]
        if ready:
            await self._wait_while_test_holds()
            await self._compute(ready)
        await self._store(items)

    async def _wait_while_test_holds(self) -> None:
        while self._test_hold_file and os.path.exists(self._test_hold_file):
            await asyncio.sleep(0.02)

    def _prepare(self, job: Job, data: bytes) -> ExplainRequest:
        # Decoded straight to the model's input: a batch holds tensors, never full-size images.
        loaded = self.models[job.request.model]
        return job.request.explain_request(prepare_image(data, loaded, max_pixels=self.settings.max_pixels))

    async def _compute(self, items: list[_Item]) -> None:
        """One engine call for ``items``; on failure, one call per job."""
        request = items[0].job.request
        loaded = self.models[request.model]
        requests: list[ExplainRequest] = []
        for i in items:
            assert i.request is not None  # _compute_batch passes on only the items it prepared
            requests.append(i.request)
        t0 = time.monotonic()
        retry_alone = False
        try:
            explanations = await asyncio.to_thread(
                call_with_deadline,
                lambda: explain_requests(
                    loaded,
                    requests,
                    **request.engine_options,
                    max_caption_chars=self.settings.max_caption_chars,
                    memory_fraction=self.settings.memory_fraction,
                ),
                self.settings.job_timeout_s * len(items),
            )
        except Exception as exc:  # noqa: BLE001 - every failure is either retried smaller or reported
            if len(items) == 1:
                self._record_failure(items[0].job, exc, loaded)
                return
            log.warning(
                "batch of %d failed (%s: %s); retrying it job by job", len(items), type(exc).__name__, exc
            )
            retry_alone = True
        if retry_alone:  # outside the except block: the failed call's traceback (and its tensors) is freed
            for item in items:
                await self._compute([item])
            return
        compute_ms = (time.monotonic() - t0) * 1000
        self._metrics += [
            metrics.observe("batch_size", len(items)),
            metrics.observe("compute_seconds", compute_ms / 1000),
        ]
        for item, per_caption in zip(items, explanations, strict=True):
            queued_ms = ((item.job.started_at or item.job.created_at) - item.job.created_at) * 1000
            timings = {"queued_ms": queued_ms, "compute_ms": compute_ms}
            fmt = item.job.request.format
            item.result = {
                "captions": [{**e.to_dict(matrix_format=fmt), "timings": timings} for e in per_caption]
            }

    def _record_failure(self, job: Job, exc: BaseException, loaded: LoadedModel) -> None:
        if _is_oom(exc):
            with suppress(Exception):
                import torch

                torch.cuda.empty_cache()
            job.fail(
                f"out of memory computing this job alone on {loaded.device}: {exc}. Use fewer "
                "steps or captions, or a worker with more memory",
                "OutOfMemory",
                Fault.SERVER,
            )
        elif isinstance(exc, AttributionError):
            job.fail(str(exc), type(exc).__name__, Fault.CLIENT)
        elif isinstance(exc, JobTimeout):
            job.fail(str(exc), "JobTimeout", Fault.SERVER)
        else:
            log.exception("job failed", exc_info=exc)
            job.fail(f"{type(exc).__name__}: {exc}", "InternalError", Fault.SERVER)

    # --- 4. storing -----------------------------------------------------------------------------
    async def _store(self, items: list[_Item]) -> None:
        increments, self._metrics = self._metrics, []  # sent after the outcomes: waiters wake first
        for item in items:
            job = item.job
            job.status = JobStatus.FAILED if item.failed else JobStatus.DONE
            job.result, job.finished_at = item.result, time.time()
            await self._write(partial(self.queue.finish, job))
            increments += [
                metrics.outcome(job.status.value),
                metrics.observe("queue_wait_seconds", (job.started_at or job.created_at) - job.created_at),
            ]
        await self.queue.ack([i.delivery for i in items])
        await self.queue.add_metrics(metrics.merge(*increments))

    # --- heartbeat ------------------------------------------------------------------------------
    async def _heartbeat_forever(self) -> None:
        period = self.settings.heartbeat_s
        while True:
            if self._in_flight:  # a batch longer than the visibility timeout stays ours, also while
                try:  # the heartbeat is refused (renewing adds no data: a full Redis allows it)
                    await self.queue.renew(self.name, self._in_flight)
                except Exception as exc:  # noqa: BLE001 - the next beat tries again
                    log.warning("renewing the jobs in flight failed (%s: %s)", type(exc).__name__, exc)
            try:
                await self.queue.heartbeat(self.name, {**self.info, "at": time.time()}, ttl_s=3 * period)
                self._advertised.set()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                if write_refusal(exc):  # unseen by the API (no worker: 503) until a beat is stored
                    self._advertised.clear()
                log.warning("heartbeat failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(period)

    async def _until_advertised(self) -> None:
        """Take no new job while the heartbeat cannot be stored (Redis refuses writes): the API sees no
        worker and accepts none, and a job read now could not be started. Resumes by itself."""
        log.warning("not taking jobs until a heartbeat is stored again")
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._advertised.wait(), self.settings.heartbeat_s)

    async def _write(self, write: Callable[[], Awaitable[T]]) -> T:
        """A queue write, retried while Redis refuses writes (full memory or disk) and the worker is not
        stopping: what was computed is stored once room is freed, not recomputed after the visibility
        timeout (the heartbeat keeps renewing the deliveries meanwhile)."""
        delay = 0.2
        while True:
            try:
                return await write()
            except Exception as exc:
                reason = write_refusal(exc)
                if reason is None or self._stopping.is_set():
                    raise
                log.warning("%s; storing again in %.1f s", reason, delay)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _sleep(self, seconds: float) -> None:
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
