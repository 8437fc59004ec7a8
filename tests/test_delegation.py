"""`Agent.as_tool`: a child agent as a parent's tool: media back as parts, usage rolled up, runs linked."""

from __future__ import annotations

import json
from typing import Any

from PIL import Image
from pydantic import BaseModel

from agent import Agent, Message
from agent._delegate import MAX_DEPTH
from agent.messages import ImagePart, RetryPart, ToolResultPart
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store
from tools import ToolContext


def _chart() -> ImagePart:
    return ImagePart.from_pil(Image.new("RGB", (32, 24), (200, 30, 30)))


def _result_of(message: Message) -> ToolResultPart:
    part = message.parts[0]
    assert isinstance(part, ToolResultPart)
    return part


def test_the_child_image_reaches_the_parent_model_and_both_runs_are_stored_and_linked(tmp_path: Any) -> None:
    chart = _chart()
    seen_by_child: list[str] = []

    def plot(series: str) -> Image.Image:
        """Plot a series."""
        return chart.to_pil()

    def child_model(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            seen_by_child.append(messages[-1].text)
            return [call("plot", series="sales")]
        return "sales chart"

    child = Agent(FunctionModel(child_model), tools=[plot], system_prompt="You draw charts.", name="charts")
    parent_saw: list[Message] = []

    def parent_model(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            assert [t.name for t in info.tools] == ["charts"]
            return [call("charts", task="Plot sales by month")]
        parent_saw.append(messages[-1])
        return "Here is your chart."

    with Store(tmp_path / "runs.db") as store:
        parent = Agent(FunctionModel(parent_model), tools=[child.as_tool()], memory=store)
        result = parent.run_sync("Show me sales")

        assert seen_by_child == ["Plot sales by month"]
        content = _result_of(parent_saw[0]).content
        assert [type(p).__name__ for p in content] == ["TextPart", "ImagePart"]
        assert content[1] == chart  # the pixels themselves, not a description
        assert result.usage.requests == 4  # the parent's two requests and the child's two

        children = store.list_runs(parent_run_id=result.run_id)
        assert len(children) == 1 and children[0].status == "completed"
        assert children[0].conversation_id != result.conversation_id
        stored = store.load_conversation(children[0].conversation_id)
        assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant"]
        assert stored[0].text == "Plot sales by month"
        assert store.list_runs(parent_run_id=children[0].id) == []


def test_a_typed_child_answers_in_json_and_deps_pass_through() -> None:
    class Total(BaseModel):
        amount: int

    def base(ctx: ToolContext) -> str:
        """The base amount."""
        return str(ctx.deps["base"])

    def child_model(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            return [call("base")]
        base_amount = int(_result_of(messages[-1]).content[0].text)  # type: ignore[union-attr]
        return json.dumps({"amount": base_amount + 1})

    child = Agent(FunctionModel(child_model), tools=[base], output_type=Total)
    answers: list[str] = []

    def parent_model(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            return [call("adder", task="add one")]
        answers.append(_result_of(messages[-1]).content[0].text)  # type: ignore[union-attr]
        return "done"

    Agent(FunctionModel(parent_model), tools=[child.as_tool("adder", "Adds one")]).run_sync("go", deps={"base": 41})
    assert answers == ['{"amount": 42}']


def test_a_failing_child_is_a_retry_for_the_parent_and_the_run_goes_on() -> None:
    child = Agent(FunctionModel(lambda m, i: [call("nothing")]), max_steps=1, name="stuck")
    messages_seen: list[Message] = []

    def parent_model(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            return [call("stuck", task="try")]
        messages_seen.append(messages[-1])
        return "the helper failed"

    result = Agent(FunctionModel(parent_model), tools=[child.as_tool()]).run_sync("go")
    assert result.output == "the helper failed"
    retry = messages_seen[0].parts[0]
    assert isinstance(retry, RetryPart) and "MaxStepsExceeded" in retry.message


def test_an_agent_delegating_to_itself_stops_at_the_depth_limit() -> None:
    depths: list[int] = []

    def model(messages: list[Message], info: AgentInfo) -> Any:
        if messages[-1].role == "user":  # every run (the outer one and each delegated one) delegates again
            depths.append(1)
            return [call("self", task="again")]
        last = messages[-1].parts[0]
        return last.message if isinstance(last, RetryPart) else "ok"

    me = Agent(FunctionModel(model), name="self")
    me.registry.add(me.as_tool())
    result = me.run_sync("recurse")
    assert len(depths) == MAX_DEPTH + 1  # the outer run and MAX_DEPTH delegated ones
    assert result.output == "ok"  # the innermost saw the depth error and answered; each caller then did
