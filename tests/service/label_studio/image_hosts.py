"""Sick Label Studio image hosts on loopback, real sockets: one that trickles a body a byte at a time,
and one that sends most of a body and then stalls; each counts the downloads it is serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SickHost(ThreadingHTTPServer):
    daemon_threads = True
    size: int = 1000  # the Content-Length every answer declares
    sent_before_stall: int = 0  # bytes sent at once before stalling (/stall)
    byte_every_s: float = 0.2  # the trickle's pace (/trickle); /stall sends one byte this often too

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self.lock = threading.Lock()
        self.serving = 0  # downloads in progress now
        self.most = 0  # the most ever served at once
        self.ended: list[float] = []  # when each download ended (the client went away or all was sent)

    def started(self) -> None:
        with self.lock:
            self.serving += 1
            self.most = max(self.most, self.serving)

    def stopped(self) -> None:
        with self.lock:
            self.serving -= 1
            self.ended.append(time.monotonic())


class _Handler(BaseHTTPRequestHandler):
    server: SickHost

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        host = self.server
        self.send_response(200)
        self.send_header("Content-Length", str(host.size))
        self.end_headers()
        host.started()
        try:
            sent = 0
            if self.path.startswith("/stall"):
                self.wfile.write(b"x" * host.sent_before_stall)
                sent = host.sent_before_stall
            while sent < host.size:
                self.wfile.write(b"x")
                self.wfile.flush()
                sent += 1
                time.sleep(host.byte_every_s)
        except OSError:  # the client went away
            pass
        finally:
            host.stopped()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def sick_host(address: str = "127.0.0.1", **fields: float) -> Iterator[SickHost]:
    """A ``SickHost`` on a free port of ``address``; ``fields`` set its ``size``, pace, ..."""
    server_class = type("Host", (SickHost,), {**fields})
    if ":" in address:
        import socket

        server_class.address_family = socket.AF_INET6
    server = server_class((address, 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url_of(server: SickHost) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
