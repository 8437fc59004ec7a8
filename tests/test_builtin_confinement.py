"""`file_tools` and `http_tool` hold their confinement under races, and their refusals leak nothing.

The race tests swap a path inside the root between a regular file (or folder) and a symlink that leaves the
root, from a second thread, while the tools read it through `Registry.execute`. A check-then-open-by-name
implementation returns the outside file a few times per thousand reads; a descriptor walk never does.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from agent.exceptions import ModelRetry
from agent.messages import RetryPart, ToolCallPart, ToolResultPart
from tools import Registry, ToolContext
from tools.builtin import file_tools, http_tool

SECRET = "top secret"
RACE_SECONDS = 0.8
RACE_LIMIT = 4.0


async def _call(reg: Registry, name: str, **arguments: object) -> ToolResultPart | RetryPart:
    return await reg.execute(ToolCallPart(id="1", name=name, arguments=arguments), ToolContext("1", name))


def _seen(out: ToolResultPart | RetryPart) -> str:
    """Everything the model is shown for one call."""
    return out.message if isinstance(out, RetryPart) else out.text


# ---------------------------------------------------------------- races


def _swap_forever(stop: threading.Event, swaps: list[int | BaseException], states: list[Callable[[], None]]) -> None:
    n = 0
    try:
        while not stop.is_set():
            for make in states:
                make()
            n += 1
    except BaseException as exc:  # handed to the test, which raises it
        swaps.append(exc)
    swaps.append(n)


async def _race(
    reg: Registry, path: str, states: list[Callable[[], None]], *, max_bytes: int, inside: str
) -> Counter[str]:
    """Read `path` for RACE_SECONDS while a thread cycles through `states`; count what came back."""
    stop, swaps = threading.Event(), list[int | BaseException]()
    swapper = threading.Thread(target=_swap_forever, args=(stop, swaps, states), daemon=True)
    seen: Counter[str] = Counter()
    swapper.start()
    try:
        start = time.monotonic()
        # RACE_SECONDS, longer (up to RACE_LIMIT) on a loaded machine until both states have been read
        while (elapsed := time.monotonic() - start) < RACE_SECONDS or (
            elapsed < RACE_LIMIT and not (seen["inside"] and seen["refused"])
        ):
            out = await _call(reg, "read_text", path=path)
            seen["reads"] += 1
            if isinstance(out, RetryPart):  # the symlink, or (mid-swap) nothing at that name
                expected = "symlinks are not followed" in out.message or "call list_files" in out.message
                seen["refused" if expected else "other"] += 1
            elif SECRET in out.text or len(out.text) > max_bytes:
                seen["escapes"] += 1
            elif out.text == inside:
                seen["inside"] += 1
            else:
                seen["other"] += 1
    finally:
        stop.set()
        swapper.join()
    if isinstance(swaps[0], BaseException):
        raise swaps[0]
    seen["swaps"] = swaps[0]
    print(f"\n{path}: {dict(seen)}")  # the numbers, for `pytest -s`
    return seen


def _assert_contained(seen: Counter[str]) -> None:
    assert seen["escapes"] == 0, seen
    # The race was live: both the inside file and a refusal were seen, over many reads and swaps.
    assert seen["inside"] > 0 and seen["refused"] > 0 and seen["other"] == 0, seen
    assert seen["reads"] >= 50 and seen["swaps"] >= 50, seen


@pytest.fixture
def arena(tmp_path: Path) -> Path:
    """tmp/root (the allowed folder), tmp/stage (where swaps are prepared), tmp/outside (the secrets)."""
    for name in ("root", "stage", "outside"):
        (tmp_path / name).mkdir()
    (tmp_path / "stage" / "inside.txt").write_text("inside")
    (tmp_path / "outside" / "secret.txt").write_text(SECRET)
    return tmp_path


def _file_or_link(arena: Path, target: Path) -> list[Callable[[], None]]:
    """Atomically replace root/link with a regular file, then with a symlink to `target` (rename(2))."""
    stage, link = arena / "stage", arena / "root" / "link"

    def to_file() -> None:
        os.link(stage / "inside.txt", stage / "f.tmp")
        os.replace(stage / "f.tmp", link)

    def to_link() -> None:
        os.symlink(target, stage / "l.tmp")
        os.replace(stage / "l.tmp", link)

    to_file()
    return [to_link, to_file]  # never file after file: renaming a hard link onto itself is a no-op


async def test_a_symlink_swapped_in_after_the_check_is_never_followed(arena: Path) -> None:
    reg = Registry(file_tools(arena / "root", max_bytes=1000))
    seen = await _race(
        reg, "link", _file_or_link(arena, arena / "outside" / "secret.txt"), max_bytes=1000, inside="inside"
    )
    _assert_contained(seen)


async def test_a_swapped_in_big_file_never_gets_past_max_bytes(arena: Path) -> None:
    big = arena / "outside" / "big.bin"
    with big.open("wb") as f:
        f.truncate(50_000_000)  # sparse: 50 MB to read, nothing on disk
    reg = Registry(file_tools(arena / "root", max_bytes=1000))
    seen = await _race(reg, "link", _file_or_link(arena, big), max_bytes=1000, inside="inside")
    _assert_contained(seen)


async def test_a_folder_swapped_for_a_symlink_mid_path_is_never_followed(arena: Path) -> None:
    root, stage = arena / "root", arena / "stage"
    (stage / "real").mkdir()
    (stage / "real" / "a.txt").write_text("inside")
    (arena / "outside" / "a.txt").write_text(SECRET)
    os.symlink(arena / "outside", stage / "sym")

    # A folder cannot replace a symlink in one rename(2), so each swap is two renames (the path is briefly
    # missing; that is a refusal, not an escape).
    def to_folder() -> None:
        os.rename(root / "sub", stage / "sym")
        os.rename(stage / "real", root / "sub")

    def to_link() -> None:
        os.rename(root / "sub", stage / "real")
        os.rename(stage / "sym", root / "sub")

    os.rename(stage / "real", root / "sub")
    reg = Registry(file_tools(root, max_bytes=1000))
    seen = await _race(reg, "sub/a.txt", [to_link, to_folder], max_bytes=1000, inside="inside")
    _assert_contained(seen)


# ---------------------------------------------------------------- refusals name only the model's path


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("hello")
    (root / "big.bin").write_bytes(b"x" * 2000)
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "x.txt").write_text(SECRET)
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    os.symlink(tmp_path / "outdir", root / "linkdir")
    os.symlink("loop", root / "loop")  # a symlink to itself: ELOOP however it is opened
    return root


def _assert_clean(out: ToolResultPart | RetryPart, root: Path, expected: str) -> None:
    assert isinstance(out, RetryPart), _seen(out)
    message = out.message
    assert expected in message, message
    for leak in (str(root), str(root.resolve()), str(root.parent), str(root.resolve().parent)):
        assert leak not in message, message
    assert SECRET not in message and "Errno" not in message, message
    assert not message.startswith("the tool failed"), message  # a deliberate refusal, not a raw exception
    assert len(message) < 300, message


@pytest.mark.parametrize(
    ("tool", "path", "expected"),
    [
        ("read_text", "/etc/passwd", "outside the allowed folder"),
        ("read_text", "../secret.txt", "outside the allowed folder"),
        ("read_text", "docs/../../secret.txt", "outside the allowed folder"),
        ("list_files", "..", "outside the allowed folder"),
        ("read_text", "link.txt", "'link.txt' is a symlink; symlinks are not followed"),
        ("read_text", "linkdir/x.txt", "'linkdir' is a symlink; symlinks are not followed"),
        ("list_files", "linkdir", "'linkdir' is a symlink; symlinks are not followed"),
        ("read_text", "loop", "'loop' is a symlink; symlinks are not followed"),
        ("read_text", "nope.txt", "'nope.txt' is not a file; call list_files"),
        ("read_text", "docs", "'docs' is not a file; call list_files"),
        ("read_text", "docs/a.txt/more", "'docs/a.txt' is not a folder"),
        ("list_files", "docs/a.txt", "'docs/a.txt' is not a folder"),
        ("read_text", "big.bin", "'big.bin' has 2000 bytes, over the limit of 1000"),
        ("read_text", "a\x00b", "NUL byte"),
        ("read_text", "n" * 300, "too long"),
        ("read_image", "docs/a.txt", "'docs/a.txt' is not a known image format"),
    ],
)
async def test_file_refusals_name_only_the_relative_path(sandbox: Path, tool: str, path: str, expected: str) -> None:
    out = await _call(
        Registry(file_tools(sandbox, max_bytes=1000)),
        tool,
        **({"folder": path} if tool == "list_files" else {"path": path}),
    )
    _assert_clean(out, sandbox, expected)


def test_a_path_the_file_system_cannot_encode_is_refused(sandbox: Path) -> None:
    """A lone surrogate cannot be encoded for os.open; the tool refuses it.

    Called directly, because `ToolCallPart` already refuses lone surrogates in a model's arguments.
    """
    read_text = next(t for t in file_tools(sandbox) if t.name == "read_text")
    with pytest.raises(ModelRetry, match="cannot be used as a file name") as caught:
        read_text.function("docs/\ud800")
    assert str(sandbox) not in caught.value.message


async def test_an_absolute_path_inside_the_root_is_refused_without_echoing_it(sandbox: Path) -> None:
    out = await _call(Registry(file_tools(sandbox)), "read_text", path=str(sandbox / "docs" / "a.txt"))
    _assert_clean(out, sandbox, "outside the allowed folder; use a path relative to it")


async def test_permission_denied_names_only_the_relative_path(sandbox: Path) -> None:
    (sandbox / "docs" / "private.txt").write_text("private")
    (sandbox / "docs" / "private.txt").chmod(0)
    try:
        (sandbox / "docs" / "private.txt").read_bytes()
    except PermissionError:
        pass
    else:  # root (CAP_DAC_OVERRIDE) reads a chmod 000 file, so there is no refusal to see
        pytest.skip("this process ignores file permissions (running as root), so chmod 000 cannot deny a read")
    (sandbox / "locked").mkdir()
    (sandbox / "locked").chmod(0)
    try:
        reg = Registry(file_tools(sandbox))
        _assert_clean(await _call(reg, "read_text", path="docs/private.txt"), sandbox, "permission denied reading")
        _assert_clean(await _call(reg, "list_files", folder="locked"), sandbox, "permission denied reading 'locked'")
    finally:
        (sandbox / "locked").chmod(0o700)


async def test_permission_denied_mapping_without_real_permissions(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refusal when running as root: os.open fails as it would for another user."""
    real_open = os.open

    def denying_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if os.fsdecode(path).endswith("a.txt"):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", str(sandbox / "docs" / "a.txt"))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", denying_open)
    out = await _call(Registry(file_tools(sandbox)), "read_text", path="docs/a.txt")
    _assert_clean(out, sandbox, "permission denied reading 'docs/a.txt'")


# ---------------------------------------------------------------- http refusals name only the URL


def _web(request: httpx.Request) -> httpx.Response:
    host, path = request.url.host, request.url.path
    if host == "down.example":
        raise httpx.ConnectError("[Errno 111] Connection refused (/srv/internal/socket)", request=request)
    if host == "slow.example":
        raise httpx.ReadTimeout("timed out reading /srv/internal/socket", request=request)
    if path == "/redirect-out":
        return httpx.Response(302, headers={"location": "https://evil.example/steal"})
    if path == "/redirect-bad":
        return httpx.Response(302, headers={"location": "https://docs.example:abc/x"})
    if path == "/loop":
        return httpx.Response(302, headers={"location": "/loop"})
    if path == "/gzip":
        return httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"not gzip at all")
    return httpx.Response(200, text="page body")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://evil.example/", "host 'evil.example' is not allowed"),
        ("file:///etc/passwd", "only http and https"),
        ("https://down.example/page", "could not connect to https://down.example/page"),
        ("https://slow.example/page", "timed out fetching https://slow.example/page"),
        ("https://docs.example/redirect-out", "host 'evil.example' is not allowed"),
        ("https://docs.example/redirect-bad", "https://docs.example/redirect-bad sent an invalid HTTP response"),
        ("http://[::1/", "'http://[::1/' is not a valid URL"),
        ("https://docs.example:abc/", "'https://docs.example:abc/' is not a valid URL"),
        ("https://docs.example/loop", "too many redirects from https://docs.example/loop"),
        ("https://docs.example/gzip", "could not decode the response from https://docs.example/gzip"),
    ],
)
async def test_http_refusals_are_short_and_name_the_url(url: str, expected: str) -> None:
    tool = http_tool(["docs.example", "down.example", "slow.example"], transport=httpx.MockTransport(_web))
    out = await _call(Registry([tool]), "fetch_url", url=url)
    assert isinstance(out, RetryPart), _seen(out)
    message = out.message
    assert expected in message, message
    assert "/srv/internal" not in message and "Errno" not in message, message
    for exception_name in ("ConnectError", "ReadTimeout", "InvalidURL", "DecodingError", "ValueError"):
        assert exception_name not in message, message
    assert not message.startswith("the tool failed"), message
    assert len(message) < 300, message
