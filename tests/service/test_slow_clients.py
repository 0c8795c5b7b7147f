"""A client that trickles a body the service does not read is disconnected after the answer.

A real server process (uvicorn as ``exclip-service serve`` runs it): the answer to a request whose body
has not arrived closes the connection, else the server would read the rest with no time limit.
"""

from __future__ import annotations

import http.client
import socket
import time

import pytest

TRICKLE_S = 30
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def service_url(session_launcher):
    proc = session_launcher.embedded(EXCLIP_CLIENT_TIMEOUT_S="2", EXCLIP_BODY_TIMEOUT_S="4").wait_healthy(180)
    yield proc.url
    proc.stop()


def _answer_then_trickle(url: str, head: bytes) -> tuple[bytes, float]:
    """Send ``head``, then a body byte every 0.2 s: (the answer, seconds from it until the server closed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TRICKLE_S) as sock:
        sock.sendall(head)
        sock.settimeout(0.2)
        answer, answered, start = b"", None, time.monotonic()
        while time.monotonic() - start < TRICKLE_S:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break  # closed by the server
                answer += chunk
                answered = answered or time.monotonic()
            except TimeoutError:
                pass
            except ConnectionResetError:
                break  # closed by the server, which then refused the bytes sent after
            try:
                sock.sendall(b"x")
            except OSError:
                break
        else:
            return answer, float("inf")
    assert answered is not None, "closed without an answer"
    return answer, time.monotonic() - answered


ANSWERED_EARLY = [
    ("POST", "/no-such-path", b"404"),
    ("GET", "/healthz", b"200"),
    ("POST", "/label-studio/webhook", b"200"),
]


@pytest.mark.parametrize(("method", "path", "status"), ANSWERED_EARLY)
def test_an_answer_before_the_body_closes_the_connection(service_url, method, path, status):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode()
    answer, closed_after = _answer_then_trickle(service_url, head)
    assert answer.split(b" ")[1] == status, answer[:200]
    assert b"connection: close" in answer.lower()
    assert closed_after < 5, "the server kept reading a body nobody asked for"


def test_a_read_body_keeps_the_connection_open_for_the_next_request(service_url):
    conn = http.client.HTTPConnection(service_url.removeprefix("http://"), timeout=10)
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
