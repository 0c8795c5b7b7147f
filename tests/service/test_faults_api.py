"""The API process under faults and abuse, with real processes and a private Redis: SIGTERM while a
long ``wait`` request is in flight (that request still gets its result), the upload limit enforced
while a chunked body (no Content-Length) is read, and the selection count.
"""

from __future__ import annotations

import select
import signal
import socket
import threading

import httpx
import pytest

from testing import distinct_captions
from tests.service.conftest import b64, png_bytes
from tests.service.faults_common import wait_for


def test_sigterm_to_the_api_lets_an_in_flight_wait_request_finish(launcher, redis_server, worker_hold):
    """The job is held running until the API has begun shutting down, so the request spans the SIGTERM."""
    prefix, r = launcher.key_prefix, redis_server.client()
    api = launcher.api()
    launcher.worker(**worker_hold.env)
    api.wait_ready()
    answer: dict[str, httpx.Response] = {}

    def long_request() -> None:
        answer["r"] = httpx.post(
            api.url + "/explain",
            files={"image": ("x.png", png_bytes())},
            data={"caption": distinct_captions("a dog on the grass", 4), "wait": "60"},
            timeout=90,
        )

    thread = threading.Thread(target=long_request)
    thread.start()

    def running() -> bool:
        return any(r.hget(k, "status") == "running" for k in r.scan_iter(f"{prefix}:job:*"))

    wait_for(running, 60, "the job to start")
    api.send_signal(signal.SIGTERM)
    wait_for(lambda: "Shutting down" in api.output, 30, "the API to begin shutting down")
    assert "r" not in answer and api.alive()
    worker_hold.release()
    thread.join(90)
    assert "r" in answer, "the in-flight request got no answer"
    assert answer["r"].status_code == 200 and answer["r"].json()["status"] == "done", answer["r"].text
    # uvicorn ends by re-raising the SIGTERM it handled, after "Finished server process".
    assert api.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Finished server process" in api.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(api.url + "/healthz", timeout=5)


def test_chunked_upload_is_cut_off_at_the_limit_while_it_is_sent(launcher):
    limit = 100_000
    api = launcher.api(EXCLIP_MAX_UPLOAD_BYTES=str(limit)).wait_healthy()
    port = int(api.url.rsplit(":", 1)[1])
    boundary = "b0und4ry"
    head = (
        f"POST /explain HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    piece = b"\x89" * 16_384
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32_768)
        s.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 50 * limit:  # a 5 MB body if no one stopped it
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                if select.select([s], [], [], 0.002)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        s.settimeout(10)
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # the server closed with our unread chunks in its buffer; its answer came first
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"EXCLIP_MAX_UPLOAD_BYTES" in rest
    assert sent < 10 * limit, f"the server let {sent} bytes through before answering"
    assert api.alive() and httpx.get(api.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("kind", ["form", "json"])
def test_too_many_selections_is_422(stack, kind):
    before = stack.queue_state()
    with stack.client() as c:
        if kind == "form":
            r = c.post(
                "/explain",
                files={"image": ("x.png", png_bytes())},
                data={"caption": "a dog", "span": ["0:1"] * 65},
            )
        else:
            selections = [{"box": [0, 0, 5, 5]}] * 40
            r = c.post(
                "/explain",
                json={
                    "image": b64(png_bytes()),
                    "captions": [
                        {"text": "a dog", "selections": selections},
                        {"text": "a cat", "selections": selections},
                    ],
                },
            )
    assert r.status_code == 422, r.text
    count = 65 if kind == "form" else 80
    assert f"{count} selections given; allowed: at most 64" in r.json()["detail"]
    assert "EXCLIP_MAX_SELECTIONS" in r.json()["detail"]
    assert stack.queue_state() == before
