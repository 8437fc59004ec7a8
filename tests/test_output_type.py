"""`Agent(output_type=T)`: the answer is a validated T, by grammar in process, by response_format over HTTP."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
from pydantic import BaseModel, Field

from agent import Agent, Message
from agent.exceptions import RetryBudgetExceeded, UserError
from agent.messages import RetryPart
from agent.models import ModelSettings, ResponseFormat, TextDelta, Usage
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store


class City(BaseModel):
    name: str
    population: int = Field(ge=0)


@dataclasses.dataclass
class Pair:
    left: int
    right: str


def test_the_answer_is_validated_into_the_type_and_the_schema_is_asked_for() -> None:
    seen: list[ModelSettings] = []

    def model(messages: list[Message], info: AgentInfo) -> str:
        seen.append(info.settings)
        return '{"name": "Lyon", "population": 522250}'

    result = Agent(FunctionModel(model), output_type=City).run_sync("Biggest city on the Rhone?")
    assert result.output == City(name="Lyon", population=522250)
    answer = seen[0].response_format
    assert answer is not None and answer.name == "City" and answer.schema == City.model_json_schema()


def test_tools_run_first_then_the_typed_answer() -> None:
    def lookup(city: str) -> str:
        """Population of a city."""
        return "522250"

    def model(messages: list[Message], info: AgentInfo) -> Any:
        if info.request_index == 0:
            assert info.settings.response_format is not None  # a call or the JSON: the model chooses
            return [call("lookup", city="Lyon")]
        return json.dumps({"name": "Lyon", "population": int(messages[-1].parts[0].content[0].text)})  # type: ignore[union-attr]

    result = Agent(FunctionModel(model), tools=[lookup], output_type=City).run_sync("How many live in Lyon?")
    assert result.output.population == 522250
    assert [m.role for m in result.new_messages] == ["user", "assistant", "tool", "assistant"]


def test_an_invalid_answer_goes_back_with_the_error_then_validates() -> None:
    answers = iter(['{"name": "Lyon", "population": -5}', "not json at all", '{"left": 1, "right": "x"}'])
    seen: list[str] = []

    def model(messages: list[Message], info: AgentInfo) -> str:
        seen.append(" ".join(p.message if isinstance(p, RetryPart) else str(p) for p in messages[-1].parts))
        return next(answers)

    result = Agent(FunctionModel(model), output_type=Pair, retries=2).run_sync("pair?")
    assert result.output == Pair(left=1, right="x")
    assert "not valid Pair JSON" in seen[1] and "left" in seen[1]
    assert "Answer again with only JSON" in seen[2]


def test_retries_run_out_with_a_clear_error() -> None:
    agent = Agent(FunctionModel(lambda m, i: "[]"), output_type=City, retries=1)
    with pytest.raises(RetryBudgetExceeded, match="did not validate as the output type"):
        agent.run_sync("city?")


def test_plain_types_and_an_explicit_response_format_win() -> None:
    assert Agent(FunctionModel(lambda m, i: "[1, 2, 3]"), output_type=list[int]).run_sync("n?").output == [1, 2, 3]
    own = ResponseFormat(schema={"type": "array"}, name="mine")
    seen: list[ModelSettings] = []

    def model(messages: list[Message], info: AgentInfo) -> str:
        seen.append(info.settings)
        return "[4]"

    Agent(FunctionModel(model), output_type=list[int], settings=ModelSettings(response_format=own)).run_sync("n?")
    assert seen[0].response_format == own


def test_a_type_without_a_schema_is_refused_at_construction() -> None:
    class Opaque:
        pass

    with pytest.raises(UserError, match="has no JSON schema"):
        Agent(FunctionModel(lambda m, i: "x"), output_type=Opaque)


async def test_a_resumed_run_reads_its_stored_answer_as_the_type(tmp_path: Any) -> None:
    """A run that stopped after its answer was committed (its end not recorded) resumes to that output."""
    with Store(tmp_path / "runs.db") as store:
        started = store.begin_run(
            conversation_id=None, new_messages=[Message.user("city?")], model_name="m", system_prompt=None
        )
        answer = Message.assistant('{"name": "Nice", "population": 1}')
        store.commit_step(started.run_id, 0, "model", [answer], Usage(requests=1))
        store.release(started.run_id)
        never = FunctionModel(lambda m, i: pytest.fail("the stored answer needs no new request"))
        resumed = await Agent(never, memory=store, output_type=City).resume(started.run_id)
        assert resumed.output == City(name="Nice", population=1)


# ---------------------------------------------------------------- the real backends


def _models(count: int, seed: int = 5) -> list[type[BaseModel]]:
    from agent.models._grammar._schemas import random_model

    rng = random.Random(seed)
    return [random_model(rng, f"Out{i}") for i in range(count)]


def _check_in_process(tiny_phi4: Any, count: int) -> None:
    pytest.importorskip("llguidance")
    for output_type in _models(count):
        agent = Agent(tiny_phi4, output_type=output_type, settings=ModelSettings(max_tokens=160))
        result = agent.run_sync("Fill in the record.")
        assert isinstance(result.output, output_type), result.new_messages[-1].text


def test_tiny_phi4_answers_validate_by_construction(tiny_phi4: Any) -> None:
    _check_in_process(tiny_phi4, 20)


@pytest.mark.slow
def test_tiny_phi4_answers_validate_by_construction_200(tiny_phi4: Any) -> None:
    _check_in_process(tiny_phi4, 200)


def _check_over_http(tiny_phi4: Any, count: int) -> None:
    pytest.importorskip("llguidance")
    from serve_support import running

    from agent.models.openai import OpenAIModel
    from agent.server import create_app

    app = create_app(tiny_phi4, model_name="tiny", mode="model")
    with running(app) as served:
        remote = OpenAIModel(served.base_url, "tiny", api_key="unused")
        for output_type in _models(count, seed=6):
            agent = Agent(remote, output_type=output_type, settings=ModelSettings(max_tokens=160))
            result = agent.run_sync("Fill in the record.")
            assert isinstance(result.output, output_type), result.new_messages[-1].text


def test_through_mmagent_serve_with_openai_model(tiny_phi4: Any) -> None:
    _check_over_http(tiny_phi4, 8)


@pytest.mark.slow
def test_through_mmagent_serve_with_openai_model_200(tiny_phi4: Any) -> None:
    _check_over_http(tiny_phi4, 200)


async def test_a_streamed_answer_yields_growing_validated_partial_outputs() -> None:
    from agent import PartialOutputEvent
    from agent.testing import ReplayModel

    text = '{"left": 522250, "right": "Lyon on the Rhone"}'

    class Pieces(ReplayModel):
        async def request_stream(self, messages: Any, tools: Any, settings: ModelSettings) -> Any:
            for i in range(1, len(text), 5):
                yield TextDelta(text[i - 1 : i + 4])
            async for item in super().request_stream(messages, tools, settings):
                if not isinstance(item, TextDelta):
                    yield item

    partials = [
        event.output
        async for event in Agent(Pieces([text + "<|end|>"]), output_type=Pair).run_stream("pair?")
        if isinstance(event, PartialOutputEvent)
    ]
    assert partials[0] == Pair(left=522250, right="") or partials[0].right.startswith("L")
    assert [p.right for p in partials] == sorted({p.right for p in partials}, key=len)  # the string grows
    assert partials[-1] == Pair(left=522250, right="Lyon on the Rhone")
