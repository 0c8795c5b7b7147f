"""What the clients send and how they read the answers, as generators that do no I/O ("flows").

A flow yields either a ``Call`` — the driver sends it and sends the ``httpx.Response`` back in — or a
float — seconds to sleep, after which the driver sends back None — and returns its value. ``Client``
drives flows with blocking I/O and ``AsyncClient`` with asyncio, so request bodies, retries, polling,
errors and decoding exist once, here.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar
from urllib.parse import quote

import httpx
from PIL import Image

from attribution.selections import Box, Selection, Span
from service.client.errors import (
    ClientError,
    ConnectionFailed,
    JobFailed,
    RequestRejected,
    ServerError,
    ServiceBusy,
    WaitTimeout,
)
from service.client.results import Job, ServedModels, is_job
from service.client.retry import RETRY_STATUSES, RetryPolicy, retry_after_s
from service.jobs import JobStatus
from service.schemas import CaptionIn, ExplainJSON, SelectionIn

T = TypeVar("T")
Flow = Generator["Call | float", "httpx.Response | None", T]
ImageInput = str | os.PathLike[str] | bytes | Image.Image
# A caption, or a caption with its own selections.
CaptionInput = str | tuple[str, Sequence[Selection]]
JobRef = str | Job


class Options(TypedDict, total=False):
    """The model options of a request (None or absent: the server's default, see ``GET /models``);
    ``matrix_format`` is the body's ``format``: ``json`` (nested lists) or ``base64`` (float32)."""

    model: str | None
    text_layer: int | None
    image_layer: int | None
    steps: int | None
    precision: str | None
    quadrature: str | None
    tolerance: float | None
    text_reference: str | None
    matrix_format: str | None


DETAIL_CHARS = 500  # of a non-JSON error body quoted in a message


@dataclass(frozen=True)
class Call:
    """One HTTP request; ``long_poll_s``: the server may hold the answer this long (added to the read
    timeout, so a long poll is not cut short by the client's own timeout)."""

    method: str
    path: str
    params: dict[str, str] | None = None
    json: dict[str, Any] | None = None
    long_poll_s: float = 0.0

    def request_args(self, timeout: httpx.Timeout) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.build_request`` for this call."""
        read = None if timeout.read is None else timeout.read + self.long_poll_s
        return {
            "method": self.method,
            "url": self.path,
            "params": self.params,
            "json": self.json,
            "timeout": httpx.Timeout(
                connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
            ),
        }


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def connection_failed(call: Call, exc: httpx.TransportError) -> ConnectionFailed:
    return ConnectionFailed(f"{call.method} {call.path}: no answer ({type(exc).__name__}: {exc})")


# ---- requests


def image_bytes(image: ImageInput) -> bytes:
    """The bytes to upload: a file's (path), as given (bytes), or a PIL image encoded as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    return Path(image).read_bytes()


def selection_in(selection: Selection) -> SelectionIn:
    """A library selection as the JSON body's selection object."""
    if isinstance(selection, Box):
        return SelectionIn(box=(selection.x0, selection.y0, selection.x1, selection.y1))
    pair = (selection.start, selection.end)
    return SelectionIn(span=pair) if isinstance(selection, Span) else SelectionIn(tokens=pair)


def selection_param(selection: Selection) -> tuple[str, str]:
    """A selection as the heatmap route's query parameter, in the library's string syntax."""
    if isinstance(selection, Box):
        return "box", ",".join(
            repr(float(v)) for v in (selection.x0, selection.y0, selection.x1, selection.y1)
        )
    return ("span" if isinstance(selection, Span) else "tokens"), f"{selection.start}:{selection.end}"


def explain_body(
    image: ImageInput,
    captions: str | Sequence[CaptionInput],
    selections: Sequence[Selection] = (),
    options: Options | None = None,
) -> dict[str, Any]:
    """The ``application/json`` body of ``POST /explain`` and ``POST /jobs`` (service.schemas.ExplainJSON).

    ``captions``: one caption or several, each a string or ``(text, selections)``; ``selections``
    apply to every caption given as a plain string. The image travels base64-encoded (a third larger;
    ``EXCLIP_MAX_UPLOAD_BYTES`` counts the whole body). A malformed value raises pydantic's
    ``ValidationError`` (a ``ValueError``) before anything is sent; the server checks the rest (ranges,
    limits: 422).
    """
    items = [captions] if isinstance(captions, str) else list(captions)
    caption_ins = []
    for item in items:
        text, chosen = (item, selections) if isinstance(item, str) else item
        caption_ins.append(CaptionIn(text=text, selections=[selection_in(s) for s in chosen]))
    fields = {"format" if k == "matrix_format" else k: v for k, v in (options or {}).items()}
    given = {k: v for k, v in fields.items() if v is not None}
    body = ExplainJSON(image=base64.b64encode(image_bytes(image)).decode(), captions=caption_ins, **given)
    return body.model_dump(mode="json", exclude_none=True)


def job_path(job: JobRef, suffix: str = "") -> str:
    job_id = job.id if isinstance(job, Job) else job
    return f"/jobs/{quote(job_id, safe='')}{suffix}"


# ---- answers


def _message(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI's field errors
        return "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in detail)
    return str(detail)


def error_of(response: httpx.Response) -> ClientError:
    """The exception for a 4xx/5xx answer, with its status and the server's ``detail``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None:
        detail = response.text[:DETAIL_CHARS] or response.reason_phrase
    status = response.status_code
    message = f"{response.request.method} {response.request.url.path} -> {status}: {_message(detail)}"
    if is_job(body):  # a failed job, or one whose result or image was evicted
        return JobFailed(message, job=Job.from_dict(body), status=status, detail=detail)
    if status in RETRY_STATUSES:
        retry_after = retry_after_s(response.headers.get("Retry-After"))
        return ServiceBusy(message, status=status, detail=detail, retry_after=retry_after)
    if status < 500:
        return RequestRejected(message, status=status, detail=detail)
    return ServerError(message, status=status, detail=detail)


def finished_done(job: Job) -> Job:
    """The job if it is done; JobFailed for a failed or cancelled one."""
    if job.status is JobStatus.DONE:
        return job
    error = (job.error or {}).get("message") or f"the job was {job.status.value}"
    raise JobFailed(f"job {job.id} {job.status.value}: {error}", job=job, detail=error)


# ---- flows


def send(call: Call, retry: RetryPolicy) -> Flow[httpx.Response]:
    """The answer to ``call``, sent again after 429/503 as ``retry`` allows; a 4xx/5xx raises."""
    waited, attempt = 0.0, 0
    while True:
        response = yield call
        assert response is not None  # the driver answers a Call with its response
        hint = retry_after_s(response.headers.get("Retry-After"))
        delay = retry.delay(response.status_code, hint, attempt, waited)
        if delay is None:
            if response.is_error:
                raise error_of(response)
            return response
        yield delay
        waited, attempt = waited + delay, attempt + 1


def wait_job(job: JobRef, retry: RetryPolicy, poll_s: float, wait_s: float) -> Flow[Job]:
    """Long-poll ``GET /jobs/{id}`` (``poll_s`` per request) until the job finishes, whatever its status;
    WaitTimeout after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        wait = max(0.0, min(poll_s, deadline - time.monotonic()))
        call = Call("GET", job_path(job), params={"wait": f"{wait:.3f}"}, long_poll_s=wait)
        latest = Job.from_dict((yield from send(call, retry)).json())
        if latest.finished:
            return latest
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"job {latest.id} is still {latest.status.value} after {wait_s:g} s", job=latest
            )


def explain(body: dict[str, Any], retry: RetryPolicy, poll_s: float, wait_s: float) -> Flow[Job]:
    """``POST /explain`` (the server holds it up to ``poll_s``), then long polls: the done job."""
    start = time.monotonic()
    wait = min(poll_s, wait_s)
    call = Call("POST", "/explain", json={**body, "wait": wait}, long_poll_s=wait)
    job = Job.from_dict((yield from send(call, retry)).json())
    if not job.finished:
        job = yield from wait_job(job, retry, poll_s, max(0.0, wait_s - (time.monotonic() - start)))
    return finished_done(job)


def submit(body: dict[str, Any], retry: RetryPolicy) -> Flow[Job]:
    """``POST /jobs``: the queued job, at once."""
    return Job.from_dict((yield from send(Call("POST", "/jobs", json=body), retry)).json())


def get_job(job: JobRef, retry: RetryPolicy) -> Flow[Job]:
    return Job.from_dict((yield from send(Call("GET", job_path(job)), retry)).json())


def cancel(job: JobRef, retry: RetryPolicy) -> Flow[Job]:
    """``DELETE /jobs/{id}``: the cancelled job; RequestRejected (409) if it already started."""
    return Job.from_dict((yield from send(Call("DELETE", job_path(job)), retry)).json())


def heatmap(
    job: JobRef,
    retry: RetryPolicy,
    *,
    caption: int,
    selection: Selection | None,
    legend: bool,
    alpha: float | None,
    max_side: int | None,
) -> Flow[bytes]:
    """``GET /jobs/{id}/heatmap.png``: the PNG's bytes."""
    params = {"caption": str(caption), "legend": "true" if legend else "false"}
    if selection is not None:
        name, value = selection_param(selection)
        params[name] = value
    if alpha is not None:
        params["alpha"] = repr(float(alpha))
    if max_side is not None:
        params["max_side"] = str(max_side)
    response = yield from send(Call("GET", job_path(job, "/heatmap.png"), params=params), retry)
    return response.content


def models(retry: RetryPolicy) -> Flow[ServedModels]:
    return ServedModels.from_dict((yield from send(Call("GET", "/models"), retry)).json())


def http_options(url: str, api_key: str | None, timeout_s: float | None) -> dict[str, Any]:
    """What ``httpx.Client`` / ``httpx.AsyncClient`` are made with: base URL, API key, timeout."""
    return {"base_url": url, "headers": auth_headers(api_key), "timeout": httpx.Timeout(timeout_s)}
