"""Large artifacts as files next to an SQLite database, named by their sha256.

A file is written (to a temporary name, flushed to disk, then renamed) before the transaction that adds
its `mm_artifacts` row commits, and removed only after the row is gone, under the database's write lock.
A crash can therefore leave an unreferenced file behind (harmless: it is reused when the same bytes come
again, and `Store.collect_garbage` removes it), never a row without its file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agent.exceptions import StoreError


class BlobFiles:
    """A directory of content-addressed files: `<dir>/<sha[:2]>/<sha>`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, sha256: str) -> Path:
        """Where the bytes with this hash live."""
        return self.directory / sha256[:2] / sha256

    def write(self, sha256: str, data: bytes) -> None:
        """Store `data` durably (atomic rename after fsync); an existing complete file is kept."""
        target = self.path(sha256)
        try:
            if target.is_file() and target.stat().st_size == len(data):
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"cannot write artifact file {target}: {exc.strerror or exc}") from exc

    def read(self, sha256: str) -> bytes:
        """The stored bytes."""
        target = self.path(sha256)
        try:
            return target.read_bytes()
        except OSError as exc:
            raise StoreError(f"artifact {sha256} is missing its file {target}: {exc.strerror or exc}") from exc

    def remove(self, sha256: str) -> None:
        """Delete the file if present."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def names(self) -> Iterator[str]:
        """Hashes of every stored file."""
        if not self.directory.is_dir():
            return
        for sub in self.directory.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                for f in sub.iterdir():
                    if len(f.name) == 64 and not f.name.startswith("."):
                        yield f.name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
