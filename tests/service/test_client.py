"""The Python client (service.client) against the real service: an embedded ``serve`` subprocess with
the tiny model and an API key, and API + worker on the private Redis for the 429/503 retries.

Results are compared with the library run in the test process; the one stand-in server is a loopback
HTTP server answering 503 without ``Retry-After``, to time the client's own backoff.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from attribution.decode import decode_image
from attribution.pipeline import ExplainRequest, explain_requests
from service.cli import main as cli_main
from service.client import (
    AsyncClient,
    Box,
    Client,
    ConnectionFailed,
    JobFailed,
    JobStatus,
    RequestRejected,
    RetryPolicy,
    ServiceBusy,
    Span,
    TokenRange,
)
from service.client.retry import retry_after_s
from testing import Process, distinct_captions, free_port
from tests.service.conftest import BATCH_ENV, png_bytes

KEY = "client-test-key"
IMAGE = png_bytes(64, 48, seed=11)
CAPTIONS = [
    ("a red ball on the grass", [Span(2, 10), TokenRange(1, 3)]),
    ("a brown box", [Box(10, 5, 40, 30)]),
]


@pytest.fixture(scope="module")
def service(session_launcher) -> Iterator[Process]:
    proc = session_launcher.embedded(EXCLIP_API_KEYS=KEY, **BATCH_ENV).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
def client(service) -> Iterator[Client]:
    with Client(service.url, api_key=KEY) as c:
        yield c


def test_explain_with_spans_and_boxes_equals_the_library(client, tiny_loaded):
    job = client.explain(IMAGE, CAPTIONS, steps=3)
    assert job.status is JobStatus.DONE and job.model == "exclip-tiny" and len(job.explanations) == 2
    assert all(t["compute_ms"] > 0 for t in job.timings)
    request = ExplainRequest(decode_image(IMAGE), [c for c, _ in CAPTIONS], [list(s) for _, s in CAPTIONS])
    [want] = explain_requests(tiny_loaded, [request], text_layer=None, image_layer=None, steps=3)
    for got, expected in zip(job.explanations, want, strict=True):
        assert got.caption == expected.caption and got.geometry == expected.geometry
        assert [t.text for t in got.tokens] == [t.text for t in expected.tokens]
        torch.testing.assert_close(
            got.result.interactions, expected.result.interactions, rtol=1e-4, atol=1e-7
        )
        assert [s.selection for s in got.selections] == [s.selection for s in expected.selections]
        for g, e in zip(got.selections, expected.selections, strict=True):
            for name in ("heatmap", "token_scores"):
                if getattr(e, name) is not None:
                    torch.testing.assert_close(getattr(g, name), getattr(e, name), rtol=1e-4, atol=1e-7)
    # selections= applies to every plain-string caption; a PIL image is sent as PNG
    [one] = client.explain(
        Image.open(io.BytesIO(IMAGE)), ["a red ball"], selections=[Box(0, 0, 32, 24)]
    ).explanations
    assert one.selections[0].selection == Box(0, 0, 32, 24) and one.selections[0].token_scores.shape == (5,)


def test_both_matrix_formats_decode_to_the_same_arrays(client):
    as_json = client.explain(IMAGE, CAPTIONS, steps=2, matrix_format="json")
    as_base64 = client.explain(IMAGE, CAPTIONS, steps=2, matrix_format="base64")
    assert isinstance(as_json.raw["result"]["captions"][0]["interactions"], list)
    assert as_base64.raw["result"]["captions"][0]["interactions"]["encoding"] == "base64-float32-le"
    for a, b in zip(as_json.explanations, as_base64.explanations, strict=True):
        assert a.result.interactions.dtype == b.result.interactions.dtype == torch.float32
        assert torch.equal(a.result.interactions, b.result.interactions)


def test_async_client_equals_the_sync_client(service, client):
    sync = client.explain(IMAGE, CAPTIONS, steps=2, text_layer=1)

    async def both() -> list:
        async with AsyncClient(service.url, api_key=KEY) as aclient:
            return await asyncio.gather(
                *(aclient.explain(IMAGE, CAPTIONS, steps=2, text_layer=1) for _ in range(2))
            )

    for job in asyncio.run(both()):
        assert job.id != sync.id and job.explanations[0].options == sync.explanations[0].options
        for a, s in zip(job.explanations, sync.explanations, strict=True):
            assert torch.equal(a.result.interactions, s.result.interactions)  # each input computed on its own


def test_submit_poll_wait_and_heatmap(client):
    queued = client.submit(IMAGE, "a red ball on the grass", steps=2)
    assert queued.status in (JobStatus.QUEUED, JobStatus.RUNNING) and queued.explanations is None
    done = client.wait(queued)
    assert done.status is JobStatus.DONE and client.job(queued.id).status is JobStatus.DONE
    png = client.heatmap(done, selection=Span(2, 10))
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (64, 48)
    with_legend = Image.open(io.BytesIO(client.heatmap(done, selection=TokenRange(1, 3), legend=True)))
    assert with_legend.size[0] == 64 and with_legend.size[1] > 48
    assert Image.open(
        io.BytesIO(client.heatmap(done, selection=Box(0.5, 1.5, 30.25, 20), max_side=32))
    ).size == (32, 24)
    with pytest.raises(RequestRejected) as bad_span:
        client.heatmap(done, selection=Span(40, 50))
    assert bad_span.value.status == 422 and "40" in bad_span.value.detail


def test_cancel_a_queued_job(client):
    slow = distinct_captions("a dog running on the beach near the sea", 16)
    busy = client.submit(png_bytes(seed=7), slow, steps=100)
    deadline = time.monotonic() + 30
    while client.job(busy).status is JobStatus.QUEUED and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker is now computing the slow job and reads nothing new
    victim = client.submit(png_bytes(seed=8), "a cat", steps=3)
    assert client.cancel(victim).status is JobStatus.CANCELLED
    assert client.wait(victim).status is JobStatus.CANCELLED  # wait returns any finished job
    assert client.wait(busy).status is JobStatus.DONE
    with pytest.raises(RequestRejected) as finished:
        client.cancel(busy)
    assert finished.value.status == 409 and "only queued jobs can be cancelled" in finished.value.detail


def test_models(client):
    served = client.models()
    assert served.default == "exclip-tiny" and list(served.models) == ["exclip-tiny"]
    tiny = served.models["exclip-tiny"]
    assert tiny.info.grid == [4, 4] and tiny.info.text_layers == 3
    assert tiny.options["steps"]["max"] == 100 and tiny.options["text_layer"]["default"] == 2


def test_errors_carry_the_status_and_the_servers_detail(service, client):
    with Client(service.url, api_key="wrong") as stranger, pytest.raises(RequestRejected) as unauthorized:
        stranger.models()
    plain = httpx.get(service.url + "/models", headers={"Authorization": "Bearer wrong"})
    assert unauthorized.value.status == plain.status_code == 401
    assert unauthorized.value.detail == plain.json()["detail"] and plain.json()["detail"] in str(
        unauthorized.value
    )
    with pytest.raises(RequestRejected) as too_many_steps:
        client.explain(IMAGE, "a dog", steps=10_000)
    assert too_many_steps.value.status == 422 and "steps" in too_many_steps.value.detail
    with pytest.raises(RequestRejected) as unknown:
        client.job("no-such-job")
    assert unknown.value.status == 404 and "no-such-job" in unknown.value.detail
    with pytest.raises(RequestRejected) as not_an_image:
        client.explain(b"not an image", "a dog")
    assert not_an_image.value.status == 422
    photo = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(200, 200, seed=3))).save(photo, format="JPEG")
    with pytest.raises(JobFailed) as failed:  # the API reads the header; the worker finds the data cut off
        client.explain(photo.getvalue()[:900], "a thing")
    assert failed.value.status == 422 and "broken or truncated" in failed.value.detail
    assert failed.value.job.status is JobStatus.FAILED and failed.value.job.error["type"] == "InvalidImage"
    with pytest.raises(ValueError, match="precision"):  # malformed options are refused before sending
        client.explain(IMAGE, "a dog", precision="float64")
    with Client(f"http://127.0.0.1:{free_port()}") as nobody, pytest.raises(ConnectionFailed):
        nobody.models()


def test_503_without_a_worker_is_retried_after_retry_after(launcher):
    api = launcher.api().wait_healthy()
    with Client(api.url, retry=RetryPolicy(max_wait_s=0)) as impatient, pytest.raises(ServiceBusy) as busy:
        impatient.explain(IMAGE, "a dog", steps=2)
    assert busy.value.status == 503 and busy.value.retry_after == 5 and "no worker" in busy.value.detail
    start = time.monotonic()
    threading.Timer(0.5, launcher.worker).start()  # a worker comes up while the client waits
    with Client(
        api.url, retry=RetryPolicy(max_wait_s=120)
    ) as patient:  # a worker starts slowly on a busy machine
        job = patient.explain(IMAGE, "a dog", steps=2)
    assert job.status is JobStatus.DONE and time.monotonic() - start >= 5  # honoured Retry-After: 5


def test_429_of_a_full_queue_is_retried_within_the_budget(launcher):
    api = launcher.api(EXCLIP_MAX_QUEUE="1")
    worker = launcher.worker(EXCLIP_HEARTBEAT_S="60")  # its heartbeat outlives the pause below
    api.wait_ready()
    worker.send_signal(signal.SIGSTOP)  # a stalled worker: the queue fills
    try:
        with Client(api.url, retry=RetryPolicy(max_wait_s=5)) as client:
            first = client.submit(IMAGE, "a dog", steps=2)
            start = time.monotonic()
            with pytest.raises(ServiceBusy) as full:  # Retry-After 10 exceeds the budget: raised at once
                client.submit(IMAGE, "a cat", steps=2)
            assert time.monotonic() - start < 2
            assert full.value.status == 429 and full.value.retry_after == 10
            assert "EXCLIP_MAX_QUEUE" in full.value.detail
            client.retry = RetryPolicy(max_wait_s=30)
            threading.Timer(1.0, worker.send_signal, [signal.SIGCONT]).start()  # the queue drains
            start = time.monotonic()
            second = client.submit(IMAGE, "a cat", steps=2)
            assert time.monotonic() - start >= 10  # slept the Retry-After, then was accepted
            assert (
                client.wait(second).status is JobStatus.DONE and client.wait(first).status is JobStatus.DONE
            )
    finally:
        worker.send_signal(signal.SIGCONT)


class _Unavailable(BaseHTTPRequestHandler):
    """503 without Retry-After for the first ``refusals`` requests, then a done job."""

    refusals = 3
    arrivals: list[float] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) <= self.refusals:
            body, status = {"detail": "warming up"}, 503
        else:
            body = {
                "id": "j1",
                "status": "cancelled",
                "created_at": 0,
                "model": "m",
                "result": None,
                "error": None,
            }
            status = 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unavailable() -> Iterator[str]:
    _Unavailable.arrivals = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_backoff_without_retry_after_doubles_and_is_bounded(unavailable):
    with Client(unavailable, retry=RetryPolicy(max_wait_s=5, backoff_s=0.2)) as client:
        assert client.job("j1").status is JobStatus.CANCELLED
    gaps = [b - a for a, b in zip(_Unavailable.arrivals, _Unavailable.arrivals[1:], strict=False)]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert delay <= gap < delay + 0.3, gaps
    _Unavailable.arrivals = []
    with Client(unavailable, retry=RetryPolicy(max_wait_s=0.7, backoff_s=0.2)) as client:
        with pytest.raises(ServiceBusy) as busy:  # 0.2 + 0.4 fit in 0.7, the next 0.8 does not
            client.job("j1")
    assert (
        len(_Unavailable.arrivals) == 3
        and busy.value.detail == "warming up"
        and busy.value.retry_after is None
    )


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_s("7") == 7.0 and retry_after_s(" 1.5 ") == 1.5 and retry_after_s(None) is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_s("soon") is None and retry_after_s("nan") is None and retry_after_s("-3") == 0.0


def test_cli_explain_talks_to_the_service_through_the_client(service, tmp_path, capsys):
    image = tmp_path / "scene.png"
    image.write_bytes(IMAGE)
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    args = ["explain", str(image), "a red ball", "--span", "2:5", "--steps", "2", "--url", service.url]
    assert cli_main([*args, "--api-key", KEY, "--json", str(out_json), "--png", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "caption: 'a red ball'" in printed and "span 2:5: tokens [2]" in printed
    assert json.loads(out_json.read_text())["result"]["captions"][0]["caption"] == "a red ball"
    assert out_png.read_bytes().startswith(b"\x89PNG")
    assert cli_main([*args, "--api-key", "wrong"]) == 1
    assert "error (401)" in capsys.readouterr().err


def test_readme_python_example_runs(service, tmp_path, monkeypatch):
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    default = 'Client("http://127.0.0.1:8000")'
    assert default in code
    (tmp_path / "docs").symlink_to(Path(__file__).parents[2] / "docs")
    monkeypatch.chdir(tmp_path)
    exec(code.replace(default, f"Client({service.url!r}, api_key={KEY!r})"), {})
    assert (tmp_path / "ball.png").read_bytes().startswith(b"\x89PNG")
