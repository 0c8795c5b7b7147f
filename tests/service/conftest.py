"""Fixtures for the service tests: a running stack per queue back-end, test images, result comparison.

``stack`` (session, parametrised ``redis`` / ``embedded``): the same tests run against
API + worker subprocesses sharing the private Redis, and against one embedded ``serve`` process.
Both use ``EXCLIP_MAX_BATCH=8`` and ``EXCLIP_MAX_WAIT_MS=200`` so concurrent requests batch.

``private_stack`` (function): a redis-server of the test's own and a ``ServiceLauncher`` bound to it.

``embedded_in_process(loaded, **settings)``: the embedded service (API and worker on the in-memory
queue) in the test process, behind a Starlette ``TestClient``, for tests that patch a function of the
service or look into its queue.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.jobs import CaptionRequest, Job, JobRequest
from service.redis_keys import Keys
from testing import ServiceLauncher, WorkerHold, wait_until_ready

BATCH_ENV = {"EXCLIP_MAX_BATCH": "8", "EXCLIP_MAX_WAIT_MS": "200"}


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_job(
    captions: tuple[str, ...] | list[str] = ("a dog",),
    *,
    steps: int = 2,
    selections: tuple = (),
    model: str = "exclip-tiny",
    owner: str | None = None,
) -> Job:
    """A job for the tiny model at its last blocks, every caption with the same ``selections``."""
    request = JobRequest(
        model=model,
        text_layer=2,
        image_layer=2,
        steps=steps,
        precision="float32",
        format="json",
        captions=tuple(CaptionRequest(c, selections) for c in captions),
    )
    return Job(request=request, owner=owner)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@dataclass
class Stack:
    """A running service: ``url``; ``redis`` (sync client) and ``keys`` only in redis mode; ``hold``
    (released unless a test engages it) holds its worker's batches before they compute."""

    mode: str
    url: str
    redis: Any
    keys: Keys | None
    hold: WorkerHold

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        return metric_values(httpx.get(self.url + "/metrics", timeout=10).text)

    def queue_state(self) -> tuple[float, int, int]:
        """(jobs ever enqueued, stream length, job records): all unchanged when nothing is enqueued."""
        enqueued = self.metrics()["exclip_jobs_enqueued_total"]
        if self.redis is None:
            return enqueued, -1, -1
        stream_len = (
            self.redis.xlen(self.keys.stream("exclip-tiny"))
            if self.redis.exists(self.keys.stream("exclip-tiny"))
            else 0
        )
        return enqueued, stream_len, len(self.redis.keys(self.keys.job("*")))


@pytest.fixture(scope="session", params=["redis", "embedded"])
def stack(request, session_launcher, redis_server, tmp_path_factory) -> Stack:
    hold = WorkerHold(tmp_path_factory.mktemp(f"hold-{request.param}"), engaged=False)
    if request.param == "redis":
        api = session_launcher.api()
        session_launcher.worker(**BATCH_ENV, **hold.env)
        api.wait_ready()
        return Stack("redis", api.url, redis_server.client(), Keys(session_launcher.key_prefix), hold)
    serve = session_launcher.embedded(**BATCH_ENV, **hold.env).wait_ready()
    return Stack("embedded", serve.url, None, None, hold)


@pytest.fixture
def private_stack(make_redis_server, key_prefix, tiny_checkpoint, tmp_path):
    """A redis-server of this test's own (to stop or to watch expire) and a launcher bound to it."""
    server = make_redis_server()
    launch = ServiceLauncher(server.url, key_prefix, tiny_checkpoint, tmp_path)
    try:
        yield server, launch
    finally:
        launch.close()


def assert_close(got: Any, want: Any, path: str = "") -> None:
    """Structural equality with float tolerance (the service computes in another process)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {set(got)} != {set(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), f"{path}: length differs"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, str):
        # The service computes in another process (its own threads, its own decoding path), which
        # changes float32 rounding; a gap is a difference of two sums, so it gets a wider absolute
        # tolerance. Batching changes nothing: each input is computed on its own, so results are
        # bit-identical whatever else is in the batch (docs/method.md).
        abs_tol = 1e-6 if path.endswith("gap") else 1e-7
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=abs_tol), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def strip_timings(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for caption in result["captions"]:
        timings = caption["timings"]
        assert timings["queued_ms"] >= 0 and timings["compute_ms"] > 0
        out.append({k: v for k, v in caption.items() if k != "timings"})
    return out


@contextmanager
def embedded_in_process(
    loaded: Any, *, raise_server_exceptions: bool = True, **settings: Any
) -> Iterator[Any]:
    """A ``TestClient`` of the embedded app (``create_app`` with ``loaded`` as its worker's model) whose
    ``Settings`` are ``settings`` plus the ``EXCLIP_*`` environment, once ``/readyz`` says ready.

    ``client.app.state.queue`` is its ``MemoryQueue``; the worker runs on the client's event loop.
    """
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(redis_url=None, **settings), worker_models=[loaded])
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        wait_until_ready(client)
        yield client


@pytest.fixture(scope="module")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a server that gives the Label Studio scenario's image at ``SCENE_PATH``, as Label
    Studio gives uploads."""
    from tests.service.label_studio.scenario import SCENE_PATH, file_server, scene_png

    root = tmp_path_factory.mktemp("ls-host")
    (root / SCENE_PATH.lstrip("/")).parent.mkdir(parents=True)
    (root / SCENE_PATH.lstrip("/")).write_bytes(scene_png())
    with file_server(root) as url:
        yield url
