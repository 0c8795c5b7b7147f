"""Workers that die or compute for long, with real processes and a private Redis:

- a worker SIGKILLed in the middle of a batch of several jobs: every job stays pending, another worker
  claims them all after the visibility timeout, and the stream is trimmed only once they are done;
- a job whose worker dies every time is failed after EXCLIP_MAX_DELIVERIES;
- an out-of-memory batch is retried job by job and the worker goes on;
- batches longer than the visibility timeout and the result TTL keep their jobs, stream entries and
  images (the heartbeat renews them).

"Mid-batch" and "long" are made by a ``WorkerHold``: the worker has started the jobs (they are
``running`` and pending) and waits before its engine call until the test releases it, so each window
lasts as long as the test needs on any machine.
"""

from __future__ import annotations

import resource
import time

import httpx
import pytest

from service.redis_keys import Keys
from testing import WorkerHold, distinct_captions
from tests.service.faults_common import (
    STREAM_MODEL,
    TTL_S,
    assert_every_key_expires,
    job,
    pending,
    submit,
    wait_finished,
    wait_for,
    wait_running,
)


def test_sigkill_mid_batch_loses_no_job_and_trims_only_acknowledged_entries(
    launcher, redis_server, worker_hold
):
    prefix, r = launcher.key_prefix, redis_server.client()
    stream = Keys(prefix).stream(STREAM_MODEL)
    env = {"EXCLIP_VISIBILITY_TIMEOUT_S": "3", "EXCLIP_RESULT_TTL_S": str(TTL_S)}
    api = launcher.api(**env)
    # One batch of exactly four: the worker fills it for up to 60 s and starts it once it has four.
    batch = {"EXCLIP_MAX_BATCH": "4", "EXCLIP_MAX_WAIT_MS": "60000"}
    first = launcher.worker(EXCLIP_WORKER_NAME="first", **batch, **worker_hold.env, **env)
    api.wait_ready()
    ids = [submit(api.url, distinct_captions("a dog on the grass", 4), seed=i) for i in range(4)]
    wait_for(lambda: all(job(api.url, i)["status"] == "running" for i in ids), 90, "the batch to start")
    first.kill()  # SIGKILL with all four started and not one computed
    assert [job(api.url, i)["status"] for i in ids] == ["running"] * 4
    held = pending(r, prefix)
    assert len(held) == 4 and {p["consumer"] for p in held} == {"first"}
    assert r.xlen(stream) >= 4  # nothing pending was trimmed

    launcher.worker(EXCLIP_WORKER_NAME="second", **env)  # not held
    jobs = wait_finished(api.url, ids, timeout_s=180)
    assert [j["status"] for j in jobs] == ["done"] * 4, [j["error"] for j in jobs]
    assert [r.hget(Keys(prefix).job(i), "deliveries") for i in ids] == ["2"] * 4
    assert all(len(j["result"]["captions"]) == 4 for j in jobs)
    assert pending(r, prefix) == [] and r.xlen(stream) == 0
    assert_every_key_expires(r, prefix)


def test_job_that_kills_its_worker_every_time_is_failed_after_max_deliveries(
    launcher, redis_server, worker_hold
):
    prefix, r = launcher.key_prefix, redis_server.client()
    env = {"EXCLIP_VISIBILITY_TIMEOUT_S": "2", "EXCLIP_MAX_DELIVERIES": "2"}
    api = launcher.api(**env)
    workers = {
        name: launcher.worker(EXCLIP_WORKER_NAME=name, **worker_hold.env, **env)
        for name in ("w1", "w2", "w3")
    }
    api.wait_ready()
    wait_for(
        lambda: len(httpx.get(api.url + "/metrics", timeout=10).text.split("exclip_workers 3.0")) == 2,
        90,
        "three live workers",
    )
    poison = submit(api.url, distinct_captions("this job crashes whichever worker runs it", 8))
    for delivery in ("1", "2"):  # the crash, simulated: SIGKILL whoever holds it started, twice
        wait_for(
            lambda d=delivery: r.hget(Keys(prefix).job(poison), "deliveries") == d, 60, f"delivery {delivery}"
        )
        assert job(api.url, poison)["status"] == "running"
        [holder] = {p["consumer"] for p in pending(r, prefix)}
        workers.pop(holder).kill()
    [failed] = wait_finished(api.url, [poison], timeout_s=60)  # failed before it computes: still held
    assert failed["status"] == "failed" and failed["error"]["type"] == "PoisonJob"
    assert "delivered 2 times" in failed["error"]["message"]
    assert "EXCLIP_MAX_DELIVERIES=2" in failed["error"]["message"]
    assert pending(r, prefix) == []
    [survivor] = workers.values()
    assert survivor.alive()
    worker_hold.release()
    after = submit(api.url, ["a cat"], steps=2)
    assert wait_finished(api.url, [after])[0]["status"] == "done"


LONG_CAPTION = "a dog running on the beach near the sea"


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def test_an_out_of_memory_batch_is_retried_job_by_job_and_the_worker_goes_on(launcher, tmp_path):
    """A real allocation failure: the worker's address space is capped (RLIMIT_AS) once it is warm.

    The engine computes each job of a batch on its own and its memory grows with the steps, hardly with
    the captions (tiny model, 20000 steps: +166 MB VmPeak for 1 caption, +193 MB for 16; 5000 steps:
    +60 / +56 MB). Jobs batch only with equal steps, so a batch that does not fit holds no job that fits
    alone: the worker retries it job by job, each job fails on its own with a clear OutOfMemory, and
    the worker serves the next job that fits. The three big jobs are queued while a small one is held,
    so the worker reads them as one batch of three.
    """
    hold = WorkerHold(tmp_path, engaged=False)
    api = launcher.api(EXCLIP_MAX_STEPS="20000")
    worker = launcher.worker(
        EXCLIP_MAX_BATCH="3", MALLOC_ARENA_MAX="2", **hold.env
    )  # few malloc arenas: a stable address space
    api.wait_ready()
    warm = submit(api.url, ["a dog"], steps=10)
    assert wait_finished(api.url, [warm])[0]["status"] == "done"
    budget = 120 * 2**20  # plenty for 10 steps, too little for 20000 steps (> 160 MB)
    limit = _vm_size(worker.proc.pid) + budget
    resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (limit, limit))

    hold.engage()
    small = submit(api.url, ["a cat"], steps=10, seed=1)
    wait_running(api.url, small, "the small job to start")
    huge = [
        submit(api.url, ["a cat"], steps=20000, seed=2),
        submit(
            api.url, distinct_captions("a dog running on the beach near the sea", 16), steps=20000, seed=3
        ),
        submit(api.url, ["a bird"], steps=20000, seed=4),
    ]
    hold.release()
    assert wait_finished(api.url, [small])[0]["status"] == "done"
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


def hold_while(check, seconds: float) -> None:
    """Call ``check()`` every 0.2 s for ``seconds`` (the test holds the batch meanwhile)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        check()
        time.sleep(0.2)


@pytest.mark.slow
def test_a_batch_longer_than_the_ttl_keeps_its_stream_record_and_image(private_stack, tmp_path):
    """The heartbeat renews what an in-flight batch needs, so nothing it holds expires under it."""
    server, launch = private_stack
    hold = WorkerHold(tmp_path)
    ttl_s = 3
    env = {"EXCLIP_RESULT_TTL_S": str(ttl_s), "EXCLIP_HEARTBEAT_S": "1"}
    api = launch.api(**env)
    worker = launch.worker(**env, **hold.env)
    api.wait_ready()
    long_job = submit(api.url, distinct_captions("a dog on the grass", 16))
    r, keys = server.client(), Keys(launch.key_prefix)
    wait_for(lambda: r.hget(keys.job(long_job), "status") == "running", 60, "the batch to start")

    def all_kept() -> None:
        assert r.hget(keys.job(long_job), "status") == "running"
        assert r.exists(keys.stream(STREAM_MODEL), keys.job(long_job), keys.image(long_job)) == 3

    hold_while(all_kept, 2 * ttl_s + 1)  # each key would have expired twice over without renewal
    hold.release()
    [done] = wait_finished(api.url, [long_job])
    assert done["status"] == "done" and len(done["result"]["captions"]) == 16
    assert "vanished" not in worker.output


@pytest.mark.slow
def test_two_live_workers_hold_each_long_job_alone_past_the_visibility_timeout(
    launcher, redis_server, worker_hold
):
    """Each job is held for more than two visibility timeouts; the heartbeat's renewal keeps it with its
    worker: one delivery per job, one consumer per entry, no takeover."""
    visibility_s = 4
    env = {
        "EXCLIP_VISIBILITY_TIMEOUT_S": str(visibility_s),
        "EXCLIP_HEARTBEAT_S": "1",
        "EXCLIP_MAX_BATCH": "1",
    }
    api = launcher.api(**env)
    workers = [launcher.worker(EXCLIP_WORKER_NAME=name, **env, **worker_hold.env) for name in ("w1", "w2")]
    api.wait_ready()
    ids = [submit(api.url, distinct_captions("a dog on the grass", 16), seed=i) for i in range(2)]
    r = redis_server.client()
    wait_for(lambda: all(job(api.url, i)["status"] == "running" for i in ids), 90, "both jobs to start")
    holders: dict[str, set[str]] = {}

    def one_holder_each() -> None:
        for p in pending(r, launcher.key_prefix):
            holders.setdefault(p["message_id"], set()).add(p["consumer"])
            assert p["times_delivered"] == 1, p

    hold_while(one_holder_each, 2 * visibility_s + 1)
    worker_hold.release()
    jobs = wait_finished(api.url, ids)
    assert len(holders) == 2 and all(len(h) == 1 for h in holders.values()), holders
    assert {c for h in holders.values() for c in h} == {"w1", "w2"}
    assert [j["status"] for j in jobs] == ["done", "done"]
    assert [r.hget(Keys(launcher.key_prefix).job(i), "deliveries") for i in ids] == ["1", "1"]
    assert not any("took over" in w.output for w in workers)
