"""The agent with memory: continuing conversations, resuming runs, and the recall tool (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from memory_support import store_fixture, store_url_fixture  # noqa: F401
from PIL import Image

from agent import Agent
from agent.exceptions import MediaError, UserError
from agent.messages import ImagePart, Message, Part, TextPart, ToolCallPart, ToolResultPart
from agent.models import Usage
from agent.testing import AgentInfo, FunctionModel
from memory import Store, recall_tool
from tools import Tool, ToolContext


def photo(seed: int) -> ImagePart:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ImagePart(data=buffer.getvalue(), media_type="image/png")


def last_text(messages: list[Message]) -> str:
    return next(m.text for m in reversed(messages) if m.role == "user" and m.text)


async def test_conversation_id_continues_a_stored_conversation(store: Store) -> None:
    model = FunctionModel(lambda messages, info: f"echo: {last_text(messages)} ({len(messages)} messages)")
    agent = Agent(model, system_prompt="Be brief.", memory=store)
    first = await agent.run("my name is Ada", images=[photo(1)])
    assert first.conversation_id is not None and first.run_id is not None
    second = await agent.run("what is my name?", conversation_id=first.conversation_id)
    assert second.conversation_id == first.conversation_id
    sent = model.requests[-1]
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]  # the history came from the store
    assert sent[1] == Message.user("my name is Ada", images=[photo(1)])
    stored = store.load_conversation(first.conversation_id)
    assert stored == [*first.new_messages, *second.new_messages]
    assert [r.status for r in store.list_runs(conversation_id=first.conversation_id)] == ["completed", "completed"]
    assert store.list_runs()[0].system_prompt == "Be brief."
    with pytest.raises(UserError, match="no conversation 'missing'"):
        await agent.run("hi", conversation_id="missing")


def counting_tool(counts: dict[str, int]) -> Tool:
    def lookup(ctx: ToolContext, key: str) -> str:
        counts[ctx.call_id] = counts.get(ctx.call_id, 0) + 1
        return f"value of {key}"

    return Tool.from_function(lookup)


def two_step_script(messages: list[Message], info: AgentInfo) -> str | list[Part]:
    calls = sum(1 for m in messages if m.role == "assistant")
    if calls < 2:
        return [ToolCallPart(id=f"s{calls}-{i}", name="lookup", arguments={"key": f"k{calls}{i}"}) for i in range(2)]
    return "finished"


async def test_resume_after_a_failure_continues_without_repeating_tools(store: Store) -> None:
    counts: dict[str, int] = {}

    def flaky(messages: list[Message], info: AgentInfo) -> str | list[Part]:
        if sum(1 for m in messages if m.role == "assistant") == 2:
            raise RuntimeError("the GPU fell over")
        return two_step_script(messages, info)

    failing = Agent(FunctionModel(flaky), tools=[counting_tool(counts)], memory=store)
    with pytest.raises(RuntimeError, match="GPU"):
        await failing.run("look things up")
    [run] = store.list_runs()
    assert (run.status, run.error, run.steps) == ("failed", "RuntimeError: the GPU fell over", 4)
    assert counts == {"s0-0": 1, "s0-1": 1, "s1-0": 1, "s1-1": 1}

    healthy = FunctionModel(two_step_script)
    result = await Agent(healthy, tools=[counting_tool(counts)], memory=store).resume(run.id)
    assert result.output == "finished" and result.run_id == run.id
    assert counts == {"s0-0": 1, "s0-1": 1, "s1-0": 1, "s1-1": 1}  # nothing ran twice
    assert len(healthy.requests) == 1 and len(healthy.requests[0]) == 5
    assert store.list_runs()[0].status == "completed"
    assert result.usage.requests == 3
    with pytest.raises(UserError, match="already completed"):
        await Agent(healthy, memory=store).resume(run.id)


async def test_resume_runs_calls_whose_results_were_not_committed(store: Store) -> None:
    """The process died after the model asked for tools and before their results were committed."""
    counts: dict[str, int] = {}
    started = store.begin_run(
        conversation_id=None, new_messages=[Message.user("look")], model_name="f", system_prompt=None
    )
    calls = [ToolCallPart(id=f"s0-{i}", name="lookup", arguments={"key": f"k0{i}"}) for i in range(2)]
    store.commit_step(started.run_id, 0, "model", [Message.assistant("", calls)], Usage(requests=1))
    model = FunctionModel(two_step_script)
    result = await Agent(model, tools=[counting_tool(counts)], memory=store).resume(started.run_id)
    assert result.output == "finished"
    assert counts == {"s0-0": 1, "s0-1": 1, "s1-0": 1, "s1-1": 1}
    assert len(model.requests) == 2  # step 0's request was not made again
    stored = store.load_conversation(started.conversation_id)
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert store.load_run(started.run_id).usage.requests == 3


async def test_resume_after_the_final_answer_was_committed_only_closes_the_run(store: Store) -> None:
    started = store.begin_run(
        conversation_id=None, new_messages=[Message.user("hi")], model_name="f", system_prompt=None
    )
    store.commit_step(started.run_id, 0, "model", [Message.assistant("hello!")], Usage(requests=1))
    model = FunctionModel(lambda messages, info: "should not be asked")
    result = await Agent(model, memory=store).resume(started.run_id)
    assert result.output == "hello!" and model.requests == []
    assert store.list_runs()[0].status == "completed"


async def test_an_oversized_tool_image_fails_the_run_with_a_media_error(store_url: str) -> None:
    big = ImagePart(data=b"\x89PNG" + bytes(5000))

    def script(messages: list[Message], info: AgentInfo) -> str | list[Part]:
        if messages[-1].role == "user":
            return [ToolCallPart(id="c", name="shot", arguments={})]
        return "done"

    with Store(store_url, max_artifact_bytes=4096) as store:
        agent = Agent(FunctionModel(script), tools=[Tool.from_function(lambda: big, name="shot")], memory=store)
        with pytest.raises(MediaError, match="per-artifact limit"):
            await agent.run("screenshot please")
        [run] = store.list_runs()
        assert run.status == "failed" and "MediaError" in (run.error or "")


async def test_recall_brings_stored_images_back_into_context(store: Store) -> None:
    cat = photo(7)
    store.create_conversation(
        [Message.user("This is my cat Tom on the red sofa", images=[cat]), Message.assistant("What a nice cat!")]
    )
    store.create_conversation([Message.user("Unrelated: the weather is sunny")])

    def script(messages: list[Message], info: AgentInfo) -> str | list[Part]:
        if messages[-1].role == "user":
            return [ToolCallPart(id="r1", name="recall", arguments={"query": "cat Tom sofa"})]
        return "Tom is on the red sofa."

    model = FunctionModel(script)
    agent = Agent(model, tools=[recall_tool()], memory=store)
    result = await agent.run("Which sofa is Tom the cat on?")
    [result_part] = [p for m in result.messages for p in m.parts if isinstance(p, ToolResultPart)]
    text, image = result_part.content
    assert isinstance(text, TextPart) and "my cat Tom on the red sofa" in text.text and "attached: image 1" in text.text
    assert image == cat  # the stored pixels are back in the model's context
    assert model.requests[1][-1].parts[0] == result_part
    assert "Which sofa" not in text.text  # the current run's own question is not recalled


async def test_recall_scopes_and_limits(store: Store) -> None:
    tool = recall_tool(store, limit=2, max_media=0)
    assert tool.name == "recall" and set(tool.parameters["properties"]) == {"query", "scope", "limit"}
    first = store.create_conversation([Message.user(f"apple note {i}") for i in range(4)])
    store.create_conversation([Message.user("apple elsewhere")])
    ctx = ToolContext(call_id="x", tool_name="recall", conversation_id=first)

    async def call(**arguments: Any) -> Any:
        return await tool.run(tool.validate(arguments), ctx)

    everywhere = await call(query="apple", limit=50)
    assert isinstance(everywhere, str) and everywhere.count("\n") == 1  # capped at the tool's limit of 2
    here = await call(query="apple", scope="conversation", limit=2)
    assert "elsewhere" not in here and here.count(first) == 2
    assert "Nothing in memory matches" in await call(query="banana")
    no_store = recall_tool()
    assert "not available" in await no_store.run({"query": "x"}, ToolContext(call_id="y", tool_name="recall"))
    with pytest.raises(UserError):
        recall_tool(limit=0)


async def test_in_memory_store_works_with_the_agent() -> None:
    with Store(":memory:") as store:
        agent = Agent(FunctionModel(two_step_script), tools=[counting_tool({})], memory=store)
        result = await agent.run("go")
        assert store.load_conversation(result.conversation_id or "") == result.new_messages


async def test_resume_counts_the_calls_already_made_against_max_tool_calls(store: Store) -> None:
    """4 calls ran before the failure; with max_tool_calls=5 the resumed run may not make 2 more."""
    from agent import UsageLimits
    from agent.exceptions import UsageLimitExceeded

    def flaky(messages: list[Message], info: AgentInfo) -> str | list[Part]:
        if sum(1 for m in messages if m.role == "assistant") == 2:
            raise RuntimeError("the GPU fell over")
        return two_step_script(messages, info)

    def three_steps(messages: list[Message], info: AgentInfo) -> str | list[Part]:
        step = sum(1 for m in messages if m.role == "assistant")
        if step < 3:
            return [ToolCallPart(id=f"s{step}-{i}", name="lookup", arguments={"key": "k"}) for i in range(2)]
        return "finished"

    counts: dict[str, int] = {}
    with pytest.raises(RuntimeError):
        await Agent(FunctionModel(flaky), tools=[counting_tool(counts)], memory=store).run("look")
    [run] = store.list_runs()
    limited = Agent(
        FunctionModel(three_steps), tools=[counting_tool(counts)], memory=store,
        usage_limits=UsageLimits(max_tool_calls=5),
    )  # fmt: skip
    with pytest.raises(UsageLimitExceeded, match="tool call limit of 5"):
        await limited.resume(run.id)
    assert len(counts) == 4  # the third step's calls were refused, none of the first four ran again
