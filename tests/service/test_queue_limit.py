"""A full queue answers 429 with Retry-After and adds nothing; the queued jobs still complete."""

from __future__ import annotations

import signal
import time

import httpx

from tests.service.conftest import png_bytes


def test_full_queue_gives_429_and_the_queued_jobs_finish(launcher, redis_server):
    api = launcher.api(EXCLIP_MAX_QUEUE="2")
    worker = launcher.worker(EXCLIP_HEARTBEAT_S="60")  # its heartbeat outlives the pause below
    api.wait_ready()
    worker.send_signal(signal.SIGSTOP)  # a stalled worker: jobs pile up
    try:
        post = lambda: httpx.post(  # noqa: E731
            api.url + "/jobs",
            files={"image": ("x.png", png_bytes())},
            data={"caption": "a dog", "steps": "2"},
            timeout=30,
        )
        accepted = [post(), post()]
        assert [r.status_code for r in accepted] == [202, 202]
        stream = f"{launcher.key_prefix}:stream:exclip-tiny"
        r = redis_server.client()
        length = r.xlen(stream)
        refused = post()
        assert refused.status_code == 429 and "EXCLIP_MAX_QUEUE" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) > 0 and r.xlen(stream) == length
    finally:
        worker.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    ids = [a.json()["id"] for a in accepted]
    while time.monotonic() < deadline:
        statuses = [httpx.get(f"{api.url}/jobs/{i}").json()["status"] for i in ids]
        if statuses == ["done", "done"]:
            break
        time.sleep(0.1)
    assert statuses == ["done", "done"]
