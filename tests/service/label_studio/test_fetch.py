"""Task images come only from the Label Studio host (no server-side request forgery), within limits.

The "Label Studio host" here is a real HTTP server on 127.0.0.1 that records what it was asked.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.label_studio.errors import ImageRefused, ImageUnavailable
from service.label_studio.fetch import Downloads, ImageFetcher, refused_category
from service.label_studio.predictor import Predictor
from service.label_studio.projects import ProjectSetup
from service.settings import Settings
from tests.service.label_studio.image_hosts import sick_host, url_of

IMAGE = b"\x89PNG fake image bytes" * 10
LIMIT = 1000


class _Host(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Host.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/data/upload/1/img.png":
            self._send(200, IMAGE)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/data/upload/1/img.png")
            self.end_headers()
        elif self.path == "/big":
            self._send(200, b"x" * (LIMIT + 1))
        elif self.path == "/big-chunked":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"64\r\n" + b"y" * 100 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _fetch(base: str, ref: str, token: str | None = "tok") -> bytes:
    return asyncio.run(ImageFetcher(base, token, max_bytes=LIMIT).fetch(ref))


def test_upload_path_and_same_origin_url_with_token(host: str) -> None:
    _Host.seen.clear()
    assert _fetch(host, "/data/upload/1/img.png") == IMAGE
    assert _fetch(host + "/", f"{host}/data/upload/1/img.png") == IMAGE
    assert _Host.seen == [("/data/upload/1/img.png", "Token tok")] * 2


@pytest.mark.parametrize(
    "ref",
    [
        "http://example.org/img.png",  # another host
        "http://127.0.0.2:{port}/data/upload/1/img.png",  # another address
        "http://127.0.0.1:{other}/data/upload/1/img.png",  # another port
        "https://127.0.0.1:{port}/data/upload/1/img.png",  # another scheme
        "//example.org/img.png",  # protocol-relative: another host
        "file:///etc/passwd",
        "data:image/png;base64,iVBORw0KGgo=",
        "ftp://127.0.0.1:{port}/img.png",
        "http://user:pw@127.0.0.1:{port}/data/upload/1/img.png",  # credentials in the URL
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "",
        # URLs httpx will not send (httpx.InvalidURL is no httpx.HTTPError): refused, not a crash
        "/" + "a" * 70_000,  # longer than 65536 characters
        "/data/upload/1/\u0000.png",  # a control character
        "http://127.0.0.1:{port}/data/upload/1/img.png\r\nX-Injected: 1",  # a header injection
        "/data/upload/1/\ud800.png",  # a lone surrogate: not UTF-8
        "http://[::1/img.png",  # a broken IPv6 host
    ],
)
def test_other_places_are_refused_without_a_request(host: str, ref: str) -> None:
    port = int(host.rsplit(":", 1)[1])
    _Host.seen.clear()
    with pytest.raises(ImageRefused):
        _fetch(host, ref.format(port=port, other=port + 1))
    assert _Host.seen == []


@pytest.mark.parametrize(
    "base",
    [
        "http://169.254.169.254",
        "http://[fe80::1]:8080",
        "http://0.0.0.0:8080",
        "http://224.0.0.1",
        "file:///data",
    ],
)
def test_label_studio_url_on_refused_addresses(base: str) -> None:
    """Even as the configured Label Studio URL: link-local, multicast, unspecified hosts are refused."""
    with pytest.raises(ImageRefused):
        _fetch(base, "/data/upload/1/img.png")


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("/redirect", ImageRefused, "redirect"),
        ("/big", ImageRefused, "larger than 1000 bytes"),
        ("/big-chunked", ImageRefused, "larger than 1000 bytes"),
        ("/data/upload/1/nothing.png", ImageUnavailable, "404"),
    ],
)
def test_redirects_limits_and_errors(host: str, ref: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _fetch(host, ref)


def test_configured_url_wins_and_our_key_never_goes_to_a_setup_host() -> None:
    configured = Settings(label_studio_url="http://ls.internal:8080", label_studio_api_key="ours")
    told = ProjectSetup(hostname="http://elsewhere:9", access_token="theirs")
    fetcher = Predictor(None, configured, None, told).fetcher()
    assert fetcher.origin.url == "http://ls.internal:8080"
    assert fetcher.headers == {"Authorization": "Token ours"}

    unset = Settings(label_studio_api_key="ours")
    fetcher = Predictor(None, unset, None, told).fetcher()
    assert (fetcher.origin.url, fetcher.headers) == ("http://elsewhere:9", {"Authorization": "Token theirs"})
    with pytest.raises(ImageRefused, match="LABEL_STUDIO_URL"):
        Predictor(None, unset, None, None).fetcher()


def _timed(coro, bound_s: float = 15.0):
    """Runs ``coro``; a download that outlives ``bound_s`` fails the test instead of hanging it."""

    async def bounded():
        return await asyncio.wait_for(coro, bound_s)

    started = time.monotonic()
    result = asyncio.run(bounded())
    return result, time.monotonic() - started


def test_a_trickling_host_is_cut_off_at_the_download_deadline() -> None:
    """One byte every 0.2 s keeps every read within httpx's timeout: only a total deadline stops it."""
    with sick_host(size=1000, byte_every_s=0.2) as server:
        fetcher = ImageFetcher(url_of(server), None, max_bytes=LIMIT, timeout_s=1.0)
        (result,), took = _timed(fetcher.fetch_all(["/trickle"]))
        assert isinstance(result, ImageUnavailable), result
        assert "not downloaded within the 1 s a download may take" in str(result)
        assert took < 5
        _wait_for(lambda: server.serving == 0)  # the connection was closed, not left to trickle on


def test_the_calls_deadline_bounds_every_download_and_every_wait() -> None:
    """Three stalled downloads, one at a time: all end at the call's deadline, the waiting ones too."""
    with sick_host(size=1000, byte_every_s=0.5) as server:
        fetcher = ImageFetcher(url_of(server), None, max_bytes=LIMIT, timeout_s=20.0)
        deadline = time.monotonic() + 1.0
        results, took = _timed(fetcher.fetch_all(["/trickle"] * 3, deadline=deadline, concurrency=1))
        assert all(isinstance(r, ImageUnavailable) for r in results), results
        assert all("EXCLIP_LABEL_STUDIO_BUDGET_S" in str(r) for r in results), results
        assert took < 5
        assert server.most == 1


def test_downloads_in_flight_are_bounded_per_process_not_per_call() -> None:
    """Six calls whose bodies stall near the size limit: at most ``Downloads.limit`` bodies are held
    (half-way through the first downloads' time, the host serves exactly that many)."""
    with sick_host(size=LIMIT, sent_before_stall=LIMIT - 10, byte_every_s=0.2) as server:

        async def six_calls() -> tuple[int, list]:
            downloads = Downloads(2)
            fetchers = [
                ImageFetcher(url_of(server), None, max_bytes=LIMIT, timeout_s=1.5, downloads=downloads)
                for _ in range(6)
            ]
            calls = asyncio.gather(*(f.fetch_all(["/stall"]) for f in fetchers))
            await asyncio.sleep(0.75)
            return server.serving, await calls

        (serving, results), took = _timed(six_calls())
        assert serving == 2
        assert all(isinstance(r, ImageUnavailable) for (r,) in results), results
        assert 4.5 <= took < 9  # three rounds of two


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("::1", None),
        ("127.0.0.1", None),
        ("127.8.9.10", None),
        ("::ffff:127.0.0.1", None),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100::1", "reserved"),  # the discard prefix
        ("10.0.0.1", None),
    ],
)
def test_address_categories(address: str, category: str | None) -> None:
    assert refused_category(address) == category


def test_ipv6_loopback_is_a_label_studio_host(host: str) -> None:
    """``::1`` is loopback (``ipaddress`` also calls it reserved): images are fetched from it."""
    with sick_host("::1", size=3, byte_every_s=0.0) as server:
        assert _fetch(url_of(server), "/trickle") == b"xxx"
    assert _fetch(host.replace("127.0.0.1", "localhost"), "/data/upload/1/img.png") == IMAGE


@pytest.mark.parametrize(
    ("base", "category"),
    [
        ("http://[fe80::1]:8080", "link-local"),
        ("http://[::ffff:169.254.169.254]", "link-local"),
        ("http://[::]:8080", "unspecified"),
        ("http://240.0.0.1", "reserved"),
    ],
)
def test_a_refused_host_is_named_with_its_category(base: str, category: str) -> None:
    with pytest.raises(ImageRefused, match=rf"resolves to \S+ \({category}\)"):
        _fetch(base, "/data/upload/1/img.png")
