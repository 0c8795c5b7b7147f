"""``Client``: the service over blocking HTTP (httpx); every decision is in service.client.flows."""

from __future__ import annotations

import time
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


class Client:
    """A client of one service.

    ``api_key``: sent as ``Authorization: Bearer``. ``timeout_s``: connect/read/write timeout of each
    request (a long poll adds its own wait). ``retry``: how 429/503 are retried. ``poll_s``: how long one
    request lets the server hold a job that is not done; ``wait_s``: how long ``explain`` and ``wait``
    wait for a job in all. Use it as a context manager, or call ``close()``.
    """

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
        self._http = httpx.Client(**flows.http_options(url, api_key, timeout_s))

    def explain(
        self,
        image: ImageInput,
        captions: str | Sequence[CaptionInput],
        *,
        selections: Sequence[Selection] = (),
        **options: Unpack[Options],
    ) -> Job:
        """Explain ``image`` (a path, bytes or PIL image) with ``captions`` and wait for the done job;
        ``job.explanations`` holds one ``Explanation`` per caption.

        ``captions``: a string or a list of strings and ``(text, selections)`` pairs; ``selections``
        (``Span``, ``TokenRange``, ``Box``) apply to every caption given as a plain string. ``options``:
        ``model``, ``text_layer``, ``image_layer``, ``steps``, ``precision``, ``quadrature``, ``tolerance``,
        ``text_reference``, ``matrix_format`` (absent: the server's defaults). Raises ``JobFailed`` if
        the job fails, ``WaitTimeout`` after ``wait_s`` (its ``job`` can be waited for again).
        """
        body = flows.explain_body(image, captions, selections, options)
        return self._run(flows.explain(body, self.retry, self.poll_s, self.wait_s))

    def submit(
        self,
        image: ImageInput,
        captions: str | Sequence[CaptionInput],
        *,
        selections: Sequence[Selection] = (),
        **options: Unpack[Options],
    ) -> Job:
        """Queue the same request as ``explain`` and return the queued job at once."""
        body = flows.explain_body(image, captions, selections, options)
        return self._run(flows.submit(body, self.retry))

    def job(self, job: JobRef) -> Job:
        """The job's current state (one ``GET /jobs/{id}``)."""
        return self._run(flows.get_job(job, self.retry))

    def wait(self, job: JobRef, wait_s: float | None = None) -> Job:
        """The job once finished (done, failed or cancelled); ``WaitTimeout`` after ``wait_s``."""
        return self._run(
            flows.wait_job(job, self.retry, self.poll_s, self.wait_s if wait_s is None else wait_s)
        )

    def cancel(self, job: JobRef) -> Job:
        """Cancel a job that has not started; ``RequestRejected`` (409) for a running or finished one."""
        return self._run(flows.cancel(job, self.retry))

    def heatmap(
        self,
        job: JobRef,
        *,
        caption: int = 0,
        selection: Selection | None = None,
        legend: bool = False,
        alpha: float | None = None,
        max_side: int | None = None,
    ) -> bytes:
        """The heatmap PNG of a done job's caption: a span's or token range's, else the whole caption's
        (a box is outlined on it)."""
        flow = flows.heatmap(
            job,
            self.retry,
            caption=caption,
            selection=selection,
            legend=legend,
            alpha=alpha,
            max_side=max_side,
        )
        return self._run(flow)

    def models(self) -> ServedModels:
        """The models the workers hold, with every option's range."""
        return self._run(flows.models(self.retry))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            return self._http.send(self._http.build_request(**call.request_args(self._http.timeout)))
        except httpx.TransportError as exc:
            raise flows.connection_failed(call, exc) from exc

    def _run(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Call):
                    step = flow.send(self._send(step))
                else:
                    time.sleep(step)
                    step = flow.send(None)
        except StopIteration as stop:
            value: Any = stop.value
            return value
        finally:
            flow.close()
