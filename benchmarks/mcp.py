"""The MCP client layer's cost per tool call, against the SDK's bare `call_tool`, on one local stdio server.

One server (tests/mcp_servers/demo.py, written with the official SDK) is started over stdio and one session kept.
`--calls` (1,000) times, alternating which goes first, the trivial tool `ping` is called
1. bare: `client.call_tool("ping", {})` on the SDK's own `Client`, and
2. ours: `Registry.execute` of a `ToolCallPart` naming it (argument validation, the timeout and failure
   handling every tool call gets, the MCP call on the same `Client`, the result turned into parts).
The overhead is the median of ours minus the median of bare (both medians over the same run).

    python benchmarks/mcp.py [--calls 1000]

Last line: `mcp_overhead_us=<float>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TextIO

# Run as a script, this file's folder comes first on sys.path, where this file would shadow the `mcp` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.messages import ToolCallPart, ToolResultPart  # noqa: E402 (after the sys.path fix)
from tools import Registry, ToolContext  # noqa: E402
from tools.mcp import MCPTools  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "tests" / "mcp_servers" / "demo.py"


async def measure(calls: int, devnull: TextIO) -> tuple[list[float], list[float]]:
    bare: list[float] = []
    ours: list[float] = []
    async with MCPTools.stdio(sys.executable, str(DEMO), "stdio", errlog=devnull) as server:
        client = server._require()  # the session the tools use
        registry = Registry(server.tools)
        call = ToolCallPart(id="c", name="ping", arguments={})
        ctx = ToolContext(call_id="c", tool_name="ping")

        async def sdk() -> None:
            started = time.perf_counter()
            result = await client.call_tool("ping", {})
            bare.append(time.perf_counter() - started)
            assert not result.is_error

        async def layer() -> None:
            started = time.perf_counter()
            outcome = await registry.execute(call, ctx)
            ours.append(time.perf_counter() - started)
            assert isinstance(outcome, ToolResultPart) and outcome.text == "pong"

        for _ in range(50):  # warm both paths
            await sdk()
            await layer()
        bare.clear()
        ours.clear()
        for index in range(calls):
            first, second = (sdk, layer) if index % 2 else (layer, sdk)
            await first()
            await second()
    return bare, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:  # the server's log lines
        bare, ours = asyncio.run(measure(args.calls, devnull))
    bare_us, ours_us = statistics.median(bare) * 1e6, statistics.median(ours) * 1e6
    print(f"{args.calls} calls of a trivial tool over stdio, one session, alternating:")
    print(f"  SDK call_tool      median {bare_us:8.1f} us  p90 {statistics.quantiles(bare, n=10)[8] * 1e6:8.1f} us")
    print(f"  Registry.execute   median {ours_us:8.1f} us  p90 {statistics.quantiles(ours, n=10)[8] * 1e6:8.1f} us")
    print(f"mcp_overhead_us={ours_us - bare_us:.1f}")


if __name__ == "__main__":
    main()
