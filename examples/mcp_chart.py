"""An agent using an MCP server whose tool returns an image: the chart reaches Phi-4 as real pixels.

    python examples/mcp_chart.py [--model auto] [--question "..."]

The server is `examples/mcp_chart_server.py`, written with the official MCP SDK and started over stdio for the
run (`MCPTools.stdio`). Its `sales_chart` tool returns a PNG; mmagent turns it into an image part of the tool
result, so the next request to the model holds the chart's pixels (within the context policy's caps), not a
placeholder. Only Phi-4-multimodal sees images: without its weights the example says so and runs the tiny
random-weight Phi-4, forcing the chart call first, so the whole path (MCP call, media gate, image tokens, vision
tower) still runs, while the words it writes are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent
from agent.events import FinalEvent, ToolCallEvent, ToolResultEvent
from agent.messages import ImagePart
from agent.models import ModelSettings
from agent.models.resolve import resolve_media_model
from tools.mcp import MCPTools

SERVER = Path(__file__).resolve().parent / "mcp_chart_server.py"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto", help="auto | phi4 | tiny-phi4 | a folder | a server URL")
    parser.add_argument(
        "--question", default="Look at the sales chart. Which month sold the most, and what stands out?"
    )
    args = parser.parse_args(argv)

    model, random_weights = resolve_media_model(args.model, "see images", echo=print)
    charts = MCPTools.stdio(sys.executable, str(SERVER))
    settings = ModelSettings(max_tokens=200)
    if random_weights:  # noise would rarely pick the tool: force the first step, the grammar writes the call
        settings = ModelSettings(max_tokens=96, tool_choice="sales_chart")
    agent = Agent(model, mcp=[charts], system_prompt="Use the chart tools, then answer briefly.", settings=settings)
    async for event in agent.run_stream(args.question):
        if isinstance(event, ToolCallEvent):
            print(f"-> {event.call.name}({event.call.arguments})")
        elif isinstance(event, ToolResultEvent):
            images = [p for p in event.result.content if isinstance(p, ImagePart)]
            shown = f"an image {images[0].size[0]}x{images[0].size[1]}" if images else repr(event.result.text[:80])
            print(f"<- {event.result.name}: {shown}")
        elif isinstance(event, FinalEvent):
            print(("(random weights: noise) " if random_weights else "") + event.result.output)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
