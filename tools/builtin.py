"""Built-in tools. Anything that touches files or the network is confined by construction.

* `file_tools(root)`: list, read text and read images *inside* `root` only. Paths are resolved (symlinks
  included) and refused if they leave the root; files over `max_bytes` are refused.
* `http_tool(allowed_hosts)`: GET pages from an allow-list of hosts only (redirects are checked against the
  same list), with a size cap and a timeout. Page text is untrusted: the Phi-4 renderer escapes it, so it can
  never forge control tokens or tool calls.
* `calculator`: arithmetic on numbers, parsed with `ast` (no names, no calls, bounded exponents).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field

from agent.exceptions import ModelRetry, UserError
from agent.messages import ImagePart, as_image_part
from tools._registry import Tool

__all__ = ["calculator", "file_tools", "http_tool"]


# ---------------------------------------------------------------- files


def _confine(root: Path, relative: str) -> Path:
    if "\x00" in relative:
        raise ModelRetry("the path contains a NUL byte")
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise ModelRetry(f"{relative!r} is outside the allowed folder; use a path relative to it")
    return candidate


def file_tools(root: str | Path, *, max_bytes: int = 2_000_000) -> list[Tool]:
    """Tools that list and read files inside `root` (and nowhere else).

    Args:
        root: the folder the model may read.
        max_bytes: the largest file the tools will read.
    """
    base = Path(root).resolve()
    if not base.is_dir():
        raise UserError(f"file_tools root {str(root)!r} is not a folder")

    def list_files(folder: str = ".") -> list[str]:
        """List the files and folders in a folder.

        Args:
            folder: a folder relative to the allowed root.
        """
        target = _confine(base, folder)
        if not target.is_dir():
            raise ModelRetry(f"{folder!r} is not a folder")
        return sorted(str(p.relative_to(base)) + ("/" if p.is_dir() else "") for p in target.iterdir())

    def _read(path: str) -> bytes:
        target = _confine(base, path)
        if not target.is_file():
            raise ModelRetry(f"{path!r} is not a file; call list_files to see what exists")
        size = target.stat().st_size
        if size > max_bytes:
            raise ModelRetry(f"{path!r} has {size} bytes, over the limit of {max_bytes}")
        return target.read_bytes()

    def read_text(path: str) -> str:
        """Read a text file.

        Args:
            path: the file, relative to the allowed root.
        """
        return _read(path).decode("utf-8", errors="replace")

    def read_image(path: str) -> ImagePart:
        """Load an image file so you can look at it.

        Args:
            path: the image, relative to the allowed root.
        """
        return as_image_part(_read(path))

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

    def check(url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ModelRetry(f"only http and https URLs can be fetched, not {parts.scheme or 'no scheme'!r}")
        if (parts.hostname or "").lower() not in hosts:
            raise ModelRetry(f"host {parts.hostname!r} is not allowed; allowed: {', '.join(sorted(hosts))}")

    async def fetch_url(url: str) -> str:
        """Fetch a web page and return its text.

        Args:
            url: an http(s) URL on one of the allowed hosts.
        """
        import httpx

        check(url)
        async with httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False) as client:
            for _ in range(5):
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = str(response.url.join(response.headers.get("location", "")))
                        check(url)
                        continue
                    if response.status_code >= 400:
                        raise ModelRetry(f"the server answered {response.status_code} for {url}")
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= max_bytes:
                            body = body[:max_bytes]
                            break
                    return body.decode(response.encoding or "utf-8", errors="replace")
            raise ModelRetry("too many redirects")

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
