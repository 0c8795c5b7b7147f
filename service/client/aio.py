"""``AsyncClient``: the service over asyncio HTTP (httpx), the same flows as ``Client``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from attribution.selections import Selection
from service.client import flows
from service.client.flows import Call, CaptionInput, Flow, ImageInput, JobRef, Options, T
from service.client.results import Job, ServedModels
from service.client.retry import RetryPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack


class AsyncClient:
    """``Client`` with ``async`` methods (same arguments, same results, same errors); many calls may
    run at once on one client (``asyncio.gather``)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy | None = None,
        poll_s: float = 30.0,
        wait_s: float = 600.0,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.poll_s, self.wait_s = poll_s, wait_s
        self._http = httpx.AsyncClient(**flows.http_options(url, api_key, timeout_s))

    async def explain(
        self,
        image: ImageInput,
        captions: str | Sequence[CaptionInput],
        *,
        selections: Sequence[Selection] = (),
        **options: Unpack[Options],
    ) -> Job:
        """See ``Client.explain``."""
        body = flows.explain_body(image, captions, selections, options)
        return await self._run(flows.explain(body, self.retry, self.poll_s, self.wait_s))

    async def submit(
        self,
        image: ImageInput,
        captions: str | Sequence[CaptionInput],
        *,
        selections: Sequence[Selection] = (),
        **options: Unpack[Options],
    ) -> Job:
        """See ``Client.submit``."""
        body = flows.explain_body(image, captions, selections, options)
        return await self._run(flows.submit(body, self.retry))

    async def job(self, job: JobRef) -> Job:
        return await self._run(flows.get_job(job, self.retry))

    async def wait(self, job: JobRef, wait_s: float | None = None) -> Job:
        """See ``Client.wait``."""
        wait = self.wait_s if wait_s is None else wait_s
        return await self._run(flows.wait_job(job, self.retry, self.poll_s, wait))

    async def cancel(self, job: JobRef) -> Job:
        return await self._run(flows.cancel(job, self.retry))

    async def heatmap(
        self,
        job: JobRef,
        *,
        caption: int = 0,
        selection: Selection | None = None,
        legend: bool = False,
        alpha: float | None = None,
        max_side: int | None = None,
    ) -> bytes:
        """See ``Client.heatmap``."""
        flow = flows.heatmap(
            job,
            self.retry,
            caption=caption,
            selection=selection,
            legend=legend,
            alpha=alpha,
            max_side=max_side,
        )
        return await self._run(flow)

    async def models(self) -> ServedModels:
        return await self._run(flows.models(self.retry))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        try:
            return await self._http.send(self._http.build_request(**call.request_args(self._http.timeout)))
        except httpx.TransportError as exc:
            raise flows.connection_failed(call, exc) from exc

    async def _run(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Call):
                    step = flow.send(await self._send(step))
                else:
                    await asyncio.sleep(step)
                    step = flow.send(None)
        except StopIteration as stop:
            value: Any = stop.value
            return value
        finally:
            flow.close()
