"""ASGI middleware: request body limits (size and time), HEAD on every GET route, security headers.

``BodyLimits`` refuses a body over ``EXCLIP_MAX_UPLOAD_BYTES`` with 413 (checking ``Content-Length``
up front and counting the bytes as the app reads them, so an oversized upload is never buffered
whole) and one that arrives too slowly with 408: each part must come within ``client_timeout_s``
and the whole body within ``body_timeout_s``. An answer given before the body has arrived (a 404, a
route that reads no body) closes the connection: the server would otherwise read the rest of the
body with no time limit, and a client trickling it could hold the connection for ever. The time a
client may take over its request head is bounded by the server (service.cli).
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The page loads only its own script, style sheet and JSON; images are the user's own (blob: URLs).
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
DOCS_PATHS = ("/docs", "/redoc")  # FastAPI's docs pages load their scripts from a CDN: no CSP there


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    def __init__(
        self, app: ASGIApp, max_bytes: int, client_timeout_s: float = 20.0, body_timeout_s: float = 120.0
    ) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.client_timeout_s, self.body_timeout_s = client_timeout_s, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = (
            f"request body is larger than the limit of {self.max_bytes} bytes "
            "(EXCLIP_MAX_UPLOAD_BYTES); send a smaller image"
        )
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        has_body = declared not in (None, b"0") or b"transfer-encoding" in headers
        if declared is not None:
            if not declared.isdigit():
                await _refuse(send, 400, "Content-Length header is not a number")
                return
            if int(declared) > self.max_bytes:
                await _refuse(send, 413, too_large)
                return

        received, refused, started, body_done = 0, None, False, False
        deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, refused, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no time limit
                return await receive()
            wait = min(self.client_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except TimeoutError:
                refused = _Refused(
                    408,
                    f"request body arrived too slowly: every part must come within "
                    f"{self.client_timeout_s:g} s and the whole body within "
                    f"{self.body_timeout_s:g} s",
                )
                raise refused from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = _Refused(413, too_large)
                    raise refused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None and not started:
                return  # whatever the app answers to the cut-off body, the client gets our refusal
            if message["type"] == "http.response.start":
                started = True
                if has_body and not body_done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            await _refuse(send, refused.status, refused.message)


class HeadAndSecurityHeaders:
    """Answer HEAD as the GET of the same URL without its body, and add the security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        path = scope["path"]
        csp = None if path.startswith(DOCS_PATHS) else PAGE_CSP if path == "/" else API_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if csp is not None:
                    headers.append((b"content-security-policy", csp.encode()))
                message = {**message, "headers": headers}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_with_headers)
