"""The test harness shared by tests/ and bench/: free ports, private Redis, the tiny model, processes.

One importable module (``tests.harness``; bench scripts put the repository root on ``sys.path``), not
a package module of ``service``: none of it ships, and pytest fixtures in tests/conftest.py wrap it.

- ``free_port()``: a TCP port that was free a moment ago on 127.0.0.1.
- ``RedisServer``: a private ``redis-server`` on its own port, no persistence (never the shared 6379).
- ``save_tiny_checkpoint(directory)``: an ``exclip-tiny`` state_dict with seeded random weights.
- ``Process``: any subprocess with its output in a log file; ``wait_healthy``/``wait_ready`` for APIs.
  Several are stopped together, last started first, with a ``contextlib.ExitStack`` of their ``stop``.
- ``ServiceLauncher``: API / worker / embedded ``python -m service.cli`` processes sharing one Redis and
  key prefix, with the tiny checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = "/usr/bin/redis-server"
SERVICE_CLI = [sys.executable, "-m", "service.cli"]
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright drives it (never `playwright install`)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` without persistence on its own port."""

    # No persistence by default; a subclass or caller may ask for an append-only file instead.
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.persistence,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server (its data is lost; nothing is persisted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)


def random_clip(name: str, n_images: int = 1, device: str = "cpu") -> tuple[Any, Any, Any]:
    """An open_clip ``name`` with seeded random weights (seed 0), eval mode, on ``device``; its tokenizer;
    and ``n_images`` seeded random inputs (seed 1) of its image size, (n, 3, H, W).

    The same model and inputs in every test and benchmark that compares engines or measures costs.
    """
    import open_clip
    import torch

    import attribution.models  # noqa: F401 - importing registers exclip-tiny and exclip-scenes

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval().to(device)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(n_images, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, open_clip.get_tokenizer(name), images


def save_tiny_checkpoint(directory: Path, seed: int = 0) -> str:
    """Save an ``exclip-tiny`` state_dict (seeded random weights) in ``directory``; return its path.

    Pass it as ``--pretrained`` / ``EXCLIP_PRETRAINED``: random init differs per process, a file does not.
    """
    import open_clip
    import torch

    from attribution.models import TINY_MODEL  # importing registers the architecture

    torch.manual_seed(seed)
    path = Path(directory) / "exclip-tiny.pt"
    torch.save(open_clip.create_model(TINY_MODEL, pretrained=None).state_dict(), path)
    return str(path)


class Process:
    """One subprocess (default: ``python -m service.cli ARGS``); its stdout and stderr go to a log file.

    ``new_session``: the child gets its own session, so a Ctrl-C in the terminal reaches only the
    parent (a bench script), which then stops its children itself, in order.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        port: int | None = None,
        *,
        argv: list[str] | None = None,
        name: str | None = None,
        new_session: bool = False,
    ) -> None:
        self.args, self.env = args, env
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.log_path = log_dir / f"{name or args[0]}-{uuid.uuid4().hex[:8]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv or [*SERVICE_CLI, *args],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the output."""
        return "\n".join(self.output.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _wait_url(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.output}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.url}{path} not 200 after {timeout_s}s:\n{self.output}")

    def wait_healthy(self, timeout_s: float = 60) -> Process:
        """Wait for the API's /healthz (the process serves HTTP)."""
        self._wait_url("/healthz", timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 90) -> Process:
        """Wait for the API's /readyz (queue reachable, a worker advertises a model)."""
        self._wait_url("/readyz", timeout_s)
        return self

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL after ``timeout_s``)."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class ServiceLauncher:
    """Starts API / worker / embedded processes sharing one Redis and key prefix, with the tiny model."""

    def __init__(self, redis_url: str | None, key_prefix: str, checkpoint: str, log_dir: Path) -> None:
        self.redis_url, self.key_prefix, self.log_dir = redis_url, key_prefix, log_dir
        self.base_env = {
            **os.environ,
            "EXCLIP_KEY_PREFIX": key_prefix,
            "EXCLIP_MODEL": "exclip-tiny",
            "EXCLIP_PRETRAINED": checkpoint,
            "EXCLIP_DEVICE": "cpu",
            "EXCLIP_HEARTBEAT_S": "2",  # heartbeat key lives 6 s: enough on a busy CI machine
            "OMP_NUM_THREADS": "1",  # several processes share 2 cores in CI
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: list[Process] = []

    def _env(self, redis_url: str | None, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if k != "REDIS_URL"}
        if redis_url:
            env["REDIS_URL"] = redis_url
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _start(self, args: list[str], env: dict[str, str], port: int | None) -> Process:
        proc = Process(args, env, self.log_dir, port)
        self.processes.append(proc)
        return proc

    def api(self, **env: str) -> Process:
        """``serve`` against Redis (API only); call ``.wait_healthy()`` or ``.wait_ready()``."""
        port = free_port()
        return self._start(["serve", "--port", str(port)], self._env(self.redis_url, env), port)

    def worker(self, **env: str) -> Process:
        """``worker`` against Redis; ready once an API's /readyz says so."""
        return self._start(["worker"], self._env(self.redis_url, env), None)

    def embedded(self, **env: str) -> Process:
        """``serve`` without REDIS_URL: API and worker in one process with the in-memory queue."""
        port = free_port()
        return self._start(["serve", "--port", str(port)], self._env(None, env), port)

    def close(self) -> None:
        for proc in self.processes:
            proc.stop(timeout_s=15)


def wait_until_ready(client: Any, timeout_s: float = 60) -> None:
    """Until an in-process app (a ``TestClient``) answers ``/readyz`` 200: a worker advertised a model."""
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "no worker advertised a model: /readyz never said ready"
        time.sleep(0.05)


def spy_conversions(monkeypatch: Any) -> list[tuple[int, int]]:
    """From now on, the (width, height) of every image ``attribution.decode`` converts to RGB or grey
    (``_to_rgb_or_grey``): a band-wise conversion shows as many bands, a whole one as the full size."""
    from attribution import decode

    sizes: list[tuple[int, int]] = []
    convert = decode._to_rgb_or_grey

    def spy(image: Any, *args: Any) -> Any:
        sizes.append(image.size)
        return convert(image, *args)

    monkeypatch.setattr(decode, "_to_rgb_or_grey", spy)
    return sizes


def distinct_captions(text: str, n: int) -> list[str]:
    """``n`` different captions: the engine computes each distinct caption once, so repeats cost nothing."""
    return [f"{text} {i}" for i in range(n)]


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``) for as long as the ``with`` block runs.

    Each fixture scope opens its own: a sync Playwright session cannot be shared into tests that run
    an asyncio loop of their own, so tests/web and tests/label_studio do not share one browser.
    """
    import pytest
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is required for the browser tests (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
