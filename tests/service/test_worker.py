"""The ``Worker`` in process, on the in-memory queue, with the tiny model (as arq's tests/test_worker.py).

Real jobs, real engine calls: batching of compatible jobs, a failing batch retried job by job, poison
jobs, the compute deadline, jobs whose record is gone, the warm-up before the first heartbeat. The
split on out-of-memory with a real allocation failure needs an address-space cap, so it runs on a
worker process (tests/service/test_faults.py).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from attribution.pipeline import explain_requests
from attribution.selections import Span
from service.errors import Fault, JobTimeout
from service.jobs import Job, JobStatus
from service.queue.memory import MemoryQueue
from service.settings import Settings
from service.timeouts import call_with_deadline
from service.worker import Worker
from testing import distinct_captions
from tests.service.conftest import make_job, png_bytes

pytestmark = pytest.mark.anyio
MODEL = "exclip-tiny"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(**kw) -> Settings:
    base = {
        "max_batch": 8,
        "max_wait_ms": 0,
        "heartbeat_s": 0.2,
        "redis_timeout_s": 0.4,
        "visibility_timeout_s": 60,
        "worker_name": "w-test",
    }
    return Settings(**{**base, **kw})


async def enqueue(q: MemoryQueue, job: Job, seed: int = 0) -> Job:
    await q.enqueue(job, png_bytes(seed=seed), max_depth=100, depth_models=[MODEL])
    return job


async def run_until_finished(
    worker: Worker, q: MemoryQueue, ids: list[str], timeout_s: float = 120
) -> list[Job]:
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            jobs = [await q.get(i) for i in ids]
            if all(j is not None and j.status.finished for j in jobs):
                return jobs
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
        raise AssertionError(f"jobs not finished after {timeout_s}s: {[j.status for j in jobs]}")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


def compute_ms(job: Job) -> float:
    return job.result["captions"][0]["timings"]["compute_ms"]


async def test_compatible_jobs_are_computed_in_one_call_per_group(tiny_loaded):
    q = MemoryQueue(ttl_s=600)
    two = [await enqueue(q, make_job(["a dog"], steps=2), seed=i) for i in range(3)]
    three = [await enqueue(q, make_job(["a cat", "a bird"], steps=3), seed=10 + i) for i in range(2)]
    jobs = await run_until_finished(Worker(q, [tiny_loaded], settings()), q, [j.id for j in two + three])
    assert [j.status for j in jobs] == [JobStatus.DONE] * 5
    metrics = await q.read_metrics()
    assert (metrics["batch_size:count"], metrics["batch_size:sum"]) == (2, 5)  # one call per group
    assert len({compute_ms(j) for j in jobs[:3]}) == 1 and len({compute_ms(j) for j in jobs[3:]}) == 1
    assert compute_ms(jobs[0]) != compute_ms(jobs[3])
    # The batched result is the engine's result for that job alone.
    import io

    from PIL import Image

    [[alone]] = explain_requests(
        tiny_loaded,
        [two[1].request.explain_request(Image.open(io.BytesIO(png_bytes(seed=1))).convert("RGB"))],
        **two[1].request.engine_options,
    )
    got = jobs[1].result["captions"][0]
    assert got["score"] == pytest.approx(alone.result.score, rel=1e-5, abs=1e-6)
    assert got["completeness"]["total"] == pytest.approx(alone.result.completeness.total, rel=1e-4, abs=1e-6)


async def test_a_failing_batch_is_retried_job_by_job(tiny_loaded, caplog):
    q = MemoryQueue(ttl_s=600)
    good1 = await enqueue(q, make_job(["a dog"]), seed=1)
    # Never validated by an API: its span lies past the caption, so the engine call for the batch raises.
    bad = await enqueue(q, make_job(["a cat"], selections=(Span(50, 60),)), seed=2)
    good2 = await enqueue(q, make_job(["a bird"]), seed=3)
    jobs = await run_until_finished(Worker(q, [tiny_loaded], settings()), q, [good1.id, bad.id, good2.id])
    assert [j.status for j in jobs] == [JobStatus.DONE, JobStatus.FAILED, JobStatus.DONE]
    assert jobs[1].error["type"] == "InvalidSelection" and jobs[1].fault is Fault.CLIENT
    assert "retrying it job by job" in caplog.text
    metrics = await q.read_metrics()
    assert (metrics["batch_size:count"], metrics["batch_size:sum"]) == (2, 2)  # the two good ones, alone
    assert metrics["jobs:failed"] == 1 and metrics["jobs:done"] == 2
    assert await q.depth([MODEL]) == 0  # all acknowledged


async def test_a_job_redelivered_too_often_is_failed_as_poison(tiny_loaded):
    q = MemoryQueue(ttl_s=600)
    job = await enqueue(q, make_job(["a dog"]))
    [d] = await q.read("crashed-worker", [MODEL], count=1, block_ms=100)  # delivered, started, never acked
    assert (await q.start(d.job_id)).deliveries == 1
    worker = Worker(q, [tiny_loaded], settings(visibility_timeout_s=0.3, max_deliveries=1))
    [failed] = await run_until_finished(worker, q, [job.id])
    assert failed.status is JobStatus.FAILED and failed.error["type"] == "PoisonJob"
    assert "EXCLIP_MAX_DELIVERIES=1" in failed.error["message"] and failed.fault is Fault.SERVER
    assert failed.deliveries == 2 and await q.depth([MODEL]) == 0


async def test_the_deadline_fails_a_slow_job_and_the_worker_goes_on(tiny_loaded):
    q = MemoryQueue(ttl_s=600)
    # About 12 s of compute on an idle 2-core machine: 24 times the limit, so it is cut off on any
    # machine that is not 24 times faster, and after it, the limit is what bounds the test's time.
    slow = await enqueue(
        q, make_job(distinct_captions("a dog running on the beach near the sea", 16), steps=20000), seed=1
    )
    worker = Worker(q, [tiny_loaded], settings(job_timeout_s=0.5, max_batch=1))
    t0 = time.monotonic()
    [failed] = await run_until_finished(worker, q, [slow.id])
    assert failed.status is JobStatus.FAILED and failed.error["type"] == "JobTimeout"
    assert "EXCLIP_JOB_TIMEOUT_S" in failed.error["message"]
    assert time.monotonic() - t0 < 30  # it was stopped, not run to the end
    after = await enqueue(q, make_job(["a cat"]), seed=2)
    [done] = await run_until_finished(Worker(q, [tiny_loaded], settings(job_timeout_s=0.5)), q, [after.id])
    assert done.status is JobStatus.DONE


async def test_a_job_whose_record_is_gone_is_not_computed_and_its_entry_is_dropped(tiny_loaded):
    q = MemoryQueue(ttl_s=1)
    lost = await enqueue(q, make_job(["a dog"]))
    await asyncio.sleep(1.2)  # the record expires before any worker reads the entry
    assert await q.get(lost.id) is None
    kept = await enqueue(q, make_job(["a cat"]), seed=1)
    q.ttl_s = 600
    worker = Worker(q, [tiny_loaded], settings())
    [done] = await run_until_finished(worker, q, [kept.id])
    assert done.status is JobStatus.DONE and await q.get(lost.id) is None
    assert await q.depth([MODEL]) == 0
    assert (await q.read_metrics())["batch_size:sum"] == 1  # only the kept job was computed


async def test_the_worker_warms_up_before_its_first_heartbeat(tiny_loaded, caplog):
    caplog.set_level("INFO", logger="exclip.worker")
    q = MemoryQueue(ttl_s=600)
    worker = Worker(q, [tiny_loaded], settings())
    task = asyncio.create_task(worker.run())
    try:
        while not await q.workers():
            await asyncio.sleep(0.01)
        assert "warmed up exclip-tiny" in caplog.text  # logged before the first heartbeat was written
    finally:
        worker.stop()
        await task


def test_call_with_deadline_interrupts_python_code_and_never_fires_late():
    def spin() -> None:
        while True:
            sum(range(1000))

    t0 = time.monotonic()
    with pytest.raises(JobTimeout, match="limit of 0.2 s"):
        call_with_deadline(spin, 0.2)
    assert time.monotonic() - t0 < 5
    timers_before = {t for t in threading.enumerate() if isinstance(t, threading.Timer)}
    assert call_with_deadline(lambda: 42, 0.2) == 42
    # Until its timer thread has ended: a timer that fired now would raise here, in this thread.
    deadline = time.monotonic() + 30
    while any(isinstance(t, threading.Timer) for t in set(threading.enumerate()) - timers_before):
        assert time.monotonic() < deadline, "the deadline's timer thread never ended"
        time.sleep(0.01)
