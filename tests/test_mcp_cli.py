"""MCP from the command line: `mmagent run/chat --mcp`, and `mmagent mcp` driven by the SDK's own client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from serve_support import stub_model_server

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("mmagent", path=str(Path(sys.executable).parent)) or "mmagent"
DEMO = f"{sys.executable} {ROOT / 'tests' / 'mcp_servers' / 'demo.py'} stdio"


@pytest.fixture(scope="module")
def model_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in model server: after the user's turn it calls the tool the user names (`use NAME`), after the
    tool's result it answers with that result."""

    def call_for(text: str) -> tuple[str, dict[str, Any]]:
        name = text.removeprefix("use ").strip()
        return name, ({"a": 2, "b": 3} if name == "math.add" else {})

    with stub_model_server(call_for, lambda result: f"result: {result}") as out:
        yield out


def test_run_uses_an_mcp_server_over_stdio(model_server: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    url, seen = model_server
    done = subprocess.run(
        [EXE, "run", "use math.add", "--model", url, "--server-model", "m", "--mcp", DEMO, "--json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == "result: 5"
    assert "-> math.add" in done.stderr
    offered = [t["function"]["name"] for t in seen[-1]["tools"]]
    assert "math.add" in offered and "calculator" in offered  # the MCP server's tools beside the built-ins


def test_chat_keeps_one_mcp_server_for_the_whole_conversation(
    model_server: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, _ = model_server
    done = subprocess.run(
        [EXE, "chat", "--model", url, "--server-model", "m", "--db", str(tmp_path / "c.db"), "--mcp", DEMO],
        input="use pid\nuse pid\n/quit\n", capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pids = [line.split("result: ")[1].strip() for line in done.stdout.splitlines() if "result: " in line]
    assert len(pids) == 2 and pids[0] == pids[1]  # both turns reached the same server process


def test_bad_mcp_options_are_one_line(tmp_path: Path) -> None:
    for args, fragment in (
        (["run", "hi", "--model", "http://127.0.0.1:9/v1", "--mcp", "'unclosed"], "--mcp"),
        (
            [
                "run",
                "hi",
                "--model",
                "http://127.0.0.1:9/v1",
                "--mcp",
                f"{sys.executable} -c 'import sys; sys.exit(4)'",
            ],
            "cannot connect to the MCP server",
        ),
        (["run", "hi", "--model", "http://127.0.0.1:9/v1", "--mcp-url", "ftp://x"], "needs an http"),
        (["mcp", "--transport", "carrier-pigeon"], "--transport must be stdio or http"),
        (["mcp", "--transport", "http", "--port", "0"], "--port must be between"),
    ):
        done = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 1, (args, done.stderr)
        assert fragment in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_mmagent_mcp_serves_the_agent_over_stdio_to_the_sdk_client(tmp_path: Path) -> None:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    async def go() -> tuple[list[str], str]:
        env = {"MMAGENT_CACHE_DIR": os.environ.get("MMAGENT_CACHE_DIR", str(Path.home() / ".cache/mmagent"))}
        params = StdioServerParameters(command=EXE, args=["mcp", "--model", "tiny-phi4"], env=env, cwd=str(tmp_path))
        with open(os.devnull, "w") as devnull:  # noqa: ASYNC230 (the server's log lines)
            async with Client(stdio_client(params, errlog=devnull)) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                result = await client.call_tool("calculator", {"expression": "6 * 7"})
                return names, result.content[0].text  # type: ignore[union-attr]

    names, answer = asyncio.run(go())
    assert {"calculator", "transcribe", "describe_image", "ask"} <= set(names)
    assert answer == "42"
