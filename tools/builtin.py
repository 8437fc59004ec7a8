"""Built-in tools. Anything that touches files or the network is confined by construction.

* `file_tools(root)`: list, read text and read images *inside* `root` only. A path is opened one component at a
  time below a descriptor of the root, each with `O_NOFOLLOW`, so no symlink is ever followed: a symlink, even
  one pointing inside the root, is refused, and one swapped in while a call runs cannot lead out. `..` is
  resolved on the text of the path and may not climb above the root; absolute paths are refused. The size cap
  is enforced on the opened file (at most `max_bytes + 1` bytes are read), so a file that grows or is replaced
  meanwhile cannot get past it. Where the OS lacks `dir_fd` and `O_NOFOLLOW` (Windows), paths are resolved
  and checked instead (racy, but with the same rules and the same capped read from one opened handle).
* `http_tool(allowed_hosts)`: GET pages from an allow-list of hosts only (redirects are checked against the
  same list), with a size cap and a timeout. Page text is untrusted: the Phi-4 renderer escapes it, so it can
  never forge control tokens or tool calls.
* `calculator`: arithmetic on numbers, parsed with `ast` (no names, no calls, bounded exponents).

What the model is told when a call is refused names only the path or URL it gave: never the root's absolute
path, nor raw OS or httpx error text.
"""

from __future__ import annotations

import ast
import errno
import operator
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any

from pydantic import Field

from agent.exceptions import MediaError, ModelRetry, UserError
from agent.messages import ImagePart, as_image_part
from tools._fetch import FetchRefused, confined_get
from tools._registry import Tool

__all__ = ["calculator", "file_tools", "http_tool"]


# ---------------------------------------------------------------- files

_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
# A file or folder to read. O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused).
_READ: int = os.O_RDONLY | _CLOEXEC | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
# A folder to walk through: O_PATH (Linux) needs only search permission, like the kernel's own path walk.
_WALK: int = getattr(os, "O_PATH", os.O_RDONLY) | _CLOEXEC | _NOFOLLOW | _DIRECTORY
# Linux, macOS and BSD open below a folder descriptor; elsewhere (Windows) paths are resolved and checked.
_BENEATH = bool(_NOFOLLOW and _DIRECTORY) and os.open in os.supports_dir_fd and os.scandir in os.supports_fd
_CHUNK = 1 << 20


def _quote(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _components(relative: str) -> list[str]:
    """The model's path as names below the root; `.` and `..` are resolved here, never by the kernel."""
    if "\x00" in relative:
        raise ModelRetry("the path contains a NUL byte")
    pure = PurePath(relative)
    if pure.is_absolute() or pure.drive or pure.root:
        raise ModelRetry("absolute paths are outside the allowed folder; use a path relative to it")
    names: list[str] = []
    for name in pure.parts:
        if name != "..":
            names.append(name)
        elif names:
            names.pop()
        else:
            raise ModelRetry(f"{_quote(relative)} is outside the allowed folder; use a path relative to it")
    return names


def _shown(names: Sequence[str]) -> str:
    return "/".join(names) or "."


def _refusal(exc: OSError | UnicodeError, names: Sequence[str], *, folder: bool, dir_fd: int | None = None) -> str:
    """A short message for a failed open or read, naming only the model's path (`names`)."""
    shown = _quote(_shown(names))
    if isinstance(exc, UnicodeError):
        return f"{shown} cannot be used as a file name"
    if dir_fd is not None and names and exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        try:  # O_NOFOLLOW fails with ELOOP, or ENOTDIR under O_DIRECTORY; say which it was
            if stat.S_ISLNK(os.stat(names[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode):
                exc = OSError(errno.ELOOP, "symlink")
        except OSError:
            pass
    if exc.errno == errno.ELOOP:
        return f"{shown} is a symlink; symlinks are not followed"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
        kind = "folder" if folder else "file"
        return f"{shown} is not a {kind}; call list_files to see what exists"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied reading {shown}"
    if exc.errno == errno.ENAMETOOLONG:
        return f"{shown} is too long a name"
    return f"cannot read {shown}: {os.strerror(exc.errno).lower()}" if exc.errno else f"cannot read {shown}"


def _open_beneath(base: Path, names: Sequence[str], *, folder: bool) -> int:
    """Open `names` below `base` one component at a time, never following a symlink; return the descriptor.

    Each `os.open` gets a single name and a folder descriptor, with O_NOFOLLOW, so a symlink (wherever it
    appears, whenever it was swapped in) fails the call instead of leading out of `base`. Every component but
    the last must be a real folder; the last is opened as a folder if `folder`.
    """
    try:
        fd = os.open(base, _WALK if names else _READ | _DIRECTORY)
    except OSError:
        raise ModelRetry("the allowed folder cannot be opened; tell the user") from None
    for i, name in enumerate(names):
        last = i == len(names) - 1
        flags = (_READ | (_DIRECTORY if folder else 0)) if last else _WALK
        try:
            child = os.open(name, flags, dir_fd=fd)
        except (OSError, UnicodeError) as exc:
            raise ModelRetry(_refusal(exc, names[: i + 1], folder=folder or not last, dir_fd=fd)) from None
        finally:
            os.close(fd)
        fd = child
    return fd


def _resolve_inside(base: Path, names: Sequence[str], *, folder: bool) -> Path:
    """The fallback without `dir_fd`: resolve, then refuse a path that differs from its text (a symlink)."""
    lexical = base.joinpath(*names)
    try:
        resolved = lexical.resolve(strict=True)
    except RuntimeError:  # a symlink loop, before Python 3.13
        raise ModelRetry(f"{_quote(_shown(names))} is a symlink; symlinks are not followed") from None
    except (OSError, UnicodeError) as exc:
        raise ModelRetry(_refusal(exc, names, folder=folder)) from None
    if os.path.normcase(resolved) != os.path.normcase(lexical):
        raise ModelRetry(f"{_quote(_shown(names))} is or goes through a symlink; symlinks are not followed")
    return resolved


def _open_file(base: Path, names: Sequence[str]) -> int:
    if _BENEATH:
        return _open_beneath(base, names, folder=False)
    path = _resolve_inside(base, names, folder=False)
    try:
        return os.open(path, _READ | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ModelRetry(_refusal(exc, names, folder=False)) from None


def _read_capped(fd: int, names: Sequence[str], max_bytes: int) -> bytes:
    """Read a regular file from `fd`, refusing it if it holds more than `max_bytes`, whenever it grew."""
    shown = _quote(_shown(names))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelRetry(f"{shown} is not a file; call list_files to see what exists")
        if info.st_size > max_bytes:
            raise ModelRetry(f"{shown} has {info.st_size} bytes, over the limit of {max_bytes}")
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ModelRetry(_refusal(exc, names, folder=False)) from None
    if left <= 0:
        raise ModelRetry(f"{shown} grew while being read; it is over the limit of {max_bytes} bytes")
    return b"".join(chunks)


def _list(base: Path, names: Sequence[str]) -> list[str]:
    """Entries of a folder, each relative to the root; folders end in "/" (symlinks never do)."""
    if not _BENEATH:
        return _scan(_resolve_inside(base, names, folder=True), names)
    fd = _open_beneath(base, names, folder=True)
    try:
        return _scan(fd, names)
    finally:
        os.close(fd)


def _scan(folder: int | Path, names: Sequence[str]) -> list[str]:
    prefix = "".join(f"{name}/" for name in names)
    try:
        with os.scandir(folder) as entries:
            return sorted(prefix + e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries)
    except OSError as exc:
        raise ModelRetry(_refusal(exc, names, folder=True)) from None


def file_tools(root: str | Path, *, max_bytes: int = 2_000_000) -> list[Tool]:
    """Tools that list and read files inside `root` (and nowhere else).

    Symlinks are never followed, not even ones that point inside `root`: reading one, or a path through one,
    is refused, and `list_files` shows them without a trailing "/". `..` may not climb above `root`.

    Args:
        root: the folder the model may read; resolved once, here.
        max_bytes: the largest file the tools will read.
    """
    base = Path(root).resolve()
    if not base.is_dir():
        raise UserError(f"file_tools root {str(root)!r} is not a folder")

    def list_files(folder: str = ".") -> list[str]:
        """List the files and folders in a folder (folders end in "/"; symlinks are listed but not followed).

        Args:
            folder: a folder relative to the allowed root.
        """
        return _list(base, _components(folder))

    def _read(path: str) -> bytes:
        names = _components(path)
        fd = _open_file(base, names)
        try:
            return _read_capped(fd, names, max_bytes)
        finally:
            os.close(fd)

    def read_text(path: str) -> str:
        """Read a text file (symlinks are not followed).

        Args:
            path: the file, relative to the allowed root.
        """
        return _read(path).decode("utf-8", errors="replace")

    def read_image(path: str) -> ImagePart:
        """Load an image file so you can look at it (symlinks are not followed).

        Args:
            path: the image, relative to the allowed root.
        """
        data = _read(path)
        try:
            return as_image_part(data)
        except MediaError:
            raise ModelRetry(f"{_quote(path)} is not a known image format (PNG, JPEG, GIF, WEBP, BMP)") from None

    return [Tool.from_function(f) for f in (list_files, read_text, read_image)]


# ---------------------------------------------------------------- network


def http_tool(
    allowed_hosts: Iterable[str], *, max_bytes: int = 500_000, timeout: float = 10.0, transport: Any = None
) -> Tool:
    """A `fetch_url` tool limited to `allowed_hosts` (exact host names; no wildcards).

    Args:
        allowed_hosts: host names the model may fetch from.
        max_bytes: the response is cut at this many bytes.
        timeout: seconds per request.
        transport: an httpx transport (tests use `httpx.MockTransport`).
    """
    hosts = frozenset(h.lower() for h in allowed_hosts)
    if not hosts:
        raise UserError("http_tool needs at least one allowed host")

    async def fetch_url(url: str) -> str:
        """Fetch a web page and return its text.

        Args:
            url: an http(s) URL on one of the allowed hosts.
        """
        body = bytearray()
        try:
            fetched = await confined_get(
                url, hosts, max_bytes=max_bytes, read_timeout=timeout, sink=body.extend, transport=transport
            )
        except FetchRefused as exc:
            raise ModelRetry(str(exc)) from None
        return bytes(body).decode(fetched.encoding or "utf-8", errors="replace")

    return Tool.from_function(fetch_url, timeout=timeout * 2)


# ---------------------------------------------------------------- arithmetic

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
            raise ModelRetry("exponent or base too large")
        return _BINARY[type(node.op)](left, right)  # type: ignore[no-any-return]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))  # type: ignore[no-any-return]
    raise ModelRetry(f"only numbers and + - * / // % ** ( ) are allowed, found {type(node).__name__}")


def _calculate(expression: Annotated[str, Field(max_length=200)]) -> float | int:
    """Evaluate an arithmetic expression exactly, e.g. "(3 + 4) * 2 ** 3".

    Args:
        expression: numbers with + - * / // % ** and parentheses.
    """
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ModelRetry(f"not an arithmetic expression: {exc.msg}") from None
    try:
        return _eval(tree)
    except ZeroDivisionError:
        raise ModelRetry("division by zero") from None


calculator = Tool.from_function(_calculate, name="calculator")
