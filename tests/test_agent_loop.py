"""The agent loop, driven by the shipped test models."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent import (
    Agent,
    FinalEvent,
    Message,
    ModelResponseEvent,
    RetryEvent,
    TextDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
    UsageEvent,
    UsageLimits,
)
from agent.exceptions import MaxStepsExceeded, RetryBudgetExceeded, UsageLimitExceeded, UserError
from agent.messages import AudioPart, ImagePart, RetryPart, TextPart, ToolCallPart, ToolResultPart
from agent.testing import AgentInfo, FunctionModel, ReplayModel, call
from tools import Deny, ModelRetry, ToolContext, tool


def _script(*turns: object) -> FunctionModel:
    """A model that plays `turns` in order (each a str or a list of parts)."""

    def respond(messages: list[Message], info: AgentInfo) -> object:
        return turns[info.request_index]

    return FunctionModel(respond)  # type: ignore[arg-type]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_final_answer_without_tools() -> None:
    model = _script("Hello there.")
    result = await Agent(model, system_prompt="Be kind.").run("hi")
    assert result.output == "Hello there."
    assert [m.role for m in result.messages] == ["system", "user", "assistant"]
    assert [m.role for m in result.new_messages] == ["user", "assistant"]
    assert result.usage.requests == 1
    assert model.requests[0][0] == Message.system("Be kind.")


async def test_stream_yields_typed_events_in_order() -> None:
    model = _script([TextPart(text="Adding."), call("add", a=2, b=3)], "The sum is 5.")
    events = [e async for e in Agent(model, tools=[add]).run_stream("2+3?")]
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "TextDeltaEvent",
        "ModelResponseEvent",
        "UsageEvent",
        "ToolCallEvent",
        "ToolResultEvent",
        "TextDeltaEvent",
        "TextDeltaEvent",
        "TextDeltaEvent",
        "TextDeltaEvent",
        "ModelResponseEvent",
        "UsageEvent",
        "FinalEvent",
    ]
    deltas = "".join(e.text for e in events if isinstance(e, TextDeltaEvent) and e.step == 1)
    assert deltas == "The sum is 5."
    result = next(e for e in events if isinstance(e, ToolResultEvent)).result
    assert result.text == "5"
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.result.output == "The sum is 5."
    assert isinstance(events[1], ModelResponseEvent) and isinstance(events[2], UsageEvent)
    assert isinstance(events[3], ToolCallEvent) and events[3].call.arguments == {"a": 2, "b": 3}


async def test_calls_in_one_turn_run_concurrently_and_fail_independently() -> None:
    started: list[str] = []

    async def slow_async(x: int) -> int:
        started.append("async")
        await asyncio.sleep(0.3)
        return x

    def slow_sync(x: int) -> int:
        started.append(f"sync-{threading.current_thread().name}")
        time.sleep(0.3)
        return x * 10

    def broken() -> str:
        raise RuntimeError("disk on fire")

    @tool(timeout=0.1)
    async def hangs() -> str:
        await asyncio.sleep(10)
        return "never"

    model = _script(
        [call("slow_async", x=1), call("slow_sync", x=2), call("slow_sync", x=3), call("broken"), call("hangs")],
        "done",
    )
    agent = Agent(model, tools=[slow_async, slow_sync, broken, hangs])
    t0 = time.perf_counter()
    result = await agent.run("go")
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.6, f"calls ran one after another ({elapsed:.2f} s)"
    tool_message = result.messages[2]
    outcomes = tool_message.parts
    assert [type(p).__name__ for p in outcomes] == [
        "ToolResultPart",
        "ToolResultPart",
        "ToolResultPart",
        "RetryPart",
        "RetryPart",
    ]
    assert [p.text for p in outcomes[:3]] == ["1", "20", "30"]  # type: ignore[union-attr]
    assert "RuntimeError: disk on fire" in outcomes[3].message  # type: ignore[union-attr]
    assert "timed out" in outcomes[4].message  # type: ignore[union-attr]
    assert sum(s.startswith("sync-") for s in started) == 2
    assert all(s != f"sync-{threading.main_thread().name}" for s in started)


async def test_invalid_arguments_and_unknown_tools_go_back_as_retries() -> None:
    model = _script([call("add", a="one", b=2)], [call("ad", a=1, b=2)], [call("add", a=1, b=2)], "3")
    events = [e async for e in Agent(model, tools=[add]).run_stream("1+2")]
    retries = [e.retry for e in events if isinstance(e, RetryEvent)]
    assert [r.name for r in retries] == ["add", "ad"]
    assert "argument 'a'" in retries[0].message and '"one"' in retries[0].message
    assert "unknown tool 'ad'; available: add" in retries[1].message
    # the model saw each retry request in the next turn
    assert model.requests[1][-1].parts == (retries[0],)
    assert model.requests[2][-1].parts == (retries[1],)
    assert isinstance(events[-1], FinalEvent) and events[-1].result.output == "3"


async def test_retry_budget_is_per_tool_and_carries_the_transcript() -> None:
    @tool(retries=1)
    def picky(n: int) -> int:
        raise ModelRetry(f"{n} is not prime enough")

    model = _script([call("picky", n=1)], [call("add", a=1, b="x")], [call("picky", n=2)], "unreached")
    with pytest.raises(RetryBudgetExceeded, match="tool 'picky' needed more than 1 retries") as info:
        await Agent(model, tools=[picky, add], retries=5).run("go")
    transcript = info.value.messages
    assert transcript[-1].role == "tool"
    assert transcript[-1].parts == (
        RetryPart(message="2 is not prime enough", call_id=transcript[-2].parts[0].id, name="picky"),
    )  # type: ignore[union-attr]


async def test_max_steps_and_usage_limits_raise_with_transcript() -> None:
    loop_forever = FunctionModel(lambda messages, info: [call("add", a=1, b=1)])
    with pytest.raises(MaxStepsExceeded) as info:
        await Agent(loop_forever, tools=[add], max_steps=3).run("go")
    assert len([m for m in info.value.messages if m.role == "assistant"]) == 3
    with pytest.raises(UsageLimitExceeded, match="request limit of 2"):
        await Agent(loop_forever, tools=[add], usage_limits=UsageLimits(max_requests=2)).run("go")
    with pytest.raises(UsageLimitExceeded, match="tool call limit of 1"):
        await Agent(_script([call("add", a=1, b=1), call("add", a=1, b=1)]), tools=[add],
                    usage_limits=UsageLimits(max_tool_calls=1)).run("go")  # fmt: skip


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return buf.getvalue()


async def test_image_and_audio_tool_results_reach_the_next_request_exactly() -> None:
    picture = _png((10, 200, 30))
    samples = np.random.default_rng(7).uniform(-1, 1, 8000).astype(np.float32)

    def snapshot() -> bytes:
        return picture

    def record() -> AudioPart:
        return AudioPart.from_samples(samples, 16_000)

    def pil_crop() -> Image.Image:
        return Image.open(io.BytesIO(picture)).crop((0, 0, 3, 2))

    model = _script([call("snapshot"), call("record"), call("pil_crop")], "seen and heard")
    await Agent(model, tools=[snapshot, record, pil_crop]).run("look and listen")
    results = model.requests[1][-1].parts
    assert all(isinstance(p, ToolResultPart) for p in results)
    image = results[0].content[0]  # type: ignore[union-attr]
    audio = results[1].content[0]  # type: ignore[union-attr]
    crop = results[2].content[0]  # type: ignore[union-attr]
    assert isinstance(image, ImagePart) and image.data == picture
    assert isinstance(audio, AudioPart)
    np.testing.assert_array_equal(audio.samples(), samples)
    assert isinstance(crop, ImagePart) and crop.to_pil().size == (3, 2)
    assert crop.to_pil().getpixel((1, 1)) == (10, 200, 30)


async def test_user_images_and_audio_are_sent_as_parts() -> None:
    model = _script("ok")
    samples = np.zeros(1600, dtype=np.float32)
    await Agent(model).run("describe", images=[_png((1, 2, 3))], audio=[(samples, 16_000)])
    kinds = [p.kind for p in model.requests[0][-1].parts]
    assert kinds == ["image", "audio", "text"]


async def test_approval_denial_is_shown_to_the_model() -> None:
    @tool(requires_approval=True)
    def wire_money(amount: int) -> str:
        return "sent"

    def approver(call: ToolCallPart, ctx: ToolContext) -> bool | Deny:
        return Deny("amount too large") if call.arguments["amount"] > 100 else True

    model = _script([call("wire_money", amount=1000)], [call("wire_money", amount=5)], "done")
    result = await Agent(model, tools=[wire_money], approver=approver).run("pay")
    denied, sent = result.messages[2].parts[0], result.messages[4].parts[0]
    assert isinstance(denied, ToolResultPart) and denied.is_error and "amount too large" in denied.text
    assert isinstance(sent, ToolResultPart) and sent.text == "sent"


async def test_unparsable_output_from_replay_becomes_a_retry_then_recovers() -> None:
    model = ReplayModel(
        [
            '<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": }]<|/tool_call|><|end|>',
            '<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}]<|/tool_call|><|end|>',
            "It is 3.<|end|>",
        ]
    )
    events = [e async for e in Agent(model, tools=[add]).run_stream("1+2")]
    retries = [e.retry for e in events if isinstance(e, RetryEvent)]
    assert len(retries) == 1 and "invalid JSON" in retries[0].message
    assert model.requests[1][-1].role == "user" and isinstance(model.requests[1][-1].parts[0], RetryPart)
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.result.output == "It is 3."


async def test_a_malformed_call_beside_a_valid_one_is_reported_with_the_results() -> None:
    model = ReplayModel(
        [
            '<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"arguments": {}}]<|/tool_call|>',
            "3",
        ]
    )
    result = await Agent(model, tools=[add]).run("1+2")
    tool_turn = model.requests[1][-1]
    assert tool_turn.role == "tool"
    assert isinstance(tool_turn.parts[0], ToolResultPart) and tool_turn.parts[0].text == "3"
    assert isinstance(tool_turn.parts[1], RetryPart) and "needs a string 'name'" in tool_turn.parts[1].message
    assert result.output == "3"


async def test_history_is_continued_and_bad_prompts_are_refused() -> None:
    model = _script("second")
    first = Message.user("first")
    result = await Agent(model).run("again", history=[first, Message.assistant("one")])
    assert [m.text for m in model.requests[0]] == ["first", "one", "again"]
    assert result.new_messages[0].text == "again"
    with pytest.raises(UserError, match="must be a user message"):
        await Agent(model).run(Message.assistant("x"))
    with pytest.raises(UserError, match="needs an agent with memory"):
        await Agent(model).run("x", conversation_id="abc")
    with pytest.raises(UserError, match="cannot be called from a running event loop"):
        Agent(model).run_sync("x")


def test_run_sync_works_outside_a_loop() -> None:
    assert Agent(_script("sync ok")).run_sync("hi").output == "sync ok"


async def test_a_forced_tool_choice_applies_to_the_first_request_only() -> None:
    """tool_choice='required' (or a tool name) forces a call once; later requests send 'auto' so the run ends."""
    from agent.models import ModelSettings

    def script(messages: list[Any], info: AgentInfo) -> Any:
        if info.request_index == 0:
            return [call("add", a=1, b=2)]
        return "3"

    @tool
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    for choice in ("required", "add"):
        model = FunctionModel(script)
        result = await Agent(model, tools=[add], settings=ModelSettings(tool_choice=choice)).run("1+2?")
        assert result.output == "3"
        assert [i.settings.tool_choice for i in model.infos] == [choice, "auto"]
        kept = FunctionModel(script)
        await Agent(kept, tools=[add], settings=ModelSettings(tool_choice=choice), reset_tool_choice=False).run("x")
        assert [i.settings.tool_choice for i in kept.infos] == [choice, choice]
