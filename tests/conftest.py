"""Shared pytest fixtures over the ``testing`` package: a private Redis, a tiny self-saved model, services.

Everything is real: Redis is ``/usr/bin/redis-server`` on a free port (never the shared 6379), the
model is ``exclip-tiny`` with weights saved once per session, and the API and workers are
``python -m service.cli`` subprocesses. Reuse them for fault, browser and deployment tests:

``redis_server`` (session)
    A ``RedisServer``: ``.url``, ``.port``, ``.client()`` (sync redis-py, str responses),
    ``.stop()`` (SIGKILL, data is gone: no persistence), ``.start()`` (same port again).
    Tests that stop it must ``.start()`` it again (``make_redis_server`` gives one to kill freely).
``make_redis_server`` (function)
    Factory for extra private servers, each stopped at teardown.
``key_prefix`` (function)
    A unique ``EXCLIP_KEY_PREFIX`` per test, so tests sharing the server never see each other's keys.
``tiny_checkpoint`` (session)
    Path of an ``exclip-tiny`` state_dict; pass it as ``--pretrained`` / ``EXCLIP_PRETRAINED``
    (random init differs per process, a saved file does not).
``tiny_loaded`` (session)
    That checkpoint loaded in the test process (``attribution.models.load_model``), for comparing
    service results with ``attribution.pipeline.explain_requests``.
``launcher`` (function) / ``session_launcher`` (session)
    A ``ServiceLauncher`` bound to ``redis_server``, the tiny checkpoint and (for ``launcher``)
    ``key_prefix``: ``.api(**env)``, ``.worker(**env)``, ``.embedded(**env)`` start subprocesses
    (keyword arguments are extra env vars, e.g. ``EXCLIP_MAX_BATCH="8"``) and return
    ``Process`` objects; all still running are stopped at teardown.
``worker_hold`` (function)
    A ``WorkerHold``, engaged: workers started with ``**worker_hold.env`` start batches and then wait
    before computing until ``worker_hold.release()`` (at the latest at teardown).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing import REDIS_SERVER, RedisServer, ServiceLauncher, WorkerHold, save_tiny_checkpoint


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if not os.path.exists(REDIS_SERVER):
        pytest.fail(f"{REDIS_SERVER} is required for the service tests (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_redis_server() -> Iterator:
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer()
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: str):
    from attribution.models import TINY_MODEL, load_model

    return load_model(TINY_MODEL, tiny_checkpoint, device="cpu")


@pytest.fixture
def launcher(
    redis_server: RedisServer, key_prefix: str, tiny_checkpoint: str, tmp_path: Path
) -> Iterator[ServiceLauncher]:
    launch = ServiceLauncher(redis_server.url, key_prefix, tiny_checkpoint, tmp_path)
    yield launch
    launch.close()


@pytest.fixture(scope="session")
def session_launcher(redis_server: RedisServer, tiny_checkpoint: str) -> Iterator[ServiceLauncher]:
    log_dir = Path(tempfile.mkdtemp(prefix="exclip-logs-"))
    launch = ServiceLauncher(redis_server.url, f"s{uuid.uuid4().hex[:12]}", tiny_checkpoint, log_dir)
    yield launch
    launch.close()
    shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture
def worker_hold(tmp_path: Path) -> Iterator[WorkerHold]:
    hold = WorkerHold(tmp_path)
    yield hold
    hold.release()
