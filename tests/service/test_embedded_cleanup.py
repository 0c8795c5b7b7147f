"""Embedded mode drops expired jobs on its own: the worker's read loop purges the in-memory queue at
least once a second, so a finished job's image and result do not outlive their TTL just because
nobody asks for them again (issue 10: "periodic clean-up, not only on access").

Neither test reads the job back (``get``/``image`` purge too): only what the worker loop calls runs.
"""

from __future__ import annotations

import asyncio
import time

from service.jobs import JobStatus
from service.queue.memory import PURGE_EVERY_S, MemoryQueue
from tests.service.conftest import embedded_in_process, make_job, png_bytes

MODEL = "exclip-tiny"


def test_the_read_loop_drops_a_finished_job_after_its_ttl():
    """Enqueue, read, start, finish (image and result kept for the heatmap); after the TTL the next
    ``read`` (the worker's call, for no job at all) leaves no bytes and no record behind."""

    async def scenario() -> None:
        queue = MemoryQueue(ttl_s=1)
        job = make_job(owner="h")
        await queue.enqueue(job, b"i" * 500, max_depth=10, depth_models=[MODEL])
        [delivery] = await queue.read("w1", [MODEL], count=8, block_ms=100)
        started = await queue.start(job.id)
        assert started is not None
        started.status, started.result, started.finished_at = JobStatus.DONE, {"captions": ["r"]}, time.time()
        await queue.finish(started)
        await queue.ack([delivery])
        assert queue.stored_bytes() > 500  # the image is kept for the heatmap, with the result

        await asyncio.sleep(max(1.0, PURGE_EVERY_S) + 0.2)  # past the TTL and the purge period
        assert queue.stored_bytes() > 500  # expired but still held: nothing purged by itself yet
        assert await queue.read("w1", [MODEL], count=8, block_ms=0) == []
        assert queue.stored_bytes() == 0
        assert job.id not in queue._jobs and job.id not in queue._images

    asyncio.run(scenario())


def test_the_embedded_worker_drops_expired_jobs_nobody_reads(tiny_loaded, monkeypatch):
    """The real embedded app (API + worker loop), EXCLIP_RESULT_TTL_S=3: a job done through
    POST /explain is gone from the queue within a few seconds with no request touching it.

    3 s, not less: the job must still be held when the test first looks, however slowly it gets there.
    """
    monkeypatch.setenv("EXCLIP_RESULT_TTL_S", "3")
    with embedded_in_process(tiny_loaded) as client:
        queue = client.app.state.queue
        r = client.post(
            "/explain",
            files={"image": ("x.png", png_bytes(64, 48, seed=5), "image/png")},
            data={"caption": "a dog", "wait": "30"},
        )
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        job_id = r.json()["id"]

        def held() -> tuple[int, bool]:  # read on the app's event loop, never beside the worker's changes
            return queue.stored_bytes(), job_id in queue._jobs or job_id in queue._images

        stored, present = client.portal.call(held)
        assert stored > 0 and present
        deadline = time.monotonic() + 30  # TTL 3 s + a purge at least once a second, on a busy machine
        while client.portal.call(held) != (0, False) and time.monotonic() < deadline:
            time.sleep(0.1)  # only the worker runs meanwhile: no request reads the job
        assert client.portal.call(held) == (0, False)
