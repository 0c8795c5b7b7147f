"""Every route learns what the workers serve through one ``Served`` dependency: the heartbeats are read
at most once a second per API process, and "no worker" is one 503 wherever a job would be queued."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from service.app import create_app
from service.served import NO_WORKER, SERVED_TTL_S
from service.settings import Settings
from tests.service.conftest import png_bytes

READERS = ["/models", "/metrics", "/readyz", "/label-studio/versions"]


def _counting_heartbeat_reads(queue) -> list[float]:
    reads: list[float] = []
    workers = queue.workers

    async def counted():
        reads.append(time.monotonic())
        return await workers()

    queue.workers = counted
    return reads


def test_routes_share_one_cached_read_of_the_heartbeats(tiny_loaded):
    app = create_app(Settings(redis_url=None))
    with TestClient(app) as client:
        queue = app.state.queue
        info = {"name": "w1", "models": [tiny_loaded.describe()]}
        client.portal.call(queue.heartbeat, "w1", info, 60.0)
        reads = _counting_heartbeat_reads(queue)
        t0 = time.monotonic()
        for path in READERS * 3:
            assert client.get(path).status_code == 200, path
        assert client.get("/models").json()["default"] == tiny_loaded.name
        if time.monotonic() - t0 < SERVED_TTL_S:  # a slow machine may have needed a second read
            assert len(reads) == 1, reads
        time.sleep(SERVED_TTL_S)
        client.get("/models")
        assert len(reads) >= 2, "the cache never expires"


def test_without_a_worker_every_queuing_route_answers_the_same_503_and_readers_do_not(tiny_loaded):
    app = create_app(Settings(redis_url=None))
    with TestClient(app) as client:
        reads = _counting_heartbeat_reads(app.state.queue)
        for path in ("/explain", "/jobs"):
            r = client.post(path, files={"image": ("x.png", png_bytes())}, data={"caption": "a dog"})
            assert (r.status_code, r.json()["detail"]) == (503, NO_WORKER), (path, r.text)
        assert len(reads) == 2, "an empty list must not be cached: a new worker is seen at once"
        models = client.get("/models")
        assert models.status_code == 200 and models.json() == {"models": [], "default": None}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "no live worker holds a model"
        info = {"name": "w1", "models": [tiny_loaded.describe()]}
        client.portal.call(app.state.queue.heartbeat, "w1", info, 60.0)
        assert client.get("/models").json()["default"] == tiny_loaded.name  # at once, not after a second
