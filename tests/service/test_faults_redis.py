"""Redis that hangs, stalls, loses its data or crashes under real API and worker processes:

- Redis hanging (SIGSTOP, connections accepted but never answered): 503 + Retry-After within the
  socket timeout, /readyz not ready, and recovery once Redis answers again; a client waiting on a job
  while Redis stalls gets 202 with the job;
- the stream expiring under idle workers, the database flushed mid-batch, the group destroyed, Redis
  restarted empty: the workers log, recreate and go on, and lost jobs are never written back;
- a crash with append-only persistence: queued jobs survive and complete once.

Jobs that must be running while Redis fails are held there by a ``WorkerHold``.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.redis_keys import GROUP, Keys
from testing import RedisServer, ServiceLauncher, distinct_captions
from tests.service.conftest import png_bytes
from tests.service.faults_common import (
    STREAM_MODEL,
    explain_now,
    pending,
    submit,
    wait_finished,
    wait_for,
    wait_running,
)


def test_hanging_redis_gives_503_quickly_and_everything_recovers(private_stack):
    server, launch = private_stack
    api = launch.api(EXCLIP_REDIS_TIMEOUT_S="1")
    worker = launch.worker(EXCLIP_REDIS_TIMEOUT_S="1")
    api.wait_ready()
    server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        t0 = time.monotonic()
        r = httpx.post(
            api.url + "/explain",
            files={"image": ("x.png", png_bytes())},
            data={"caption": "a dog"},
            timeout=30,
        )
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert "Redis" in r.json()["detail"] and int(r.headers["Retry-After"]) > 0
        assert elapsed < 8, f"the API hung for {elapsed:.1f}s"
        ready = httpx.get(api.url + "/readyz", timeout=30)
        assert ready.status_code == 503 and "queue unreachable" in ready.json()["reason"]
        assert httpx.get(api.url + "/healthz", timeout=5).status_code == 200
        wait_for(lambda: "queue unavailable" in worker.output, 60, "the worker to meet the timeout")
        assert api.alive() and worker.alive()
    finally:
        server.proc.send_signal(signal.SIGCONT)
    api.wait_ready(timeout_s=60)
    r = httpx.post(
        api.url + "/explain",
        files={"image": ("x.png", png_bytes())},
        data={"caption": "a dog", "steps": "2"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["status"] == "done", r.text


def test_a_redis_stall_while_a_client_waits_answers_202_with_the_job(private_stack, worker_hold):
    server, launch = private_stack
    api = launch.api(EXCLIP_REDIS_TIMEOUT_S="1")
    launch.worker(EXCLIP_REDIS_TIMEOUT_S="1", **worker_hold.env)
    api.wait_ready()
    answer: dict[str, httpx.Response] = {}

    def explain() -> None:
        answer["r"] = httpx.post(
            api.url + "/explain",
            files={"image": ("x.png", png_bytes())},
            data={"caption": distinct_captions("a dog on the grass", 4), "wait": "60"},
            timeout=90,
        )

    thread = threading.Thread(target=explain)
    thread.start()
    r = server.client()
    wait_for(lambda: any(r.hget(k, "status") == "running" for k in r.scan_iter("*:job:*")), 60, "the job")
    server.proc.send_signal(signal.SIGSTOP)
    try:
        thread.join(30)
        assert "r" in answer, "no answer while Redis stalled"
    finally:
        server.proc.send_signal(signal.SIGCONT)
    reply = answer["r"]
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    assert reply.headers["Location"] == f"/jobs/{job_id}" and "GET /jobs" in reply.json()["detail"]
    worker_hold.release()
    [done] = wait_finished(api.url, [job_id], timeout_s=120)
    assert done["status"] == "done"


def stream_expired(r, stream: str) -> bool:
    """The stream that held jobs is gone: no key, or the empty one a worker re-creates (no id ever)."""
    try:
        return r.xinfo_stream(stream)["last-generated-id"] == "0-0"
    except redis.ResponseError:  # no such key
        return True


def reads_answered(r) -> int:
    """XREADGROUP calls Redis has answered so far (a blocked one counts once it is answered)."""
    stats = r.info("commandstats").get("cmdstat_xreadgroup", {})
    return stats.get("calls", 0) + stats.get("rejected_calls", 0)


def test_idle_worker_survives_its_stream_expiring(private_stack):
    """The stream expires EXCLIP_RESULT_TTL_S after its last job, while idle workers block reading it.

    A private Redis with few keys, so its active expiry (not a later read) removes the stream while the
    worker is blocked in XREADGROUP; checked twice, as the worker could be between two reads once. Only
    the worker reads the stream, so two more answered reads after the expiry mean its blocked read was
    answered and it read again.
    """
    server, launch = private_stack
    api = launch.api(EXCLIP_RESULT_TTL_S="2")
    worker = launch.worker(EXCLIP_RESULT_TTL_S="2")
    api.wait_ready()
    r = server.client()
    stream = Keys(launch.key_prefix).stream(STREAM_MODEL)
    for seed, caption in enumerate(("a dog", "a cat")):
        assert explain_now(api.url, caption, seed=seed)["status"] == "done"
        wait_for(lambda: stream_expired(r, stream), 30, "the stream to expire")
        expired_at = reads_answered(r)
        wait_for(lambda n=expired_at: reads_answered(r) >= n + 2, 60, "the worker to read on")
        assert worker.alive(), worker.output[-3000:]
    assert explain_now(api.url, "a bird", seed=2)["status"] == "done"


def lost(url: str, job_id: str) -> bool:
    r = httpx.get(f"{url}/jobs/{job_id}", timeout=10)
    return r.status_code == 404 and "unknown, expired or lost" in r.json()["detail"]


def submit_when_served(url: str, captions: list[str], steps: int, seed: int = 0) -> str:
    """Submit once a worker is advertised again (after Redis lost the heartbeats)."""

    def attempt() -> str | None:
        r = httpx.post(
            url + "/jobs",
            files={"image": ("x.png", png_bytes(seed=seed))},
            data={"caption": captions, "steps": str(steps)},
            timeout=30,
        )
        return r.json()["id"] if r.status_code == 202 else None

    return wait_for(attempt, 60, "a worker to be advertised", 0.2)


@pytest.mark.slow
def test_workers_survive_a_flushed_database_a_lost_group_and_an_empty_restart(private_stack, worker_hold):
    """Whatever Redis loses under a worker — mid-batch or idle — it logs, recreates and goes on; the jobs
    lost with the data are 404 "unknown or lost" and their results are never written anywhere."""
    server, launch = private_stack
    api = launch.api(EXCLIP_REDIS_TIMEOUT_S="1")
    worker = launch.worker(EXCLIP_REDIS_TIMEOUT_S="1", **worker_hold.env)
    api.wait_ready()
    r, keys = server.client(), Keys(launch.key_prefix)

    flushed = submit(api.url, distinct_captions("a dog on the grass", 4))
    wait_running(api.url, flushed)  # held: the flush lands mid-batch
    r.flushall()  # record, image, stream and group all go
    assert lost(api.url, flushed)
    wait_for(lambda: "vanished under" in worker.output, 60, "the heartbeat to notice the lost batch")
    worker_hold.release()
    after_flush = submit_when_served(api.url, ["a cat"], steps=2)
    assert wait_finished(api.url, [after_flush])[0]["status"] == "done"  # so the held batch is finished
    assert not r.exists(keys.job(flushed)), "a lost job's result was written into a new record"

    r.xgroup_destroy(keys.stream(STREAM_MODEL), GROUP)  # idle: the group alone goes
    no_group = submit(api.url, ["a bird"], steps=2, seed=1)
    assert wait_finished(api.url, [no_group])[0]["status"] == "done"

    worker_hold.engage()
    restarted = submit(api.url, distinct_captions("a dog on the grass", 4), seed=2)
    wait_running(api.url, restarted)
    server.stop()
    server.start()  # same port, empty: no persistence
    api.wait_ready(timeout_s=60)
    assert lost(api.url, restarted)
    worker_hold.release()
    after_restart = submit_when_served(api.url, ["a fish"], steps=2, seed=3)
    assert wait_finished(api.url, [after_restart], timeout_s=180)[0]["status"] == "done"
    assert worker.alive() and "Traceback" not in worker.output, worker.output[-3000:]
    assert not r.exists(keys.job(restarted))


class AofRedisServer(RedisServer):
    """A private redis-server with append-only persistence (fsync every second), as deployed."""

    def __init__(self, data_dir) -> None:
        super().__init__()
        self.persistence = (
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(data_dir),
        )


def in_append_only_files(directory: Path, ids: list[str]) -> bool:
    """Every id is written in the append-only files (where a killed server reads it back from)."""
    written = b"".join(p.read_bytes() for p in directory.rglob("*.aof*"))
    return all(i.encode() in written for i in ids)


def test_queued_jobs_survive_a_redis_crash_with_aof_and_complete_once(key_prefix, tiny_checkpoint, tmp_path):
    server = AofRedisServer(tmp_path / "aof")
    (tmp_path / "aof").mkdir()
    server.start()
    launch = ServiceLauncher(server.url, key_prefix, tiny_checkpoint, tmp_path)
    try:
        api = launch.api()
        worker = launch.worker(EXCLIP_HEARTBEAT_S="60")  # its heartbeat outlives the pause below
        api.wait_ready()
        worker.send_signal(signal.SIGSTOP)  # jobs stay queued
        try:
            ids = [submit(api.url, [f"a dog number {i}"], steps=2, seed=i) for i in range(3)]
            wait_for(lambda: in_append_only_files(tmp_path / "aof", ids), 30, "the jobs in the AOF")
            server.proc.kill()  # a crash, not a clean shutdown
            server.proc.wait(10)
            server.start()
        finally:
            worker.send_signal(signal.SIGCONT)
        jobs = wait_finished(api.url, ids, timeout_s=120)
        assert [j["status"] for j in jobs] == ["done"] * 3, [j["error"] for j in jobs]
        r = server.client()
        assert [r.hget(Keys(key_prefix).job(i), "deliveries") for i in ids] == ["1"] * 3  # computed once
        assert float(r.hget(Keys(key_prefix).metrics, "jobs:done")) == 3
        assert pending(r, key_prefix) == []
    finally:
        launch.close()
        server.stop()
