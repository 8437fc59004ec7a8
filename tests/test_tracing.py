"""OpenTelemetry tracing (agent.tracing): spans, GenAI attributes, nesting, errors, opt-in content, media as
sha256 only, and nothing at all (not even the import) while it is off."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from PIL import Image

import agent.tracing
from agent import Agent, Message, ModelResponseEvent, ModelSettings, TextDeltaEvent
from agent.exceptions import MaxStepsExceeded
from agent.messages import AudioPart, ImagePart, ToolCallPart
from agent.testing import AgentInfo, FunctionModel, call
from tools import tool

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Traced:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def enable(self, *, capture_content: bool = False) -> None:
        agent.tracing.enable(self.provider, capture_content=capture_content)

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        [span] = self.named(name)
        return span


@pytest.fixture
def traced() -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    result = Traced(provider, exporter)
    result.enable()
    yield result
    agent.tracing.disable()
    provider.shutdown()


def script(*turns: Any, name: str = "function-model") -> FunctionModel:
    """A model whose turn i is `turns[i]` (calls or text; the last one repeats)."""

    def reply(messages: list[Message], info: AgentInfo) -> Any:
        turn = turns[min(info.request_index, len(turns) - 1)]
        return turn(messages, info) if callable(turn) else turn

    return FunctionModel(reply, name=name)


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def calls(messages: Sequence[Message]) -> list[ToolCallPart]:
    return [c for m in messages for c in m.tool_calls]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


SETTINGS = ModelSettings(max_tokens=64, temperature=0.5, top_p=0.9, seed=7)
REQUEST = {
    "gen_ai.request.max_tokens": 64,
    "gen_ai.request.temperature": 0.5,
    "gen_ai.request.top_p": 0.9,
    "gen_ai.request.seed": 7,
}
CONTENT_KEYS = {
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.definitions",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
}


# ---------------------------------------------------------------- spans, attributes, nesting


def test_a_run_with_a_tool_call_gives_nested_spans_with_the_conventions_attributes(traced: Traced) -> None:
    bot = Agent(
        script([call("weather", city="Oslo")], "It is sunny."), [weather], system_prompt="Be brief.", name="weather-bot"
    )
    result = bot.run_sync("Weather in Oslo?", settings=SETTINGS)

    assert [s.name for s in traced.spans] == [
        "chat function-model",
        "execute_tool weather",
        "chat function-model",
        "invoke_agent weather-bot",
    ]
    run = traced.one("invoke_agent weather-bot")
    first, second = traced.named("chat function-model")
    tool_span = traced.one("execute_tool weather")
    assert parent_of(run) is None
    assert {parent_of(first), parent_of(second), parent_of(tool_span)} == {span_id(run)}
    assert len({s.context.trace_id for s in traced.spans if s.context is not None}) == 1
    assert (run.kind, first.kind, tool_span.kind) == (SpanKind.INTERNAL, SpanKind.INTERNAL, SpanKind.INTERNAL)
    assert all(s.status.status_code is StatusCode.UNSET for s in traced.spans)

    usage = result.usage
    assert dict(run.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.provider.name": "mmagent",
        "gen_ai.agent.name": "weather-bot",
        "gen_ai.request.model": "function-model",
        **REQUEST,
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
    }
    [the_call] = calls(result.messages)
    assert dict(tool_span.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "weather",
        "gen_ai.tool.call.id": the_call.id,
        "gen_ai.tool.type": "function",
        "gen_ai.tool.description": "The weather in a city.",
    }
    for span, reason in ((first, "tool_call"), (second, "stop")):
        attributes = dict(span.attributes or {})
        tokens = {k: attributes.pop(k) for k in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")}
        assert all(isinstance(v, int) and v > 0 for v in tokens.values())
        assert attributes == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "mmagent",
            "gen_ai.request.model": "function-model",
            **REQUEST,
            "gen_ai.response.model": "function-model",
            "gen_ai.response.finish_reasons": (reason,),
        }
    chats = (first, second)
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in chats) == usage.input_tokens  # type: ignore[index,misc]
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in chats) == usage.output_tokens  # type: ignore[index,misc]


def test_a_streamed_run_with_an_async_tool_is_traced_and_its_events_are_unchanged(traced: Traced) -> None:
    async def lookup(city: str) -> str:
        """Look a city up."""
        await asyncio.sleep(0)
        return f"{city}: 3 million"

    bot = Agent(script([call("lookup", city="Oslo"), call("weather", city="Oslo")], "Done."), [lookup, weather])

    async def go() -> list[Any]:
        return [event async for event in bot.run_stream("Tell me about Oslo.")]

    events = asyncio.run(go())
    responses = [e.response for e in events if isinstance(e, ModelResponseEvent)]
    assert [type(e).__name__ for e in events][-1] == "FinalEvent"
    run = traced.one("invoke_agent")  # no name: the span is named by the operation alone
    chats = traced.named("chat function-model")
    tool_spans = [traced.one("execute_tool lookup"), traced.one("execute_tool weather")]
    assert {parent_of(s) for s in [*chats, *tool_spans]} == {span_id(run)}
    assert [s.attributes["gen_ai.usage.input_tokens"] for s in chats] == [  # type: ignore[index]
        r.usage.input_tokens for r in responses
    ]
    assert "gen_ai.agent.name" not in (run.attributes or {})


def test_the_run_span_is_a_child_of_the_callers_span_and_tools_see_their_own_span(traced: Traced) -> None:
    tracer = traced.provider.get_tracer("test")

    def sync_tool() -> str:
        """Runs in a worker thread."""
        with tracer.start_as_current_span("inside sync tool"):
            return "ok"

    async def async_tool() -> str:
        """Runs on the loop."""
        with tracer.start_as_current_span("inside async tool"):
            return "ok"

    bot = Agent(script([call("sync_tool"), call("async_tool")], "ok"), [sync_tool, async_tool])
    with tracer.start_as_current_span("request"):
        bot.run_sync("go")
    assert parent_of(traced.one("invoke_agent")) == span_id(traced.one("request"))
    assert parent_of(traced.one("inside sync tool")) == span_id(traced.one("execute_tool sync_tool"))
    assert parent_of(traced.one("inside async tool")) == span_id(traced.one("execute_tool async_tool"))


def test_a_stream_closed_early_still_ends_its_spans(traced: Traced) -> None:
    bot = Agent(script("one two three four"))

    async def go() -> None:
        stream = bot.run_stream("count")
        async for event in stream:
            assert isinstance(event, TextDeltaEvent)
            break
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(go())
    run = traced.one("invoke_agent")
    assert run.end_time is not None and run.status.status_code is StatusCode.UNSET
    assert traced.one("chat function-model").end_time is not None


# ---------------------------------------------------------------- errors


def test_a_failing_tool_marks_its_span_as_an_error_and_the_run_goes_on(traced: Traced) -> None:
    def broken(city: str) -> str:
        """Always fails."""
        raise ValueError(f"no data for {city}-secret")

    def run() -> str:
        return Agent(script([call("broken", city="Oslo")], "Sorry."), [broken]).run_sync("go").output

    assert run() == "Sorry."
    span = traced.one("execute_tool broken")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "ValueError"
    assert span.status.description is None  # the message may quote arguments: content, off by default
    assert not span.events
    assert all(s.status.status_code is StatusCode.UNSET for s in traced.spans if s is not span)
    assert "secret" not in json.dumps([dict(s.attributes or {}) for s in traced.spans], default=str)

    traced.exporter.clear()
    traced.enable(capture_content=True)
    run()
    span = traced.one("execute_tool broken")
    assert span.status.description is not None and "Oslo-secret" in span.status.description


def test_error_types_of_tool_calls_that_give_no_result(traced: Traced) -> None:
    @tool(requires_approval=True)
    def delete(path: str) -> str:
        """Delete a file."""
        return "deleted"

    @tool(timeout=0.05)
    async def slow() -> str:
        """Takes too long."""
        await asyncio.sleep(5)
        return "late"

    turn = [call("delete", path="/tmp/x"), call("slow"), call("nope"), call("weather", town="Oslo")]
    Agent(script(turn, "ok"), [delete, slow, weather]).run_sync("go")
    errors = {s.name: (s.attributes or {}).get("error.type") for s in traced.spans if s.name.startswith("execute")}
    assert errors == {
        "execute_tool delete": "denied",
        "execute_tool slow": "timeout",
        "execute_tool nope": "unknown_tool",
        "execute_tool weather": "tool_retry",  # arguments that do not match the schema
    }


def test_a_failed_run_and_a_failed_request_are_errors_with_their_exception_class(traced: Traced) -> None:
    with pytest.raises(MaxStepsExceeded):
        Agent(script([call("weather", city="Oslo")]), [weather], max_steps=1).run_sync("loop")
    run = traced.one("invoke_agent")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["error.type"] == "MaxStepsExceeded"
    assert traced.one("chat function-model").status.status_code is StatusCode.UNSET

    traced.exporter.clear()

    def down(messages: list[Message], info: AgentInfo) -> str:
        raise ConnectionError("the model is down")

    with pytest.raises(ConnectionError):
        Agent(FunctionModel(down)).run_sync("hi")
    for name in ("chat function-model", "invoke_agent"):
        span = traced.one(name)
        assert span.status.status_code is StatusCode.ERROR, name
        assert span.attributes is not None and span.attributes["error.type"] == "ConnectionError"


def test_a_stored_run_and_its_resumption_carry_the_conversation_and_run_ids(traced: Traced) -> None:
    from memory import Store

    def flaky(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            return [call("weather", city="Oslo")]
        raise RuntimeError("the GPU fell over")

    with Store(":memory:") as store:
        with pytest.raises(RuntimeError):
            Agent(FunctionModel(flaky), [weather], memory=store).run_sync("Oslo?")
        [stored] = store.list_runs()
        result = asyncio.run(Agent(script("Sunny."), [weather], memory=store).resume(stored.id))
    failed, resumed = traced.named("invoke_agent")
    assert failed.status.status_code is StatusCode.ERROR and resumed.status.status_code is StatusCode.UNSET
    for span in (failed, resumed):
        attributes = span.attributes or {}
        assert attributes["gen_ai.conversation.id"] == result.conversation_id
        assert attributes["mmagent.run.id"] == stored.id
    assert (resumed.attributes or {})["gen_ai.usage.input_tokens"] == result.usage.input_tokens
    assert [parent_of(s) for s in traced.spans if s.name.startswith("chat")][-1] == span_id(resumed)


# ---------------------------------------------------------------- content: opt-in, media as sha256 only


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def every_value(spans: Sequence[ReadableSpan]) -> list[str]:
    """Every string a span carries: its name, status, attributes, and its events' attributes."""
    values: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str | bytes):
            values.append(value if isinstance(value, str) else repr(value))
        elif isinstance(value, Sequence):
            for item in value:
                add(item)
        else:
            values.append(str(value))

    for span in spans:
        add(span.name)
        add(span.status.description or "")
        for value in (span.attributes or {}).values():
            add(value)
        for event in span.events:
            add(event.name)
            for value in (event.attributes or {}).values():
                add(value)
    return values


def forbidden(data: bytes) -> list[str]:
    """Ways the bytes could leak into a string: base64 (standard, URL-safe, from any offset mod 3), hex, latin-1."""
    found = []
    for shift in range(3):
        encoded = base64.b64encode(data[shift:]).decode()
        found += [encoded[4:36], encoded[4:36].replace("+", "-").replace("/", "_")]
    found += [data.hex()[8:72], data[8:40].decode("latin-1"), repr(data[8:40])[2:-1]]
    return found


def test_content_is_recorded_on_request_with_media_as_sha256_only(traced: Traced) -> None:
    traced.enable(capture_content=True)
    user_image, tool_image = noise_png(1), noise_png(2)
    clip = AudioPart.from_samples(np.random.default_rng(3).uniform(-0.5, 0.5, 4000))

    def snapshot() -> ImagePart:
        """A picture from the camera."""
        return ImagePart(data=tool_image, media_type="image/png")

    bot = Agent(script([call("snapshot")], "A cat."), [snapshot], system_prompt="Describe.")
    prompt = Message.user("What is this?", images=[user_image], audio=[clip])
    result = bot.run_sync(prompt)
    assert result.output == "A cat."

    values = every_value(traced.spans)
    text = "\n".join(values)
    for data in (user_image, tool_image, clip.data):
        assert hashlib.sha256(data).hexdigest() in text
        for leak in forbidden(data):
            assert leak not in text

    second = traced.named("chat function-model")[1].attributes or {}
    history = json.loads(str(second["gen_ai.input.messages"]))
    assert history[0]["role"] == "user"
    assert history[0]["parts"][0] == {
        "type": "file",
        "modality": "image",
        "mime_type": "image/png",
        "file_id": "sha256:" + hashlib.sha256(user_image).hexdigest(),
    }
    assert history[0]["parts"][1]["modality"] == "audio" and history[0]["parts"][2]["content"] == "What is this?"
    assert history[2]["parts"][0]["type"] == "tool_call_response"
    assert json.loads(str(second["gen_ai.system_instructions"])) == [{"type": "text", "content": "Describe."}]
    assert json.loads(str(second["gen_ai.output.messages"])) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "A cat."}]}
    ]
    tool_attributes = traced.one("execute_tool snapshot").attributes or {}
    assert json.loads(str(tool_attributes["gen_ai.tool.call.arguments"])) == {}
    assert json.loads(str(tool_attributes["gen_ai.tool.call.result"]))[0]["file_id"].startswith("sha256:")
    run = traced.one("invoke_agent").attributes or {}
    assert "gen_ai.input.messages" in run and "gen_ai.output.messages" in run


def test_without_capture_no_content_attribute_is_recorded(traced: Traced) -> None:
    Agent(script([call("weather", city="Oslo")], "Sunny."), [weather], system_prompt="Be brief.").run_sync(
        "Oslo?", images=[noise_png(4)]
    )
    keys = {k for s in traced.spans for k in (s.attributes or {})}
    assert not keys & CONTENT_KEYS
    text = "\n".join(every_value(traced.spans))
    assert "Oslo" not in text and "Sunny" not in text and "Be brief" not in text


# ---------------------------------------------------------------- off by default, zero cost


def test_disabled_tracing_records_nothing(traced: Traced) -> None:
    assert agent.tracing.is_enabled()
    agent.tracing.disable()
    assert not agent.tracing.is_enabled()
    Agent(script([call("weather", city="Oslo")], "Sunny."), [weather]).run_sync("Oslo?")
    assert traced.spans == []


def test_import_and_a_run_without_tracing_never_import_opentelemetry() -> None:
    code = (
        "import sys\n"
        "import agent, tools, agent.tracing\n"
        "from agent.testing import FunctionModel, call\n"
        "def weather(city: str) -> str:\n"
        "    return 'sunny'\n"
        "def reply(messages, info):\n"
        "    return [call('weather', city='Oslo')] if info.request_index == 0 else 'Sunny.'\n"
        "assert agent.Agent(FunctionModel(reply), [weather]).run_sync('Oslo?').output == 'Sunny.'\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] == 'opentelemetry')\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_public_names() -> None:
    assert agent.tracing.__all__ == ["disable", "enable", "is_enabled"]


def test_the_docs_example_runs_as_written() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tracing.md").read_text(), flags=re.S)
    runnable = [b for b in blocks if "otlp" not in b]  # the OTLP exporter is not installed
    assert runnable
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for block in runnable:
                exec(compile(block, "docs/tracing.md", "exec"), {"__name__": "docs_tracing"})
    finally:
        agent.tracing.disable()
    assert "['chat function-model', 'execute_tool weather', 'chat function-model', 'invoke_agent']" in out.getvalue()


# ---------------------------------------------------------------- MCP tools go through the same span


def test_mcp_tools_are_traced_as_extensions_with_their_media_hashed(traced: Traced) -> None:
    pytest.importorskip("mcp")
    sys.path.insert(0, str(ROOT / "tests" / "mcp_servers"))
    import demo  # type: ignore[import-not-found]

    from tools.mcp import MCPTools

    traced.enable(capture_content=True)
    demo_server = str(ROOT / "tests" / "mcp_servers" / "demo.py")
    with open(os.devnull, "w") as devnull:
        server = MCPTools.stdio(sys.executable, demo_server, "stdio", errlog=devnull)
        result = Agent(script([call("math.add", a=2, b=3), call("picture")], "Done."), mcp=[server]).run_sync("go")
    assert result.output == "Done."
    add, picture = traced.one("execute_tool math.add"), traced.one("execute_tool picture")
    assert (add.attributes or {})["gen_ai.tool.type"] == "extension"
    assert (add.attributes or {})["gen_ai.tool.call.result"] == "5"
    assert parent_of(picture) == span_id(traced.one("invoke_agent"))
    text = "\n".join(every_value(traced.spans))
    data = demo.picture_bytes()
    assert hashlib.sha256(data).hexdigest() in text
    for leak in forbidden(data):
        assert leak not in text
