"""Redis that refuses writes — out of memory (``maxmemory`` with ``noeviction``, as deployed) or unable
to persist (``MISCONF``: a full disk) — against a real private ``redis-server``, API and worker.

Every route that writes answers 503 with the reason (JSON, ``Retry-After``), not a plain-text 500; no
job is accepted that could not be started; the worker, whose heartbeat cannot be stored, takes no
jobs; and everything comes back by itself once memory (or disk) is freed.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest
import redis

from testing import RedisServer, ServiceLauncher
from tests.service.conftest import png_bytes

MAXMEMORY = 8 * 1024 * 1024
FILLER = 64 * 1024


class FullRedis(RedisServer):
    """A private redis-server with the deployed eviction policy and a small ``maxmemory``."""

    def __init__(self, *args: str) -> None:
        super().__init__()
        self.persistence = (*args, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")


def _fill(r: redis.Redis) -> None:
    """Write filler keys until Redis refuses one, then lower ``maxmemory`` a little below what is used:
    Redis is over its limit (as after a burst of large results), so it refuses every write that could
    grow its memory, the heartbeat's included."""
    n = 0
    try:
        while n < 4 * MAXMEMORY // FILLER:
            r.set(f"filler:{n}", b"f" * FILLER)
            n += 1
    except redis.exceptions.OutOfMemoryError:
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 4 * FILLER)
        return
    raise AssertionError("maxmemory was never reached")


def _write_routes(client: httpx.Client) -> dict[str, httpx.Response]:
    upload = {"files": {"image": ("x.png", png_bytes())}, "data": {"caption": "a dog", "wait": "30"}}
    setup = {"project": "7", "hostname": "http://label-studio:8080", "access_token": "t"}
    return {
        "/explain": client.post("/explain", **upload),
        "/jobs": client.post("/jobs", **upload),
        "/label-studio/setup": client.post("/label-studio/setup", json=setup),
    }


def _assert_refused(responses: dict[str, httpx.Response], reason: str) -> None:
    for path, r in responses.items():
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", (path, r.text)
        assert reason in r.json()["detail"] and int(r.headers["Retry-After"]) > 0, (path, r.text)


def _explains(client: httpx.Client, timeout_s: float = 90) -> httpx.Response:
    """POST /explain until it is answered 200 (recovery is not instant: heartbeats, then the cache)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.post(
            "/explain", files={"image": ("x.png", png_bytes())}, data={"caption": "a dog", "wait": "30"}
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(1)


def _stack(server: RedisServer, tiny_checkpoint: str, key_prefix: str, tmp_path: Path):
    launcher = ServiceLauncher(server.url, key_prefix, tiny_checkpoint, tmp_path)
    api = launcher.api(EXCLIP_HEARTBEAT_S="1")
    worker = launcher.worker(EXCLIP_HEARTBEAT_S="1")
    api.wait_ready(timeout_s=120)
    return launcher, api, worker


@pytest.mark.slow  # an API and a worker start: about 20 s on a busy 2-core machine
def test_out_of_memory_answers_503_accepts_no_job_and_recovers(tiny_checkpoint, key_prefix, tmp_path):
    server = FullRedis("--save", "", "--appendonly", "no")
    server.start()
    launcher, api, worker = _stack(server, tiny_checkpoint, key_prefix, tmp_path)
    r = server.client()
    jobs = f"{key_prefix}:job:*"
    try:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            assert _explains(client).status_code == 200
            accepted = len(r.keys(jobs))
            _fill(r)
            _assert_refused(_write_routes(client), "memory")
            assert len(r.keys(jobs)) == accepted, "a job was accepted into a Redis that cannot run it"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "memory" in ready.json()["reason"]
            assert client.get("/healthz").status_code == 200
            time.sleep(4)  # more than the heartbeat's lifetime (3 periods of 1 s)
            assert worker.alive() and api.alive()
            assert "not taking jobs until a heartbeat is stored again" in worker.output
            _assert_refused(_write_routes(client), "memory")  # still a reason, not "no worker"

            r.delete(*r.keys("filler:*"))  # memory freed: no operator touches the service
            recovered = _explains(client)
            assert recovered.status_code == 200, recovered.text
            assert recovered.json()["status"] == "done"
        for proc in (api, worker):
            assert "Traceback" not in proc.output, proc.log_tail(40)
    finally:
        launcher.close()
        server.stop()


@pytest.mark.slow
def test_a_redis_that_cannot_persist_answers_503_and_recovers(tiny_checkpoint, key_prefix, tmp_path):
    """MISCONF (here: an RDB snapshot that fails because its directory is gone; a full disk under AOF
    is refused the same way) stops every write until a snapshot succeeds again."""
    data = tmp_path / "redis-data"
    data.mkdir()
    server = FullRedis(
        "--save", "3600 1", "--appendonly", "no", "--dir", str(data), "--enable-protected-configs", "yes"
    )
    server.start()
    launcher, api, worker = _stack(server, tiny_checkpoint, key_prefix, tmp_path)
    r = server.client()
    try:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            assert _explains(client).status_code == 200
            shutil.rmtree(data)
            r.bgsave()
            deadline = time.monotonic() + 20
            while r.info("persistence")["rdb_last_bgsave_status"] != "err":
                assert time.monotonic() < deadline, "the snapshot did not fail"
                time.sleep(0.1)
            _assert_refused(_write_routes(client), "persist")

            data.mkdir()  # the disk is back (Redis's working directory was the removed one: enter it again)
            r.config_set("dir", str(data))
            r.bgsave()  # succeeds: Redis takes writes again
            recovered = _explains(client)
            assert recovered.status_code == 200, recovered.text
        for proc in (api, worker):
            assert "Traceback" not in proc.output, proc.log_tail(40)
    finally:
        launcher.close()
        server.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_worker_holding_a_job_waits_for_room_and_computes_it_once(tiny_loaded, key_prefix):
    """The worker read a job, then Redis filled up: starting it is refused. The worker keeps the job
    (no redelivery after the visibility timeout, no delivery counted twice) and computes it once
    memory is freed."""
    from service.connections import create_queue
    from service.jobs import JobStatus
    from service.settings import Settings
    from service.worker import Worker
    from tests.service.conftest import make_job

    server = FullRedis("--save", "", "--appendonly", "no")
    server.start()
    settings = Settings(
        redis_url=server.url, key_prefix=key_prefix, heartbeat_s=0.2, redis_timeout_s=1, worker_name="w"
    )
    queue = create_queue(settings)
    r = server.client()
    try:
        job = make_job(steps=2)
        await queue.enqueue(job, png_bytes(), max_depth=10, depth_models=[job.model])
        deliveries = await queue.read("w", [job.model], 8, 100)
        assert [d.job_id for d in deliveries] == [job.id]
        _fill(r)
        worker = Worker(queue, [tiny_loaded], settings)
        processing = asyncio.create_task(worker._process(deliveries))
        await asyncio.sleep(1.5)
        assert not processing.done() and (await queue.get(job.id)).status is JobStatus.QUEUED
        r.delete(*r.keys("filler:*"))
        await asyncio.wait_for(processing, 60)
        done = await queue.get(job.id)
        assert done.status is JobStatus.DONE and done.deliveries == 1, (done.status, done.error)
    finally:
        await queue.close()
        server.stop()
