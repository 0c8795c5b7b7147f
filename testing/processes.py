"""Service processes: any subprocess with its output in a log file, and API / worker / embedded
``python -m service.cli`` processes sharing one Redis and key prefix, with the tiny checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from testing.network import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICE_CLI = [sys.executable, "-m", "service.cli"]


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
        assert self.url is not None, f"{self.args} was started without a port: it serves no HTTP"
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

    # Generous limits: they only bound how long a broken start takes to fail, and several test
    # processes may start services at once on a small, shared machine.
    def wait_healthy(self, timeout_s: float = 180) -> Process:
        """Wait for the API's /healthz (the process serves HTTP)."""
        self._wait_url("/healthz", timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 240) -> Process:
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
