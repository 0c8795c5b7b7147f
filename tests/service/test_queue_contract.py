"""One contract for both queue back-ends: in-memory and Redis Streams (against a real redis-server),
grouped by the roles of service.queue.base: Connection, JobStore, Consumer, WorkerRegistry, MetricsStore
and ImageStore."""

from __future__ import annotations

import asyncio
import time

import pytest

from attribution.selections import Box, Span
from service.connections import create_queue
from service.jobs import Job, JobStatus
from service.queue import ROLES, QueueFull
from service.settings import Settings
from tests.service.conftest import make_job

pytestmark = pytest.mark.anyio

MODEL = "exclip-tiny"
# Idle and TTL windows: long enough that no pause of a busy machine between two calls of a test
# crosses one by accident (sub-second windows did), short enough to wait past.
WINDOW_S = 2.0
PAST_WINDOW_S = WINDOW_S + 0.2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def queue(request, redis_server, key_prefix):
    url = redis_server.url if request.param == "redis" else None
    q = create_queue(Settings(redis_url=url, key_prefix=key_prefix, result_ttl_s=60))
    yield q
    await q.close()


@pytest.fixture(params=["memory", "redis"])
async def expiring_queue(request, redis_server, key_prefix):
    """A queue that keeps records and images 2 s."""
    url = redis_server.url if request.param == "redis" else None
    q = create_queue(Settings(redis_url=url, key_prefix=key_prefix, result_ttl_s=2))
    yield q
    await q.close()


@pytest.fixture(params=["memory", "redis"])
async def budget_queue(request, redis_server, key_prefix):
    """A queue that keeps at most 1000 bytes of images and results."""
    url = redis_server.url if request.param == "redis" else None
    q = create_queue(Settings(redis_url=url, key_prefix=key_prefix, result_ttl_s=60, max_stored_bytes=1000))
    yield q
    await q.close()


def contract_job(model: str = MODEL, steps: int = 10) -> Job:
    return make_job(steps=steps, selections=(Span(0, 1), Box(0, 0, 2, 2)), model=model, owner="h")


async def enqueue(q, job: Job | None = None, image: bytes = b"img") -> Job:
    job = job or contract_job()
    await q.enqueue(job, image, max_depth=100, depth_models=[job.model])
    return job


# ------------------------------------------------------------------------------------------------
# Connection: reached, prepared, closed (by the fixtures)


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.__name__)
async def test_each_back_end_plays_every_role(queue, role):
    assert isinstance(queue, role)


async def test_ping_and_warm_up_answer_and_can_be_repeated(queue):
    await queue.ping()
    await queue.warm_up()
    await queue.warm_up()
    await queue.ping()


# ------------------------------------------------------------------------------------------------
# JobStore: records through their life, and waiting for them


async def test_enqueue_then_get_returns_the_queued_record(queue):
    job = await enqueue(queue, image=b"\x89PNG\x00bytes")
    got = await queue.get(job.id)
    assert got is not None and got.status is JobStatus.QUEUED
    assert (got.request, got.owner, got.model) == (job.request, "h", MODEL)
    assert await queue.image(job.id) == b"\x89PNG\x00bytes"
    assert await queue.depth([MODEL]) == 1
    assert await queue.get("no-such-job") is None


async def test_full_queue_refuses_and_adds_nothing(queue):
    await enqueue(queue)
    await enqueue(queue)
    extra = contract_job()
    with pytest.raises(QueueFull, match="EXCLIP_MAX_QUEUE"):
        await queue.enqueue(extra, b"img", max_depth=2, depth_models=[MODEL])
    assert await queue.depth([MODEL]) == 2
    assert await queue.get(extra.id) is None


async def test_cancel_a_queued_job_and_start_then_skips_it(queue):
    job = await enqueue(queue)
    cancelled = await queue.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    [d] = await queue.read("w1", [MODEL], count=8, block_ms=100)
    assert (await queue.start(d.job_id)).status is JobStatus.CANCELLED
    assert await queue.cancel("no-such-job") is None


async def test_cancel_does_not_stop_a_running_job(queue):
    job = await enqueue(queue)
    await queue.read("w1", [MODEL], count=8, block_ms=100)
    await queue.start(job.id)
    assert (await queue.cancel(job.id)).status is JobStatus.RUNNING


async def test_records_and_images_expire(expiring_queue):
    job = await enqueue(expiring_queue)
    assert await expiring_queue.get(job.id) is not None
    time.sleep(2.2)
    assert await expiring_queue.get(job.id) is None
    assert await expiring_queue.image(job.id) is None


async def test_finish_does_not_resurrect_an_expired_job(expiring_queue):
    job = await enqueue(expiring_queue)
    time.sleep(2.2)
    job.status, job.result = JobStatus.DONE, {"captions": []}
    await expiring_queue.finish(job)
    assert await expiring_queue.get(job.id) is None


@pytest.fixture
def woken_only_by_notification(monkeypatch) -> None:
    """Waiters wake only when notified: their safety poll is an hour, so a wait that ends well before
    its timeout was ended by the finish notification (not by a poll, however the machine is paced)."""
    from service.queue import base, memory, redis_streams

    def wait(get, waiters, job_id, timeout_s, safety_poll_s):
        return base.wait_notified(get, waiters, job_id, timeout_s, safety_poll_s=3600.0)

    for module in (memory, redis_streams):
        monkeypatch.setattr(module, "wait_notified", wait)


async def waiting(q, monkeypatch, job_id: str, timeout_s: float) -> asyncio.Task:
    """A task waiting for ``job_id`` to finish, returned once it has read the job unfinished and waits."""
    reads: list[JobStatus | None] = []
    get = q.get

    async def spy(read_id: str) -> Job | None:
        job = await get(read_id)
        reads.append(job.status if job else None)
        return job

    monkeypatch.setattr(q, "get", spy)
    waiter = asyncio.create_task(q.wait_finished(job_id, timeout_s))
    deadline = time.monotonic() + 30
    while not reads:  # the waiter goes from its read straight to waiting, without yielding
        assert time.monotonic() < deadline and not waiter.done()
        await asyncio.sleep(0.01)
    assert reads == [JobStatus.QUEUED]
    return waiter


async def test_wait_finished_wakes_when_the_job_finishes(queue, monkeypatch, woken_only_by_notification):
    job = await enqueue(queue)
    t0 = time.monotonic()
    assert (await queue.wait_finished(job.id, 0.3)).status is JobStatus.QUEUED  # times out
    assert 0.25 <= time.monotonic() - t0 < 5
    await queue.read("w1", [MODEL], count=8, block_ms=100)
    waiter = await waiting(queue, monkeypatch, job.id, timeout_s=60)
    await finish(queue, job, {"captions": []})
    finished_at = time.monotonic()
    waited = await waiter
    assert waited.status is JobStatus.DONE
    assert time.monotonic() - finished_at < 30  # woken by the notification: the timeout is 60 s
    assert await queue.wait_finished("no-such-job", 1) is None


async def test_cancel_wakes_waiters(queue, monkeypatch, woken_only_by_notification):
    job = await enqueue(queue)
    waiter = await waiting(queue, monkeypatch, job.id, timeout_s=60)
    t0 = time.monotonic()
    await queue.cancel(job.id)
    assert (await waiter).status is JobStatus.CANCELLED and time.monotonic() - t0 < 30
    assert await queue.image(job.id) is None


# ------------------------------------------------------------------------------------------------
# Consumer: deliveries read, acknowledged, renewed and taken over


async def test_read_start_finish_ack_lifecycle(queue):
    job = await enqueue(queue)
    [d] = await queue.read("w1", [MODEL], count=8, block_ms=100)
    assert d.job_id == job.id and d.model == MODEL
    started = await queue.start(job.id)
    assert started.status is JobStatus.RUNNING and started.deliveries == 1
    assert await queue.depth([MODEL]) == 1  # read but not acknowledged still counts
    started.status, started.result, started.finished_at = JobStatus.DONE, {"captions": [1]}, time.time()
    await queue.finish(started)
    await queue.ack([d])
    got = await queue.get(job.id)
    assert got.status is JobStatus.DONE and got.result == {"captions": [1]}
    assert await queue.depth([MODEL]) == 0
    assert await queue.read("w1", [MODEL], count=8, block_ms=50) == []


async def test_read_batches_up_to_count_in_order(queue):
    jobs = [await enqueue(queue) for _ in range(5)]
    first = await queue.read("w1", [MODEL], count=3, block_ms=100)
    rest = await queue.read("w1", [MODEL], count=3, block_ms=100)
    assert [d.job_id for d in first + rest] == [j.id for j in jobs]
    assert (len(first), len(rest)) == (3, 2)


async def test_read_only_returns_the_consumers_models(queue):
    other = await enqueue(queue, contract_job(model="ViT-B-16"))
    assert await queue.read("w1", [MODEL], count=8, block_ms=50) == []
    [d] = await queue.read("w2", ["ViT-B-16"], count=8, block_ms=50)
    assert d.job_id == other.id


async def test_read_waits_up_to_block_ms_when_empty(queue):
    t0 = time.monotonic()
    assert await queue.read("w1", [MODEL], count=8, block_ms=300) == []
    assert 0.25 <= time.monotonic() - t0 < 2.0


async def test_unacknowledged_entries_are_claimed_after_the_visibility_timeout(queue):
    job = await enqueue(queue)
    [d] = await queue.read("dead-worker", [MODEL], count=8, block_ms=100)
    await queue.start(job.id)
    assert await queue.claim_stale("w2", [MODEL], min_idle_s=WINDOW_S, count=8) == []
    time.sleep(PAST_WINDOW_S)
    [claimed] = await queue.claim_stale("w2", [MODEL], min_idle_s=WINDOW_S, count=8)
    assert claimed.job_id == job.id and claimed.entry_id == d.entry_id
    again = await queue.start(job.id)
    assert again.status is JobStatus.RUNNING and again.deliveries == 2  # counts towards max_deliveries
    await queue.ack([claimed])
    assert await queue.claim_stale("w3", [MODEL], min_idle_s=0.0, count=8) == []


async def test_renewed_entries_are_not_claimed_while_their_worker_lives(queue):
    job = await enqueue(queue)
    [d] = await queue.read("busy-worker", [MODEL], count=8, block_ms=100)
    await queue.start(job.id)
    time.sleep(PAST_WINDOW_S)
    await queue.renew("busy-worker", [d])
    assert await queue.claim_stale("w2", [MODEL], min_idle_s=WINDOW_S, count=8) == []
    time.sleep(PAST_WINDOW_S)
    # No renewal: taken over.
    [claimed] = await queue.claim_stale("w2", [MODEL], min_idle_s=WINDOW_S, count=8)
    assert claimed.entry_id == d.entry_id
    await queue.renew("busy-worker", [d])  # the old holder cannot take it back
    assert await queue.claim_stale("w3", [MODEL], min_idle_s=WINDOW_S, count=8) == []
    time.sleep(PAST_WINDOW_S)
    [again] = await queue.claim_stale("w3", [MODEL], min_idle_s=WINDOW_S, count=8)
    assert again.entry_id == d.entry_id


# ------------------------------------------------------------------------------------------------
# WorkerRegistry: heartbeats


async def test_heartbeats_list_live_workers_only(queue):
    await queue.heartbeat("w1", {"name": "w1", "models": [{"name": MODEL}]}, ttl_s=WINDOW_S)
    await queue.heartbeat("w2", {"name": "w2", "models": []}, ttl_s=30)
    assert sorted(w["name"] for w in await queue.workers()) == ["w1", "w2"]
    time.sleep(PAST_WINDOW_S)
    assert [w["name"] for w in await queue.workers()] == ["w2"]
    await queue.remove_worker("w2")
    assert await queue.workers() == []


# ------------------------------------------------------------------------------------------------
# MetricsStore: shared counters


async def test_metrics_accumulate_across_calls(queue):
    await queue.add_metrics({"jobs:done": 1, "compute_seconds:sum": 0.25})
    await queue.add_metrics({"jobs:done": 2, "compute_seconds:sum": 0.5})
    await enqueue(queue)
    metrics = await queue.read_metrics()
    assert metrics["jobs:done"] == 3 and metrics["compute_seconds:sum"] == pytest.approx(0.75)
    assert metrics["jobs_enqueued"] == 1


# ------------------------------------------------------------------------------------------------
# ImageStore: uploads, within the byte budget


async def test_images_are_kept_byte_exact_and_unknown_ones_are_none(queue):
    data = bytes(range(256)) * 3
    job = await enqueue(queue, image=data)
    assert await queue.image(job.id) == data
    assert await queue.image("no-such-job") is None


async def finish(q, job: Job, result: dict | None = None, status: JobStatus = JobStatus.DONE) -> Job:
    started = await q.start(job.id)
    started.status, started.result, started.finished_at = status, result, time.time()
    await q.finish(started)
    return started


async def test_byte_budget_evicts_finished_images_then_results_oldest_first(budget_queue):
    q = budget_queue  # 1000 bytes; each result below is 56 bytes of JSON
    jobs = [await enqueue(q, image=bytes([i]) * 250) for i in range(3)]  # 750 bytes of queued images
    with pytest.raises(QueueFull, match="EXCLIP_MAX_STORED_BYTES"):  # unfinished images are never evicted
        await q.enqueue(contract_job(), b"x" * 300, max_depth=100, depth_models=[MODEL])
    await q.read("w1", [MODEL], count=8, block_ms=100)
    for j in jobs:
        await finish(q, j, {"captions": ["r" * 40]})  # 918 bytes stored
    assert [await q.image(j.id) for j in jobs] == [bytes([i]) * 250 for i in range(3)]  # kept for heatmaps
    newer = await enqueue(q, image=b"n" * 250)  # the oldest finished image makes room
    assert await q.image(jobs[0].id) is None and await q.image(jobs[1].id) == b"\x01" * 250
    assert await q.image(newer.id) == b"n" * 250
    failed = await enqueue(q, image=b"f" * 250)  # evicts image 1
    await q.read("w1", [MODEL], count=8, block_ms=100)
    await finish(q, failed, status=JobStatus.FAILED)
    assert await q.image(failed.id) is None  # a failed job has no heatmap: its image goes at once
    big = await enqueue(q, image=b"b" * 650)  # needs image 2 and then the two oldest results
    assert [await q.image(j.id) for j in jobs] == [None, None, None]
    assert await q.image(big.id) == b"b" * 650 and await q.image(newer.id) == b"n" * 250
    kept = [await q.get(j.id) for j in jobs]
    assert [(j.status, j.evicted, j.result is None) for j in kept] == [
        (JobStatus.DONE, True, True),
        (JobStatus.DONE, True, True),
        (JobStatus.DONE, False, False),
    ]
