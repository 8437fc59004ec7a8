"""Whatever a tool does (raise anything, hang, block the loop, ignore cancellation), the run goes on."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from agent import Agent, Message
from agent.exceptions import UserError
from agent.messages import RetryPart, ToolCallPart, ToolResultPart
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store
from tools import Registry, Tool, ToolContext, ToolDefinitionError, tool

RUN_LIMIT = 5.0  # seconds: a run that takes longer hung (on the code before these fixes, most did)


class Unreadable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class Custom(BaseException):
    pass


RAISED: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "CancelledError": asyncio.CancelledError,
    "StopIteration": StopIteration,
    "Custom": Custom,
    "Unreadable": Unreadable,
}


def _until_final(*names: str) -> FunctionModel:
    """A model that calls each tool once (all in its first turn), then answers "recovered"."""

    def respond(messages: list[Message], info: AgentInfo) -> object:
        return [call(name) for name in names] if info.request_index == 0 else "recovered"

    return FunctionModel(respond)  # type: ignore[arg-type]


def _outcomes(model: FunctionModel) -> list[Any]:
    """The parts of the tool turn the model saw in its second request."""
    return list(model.requests[1][-1].parts)


async def _run(agent: Agent, prompt: str = "go") -> str:
    return (await asyncio.wait_for(agent.run(prompt), RUN_LIMIT)).output


def _raiser(name: str, *, is_async: bool) -> Tool:
    make = RAISED[name]

    def sync_tool() -> str:
        raise make()

    async def async_tool() -> str:
        await asyncio.sleep(0)
        raise make()

    return Tool.from_function(async_tool if is_async else sync_tool, name="bad", timeout=2)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("name", list(RAISED))
async def test_any_exception_from_a_tool_is_a_retry_and_the_run_goes_on(name: str, is_async: bool) -> None:
    model = _until_final("bad")
    assert await _run(Agent(model, tools=[_raiser(name, is_async=is_async)])) == "recovered"
    (retry,) = _outcomes(model)
    assert isinstance(retry, RetryPart) and retry.name == "bad"
    expected = {
        "Unreadable": "the tool failed: Unreadable (its message could not be read)",
        # PEP 479: a coroutine cannot raise StopIteration; Python turns it into a RuntimeError
        "StopIteration": "the tool failed: RuntimeError" if is_async else "the tool failed: StopIteration",
        "SystemExit": "the tool failed: SystemExit: 3",
    }.get(name, f"the tool failed: {name}")
    assert retry.message.startswith(expected), retry.message


async def test_the_loops_own_cancellation_is_passed_on_and_cancels_the_tool() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    run = asyncio.ensure_future(Agent(_until_final("slow"), tools=[slow]).run("go"))
    await asyncio.wait_for(started.wait(), RUN_LIMIT)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, RUN_LIMIT)
    await asyncio.wait_for(cancelled.wait(), RUN_LIMIT)


async def test_a_tool_cancelling_its_own_task_is_a_failure_not_a_cancellation() -> None:
    async def quits() -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)
        return "never"

    model = _until_final("quits")
    assert await _run(Agent(model, tools=[quits])) == "recovered"
    (retry,) = _outcomes(model)
    assert isinstance(retry, RetryPart) and "CancelledError" in retry.message


async def test_a_value_that_cannot_become_a_result_is_an_error_result() -> None:
    class Holder(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        thing: object

    class BadDate:
        def isoformat(self) -> str:
            raise SystemExit("not today")

    def unserialisable() -> Holder:
        return Holder(thing=object())

    def bad_date() -> dict[str, object]:
        return {"when": BadDate()}

    model = _until_final("unserialisable", "bad_date")
    assert await _run(Agent(model, tools=[unserialisable, bad_date])) == "recovered"
    first, second = _outcomes(model)
    assert isinstance(first, ToolResultPart) and first.is_error and "unusable value" in first.text
    assert isinstance(second, ToolResultPart) and second.is_error and "SystemExit: not today" in second.text


# ---------------------------------------------------------------- timeouts


def test_the_default_timeout_is_documented_and_math_inf_means_none() -> None:
    from tools import _registry

    assert _registry.DEFAULT_TIMEOUT == 60.0
    assert Registry().default_timeout == 60.0
    assert "60 s" in (tool.__doc__ or "") and "math.inf" in (tool.__doc__ or "")
    assert "default_timeout" in (Registry.__doc__ or "")
    Tool.from_function(lambda: 1, name="forever", timeout=math.inf)
    Registry(default_timeout=math.inf)
    for bad in (0, -1, math.nan):
        with pytest.raises(ToolDefinitionError, match="timeout must be positive"):
            Tool.from_function(lambda: 1, name="t", timeout=bad)
        with pytest.raises(UserError, match="default_timeout must be positive"):
            Registry(default_timeout=bad)


async def test_a_tool_without_a_timeout_gets_the_registrys_default() -> None:
    release = threading.Event()

    def sleepy() -> str:  # no timeout of its own: before, it hung the run for as long as it slept
        release.wait(30)
        return "late"

    model = _until_final("sleepy")
    try:
        t0 = time.monotonic()
        assert await _run(Agent(model, tools=Registry([sleepy], default_timeout=0.2))) == "recovered"
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
    (retry,) = _outcomes(model)
    assert isinstance(retry, RetryPart) and retry.message == "the tool timed out after 0.2 s"


async def test_the_tools_own_timeout_beats_the_default_and_math_inf_waits() -> None:
    @tool(timeout=math.inf)
    async def patient() -> str:
        await asyncio.sleep(0.3)
        return "worth the wait"

    reg = Registry([patient], default_timeout=0.1)
    out = await reg.execute(ToolCallPart(id="1", name="patient"), ToolContext(call_id="1", tool_name="patient"))
    assert isinstance(out, ToolResultPart) and out.text == "worth the wait"


async def test_an_async_tool_that_swallows_cancellation_times_out_promptly(caplog: pytest.LogCaptureFixture) -> None:
    swallowed, finished = asyncio.Event(), asyncio.Event()

    @tool(timeout=0.2)
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.set()  # and carries on regardless
        try:
            await asyncio.sleep(1.5)
            raise RuntimeError("late failure")
        finally:
            finished.set()

    model = _until_final("stubborn")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mmagent.tools"):
        assert await _run(Agent(model, tools=[stubborn])) == "recovered"
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"waited {elapsed:.2f} s for a tool that ignores cancellation"
        (retry,) = _outcomes(model)
        assert isinstance(retry, RetryPart) and "timed out after 0.2 s" in retry.message
        assert swallowed.is_set()
        gc.collect()  # the abandoned task is still referenced: it runs to its end
        await asyncio.wait_for(finished.wait(), RUN_LIMIT)
        await asyncio.sleep(0.01)
    assert "abandoned tool call ended with RuntimeError: late failure" in caplog.text


async def test_an_async_tool_blocking_the_loop_past_its_timeout_is_a_timeout() -> None:
    @tool(timeout=0.1)
    async def blocks() -> str:
        time.sleep(0.4)  # noqa: ASYNC251 - blocks the event loop: nothing can interrupt it
        return "too late"

    model = _until_final("blocks")
    assert await _run(Agent(model, tools=[blocks])) == "recovered"
    (retry,) = _outcomes(model)
    assert isinstance(retry, RetryPart) and retry.message == "the tool timed out after 0.1 s"


def test_run_sync_returns_promptly_whatever_the_tools_do() -> None:
    release = threading.Event()

    @tool(timeout=0.2)
    def sleeps() -> str:
        release.wait(30)
        return "late"

    @tool(timeout=0.2)
    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        await asyncio.sleep(30)  # the loop's shutdown cancels it a second time
        return "late"

    @tool(timeout=0.2)
    async def blocks() -> str:
        time.sleep(0.3)  # noqa: ASYNC251 - blocks the event loop
        return "late"

    def stops() -> str:
        raise StopIteration

    def exits() -> str:
        raise SystemExit(1)

    async def interrupts() -> str:
        raise KeyboardInterrupt

    names = ("sleeps", "stubborn", "blocks", "stops", "exits", "interrupts")
    model = _until_final(*names)
    agent = Agent(model, tools=[sleeps, stubborn, blocks, stops, exits, interrupts])
    t0 = time.monotonic()
    try:
        result = agent.run_sync("go")
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert result.output == "recovered"
    assert elapsed < 5, f"run_sync took {elapsed:.1f} s"
    outcomes = _outcomes(model)
    assert all(isinstance(p, RetryPart) for p in outcomes)
    assert [p.name for p in outcomes] == list(names)


# ---------------------------------------------------------------- text that is not valid UTF-8


async def test_tool_output_with_lone_surrogates_is_repaired_and_stored() -> None:
    def echo() -> str:
        return "half an emoji: \ud83d!"

    def data() -> dict[str, str]:
        return {"k\udc00": "v\ud800"}

    def fails() -> str:
        raise ValueError("bad byte \udcff")

    model = _until_final("echo", "data", "fails")
    with Store(":memory:") as store:
        result = await asyncio.wait_for(Agent(model, tools=[echo, data, fails], memory=store).run("go"), RUN_LIMIT)
        assert result.output == "recovered"
        text, blob, retry = _outcomes(model)
        assert isinstance(text, ToolResultPart) and text.text == "half an emoji: \ufffd!"
        assert isinstance(blob, ToolResultPart) and blob.text == '{"k\ufffd": "v\ufffd"}'
        assert isinstance(retry, RetryPart) and retry.message == "the tool failed: ValueError: bad byte \ufffd"
        assert result.run_id is not None
        assert store.load_run(result.run_id).messages[-2] == model.requests[1][-1]


async def test_a_prompt_with_a_lone_surrogate_is_a_user_error_before_the_model_is_asked() -> None:
    model = _until_final()
    with pytest.raises(UserError, match="lone surrogate"):
        await Agent(model).run("bad \ud800")
    with pytest.raises(UserError, match="lone surrogate"):
        await Agent(model, system_prompt="rules \udfff").run("hi")
    assert model.requests == []


def _run_a_sync_tool(results: Any) -> None:
    out = asyncio.run(Registry([_double]).execute(call("_double", x=21), ToolContext(call_id="c", tool_name="_double")))
    results.put(out.text if isinstance(out, ToolResultPart) else repr(out))


def _double(x: int) -> int:
    return 2 * x


def test_a_forked_child_runs_sync_tools_although_it_inherits_no_worker_threads() -> None:
    import multiprocessing

    _run_a_sync_tool(queue := multiprocessing.get_context("fork").SimpleQueue())  # the parent now has an idle worker
    assert queue.get() == "42"
    child = multiprocessing.get_context("fork").Process(target=_run_a_sync_tool, args=(queue,))
    child.start()
    child.join(RUN_LIMIT)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the child hung waiting for a worker thread it did not inherit"
    assert queue.get() == "42"
