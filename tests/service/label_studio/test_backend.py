"""The backend's process-wide parts: settings checked at start, and a ``/predict`` call cancelled with
its downloads and jobs when its client leaves or the service is told to stop.

The sick image host is a real HTTP server on loopback that trickles its body a byte at a time
(tests/service/label_studio/image_hosts.py), so a download only ends when someone closes it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.errors import ConfigError
from service.settings import Settings, load_settings
from testing import ROOT, free_port
from tests.service.label_studio.image_hosts import sick_host, url_of
from tests.service.label_studio.scenario import CAPTION, DOCUMENTED

REFUSED_URLS = [
    ("ftp://x", "is not an http(s) URL with a host"),
    ("http://169.254.169.254", "169.254.169.254 is a link-local address"),
    ("http://[::ffff:169.254.169.254]:8080", "link-local"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://0.0.0.0:8080", "unspecified"),
    ("http://x:99999", "not a valid URL"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED_URLS)
def test_a_label_studio_url_no_image_comes_from_stops_the_app(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"LABEL_STUDIO_URL=.*{re.escape(message)}"):
        create_app(load_settings(redis_url=None, label_studio_url=url))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://[::1]:8080", "https://ls.example.org"])
def test_loopback_and_names_are_label_studio_urls(url: str) -> None:
    create_app(Settings(redis_url=None, label_studio_url=url))


def test_the_service_does_not_start_with_such_a_url() -> None:
    """The command exits with the message (API mode: no model, no Redis connection needed to fail)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REDIS_URL": "redis://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
        env={**env, "LABEL_STUDIO_URL": "ftp://x"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "LABEL_STUDIO_URL='ftp://x'" in done.stderr
    assert "is not an http(s) URL" in done.stderr
    assert "Traceback" not in done.stderr


def _body(image: str = "/trickle") -> dict:
    task = {"id": 1, "data": {"image": image, "caption": CAPTION}}
    return {"tasks": [task], "label_config": DOCUMENTED, "params": {"context": None}}


@pytest.fixture
def served_in_thread(tiny_checkpoint: str, tiny_loaded) -> Iterator:
    """Starts the embedded app (tiny model) under uvicorn in a thread of this process: ``start(url)``."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(label_studio_url: str) -> str:
        settings = Settings(
            redis_url=None,
            model="exclip-tiny",
            pretrained=tiny_checkpoint,
            device="cpu",
            label_studio_url=label_studio_url,
        )
        port = free_port()
        config = uvicorn.Config(
            create_app(settings, worker_models=[tiny_loaded]), port=port, log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the app did not become ready")

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


def test_a_client_that_leaves_cancels_the_download(served_in_thread) -> None:
    """Label Studio gives up on a call (its timeout, a closed tab): the image download stops with it,
    not at the end of a 200 s trickle."""
    with sick_host(size=1000, byte_every_s=0.2) as host:
        url = served_in_thread(url_of(host))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/label-studio/predict", json=_body(), timeout=1.5)
        left = time.monotonic()
        assert host.most == 1  # the download had started
        deadline = time.monotonic() + 5
        while host.serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.serving == 0, "the download went on after the client left"
        assert host.ended[-1] - left < 3


@pytest.mark.slow  # a service process starts in 20-60 s on a busy 2-core machine
def test_sigterm_cancels_a_call_stuck_in_a_download_and_answers_503(launcher) -> None:
    """uvicorn waits for requests in flight (up to EXCLIP_WAIT_MAX_S + 10 s) before it stops: a call
    stuck in a download is cancelled at once instead, answered 503, and the process exits promptly."""
    with sick_host(size=1000, byte_every_s=0.2) as host:
        api = launcher.embedded(LABEL_STUDIO_URL=url_of(host))
        api.wait_ready()
        answers: list[httpx.Response] = []
        call = threading.Thread(
            target=lambda: answers.append(
                httpx.post(api.url + "/label-studio/predict", json=_body(), timeout=60)
            )
        )
        call.start()
        deadline = time.monotonic() + 20
        while not host.most and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.most == 1, api.log_tail()
        signalled = time.monotonic()
        api.send_signal(signal.SIGTERM)
        call.join(30)
        assert api.proc.wait(30) is not None
        took = time.monotonic() - signalled
        (answer,) = answers
        assert answer.status_code == 503, answer.text
        assert "shutting down" in answer.json()["detail"]
        assert took < 10, api.log_tail()
        assert host.serving == 0
        assert "Traceback" not in api.output, api.log_tail(60)
