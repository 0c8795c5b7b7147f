"""Slow and idle clients against a real server process (uvicorn as ``exclip-service serve`` runs it,
with short client timeouts): a head or body that trickles in is cut off, an idle connection closed,
and an answer given before the body arrived closes the connection (else the server would read the
rest with no time limit).
"""

from __future__ import annotations

import http.client
import itertools
import socket
import time

import pytest

TRICKLE_S = 30
JSON = {"Content-Type": "application/json"}
NEVER = float("inf")


@pytest.fixture(scope="module")
def impatient_service(session_launcher):
    proc = session_launcher.embedded(EXCLIP_CLIENT_TIMEOUT_S="2", EXCLIP_BODY_TIMEOUT_S="4").wait_healthy(180)
    yield proc.url
    proc.stop()


def _trickle(url: str, first: bytes, then: bytes, every_s: float) -> tuple[bytes, float, float]:
    """Send ``first``, then ``then`` one byte per ``every_s``, until the server closes the connection or
    ``TRICKLE_S`` pass: (what the server sent, seconds until its first byte, seconds until it closed;
    ``NEVER`` for what did not happen)."""
    host, port = url.removeprefix("http://").split(":")
    answer, answered, start = b"", NEVER, time.monotonic()
    with socket.create_connection((host, int(port)), timeout=TRICKLE_S) as sock:
        sock.sendall(first)
        sock.settimeout(every_s)
        for i in itertools.count():
            if time.monotonic() - start > TRICKLE_S:
                return answer, answered, NEVER
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:  # closed, then refused the bytes sent after
                chunk = b""
            if chunk == b"":
                return answer, answered, time.monotonic() - start
            if chunk:
                answer += chunk
                answered = min(answered, time.monotonic() - start)
            try:
                sock.sendall(then[i % len(then) : i % len(then) + 1] if then else b"")
            except OSError:
                return answer, answered, time.monotonic() - start
    raise AssertionError("unreachable")


def test_client_dribbling_its_headers_is_disconnected(impatient_service):
    head, slow = b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: aaaa"
    _, _, closed = _trickle(impatient_service, head, slow, every_s=0.3)
    assert closed < TRICKLE_S, "the server kept a connection whose headers never ended"


def test_idle_connection_is_closed(impatient_service):
    answer, _, closed = _trickle(impatient_service, b"", b"", every_s=0.5)
    assert closed < TRICKLE_S and answer == b""


def test_client_dribbling_its_body_gets_408(impatient_service):
    head = (
        b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"captions": ['
    )
    answer, _, closed = _trickle(impatient_service, head, b'"a", ', every_s=0.3)
    assert closed < TRICKLE_S and answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"too slowly" in answer


ANSWERED_EARLY = [
    ("POST", "/no-such-path", b"404"),
    ("GET", "/healthz", b"200"),
    ("POST", "/label-studio/webhook", b"200"),
]


@pytest.mark.parametrize(("method", "path", "status"), ANSWERED_EARLY)
def test_an_answer_before_the_body_closes_the_connection(impatient_service, method, path, status):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode()
    answer, answered, closed = _trickle(impatient_service, head, b"x", every_s=0.2)
    assert answered < NEVER and answer.split(b" ")[1] == status, answer[:200]
    assert b"connection: close" in answer.lower()
    assert closed - answered < 5, "the server kept reading a body nobody asked for"


def test_a_read_body_keeps_the_connection_open_for_the_next_request(impatient_service):
    conn = http.client.HTTPConnection(impatient_service.removeprefix("http://"), timeout=10)
    sockets = []
    for _ in range(2):  # one connection, two requests: keep-alive still works after a body was read
        conn.request("POST", "/label-studio/setup", body=b'{"project": "1"}', headers=JSON)
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()[:200]
        assert reply.getheader("connection") != "close"
        reply.read()
        sockets.append(conn.sock)
    conn.close()
    assert sockets[0] is sockets[1] is not None
