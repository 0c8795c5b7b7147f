"""What the live workers serve, as every route reads it: ``ServedModels`` from the heartbeats, read at
most once a second per API process (``ServedCache``, the ``Served`` dependency), and the one "no
worker" answer (503).

Heartbeats come every few seconds, so re-reading them for each request buys nothing; an empty list is
not kept, so a worker that just started is seen by the next request. Routes read it when they need it
(after a body is parsed, say), not when the request arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from service.catalog import ModelInfo, default_model, served_models
from service.errors import RequestInvalid
from service.queue.base import Connection, WorkerRegistry
from service.settings import Settings

SERVED_TTL_S = 1.0
NO_WORKER = "no worker is serving a model right now; retry in a few seconds"


@dataclass(frozen=True)
class ServedModels:
    """The models live workers hold (name -> ``ModelInfo``) and how many workers are live."""

    models: dict[str, ModelInfo]
    workers: int

    def required(self) -> dict[str, ModelInfo]:
        """The models, or 503 when no worker serves one (a job now could not run)."""
        if not self.models:
            raise RequestInvalid(NO_WORKER, 503)
        return self.models

    def default(self, settings: Settings) -> str | None:
        """The model a request that names none gets (None: no worker)."""
        return default_model(self.models, settings)


class _Heartbeats(WorkerRegistry, Connection, Protocol):
    """The two roles of the queue this reads: the heartbeats, and ``ping`` for why there are none."""


class ServedCache:
    """``ServedModels`` read from the workers' heartbeats at most every ``ttl_s`` seconds."""

    def __init__(self, registry: _Heartbeats, ttl_s: float = SERVED_TTL_S) -> None:
        self.registry, self.ttl_s = registry, ttl_s
        self._read_at = 0.0
        self._served: ServedModels | None = None

    async def read(self) -> ServedModels:
        cached = self._served
        if cached is not None and cached.models and time.monotonic() - self._read_at < self.ttl_s:
            return cached
        workers = await self.registry.workers()  # QUEUE_DOWN propagates: the API answers 503
        self._served = ServedModels(served_models(workers), len(workers))
        self._read_at = time.monotonic()
        return self._served

    async def required(self) -> dict[str, ModelInfo]:
        """The served models, or 503 when no worker serves one: with the store's reason when it is the
        cause (a Redis that refuses writes refuses heartbeats too), else "no worker"."""
        serving = await self.read()
        if not serving.models:
            await self.registry.ping()  # raises WritesRefused (503 with its reason) when it is why
        return serving.required()
