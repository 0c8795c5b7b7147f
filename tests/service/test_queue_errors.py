"""Errors of the queue as the API reports them: a lost enqueue reply never loses the job's handle, and
only Redis's own errors are reported as "Redis unreachable" (issue 10 items 6 and 8).

The embedded service runs in this process (``embedded_in_process``) with its queue's methods patched
to fail the way a Redis client or the machine can.
"""

from __future__ import annotations

import errno
import re

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.service.conftest import embedded_in_process, png_bytes


def post_explain(client):
    return client.post(
        "/explain",
        files={"image": ("x.png", png_bytes(64, 48, seed=7), "image/png")},
        data={"caption": "a dog", "wait": "30"},
    )


@pytest.mark.parametrize(
    "lost",
    [RedisTimeoutError("Timeout reading from socket"), RedisConnectionError("Connection reset by peer")],
    ids=["timeout", "connection"],
)
def test_a_failed_enqueue_answers_503_naming_the_job_it_tried(tiny_loaded, monkeypatch, lost):
    """The enqueue went through but its reply was lost: the 503 names the job id, and that id finds the
    job (which the worker computes)."""
    with embedded_in_process(tiny_loaded) as client:
        queue = client.app.state.queue
        enqueue, tried = queue.enqueue, []

        async def enqueue_then_lose_the_reply(job, image, **kwargs):
            tried.append(job.id)
            await enqueue(job, image, **kwargs)
            raise lost

        monkeypatch.setattr(queue, "enqueue", enqueue_then_lose_the_reply)
        r = post_explain(client)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        [job_id] = tried
        detail = r.json()["detail"]
        assert re.search(rf"\bjob {job_id} was queued\b", detail), detail
        assert f"GET /jobs/{job_id}" in detail
        found = client.get(f"/jobs/{job_id}", params={"wait": 30})
        assert found.status_code == 200 and found.json()["status"] == "done", found.text


NOT_REDIS = [
    OSError(errno.ENOSPC, "No space left on device"),
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/exclip/keys"),
]


@pytest.mark.parametrize("error", NOT_REDIS, ids=lambda e: type(e).__name__)
def test_an_oserror_that_is_not_redis_is_not_reported_as_redis(tiny_loaded, monkeypatch, error):
    """A plain ``OSError`` from the queue (not one of redis-py's errors) is a server error (500), in the
    enqueue path and in the handlers: never "Redis unreachable" with a 503 that invites retries."""
    with embedded_in_process(tiny_loaded, raise_server_exceptions=False) as client:
        queue = client.app.state.queue

        async def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(queue, "enqueue", fail)
        submitted = post_explain(client)
        monkeypatch.setattr(queue, "get", fail)
        read = client.get("/jobs/some-job")
    for r in (submitted, read):
        assert r.status_code == 500, r.text
        assert "redis" not in r.text.lower() and "unreachable" not in r.text.lower()


def test_redis_errors_are_reported_as_redis_unreachable(tiny_loaded, monkeypatch):
    """The other side of the line above: redis-py's connection error on a read is a 503 that says Redis
    is unreachable, with Retry-After."""
    with embedded_in_process(tiny_loaded, raise_server_exceptions=False) as client:

        async def fail(*args, **kwargs):
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        monkeypatch.setattr(client.app.state.queue, "get", fail)
        r = client.get("/jobs/some-job")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["detail"] == "the job queue (Redis) is unreachable right now; retry later"
