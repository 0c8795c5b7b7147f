"""Task images: downloaded only from the Label Studio host, with its token, within the upload limits.

Task data hold Label Studio paths (``/data/upload/3/abc.png``) or absolute URLs. A path is joined to
the Label Studio URL; an absolute URL must have exactly that URL's scheme, host and port. Anything else
— another host, ``file:``/``data:``/``ftp:`` URLs, credentials in the URL — is refused, so task data
cannot make the service request other addresses (server-side request forgery). Redirects are not
followed (a redirect could lead anywhere), and a host that resolves to a link-local, multicast,
unspecified or reserved address (cloud metadata endpoints live at 169.254.169.254) is refused even when
it is the Label Studio URL; loopback (127.0.0.0/8, ``::1``) is allowed, so a ``localhost`` that names
both families works. The address check runs just before the downloads, so a DNS name that changes its
answer in between is not caught: give ``LABEL_STUDIO_URL`` as an address or a name you control.

Bounded whatever the host does: each body is read up to ``max_bytes`` and no further; each download
has a total deadline (``timeout_s``, and never past the call's deadline), not only a per-read timeout,
so a host that trickles one byte at a time is cut off; and downloads in flight are limited per process
(``Downloads``), so memory is at most that many times ``max_bytes`` however many calls wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from service.label_studio.errors import ImageRefused, ImageUnavailable

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_DOWNLOADS = 8
"""Image downloads in flight at once in one API process, across all ``/predict`` calls."""
PER_CALL = 4
"""Image downloads in flight at once for one call."""


@dataclass(frozen=True)
class Origin:
    """scheme://host:port of the Label Studio server, the only place images are fetched from."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        try:
            parts = urlsplit(url.strip())
            port = parts.port  # raises for a port that is not a number or out of range
        except ValueError as exc:  # e.g. "Invalid IPv6 URL", "Port out of range 0-65535"
            raise ImageRefused(f"{_shown(url)} is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES or not parts.hostname:
            raise ImageRefused(f"{_shown(url)} is not an http(s) URL with a host")
        if parts.username or parts.password:
            raise ImageRefused(f"{_shown(url)} carries credentials; the token goes in a header, not the URL")
        host = parts.hostname.lower()
        if ":" in host:  # only an IPv6 literal may hold colons
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                raise ImageRefused(f"{_shown(url)} has an invalid IPv6 host {host!r}") from None
        try:
            httpx.URL(url.strip())  # what httpx would refuse when sending: too long, control characters
        except (httpx.InvalidURL, UnicodeError) as exc:  # InvalidURL is not an httpx.HTTPError
            raise ImageRefused(f"{_shown(url)} is not a valid URL: {exc}") from None
        return cls(scheme, host, port or DEFAULT_PORTS[scheme])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _shown(url: str) -> str:
    """A URL for an error message: short, and without any query string (it may hold a token)."""
    shown = url.split("?", 1)[0]
    return repr(shown if len(shown) <= 120 else shown[:117] + "...")


def resolve(origin: Origin, ref: str) -> str:
    """The absolute URL of a task image reference, or ``ImageRefused`` if it is not on ``origin``."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageRefused("the task has no image URL")
    ref = ref.strip()
    if ref.startswith("/") and not ref.startswith("//"):
        url = urljoin(origin.url + "/", ref)
    else:
        url = ref
    try:
        target = Origin.parse(url)
    except ImageRefused as exc:
        raise ImageRefused(f"image {exc}") from None
    if target != origin:
        raise ImageRefused(
            f"image {_shown(ref)} is not on the Label Studio host {origin.url}; "
            "the backend fetches images only from there"
        )
    return url


def refused_category(address: str) -> str | None:
    """Why images are never fetched from this IP address ("link-local", ...), or None: it may be used.

    Loopback is allowed in both families (``ipaddress`` counts ``::1`` as reserved too); an IPv4 address
    mapped into IPv6 is judged as the IPv4 address it is.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    for category, refused in (
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
    ):
        if refused:
            return category
    return None


def refused_literal(origin: Origin) -> str | None:
    """For a host given as an IP address: why it is refused (see ``refused_category``); else None.
    A host name is checked when it is resolved, just before the downloads."""
    try:
        return refused_category(origin.host)
    except ValueError:  # a name, not an address
        return None


async def check_host(origin: Origin) -> None:
    """Refuse a Label Studio host that resolves to an address ``refused_category`` refuses."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageUnavailable(f"cannot resolve the Label Studio host {origin.host!r}: {exc}") from None
    # The address is always a str for the IP families getaddrinfo answers with.
    addresses = sorted({str(info[4][0]) for info in infos})
    bad = [f"{a} ({category})" for a in addresses if (category := refused_category(a))]
    if bad:
        raise ImageRefused(
            f"the Label Studio host {origin.host!r} resolves to {', '.join(bad)}; "
            "images are not fetched from there"
        )


class Downloads:
    """The process's limit on image downloads in flight: memory is at most ``limit`` x the size limit."""

    def __init__(self, limit: int = MAX_DOWNLOADS) -> None:
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)

    async def __aenter__(self) -> None:
        await self._slots.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()


class ImageFetcher:
    """Fetches task images from one Label Studio server with ``Authorization: Token <token>``."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        max_bytes: int,
        timeout_s: float = 20.0,
        downloads: Downloads | None = None,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.headers = {"Authorization": f"Token {token}"} if token else {}
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.downloads = downloads

    async def fetch_all(
        self, refs: list[str], *, deadline: float | None = None, concurrency: int = PER_CALL
    ) -> list[bytes | Exception]:
        """Each image's bytes, or the error that refused it (one bad task does not sink the others).

        ``deadline`` (``time.monotonic()``) ends every download still running then, waiting included.
        """
        await check_host(self.origin)
        limit = asyncio.Semaphore(concurrency)
        downloads = self.downloads or Downloads(concurrency)
        client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s, trust_env=False)
        async with client:

            async def one(ref: str) -> bytes | Exception:
                try:
                    async with limit, downloads:
                        return await self._fetch_in_time(client, ref, deadline)
                except (ImageRefused, ImageUnavailable) as exc:
                    return exc

            return list(await asyncio.gather(*(one(ref) for ref in refs)))

    async def fetch(self, ref: str, *, deadline: float | None = None) -> bytes:
        result = (await self.fetch_all([ref], deadline=deadline))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _fetch_in_time(self, client: httpx.AsyncClient, ref: str, deadline: float | None) -> bytes:
        """``_fetch`` within ``timeout_s`` from now and never past ``deadline``."""
        url = resolve(self.origin, ref)  # refused before any wait
        own = self.timeout_s
        if deadline is not None and deadline - time.monotonic() < own:
            own, why = deadline - time.monotonic(), "the call's time budget (EXCLIP_LABEL_STUDIO_BUDGET_S)"
        else:
            why = f"the {self.timeout_s:g} s a download may take"
        if own <= 0:
            raise ImageUnavailable(f"image {_shown(ref)}: not fetched, {why} is spent")
        try:
            return await asyncio.wait_for(self._fetch(client, url, ref), own)
        except asyncio.TimeoutError:
            raise ImageUnavailable(f"image {_shown(ref)}: not downloaded within {why}") from None

    async def _fetch(self, client: httpx.AsyncClient, url: str, ref: str) -> bytes:
        try:
            async with client.stream("GET", url, headers=self.headers) as response:
                if response.is_redirect:
                    raise ImageRefused(
                        f"image {_shown(ref)}: Label Studio answered with a redirect "
                        f"({response.status_code}); redirects are not followed"
                    )
                if response.status_code != 200:
                    raise ImageUnavailable(
                        f"image {_shown(ref)}: Label Studio answered "
                        f"{response.status_code}; check the backend's access token"
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageRefused(self._too_large(ref))
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ImageRefused(self._too_large(ref))
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise ImageUnavailable(f"image {_shown(ref)}: {type(exc).__name__}: {exc}") from None

    def _too_large(self, ref: str) -> str:
        return f"image {_shown(ref)} is larger than {self.max_bytes} bytes (EXCLIP_MAX_UPLOAD_BYTES)"
