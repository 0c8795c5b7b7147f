"""A private ``redis-server`` per test session or benchmark (never the shared 6379)."""

from __future__ import annotations

import subprocess
import time

import redis

from testing.network import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class PortTaken(RuntimeError):
    """redis-server exited at once: another process listens on its port."""


class RedisServer:
    """A private ``redis-server`` without persistence on its own port."""

    # No persistence by default; a subclass or caller may ask for an append-only file instead.
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(self, port: int | None = None) -> None:
        self._port_chosen = port is not None
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start on ``port``. At the first start, a port this object picked itself is picked again if it
        was taken meanwhile (test processes running in parallel pick free ports at the same time); a
        restart keeps the port, as clients hold the URL."""
        for _ in range(4):
            try:
                self._start(timeout_s)
                self._port_chosen = True  # from now on the port is the server's address
                return
            except PortTaken:
                if self._port_chosen:
                    raise
                self.port = free_port()
                self.url = f"redis://127.0.0.1:{self.port}/0"
        self._start(timeout_s)

    def _start(self, timeout_s: float) -> None:
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
                answering = self.client().info("server")["process_id"]
                if answering != self.proc.pid:  # another process's server holds the port
                    self.proc.kill()
                    self.proc.wait(10)
                    raise PortTaken(f"port {self.port} is another redis-server's (pid {answering})")
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise PortTaken(f"redis-server could not listen on port {self.port}") from None
                if time.monotonic() > deadline:
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
