"""One confined HTTP GET, shared by `http_tool` and media ingestion: an allow-list of hosts (redirects checked
against it too), a size cap and a time limit per request, and errors that name the URL, never httpx's text."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

MAX_REDIRECTS = 5


class FetchRefused(Exception):
    """The URL was refused or could not be fetched; `str(exc)` is a one-line reason naming the URL."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """What one GET gave: where it ended (after redirects), its declared type and encoding, how many bytes the
    sink got, and whether the body was cut at the cap."""

    url: str
    content_type: str | None
    encoding: str | None
    size: int
    truncated: bool


def quote(text: str) -> str:
    """A string as shown in a refusal: quoted (control characters escaped) and cut to 80 characters."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def shown_url(url: str) -> str:
    """A URL short enough to put in an error message."""
    return url if len(url) <= 200 else url[:197] + "..."


def check_url(url: str, hosts: Collection[str], *, via: str | None = None) -> None:
    """Refuse anything but http(s) on one of `hosts` (lower-case exact names)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. "http://[::1"
        raise FetchRefused(f"{quote(url)} is not a valid URL") from None
    refusal = None
    if parts.scheme not in ("http", "https"):
        refusal = f"only http and https URLs can be fetched, not {parts.scheme or 'no scheme'!r}"
    elif (hostname or "").lower() not in hosts:
        refusal = f"host {hostname!r} is not allowed; allowed: {', '.join(sorted(hosts))}"
    if refusal is not None:
        raise FetchRefused(refusal if via is None else f"{via} redirected to {quote(url)}: {refusal}")


def _refusal(url: str, exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return f"{quote(url)} is not a valid URL"
    shown = shown_url(url)
    described: tuple[tuple[type[Exception], str], ...] = (
        (httpx.TimeoutException, "timed out fetching {}"),
        (httpx.ConnectError, "could not connect to {}"),
        (httpx.NetworkError, "the connection broke while fetching {}"),
        (httpx.DecodingError, "could not decode the response from {}"),
        (httpx.ProtocolError, "the server at {} sent an invalid HTTP response"),
    )
    return next(
        (message.format(shown) for kind, message in described if isinstance(exc, kind)), f"fetching {shown} failed"
    )


async def confined_get(
    url: str,
    hosts: Collection[str],
    *,
    max_bytes: int,
    read_timeout: float,
    sink: Callable[[bytes], object],
    over_cap: Literal["truncate", "refuse"] = "truncate",
    transport: Any = None,
) -> Fetched:
    """GET `url`, following at most `MAX_REDIRECTS` redirects (each checked), feeding the body to `sink`.

    `read_timeout` bounds each network operation (connect, each read), not the whole download: wrap the call
    in `asyncio.timeout` for that. Past `max_bytes` the body is cut there (`truncate`), or the fetch fails
    (`refuse`, checked against the declared Content-Length first and against what arrives).

    Raises:
        FetchRefused: the URL or a redirect is not allowed, the server failed or answered >= 400, the body is
            over the cap (`refuse`), or the network failed.
    """
    import httpx

    check_url(url, hosts)
    start = url
    async with httpx.AsyncClient(timeout=read_timeout, transport=transport, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = str(response.url.join(response.headers.get("location", "")))
                        check_url(target, hosts, via=url)
                        url = target
                        continue
                    if response.status_code >= 400:
                        raise FetchRefused(f"the server answered {response.status_code} for {url}")
                    declared = response.headers.get("content-length", "")
                    if over_cap == "refuse" and declared.isdigit() and int(declared) > max_bytes:
                        raise FetchRefused(
                            f"{shown_url(url)} is {int(declared)} bytes, over the cap of {max_bytes} bytes"
                        )
                    size, truncated = 0, False
                    async for chunk in response.aiter_bytes():
                        if size + len(chunk) > max_bytes:
                            if over_cap == "refuse":
                                raise FetchRefused(f"{shown_url(url)} is over the cap of {max_bytes} bytes")
                            chunk, truncated = chunk[: max_bytes - size], True
                        sink(chunk)
                        size += len(chunk)
                        if truncated or size >= max_bytes:
                            break
                    return Fetched(
                        url=url,
                        content_type=response.headers.get("content-type"),
                        encoding=response.encoding,
                        size=size,
                        truncated=truncated,
                    )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise FetchRefused(_refusal(url, exc)) from None
        raise FetchRefused(f"too many redirects from {shown_url(start)}")
