"""Task images: downloaded only from the Label Studio host, with its token, within the upload limits.

Task data hold Label Studio paths (``/data/upload/3/abc.png``) or absolute URLs. A path is joined to
the Label Studio URL; an absolute URL must have exactly that URL's scheme, host and port. Anything else
— another host, ``file:``/``data:``/``ftp:`` URLs, credentials in the URL — is refused, so task data
cannot make the service request other addresses (server-side request forgery). Redirects are not
followed (a redirect could lead anywhere), and a host that resolves to a link-local, multicast or
unspecified address (cloud metadata endpoints live at 169.254.169.254) is refused even when it is the
Label Studio URL. Bodies are read up to ``max_bytes`` and no further. The address check runs just before
the downloads, so a DNS name that changes its answer in between is not caught: give ``LABEL_STUDIO_URL``
as an address or a name you control.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from service.label_studio.errors import ImageRefused, ImageUnavailable

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}


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
        except ValueError as exc:  # e.g. "Invalid IPv6 URL"
            raise ImageRefused(f"{_shown(url)} is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES or not parts.hostname:
            raise ImageRefused(f"{_shown(url)} is not an http(s) URL with a host")
        if parts.username or parts.password:
            raise ImageRefused(f"{_shown(url)} carries credentials; the token goes in a header, not the URL")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ImageRefused(f"{_shown(url)} has an invalid port") from None
        return cls(scheme, parts.hostname.lower(), port)

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
    target = Origin.parse(url)
    if target != origin:
        raise ImageRefused(
            f"image {_shown(ref)} is not on the Label Studio host {origin.url}; "
            "the backend fetches images only from there"
        )
    try:
        httpx.URL(url)  # what httpx would refuse when sending: too long, control characters, ...
    except (httpx.InvalidURL, UnicodeError) as exc:  # InvalidURL is not an httpx.HTTPError
        raise ImageRefused(f"image {_shown(ref)} is not a valid URL: {exc}") from None
    return url


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved


async def check_host(origin: Origin) -> None:
    """Refuse a Label Studio host that resolves to a link-local, multicast or unspecified address."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageUnavailable(f"cannot resolve the Label Studio host {origin.host!r}: {exc}") from None
    # The address is always a str for the IP families getaddrinfo answers with.
    bad = sorted({str(info[4][0]) for info in infos if _refused_address(str(info[4][0]))})
    if bad:
        raise ImageRefused(
            f"the Label Studio host {origin.host!r} resolves to {', '.join(bad)} "
            "(link-local, multicast or unspecified); images are not fetched from there"
        )


class ImageFetcher:
    """Fetches task images from one Label Studio server with ``Authorization: Token <token>``."""

    def __init__(self, base_url: str, token: str | None, *, max_bytes: int, timeout_s: float = 20.0) -> None:
        self.origin = Origin.parse(base_url)
        self.headers = {"Authorization": f"Token {token}"} if token else {}
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    async def fetch_all(self, refs: list[str], concurrency: int = 4) -> list[bytes | Exception]:
        """Each image's bytes, or the error that refused it (one bad task does not sink the others)."""
        await check_host(self.origin)
        limit = asyncio.Semaphore(concurrency)
        client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s, trust_env=False)
        async with client:

            async def one(ref: str) -> bytes | Exception:
                async with limit:
                    try:
                        return await self._fetch(client, ref)
                    except (ImageRefused, ImageUnavailable) as exc:
                        return exc

            return list(await asyncio.gather(*(one(ref) for ref in refs)))

    async def fetch(self, ref: str) -> bytes:
        result = (await self.fetch_all([ref]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _fetch(self, client: httpx.AsyncClient, ref: str) -> bytes:
        url = resolve(self.origin, ref)
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
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise ImageRefused(self._too_large(ref))
                return bytes(data)
        except httpx.HTTPError as exc:
            raise ImageUnavailable(f"image {_shown(ref)}: {type(exc).__name__}: {exc}") from None

    def _too_large(self, ref: str) -> str:
        return f"image {_shown(ref)} is larger than {self.max_bytes} bytes (EXCLIP_MAX_UPLOAD_BYTES)"
