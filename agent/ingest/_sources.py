"""Sources: what `mmagent ingest` is given (files, folders, http(s) URLs) as typed, hashed local files.

A URL is fetched through the same confinement as the HTTP tool (`tools._fetch`): only hosts on the allow-list
(redirects included), a byte cap and a time limit. Downloads land in a folder, named by their sha256, so the
`clip` tool can cut them later. The kind of a file comes from its bytes, never from its name: PDF magic ->
document, an image format -> image, else FFmpeg's demuxer (a video stream -> video, audio only -> audio).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent import _media
from agent.exceptions import MediaError, UserError
from agent.ingest import _decode
from tools._fetch import FetchRefused, confined_get

MediaKind = Literal["video", "audio", "image", "document"]

_READ_CHUNK = 1 << 20
_SUFFIX = {"video": ".video", "audio": ".audio", "image": ".image", "document": ".pdf"}


@dataclass(frozen=True, slots=True)
class LocalSource:
    """A source ready to ingest: where it was named (`uri`), the local file, and what it is."""

    uri: str
    path: Path
    kind: MediaKind
    media_type: str
    sha256: str
    size: int


def is_url(text: str) -> bool:
    """Whether a source argument is a URL rather than a path (any `scheme://`)."""
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isascii() and head.isalpha()


def expand(arguments: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, Path | None, bool]]:
    """(uri, local path or None for a URL, explicitly named) for each argument; folders are walked (sorted,
    hidden names and symlinked folders skipped); an explicitly named file that is not media is an error later,
    a file found in a folder is skipped quietly."""
    for argument in arguments:
        text = os.fspath(argument)
        if isinstance(argument, str) and is_url(text):
            yield text, None, True
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        found = Path(root, name).resolve()
                        yield str(found), found, False
        else:
            resolved = path.resolve() if path.exists() else path.absolute()
            yield str(resolved), resolved, True


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 (hex) and size, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def detect_kind(path: Path) -> tuple[MediaKind, str]:
    """(kind, media type) of a local file from its content.

    Raises:
        MediaError: not a regular file, or not media that ingestion reads.
    """
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if not path.is_file():
        raise MediaError(f"{path}: is not a regular file")
    with open(path, "rb") as file:
        head = file.read(64)
    if head.startswith(b"%PDF-"):
        return "document", "application/pdf"
    sniffed = _media.sniff_media_type(head)
    if sniffed is not None and sniffed.startswith("image/"):
        return "image", sniffed
    with _decode.open_media(path) as container:
        name = container.format.name.split(",")[0]
        if container.streams.video and not _still_picture(container):
            return "video", f"video/{name}"
        if container.streams.audio:
            return "audio", sniffed or f"audio/{name}"
    raise MediaError(f"{path}: has neither video nor audio")


def _still_picture(container: Any) -> bool:
    """An audio file's cover art shows up as a one-frame video stream ("attached picture")."""
    from av.stream import Disposition

    return bool(container.streams.video[0].disposition & Disposition.attached_pic)


def local(uri: str, path: Path) -> LocalSource:
    """A local file as a source (kind from its content, then hashed)."""
    kind, media_type = detect_kind(path)
    sha, size = sha256_file(path)
    return LocalSource(uri=uri, path=path, kind=kind, media_type=media_type, sha256=sha, size=size)


async def download(
    url: str,
    folder: Path,
    *,
    allowed_hosts: Collection[str],
    max_bytes: int,
    time_limit: float,
    transport: Any = None,
) -> LocalSource:
    """Fetch `url` into `folder` (confined: allow-list, byte cap, `time_limit` seconds in all) as a source.

    Raises:
        UserError: no host is allowed, or the URL was refused, failed, timed out or is over the cap.
        MediaError: what came back is not media ingestion reads.
    """
    hosts = frozenset(h.lower() for h in allowed_hosts)
    if not hosts:
        raise UserError(f"{url}: fetching URLs needs allowed hosts (mmagent ingest --allow-host HOST)")
    os.makedirs(folder, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".download-", dir=folder)
    temp = Path(name)
    digest = hashlib.sha256()

    def sink(chunk: bytes) -> None:
        digest.update(chunk)
        os.write(handle, chunk)

    try:
        try:
            async with asyncio.timeout(time_limit):
                fetched = await confined_get(
                    url,
                    hosts,
                    max_bytes=max_bytes,
                    read_timeout=min(time_limit, 30.0),
                    sink=sink,
                    over_cap="refuse",
                    transport=transport,
                )
        except FetchRefused as exc:
            raise UserError(str(exc)) from None
        except TimeoutError:
            raise UserError(f"fetching {url} took longer than {time_limit:g} s") from None
        os.fsync(handle)
        os.close(handle)
        handle = -1
        kind, media_type = detect_kind(temp)
        sha = digest.hexdigest()
        final = folder / f"{sha}{_SUFFIX[kind]}"
        os.replace(temp, final)
        return LocalSource(uri=url, path=final, kind=kind, media_type=media_type, sha256=sha, size=fetched.size)
    except MediaError as exc:
        raise MediaError(str(exc).replace(str(temp), url)) from None
    finally:
        if handle >= 0:
            os.close(handle)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
