"""The Label Studio backend's process-wide parts, created with the app: where ``/setup``'s project
setups are kept, the limit on image downloads in flight, and the shutdown signal that ends ``/predict``
calls early; and the dependency that gives them to the routes.

A ``/predict`` call runs until it is done, its client goes away (then its downloads and queued jobs are
cancelled: nobody would read the answer), or the process is told to stop (SIGTERM or SIGINT: the call
is cancelled at once and answered 503, so shutdown does not wait out the call's time budget).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable
from types import FrameType
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from service.connections import redis_client
from service.errors import RequestInvalid
from service.label_studio.fetch import Downloads
from service.label_studio.projects import MemoryProjects, ProjectStore, RedisProjects
from service.redis_keys import Keys
from service.settings import Settings

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ClientGone(Exception):
    """The client closed its connection before the answer: there is no one to answer."""


def create_project_store(settings: Settings) -> ProjectStore:
    """Project setups beside the jobs: in Redis when ``REDIS_URL`` is set, else in memory."""
    if settings.redis_url:
        return RedisProjects(
            redis_client(settings.redis_url, timeout_s=settings.redis_timeout_s), Keys(settings.key_prefix)
        )
    return MemoryProjects()


class LabelStudioBackend:
    def __init__(self, settings: Settings) -> None:
        self.projects = create_project_store(settings)
        self.downloads: Downloads | None = None  # made on the app's event loop, in start()
        self.stopping: asyncio.Event | None = None
        self._restore: list[tuple[int, Any]] = []

    def start(self) -> None:
        """On the app's event loop: the download limit, and a watch on the stop signals that leaves
        the server's own handlers in place (they still run, after ours)."""
        self.downloads, self.stopping = Downloads(), asyncio.Event()
        if threading.current_thread() is not threading.main_thread():  # no signals there (tests)
            return
        loop, stopping = asyncio.get_running_loop(), self.stopping
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous):  # the default action (exit) or ignored: nothing to chain to
                continue

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(stopping.set)
                previous(signum, frame)

            signal.signal(sig, handler)
            self._restore.append((sig, previous))

    async def close(self) -> None:
        for sig, previous in self._restore:
            signal.signal(sig, previous)
        await self.projects.close()

    async def unless_abandoned(self, request: Request, work: Awaitable[T]) -> T:
        """``work``'s result, or cancel it when the client disconnects (``ClientGone``) or the process
        is told to stop (``RequestInvalid`` 503)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        waits: set[asyncio.Future[Any]] = {task, gone}
        if self.stopping is not None:
            waits.add(asyncio.ensure_future(self.stopping.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)  # the work's clean-up runs to its end
        if not task.cancelled():
            return task.result()
        if gone.done() and not gone.cancelled():
            raise ClientGone()
        raise RequestInvalid(
            "the service is shutting down: this call was stopped; retry (another replica, or this one "
            "once restarted, will answer)",
            503,
        )


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: ``receive`` waits for that only)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def get_label_studio(request: Request) -> LabelStudioBackend:
    return request.app.state.label_studio


LabelStudio = Annotated[LabelStudioBackend, Depends(get_label_studio)]
