"""Fault tests with real processes and a private Redis: what tests/service/test_reliability.py and
test_queue_limit.py do not already cover.

- a worker SIGKILLed in the middle of a batch of several jobs: every job stays pending, another worker
  claims them all after the visibility timeout, and the stream is trimmed only once they are done;
- poison jobs: a job whose worker dies every time is failed after EXCLIP_MAX_DELIVERIES; a job that
  fails in the worker (image deleted or replaced in Redis after the API accepted it) fails with its
  reason while the jobs batched with it complete in the same engine call;
- Redis hanging (SIGSTOP, connections accepted but never answered): 503 + Retry-After within the
  socket timeout, /readyz not ready, and recovery once Redis answers again;
- SIGTERM to the API while a long ``wait`` request is in flight: that request still gets its result;
- the upload limit enforced while reading a chunked body (no Content-Length) and the selection count;
- every key written by real API and worker processes expires.

Slow batches use the tiny model with many integration steps (EXCLIP_MAX_STEPS raised), which costs
seconds of compute but no model loading.
"""

from __future__ import annotations

import resource
import select
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import redis

from service.keys import GROUP, METRICS_TTL_S, Keys
from testing import RedisServer, ServiceLauncher, distinct_captions
from tests.service.conftest import b64, png_bytes

STREAM_MODEL = "exclip-tiny"
SLOW = {"EXCLIP_MAX_STEPS": "20000"}
TTL_S = 300


def submit(url: str, captions: list[str], steps: int, seed: int = 0, **data: str) -> str:
    r = httpx.post(
        url + "/jobs",
        files={"image": ("x.png", png_bytes(seed=seed))},
        data={"caption": captions, "steps": str(steps), **data},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job(url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def wait_running(url: str, job_id: str, what: str = "the batch to start") -> None:
    """Wait until the job is running; fail at once if it finished first (the test's window is gone)."""

    def running() -> bool:
        status = job(url, job_id)["status"]
        assert status in ("queued", "running"), f"{job_id} was {status} before the test could act on it"
        return status == "running"

    wait_for(running, 60, what)


def wait_finished(url: str, ids: list[str], timeout_s: float = 120) -> list[dict[str, Any]]:
    def all_finished():
        jobs = [job(url, i) for i in ids]
        return jobs if all(j["status"] in ("done", "failed", "cancelled") for j in jobs) else None

    return wait_for(all_finished, timeout_s, f"jobs {ids} to finish", 0.1)


def assert_every_key_expires(r, prefix: str) -> list[str]:
    """Every key under ``prefix`` has a TTL: at most EXCLIP_RESULT_TTL_S, the metrics hash 30 days."""
    keys = list(r.scan_iter(f"{prefix}:*"))
    ttls = {k: r.ttl(k) for k in keys}
    metrics_key = Keys(prefix).metrics
    assert {k: t for k, t in ttls.items() if t <= 0} == {}, "keys without expiry"
    assert {k: t for k, t in ttls.items() if k != metrics_key and t > TTL_S} == {}
    if metrics_key in ttls:
        assert ttls[metrics_key] <= METRICS_TTL_S
    return keys


def pending(r, prefix: str) -> list[dict[str, Any]]:
    return r.xpending_range(Keys(prefix).stream(STREAM_MODEL), GROUP, min="-", max="+", count=100)


def test_sigkill_mid_batch_loses_no_job_and_trims_only_acknowledged_entries(launcher, redis_server):
    prefix, r = launcher.key_prefix, redis_server.client()
    stream = Keys(prefix).stream(STREAM_MODEL)
    env = {"EXCLIP_VISIBILITY_TIMEOUT_S": "3", "EXCLIP_RESULT_TTL_S": str(TTL_S)}
    api = launcher.api(**SLOW, **env)
    first = launcher.worker(EXCLIP_WORKER_NAME="first", EXCLIP_MAX_WAIT_MS="3000", **env)
    api.wait_ready()
    ids = [submit(api.url, distinct_captions("a dog on the grass", 4), steps=12000, seed=i) for i in range(4)]
    wait_for(lambda: all(job(api.url, i)["status"] == "running" for i in ids), 60, "the batch to start")
    first.kill()  # SIGKILL while the engine call for all four is in progress
    assert [job(api.url, i)["status"] for i in ids] == ["running"] * 4
    held = pending(r, prefix)
    assert len(held) == 4 and {p["consumer"] for p in held} == {"first"}
    assert r.xlen(stream) >= 4  # nothing pending was trimmed

    launcher.worker(EXCLIP_WORKER_NAME="second", **env)
    jobs = wait_finished(api.url, ids, timeout_s=180)
    assert [j["status"] for j in jobs] == ["done"] * 4, [j["error"] for j in jobs]
    assert [r.hget(Keys(prefix).job(i), "deliveries") for i in ids] == ["2"] * 4
    assert all(len(j["result"]["captions"]) == 4 for j in jobs)
    assert pending(r, prefix) == [] and r.xlen(stream) == 0
    assert_every_key_expires(r, prefix)


def test_job_failing_in_the_worker_fails_alone_and_its_batch_completes(launcher, redis_server):
    prefix, r = launcher.key_prefix, redis_server.client()
    keys = Keys(prefix)
    api = launcher.api(**SLOW, EXCLIP_RESULT_TTL_S=str(TTL_S))
    launcher.worker(EXCLIP_MAX_WAIT_MS="1000", EXCLIP_RESULT_TTL_S=str(TTL_S))
    api.wait_ready()
    blocker = submit(api.url, distinct_captions("a long caption to keep the worker busy", 4), steps=10000)
    wait_running(api.url, blocker, "the blocker to start")
    good1, broken, expired, good2, cancelled = (submit(api.url, ["a cat"], steps=2, seed=i) for i in range(5))
    # The API checked these images; now they change under the worker's feet.
    assert r.set(keys.image(broken), b"not an image any more", xx=True, keepttl=True)
    assert r.delete(keys.image(expired)) == 1
    assert httpx.delete(f"{api.url}/jobs/{cancelled}").json()["status"] == "cancelled"
    assert job(api.url, blocker)["status"] == "running"  # so the five were read together afterwards

    jobs = dict(
        zip(
            ["good1", "broken", "expired", "good2", "cancelled"],
            wait_finished(api.url, [good1, broken, expired, good2, cancelled]),
            strict=True,
        )
    )
    assert {k: j["status"] for k, j in jobs.items()} == {
        "good1": "done",
        "broken": "failed",
        "expired": "failed",
        "good2": "done",
        "cancelled": "cancelled",
    }
    assert jobs["broken"]["error"]["type"] == "InvalidImage"
    assert "not an image in a supported format" in jobs["broken"]["error"]["message"]
    assert jobs["expired"]["error"] == {
        "type": "ImageExpired",
        "message": "the job's image expired before it was computed",
    }
    # One engine call computed both good jobs: the failures were taken out, not retried one by one.
    timing = [jobs[k]["result"]["captions"][0]["timings"]["compute_ms"] for k in ("good1", "good2")]
    assert timing[0] == timing[1]
    assert r.hget(keys.job(cancelled), "deliveries") == "0"  # never started
    wait_finished(api.url, [blocker], timeout_s=120)
    assert pending(r, prefix) == [] and r.xlen(keys.stream(STREAM_MODEL)) == 0
    written = assert_every_key_expires(r, prefix)
    assert {keys.job(i) for i in (blocker, good1, broken, expired, good2, cancelled)} <= set(written)


def test_job_that_kills_its_worker_every_time_is_failed_after_max_deliveries(launcher, redis_server):
    prefix, r = launcher.key_prefix, redis_server.client()
    env = {"EXCLIP_VISIBILITY_TIMEOUT_S": "2", "EXCLIP_MAX_DELIVERIES": "2"}
    api = launcher.api(**SLOW, **env)
    workers = {name: launcher.worker(EXCLIP_WORKER_NAME=name, **env) for name in ("w1", "w2", "w3")}
    api.wait_ready()
    wait_for(
        lambda: len(httpx.get(api.url + "/metrics", timeout=10).text.split("exclip_workers 3.0")) == 2,
        90,
        "three live workers",
    )
    poison = submit(api.url, distinct_captions("this job crashes whichever worker runs it", 8), steps=12000)
    for delivery in ("1", "2"):  # the crash, simulated: SIGKILL whoever computes it, twice
        wait_for(
            lambda d=delivery: r.hget(Keys(prefix).job(poison), "deliveries") == d, 60, f"delivery {delivery}"
        )
        [holder] = {p["consumer"] for p in pending(r, prefix)}
        workers.pop(holder).kill()
    [failed] = wait_finished(api.url, [poison], timeout_s=60)
    assert failed["status"] == "failed" and failed["error"]["type"] == "PoisonJob"
    assert "delivered 2 times" in failed["error"]["message"]
    assert "EXCLIP_MAX_DELIVERIES=2" in failed["error"]["message"]
    assert pending(r, prefix) == []
    [survivor] = workers.values()
    assert survivor.alive()
    after = submit(api.url, ["a cat"], steps=2)
    assert wait_finished(api.url, [after])[0]["status"] == "done"


@pytest.fixture
def private_stack(make_redis_server, key_prefix, tiny_checkpoint, tmp_path):
    """A redis-server of this test's own (to stop or to watch expire) and a launcher bound to it."""
    server = make_redis_server()
    launch = ServiceLauncher(server.url, key_prefix, tiny_checkpoint, tmp_path)
    try:
        yield server, launch
    finally:
        launch.close()


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
        time.sleep(2)  # the worker meets the timeouts too
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
    assert "queue unavailable" in worker.output  # it noticed, retried, and came back


def test_sigterm_to_the_api_lets_an_in_flight_wait_request_finish(launcher, redis_server):
    prefix, r = launcher.key_prefix, redis_server.client()
    api = launcher.api(**SLOW)
    launcher.worker()
    api.wait_ready()
    answer: dict[str, httpx.Response] = {}

    def long_request() -> None:
        answer["r"] = httpx.post(
            api.url + "/explain",
            files={"image": ("x.png", png_bytes())},
            data={"caption": distinct_captions("a dog on the grass", 4), "steps": "3000", "wait": "60"},
            timeout=90,
        )

    thread = threading.Thread(target=long_request)
    thread.start()

    def running() -> bool:
        return any(r.hget(k, "status") == "running" for k in r.scan_iter(f"{prefix}:job:*"))

    wait_for(running, 60, "the job to start")
    api.send_signal(signal.SIGTERM)
    thread.join(90)
    assert "r" in answer, "the in-flight request got no answer"
    assert answer["r"].status_code == 200 and answer["r"].json()["status"] == "done", answer["r"].text
    # uvicorn ends by re-raising the SIGTERM it handled, after "Finished server process".
    assert api.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Finished server process" in api.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(api.url + "/healthz", timeout=5)


def test_chunked_upload_is_cut_off_at_the_limit_while_it_is_sent(launcher):
    limit = 100_000
    api = launcher.api(EXCLIP_MAX_UPLOAD_BYTES=str(limit)).wait_healthy()
    port = int(api.url.rsplit(":", 1)[1])
    boundary = "b0und4ry"
    head = (
        f"POST /explain HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    piece = b"\x89" * 16_384
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32_768)
        s.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 50 * limit:  # a 5 MB body if no one stopped it
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                if select.select([s], [], [], 0.002)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        s.settimeout(10)
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # the server closed with our unread chunks in its buffer; its answer came first
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"EXCLIP_MAX_UPLOAD_BYTES" in rest
    assert sent < 10 * limit, f"the server let {sent} bytes through before answering"
    assert api.alive() and httpx.get(api.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("kind", ["form", "json"])
def test_too_many_selections_is_422(stack, kind):
    before = stack.queue_state()
    with stack.client() as c:
        if kind == "form":
            r = c.post(
                "/explain",
                files={"image": ("x.png", png_bytes())},
                data={"caption": "a dog", "span": ["0:1"] * 65},
            )
        else:
            selections = [{"box": [0, 0, 5, 5]}] * 40
            r = c.post(
                "/explain",
                json={
                    "image": b64(png_bytes()),
                    "captions": [
                        {"text": "a dog", "selections": selections},
                        {"text": "a cat", "selections": selections},
                    ],
                },
            )
    assert r.status_code == 422, r.text
    count = 65 if kind == "form" else 80
    assert f"{count} selections given; allowed: at most 64" in r.json()["detail"]
    assert "EXCLIP_MAX_SELECTIONS" in r.json()["detail"]
    assert stack.queue_state() == before


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def test_an_out_of_memory_batch_is_retried_job_by_job_and_the_worker_goes_on(launcher):
    """A real allocation failure: the worker's address space is capped (RLIMIT_AS) once it is warm.

    The engine computes each job of a batch on its own and its memory grows with the steps, hardly with
    the captions (tiny model, 20000 steps: +166 MB VmPeak for 1 caption, +193 MB for 16; 5000 steps:
    +60 / +56 MB). Jobs batch only with equal steps, so a batch that does not fit holds no job that fits
    alone: the worker retries it job by job, each job fails on its own with a clear OutOfMemory, and
    the worker serves the next job that fits.
    """
    api = launcher.api(**SLOW)
    worker = launcher.worker(
        EXCLIP_MAX_BATCH="3", EXCLIP_MAX_WAIT_MS="3000", MALLOC_ARENA_MAX="2"
    )  # few malloc arenas: a stable address space
    api.wait_ready()
    warm = submit(api.url, ["a dog"], steps=10)
    assert wait_finished(api.url, [warm])[0]["status"] == "done"
    budget = 120 * 2**20  # plenty for 10 steps, too little for 20000 steps (> 160 MB)
    limit = _vm_size(worker.proc.pid) + budget
    resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (limit, limit))

    small = submit(api.url, ["a cat"], steps=10, seed=1)
    assert wait_finished(api.url, [small])[0]["status"] == "done"
    huge = [
        submit(api.url, ["a cat"], steps=20000, seed=2),
        submit(
            api.url, distinct_captions("a dog running on the beach near the sea", 16), steps=20000, seed=3
        ),
        submit(api.url, ["a bird"], steps=20000, seed=4),
    ]
    jobs = wait_finished(api.url, huge, timeout_s=180)
    assert [j["status"] for j in jobs] == ["failed"] * 3, [j["error"] for j in jobs]
    assert "batch of 3 failed" in worker.output and "retrying it job by job" in worker.output
    for job_ in jobs:
        error = job_["error"]
        assert error["type"] == "OutOfMemory", error
        assert "out of memory computing this job alone" in error["message"]
        assert "fewer steps or captions" in error["message"]
    assert worker.alive()
    after = submit(api.url, ["a fish"], steps=10, seed=5)
    assert wait_finished(api.url, [after])[0]["status"] == "done"


def stream_expired(r, stream: str) -> bool:
    """The stream that held jobs is gone: no key, or the empty one a worker re-creates (no id ever)."""
    try:
        return r.xinfo_stream(stream)["last-generated-id"] == "0-0"
    except redis.ResponseError:  # no such key
        return True


def test_idle_worker_survives_its_stream_expiring(private_stack):
    """The stream expires EXCLIP_RESULT_TTL_S after its last job, while idle workers block reading it.

    A private Redis with few keys, so its active expiry (not a later read) removes the stream while the
    worker is blocked in XREADGROUP; checked twice, as the worker could be between two reads once.
    """
    server, launch = private_stack
    api = launch.api(EXCLIP_RESULT_TTL_S="2")
    worker = launch.worker(EXCLIP_RESULT_TTL_S="2")
    api.wait_ready()
    stream = Keys(launch.key_prefix).stream(STREAM_MODEL)
    for caption in ("a dog", "a cat"):
        job_id = submit(api.url, [caption], steps=2)
        assert wait_finished(api.url, [job_id])[0]["status"] == "done"
        wait_for(lambda: stream_expired(server.client(), stream), 10, "the stream to expire")
        time.sleep(3)  # a blocked XREADGROUP on the vanished stream has been answered by now
        assert worker.alive(), worker.output[-3000:]
    last = submit(api.url, ["a bird"], steps=2)
    assert wait_finished(api.url, [last], timeout_s=30)[0]["status"] == "done"


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
def test_workers_survive_a_flushed_database_a_lost_group_and_an_empty_restart(private_stack):
    """Whatever Redis loses under a worker — mid-batch or idle — it logs, recreates and goes on; the jobs
    lost with the data are 404 "unknown or lost" and their results are never written anywhere."""
    server, launch = private_stack
    api = launch.api(**SLOW, EXCLIP_REDIS_TIMEOUT_S="1")
    worker = launch.worker(EXCLIP_REDIS_TIMEOUT_S="1")
    api.wait_ready()
    r, keys = server.client(), Keys(launch.key_prefix)

    # 12000 steps: seconds of compute, so the flush lands mid-batch even on a loaded machine.
    flushed = submit(api.url, distinct_captions("a dog on the grass", 4), steps=12000)
    wait_running(api.url, flushed)
    r.flushall()  # mid-batch: record, image, stream and group all go
    assert lost(api.url, flushed)
    wait_for(lambda: "vanished" in worker.output, 120, "the worker to finish the batch it was computing")
    assert not r.exists(keys.job(flushed)), "a lost job's result was written into a new record"
    after_flush = submit_when_served(api.url, ["a cat"], steps=2)
    assert wait_finished(api.url, [after_flush])[0]["status"] == "done"

    r.xgroup_destroy(keys.stream(STREAM_MODEL), GROUP)  # idle: the group alone goes
    no_group = submit(api.url, ["a bird"], steps=2, seed=1)
    assert wait_finished(api.url, [no_group])[0]["status"] == "done"

    restarted = submit(api.url, distinct_captions("a dog on the grass", 4), steps=12000, seed=2)
    wait_running(api.url, restarted)
    server.stop()
    server.start()  # same port, empty: no persistence
    api.wait_ready(timeout_s=60)
    assert lost(api.url, restarted)
    after_restart = submit_when_served(api.url, ["a fish"], steps=2, seed=3)
    assert wait_finished(api.url, [after_restart], timeout_s=180)[0]["status"] == "done"
    assert worker.alive() and "Traceback" not in worker.output, worker.output[-3000:]
    assert not r.exists(keys.job(restarted))


@pytest.mark.slow
def test_a_batch_longer_than_the_ttl_keeps_its_stream_record_and_image(private_stack):
    """The heartbeat renews what an in-flight batch needs, so nothing it holds expires under it."""
    server, launch = private_stack
    env = {"EXCLIP_RESULT_TTL_S": "3", "EXCLIP_HEARTBEAT_S": "0.5"}
    api = launch.api(**SLOW, **env)
    worker = launch.worker(**env)
    api.wait_ready()
    long_job = submit(api.url, distinct_captions("a dog on the grass", 16), steps=20000)  # ~12 s idle
    r, keys = server.client(), Keys(launch.key_prefix)
    wait_for(lambda: r.hget(keys.job(long_job), "status") == "running", 60, "the batch to start")
    started = time.monotonic()
    while r.hget(keys.job(long_job), "status") == "running":
        assert r.exists(keys.stream(STREAM_MODEL), keys.job(long_job), keys.image(long_job)) == 3
        time.sleep(0.2)
    assert time.monotonic() - started > 4, "the batch was not longer than the TTL: the test proves nothing"
    [done] = wait_finished(api.url, [long_job])
    assert done["status"] == "done" and len(done["result"]["captions"]) == 16
    assert "vanished" not in worker.output


def test_a_redis_stall_while_a_client_waits_answers_202_with_the_job(private_stack):
    server, launch = private_stack
    api = launch.api(**SLOW, EXCLIP_REDIS_TIMEOUT_S="1")
    launch.worker(EXCLIP_REDIS_TIMEOUT_S="1")
    api.wait_ready()
    answer: dict[str, httpx.Response] = {}

    def explain() -> None:
        answer["r"] = httpx.post(
            api.url + "/explain",
            files={"image": ("x.png", png_bytes())},
            data={"caption": distinct_captions("a dog on the grass", 4), "steps": "2000", "wait": "60"},
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
    [done] = wait_finished(api.url, [job_id], timeout_s=120)
    assert done["status"] == "done"


def test_a_job_whose_image_expired_before_it_ran_answers_410(launcher, redis_server):
    api = launcher.api(**SLOW)
    launcher.worker()
    api.wait_ready()
    blocker = submit(api.url, distinct_captions("a long caption to keep the worker busy", 4), steps=10000)
    wait_running(api.url, blocker, "the blocker to start")
    answer: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: answer.setdefault(
            "r",
            httpx.post(
                api.url + "/explain",
                files={"image": ("x.png", png_bytes())},
                data={"caption": "a cat", "wait": "60"},
                timeout=90,
            ),
        )
    )
    thread.start()
    r, keys = redis_server.client(), Keys(launcher.key_prefix)
    image_key = wait_for(
        lambda: next((k for k in r.scan_iter(keys.image("*")) if blocker not in k), None),
        30,
        "the second job",
    )
    assert r.delete(image_key) == 1
    thread.join(120)
    assert answer["r"].status_code == 410, answer["r"].text
    assert answer["r"].json()["error"]["type"] == "ImageExpired"


@pytest.mark.slow
def test_two_live_workers_hold_each_long_job_alone_past_the_visibility_timeout(launcher, redis_server):
    """Each job computes for several visibility timeouts; the heartbeat's renewal keeps it with its
    worker: one delivery per job, one consumer per entry, no takeover."""
    env = {"EXCLIP_VISIBILITY_TIMEOUT_S": "2", "EXCLIP_HEARTBEAT_S": "0.5", "EXCLIP_MAX_BATCH": "1"}
    api = launcher.api(**SLOW, **env)
    workers = [launcher.worker(EXCLIP_WORKER_NAME=name, **env) for name in ("w1", "w2")]
    api.wait_ready()
    ids = [
        submit(api.url, distinct_captions("a dog on the grass", 16), steps=20000, seed=i) for i in range(2)
    ]
    r = redis_server.client()
    holders: dict[str, set[str]] = {}
    t0 = time.monotonic()
    while not all(job(api.url, i)["status"] in ("done", "failed") for i in ids):
        for p in pending(r, launcher.key_prefix):
            holders.setdefault(p["message_id"], set()).add(p["consumer"])
            assert p["times_delivered"] == 1, p
        assert time.monotonic() - t0 < 300
        time.sleep(0.2)
    assert time.monotonic() - t0 > 4, "the jobs were not longer than two visibility timeouts"
    assert len(holders) == 2 and all(len(h) == 1 for h in holders.values()), holders
    jobs = [job(api.url, i) for i in ids]
    assert [j["status"] for j in jobs] == ["done", "done"]
    assert [r.hget(Keys(launcher.key_prefix).job(i), "deliveries") for i in ids] == ["1", "1"]
    assert not any("took over" in w.output for w in workers)


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
            time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
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
