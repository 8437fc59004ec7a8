"""An MCP server over stdio for tests/test_mcp_server.py: an agent on the tiny random Phi-4, plus test tools.

    python tests/mcp_server_script.py TINY_PHI4_FOLDER PICTURE_PNG

Besides the model tools (`transcribe`, `describe_image`, `ask`), it registers `add` (integers), `picture` (returns
the bytes of PICTURE_PNG as an image) and `boom` (always raises). Generation is capped at a few tokens: the tiny
model's words are noise, and the tests only need the plumbing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent, ModelSettings
from agent.mcp_server import build_mcp_server, serve_stdio
from agent.models.transformers import TransformersModel
from tools import tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


def main(folder: str, picture_path: str) -> None:
    picture_bytes = Path(picture_path).read_bytes()

    def picture() -> bytes:
        """The test picture (a PNG)."""
        return picture_bytes

    def boom() -> str:
        """Always fails."""
        raise RuntimeError("kaboom")

    model = TransformersModel.from_pretrained(folder, progress=False)
    agent = Agent(model, tools=[add, picture, boom], settings=ModelSettings(max_tokens=8))
    serve_stdio(build_mcp_server(agent))


if __name__ == "__main__":
    main(*sys.argv[1:3])
