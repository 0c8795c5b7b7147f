"""``service.middleware`` in process: the ASGI classes driven directly, without a server or the service.

Raw ``scope``/``receive``/``send`` calls, so each body part's timing and size is the test's to choose,
and ``httpx.ASGITransport`` for the response headers. tests/service/test_invalid_requests.py and
test_faults.py check the same limits against the running service over real sockets.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.middleware import API_CSP, PAGE_CSP, SECURITY_HEADERS, BodyLimits, HeadAndSecurityHeaders

TOO_LARGE = "request body is larger than the limit of {} bytes (EXCLIP_MAX_UPLOAD_BYTES)"


async def _upload(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


async def get_only(scope: Scope, receive: Receive, send: Send) -> None:
    """Every path answers GET with "hello" and 405 otherwise: FastAPI's GET routes do not answer HEAD."""
    if scope["method"] == "GET":
        await PlainTextResponse("hello", headers={"x-app": "kept"})(scope, receive, send)
    else:
        await PlainTextResponse("method not allowed", status_code=405)(scope, receive, send)


# Starlette's error middleware answers 500 to an exception in a route, as FastAPI's does.
UPLOAD_APP = Starlette(routes=[Route("/upload", _upload, methods=["POST"])])


@dataclass
class Answer:
    messages: list[Message]
    reads: int  # receive() calls the app made

    @property
    def starts(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.start"]

    @property
    def status(self) -> int:
        [start] = self.starts  # exactly one response
        return start["status"]

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.starts[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    @property
    def detail(self) -> str:
        return json.loads(self.body)["detail"]


@dataclass
class Client:
    """``receive`` of one request: each body part after ``gap_s``, then a disconnect after
    ``disconnect_after_s`` (what a server's receive() gives once the body is read)."""

    parts: list[bytes] = field(default_factory=lambda: [b""])
    gap_s: float = 0.0
    disconnect_after_s: float = 0.0
    reads: int = 0

    async def receive(self) -> Message:
        self.reads += 1
        if self.parts:
            part = self.parts.pop(0)
            await asyncio.sleep(self.gap_s)
            return {"type": "http.request", "body": part, "more_body": bool(self.parts)}
        await asyncio.sleep(self.disconnect_after_s)
        return {"type": "http.disconnect"}


def http_scope(method: str = "POST", path: str = "/upload", headers: dict[str, bytes] | None = None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


def call(app: ASGIApp, client: Client, **scope_fields) -> Answer:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> None:
        await app(http_scope(**scope_fields), client.receive, send)

    asyncio.run(main())
    return Answer(sent, client.reads)


def limits(app: ASGIApp = UPLOAD_APP, max_bytes: int = 100, **timeouts: float) -> BodyLimits:
    return BodyLimits(app, max_bytes=max_bytes, **timeouts)


# --- BodyLimits: size -------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(max_bytes=st.integers(0, 60), sizes=st.lists(st.integers(0, 25), min_size=1, max_size=6))
def test_a_streamed_body_reaches_the_app_whole_exactly_when_within_the_limit(max_bytes, sizes):
    """No Content-Length (chunked): the bytes are counted as the app reads them."""
    answer = call(limits(max_bytes=max_bytes), Client([b"x" * n for n in sizes]))
    if sum(sizes) <= max_bytes:
        assert (answer.status, json.loads(answer.body)) == (200, {"bytes": sum(sizes)})
    else:  # the app's own answer to the cut-off body (a 500 here) never reaches the client
        assert answer.status == 413 and answer.detail.startswith(TOO_LARGE.format(max_bytes))


@settings(max_examples=80, deadline=None)
@given(declared=st.one_of(st.integers(0, 200).map(lambda n: str(n).encode()), st.binary(max_size=4)))
def test_a_declared_content_length_is_checked_before_the_body_is_read(declared):
    length = int(declared) if declared.isdigit() else 0
    body = b"x" * length if length <= 100 else b""
    answer = call(limits(max_bytes=100), Client([body]), headers={"content-length": declared})
    if not declared.isdigit():
        assert (answer.status, answer.detail) == (400, "Content-Length header is not a number")
        assert answer.reads == 0
    elif length > 100:
        assert answer.status == 413 and answer.detail.startswith(TOO_LARGE.format(100))
        assert answer.reads == 0  # refused from the header: not one byte of the body was read
    else:
        assert (answer.status, json.loads(answer.body)) == (200, {"bytes": length})


def test_a_refusal_is_a_json_answer_that_closes_the_connection():
    answer = call(limits(max_bytes=10), Client([b"x" * 11]))
    assert answer.status == 413
    assert answer.headers == {
        "content-type": "application/json",
        "content-length": str(len(answer.body)),
        "connection": "close",
    }
    assert answer.detail == TOO_LARGE.format(10) + "; send a smaller image"


def test_a_refusal_after_the_app_started_its_answer_sends_no_second_answer():
    async def answers_first(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        while (await receive()).get("more_body"):
            pass

    answer = call(limits(answers_first, max_bytes=10), Client([b"x" * 8, b"x" * 8]))
    assert answer.status == 202  # the only start: an ASGI server cannot take a second one
    assert answer.reads == 2


def test_errors_of_the_app_itself_propagate():
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        call(limits(broken), Client([b"x"]))


# --- BodyLimits: time -------------------------------------------------------------------------------


def test_a_body_part_slower_than_the_client_timeout_gets_408():
    answer = call(limits(client_timeout_s=0.05, body_timeout_s=600), Client([b"x", b"y"], gap_s=1))
    assert answer.status == 408
    assert answer.detail == (
        "request body arrived too slowly: every part must come within 0.05 s and the whole body within 600 s"
    )


def test_a_body_trickling_in_past_the_body_timeout_gets_408():
    """Every part comes well within the per-part timeout, but 20 of them take 2 s in all."""
    client = Client([b"x"] * 20, gap_s=0.1)
    answer = call(limits(client_timeout_s=10, body_timeout_s=0.3), client)
    assert answer.status == 408 and "the whole body within 0.3 s" in answer.detail
    assert client.reads < 10


def test_waiting_for_a_disconnect_after_the_body_has_no_time_limit():
    """After the body, receive() only reports a disconnect (a streaming response listens for it)."""
    seen: list[str] = []

    async def listens(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        seen.append((await receive())["type"])
        await PlainTextResponse("bye")(scope, receive, send)

    client = Client([b"x", b"y"], disconnect_after_s=0.3)
    answer = call(limits(listens, client_timeout_s=0.05, body_timeout_s=0.1), client)
    assert (answer.status, seen) == (200, ["http.disconnect"])


# --- HeadAndSecurityHeaders -----------------------------------------------------------------------


async def _request(method: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=HeadAndSecurityHeaders(get_only))
    async with httpx.AsyncClient(transport=transport, base_url="http://exclip.test") as client:
        return await client.request(method, path)


def test_head_is_answered_as_the_get_of_the_same_url_without_its_body():
    app = HeadAndSecurityHeaders(get_only)
    get, head = (call(app, Client(), method=method, path="/models") for method in ("GET", "HEAD"))
    assert (get.status, get.body) == (200, b"hello")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == "5" and head.headers["x-app"] == "kept"  # the GET's
    post = call(app, Client(), method="POST", path="/models")
    assert (post.status, post.body) == (405, b"method not allowed")  # other methods stay themselves


@pytest.mark.parametrize(
    ("path", "csp"),
    [
        ("/", PAGE_CSP),  # the page: its own script, style and JSON
        ("/jobs/123", API_CSP),
        ("/static/app.js", API_CSP),
        ("/docs", None),  # FastAPI's docs load their scripts from a CDN
        ("/docs/oauth2-redirect", None),
        ("/redoc", None),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_every_answer_carries_the_security_headers_and_its_paths_csp(path, csp, method):
    response = asyncio.run(_request(method, path))
    assert response.status_code == 200 and response.headers["x-app"] == "kept"
    for name, value in SECURITY_HEADERS:
        assert response.headers.get_list(name.decode()) == [value.decode()]
    assert response.headers.get("content-security-policy") == csp


@pytest.mark.parametrize("middleware", [BodyLimits, HeadAndSecurityHeaders])
def test_non_http_scopes_pass_through_untouched(middleware):
    calls: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    wrapped = middleware(app, max_bytes=1) if middleware is BodyLimits else middleware(app)
    asyncio.run(wrapped(scope, receive, send))
    assert calls == [(scope, receive, send)]
