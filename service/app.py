"""``create_app``: the FastAPI application (routers, limits, auth, CORS, error mapping).

The API keeps no job state: everything lives in the queue back-end, so any number of replicas can
share one Redis. In embedded mode (no ``REDIS_URL``) the app also runs one worker on its in-memory
queue, started and stopped with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Message, Scope

from attribution.models import LoadedModel
from service.connections import create_queue
from service.dependencies import api_key_owner
from service.errors import install_handlers
from service.label_studio.backend import LabelStudioBackend
from service.middleware import BodyLimits, HeadAndSecurityHeaders
from service.routers import health, heatmap, jobs, label_studio, metrics, models
from service.served import ServedCache
from service.settings import Settings, load_settings
from service.web import pages

log = logging.getLogger("exclip.api")


def create_app(
    settings: Settings | None = None, *, worker_models: list[LoadedModel] | None = None
) -> FastAPI:
    """The API; with ``worker_models`` (embedded mode) also a worker computing on the same queue.

    Raises ``ConfigError`` for settings it cannot run with (a bad value, an unreadable or empty keys
    file, a ``LABEL_STUDIO_URL`` images cannot be fetched from).
    """
    settings = settings or load_settings()
    if settings.keys and settings.owner_secret is None:
        log.warning(
            "EXCLIP_OWNER_SECRET is unset: job owner tags use a random key of this process, so "
            "jobs are readable only through it; set the same secret on every API replica"
        )
    queue = create_queue(settings)
    label_studio_backend = LabelStudioBackend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker_task = None
        if worker_models:
            from service.worker import Worker

            worker = Worker(queue, worker_models, settings)
            worker_task = asyncio.create_task(worker.run())
        await _build_routes(app)
        label_studio_backend.start()
        try:
            yield
        finally:
            if worker_task is not None:
                worker.stop()  # finishes and stores the batch it is computing
                await worker_task
            await queue.close()
            await label_studio_backend.close()

    app = FastAPI(
        title="exclip-service",
        version="0.1.0",
        lifespan=lifespan,
        description="Second-order caption–image attributions (Moeller et al., TMLR 2025) for "
        "open_clip CLIP models.",
    )
    app.state.settings, app.state.queue, app.state.label_studio = settings, queue, label_studio_backend
    app.state.served = ServedCache(queue)

    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_upload_bytes,
        client_timeout_s=settings.client_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HeadAndSecurityHeaders)

    install_handlers(app)

    protected = [Depends(api_key_owner)]
    app.include_router(health.router)
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(models.router, dependencies=protected)
    app.include_router(metrics.router, dependencies=protected)
    app.include_router(label_studio.router)  # its own auth: Label Studio sends Basic credentials

    app.include_router(heatmap.router)  # OwnedJob applies auth itself
    app.include_router(pages.router)
    return app


async def _build_routes(app: FastAPI) -> None:
    """Have FastAPI build its route state now, not on the first user request.

    FastAPI prepares an included router's routes (dependency graphs, validators) on the first request
    that walks it, about 10 ms that the first caller of /explain paid after /readyz said ready. One
    in-process ASGI request for a path no route matches walks every router; its 404 goes nowhere (an
    HTTP client would log it as if a caller had asked).
    """
    path = "/.exclip-warm-up"
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    await app(scope, receive, send)
