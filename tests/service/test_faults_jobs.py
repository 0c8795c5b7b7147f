"""Jobs whose inputs change under the worker, with real processes and a private Redis: a job that fails
in the worker (image deleted or replaced in Redis after the API accepted it) fails with its reason
while the jobs batched with it complete in the same engine call, and a client waiting on a job whose
image expired before it ran gets 410.

The worker is kept busy by a blocker job held ``running`` by a ``WorkerHold`` while the test changes
what the queued jobs hold; releasing it lets the worker read them.
"""

from __future__ import annotations

import threading

import httpx

from service.redis_keys import Keys
from testing import distinct_captions
from tests.service.conftest import png_bytes
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


def test_job_failing_in_the_worker_fails_alone_and_its_batch_completes(launcher, redis_server, worker_hold):
    prefix, r = launcher.key_prefix, redis_server.client()
    keys = Keys(prefix)
    api = launcher.api(EXCLIP_RESULT_TTL_S=str(TTL_S))
    launcher.worker(EXCLIP_MAX_WAIT_MS="1000", EXCLIP_RESULT_TTL_S=str(TTL_S), **worker_hold.env)
    api.wait_ready()
    blocker = submit(api.url, distinct_captions("a long caption to keep the worker busy", 4))
    wait_running(api.url, blocker, "the blocker to start")
    good1, broken, expired, good2, cancelled = (submit(api.url, ["a cat"], steps=2, seed=i) for i in range(5))
    # The API checked these images; now they change under the worker's feet.
    assert r.set(keys.image(broken), b"not an image any more", xx=True, keepttl=True)
    assert r.delete(keys.image(expired)) == 1
    assert httpx.delete(f"{api.url}/jobs/{cancelled}").json()["status"] == "cancelled"
    assert job(api.url, blocker)["status"] == "running"  # so the five are read together afterwards
    worker_hold.release()

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


def test_a_job_whose_image_expired_before_it_ran_answers_410(launcher, redis_server, worker_hold):
    api = launcher.api()
    launcher.worker(**worker_hold.env)
    api.wait_ready()
    blocker = submit(api.url, distinct_captions("a long caption to keep the worker busy", 4))
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
    assert job(api.url, blocker)["status"] == "running"  # the second job is still queued behind it
    assert r.delete(image_key) == 1
    worker_hold.release()
    thread.join(120)
    assert answer["r"].status_code == 410, answer["r"].text
    assert answer["r"].json()["error"]["type"] == "ImageExpired"
