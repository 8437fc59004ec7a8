"""An MCP server written with the official SDK, for the client tests: `python demo.py stdio` or
`python demo.py http PORT`. Its tools return text, JSON, an image, an audio clip, errors, progress; one adds a
tool at run time (and says so), one kills the server, one hangs."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from typing import Annotated

import numpy as np
import soundfile as sf
from mcp.server.mcpserver import Audio, Context, Elicit, ElicitationResult, Image, MCPServer, Resolve
from PIL import Image as PILImage
from pydantic import BaseModel

server = MCPServer("demo")


def picture_bytes() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def clip_bytes() -> bytes:
    samples = np.random.default_rng(4).uniform(-0.3, 0.3, 8000).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@server.tool(name="math.add")
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def picture() -> Image:
    """A picture (60x40 random pixels)."""
    return Image(data=picture_bytes(), format="png")


@server.tool()
def clip() -> Audio:
    """Half a second of noise at 16 kHz."""
    return Audio(data=clip_bytes(), format="wav")


@server.tool()
def fail(reason: str = "it broke") -> str:
    """Always fails."""
    raise ValueError(reason)


@server.tool()
async def slow(ctx: Context, steps: int = 3) -> str:
    """Works in steps, reporting progress."""
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1}")
        await asyncio.sleep(0.02)
    return f"done in {steps} steps"


@server.tool()
def die() -> str:
    """Ends the server process at once."""
    os._exit(3)


@server.tool()
async def hang() -> str:
    """Never answers."""
    await asyncio.sleep(3600)
    return "late"


@server.tool()
async def grow(ctx: Context) -> str:
    """Adds the tool `extra` and tells the client its tools changed."""
    server.add_tool(lambda: "from the new tool", name="extra", description="A tool added at run time.")
    await ctx.notify_tools_changed()
    return "added"


class Confirmation(BaseModel):
    ok: bool


def ask_to_confirm(action: str) -> Elicit[Confirmation]:
    return Elicit(f"Really {action}?", Confirmation)


@server.tool()
async def confirm(action: str, answer: Annotated[ElicitationResult[Confirmation], Resolve(ask_to_confirm)]) -> str:
    """Asks the user to confirm an action (elicitation, through a resolver as 2026-07-28 servers do)."""
    return f"{answer.action}: {getattr(answer, 'data', None)}"


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def ping() -> str:
    """Answers pong."""
    return "pong"


@server.resource("note://hello", mime_type="text/plain")
def note() -> str:
    """A short note."""
    return "Hello from a resource."


@server.prompt()
def review(topic: str) -> str:
    """Ask for a review of a topic."""
    return f"Please review {topic}."


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
