"""`mmagent serve` in model mode: a plain OpenAI-compatible endpoint for the client's own agent, run for real
(uvicorn on loopback, the tiny random Phi-4 and SmolLM2 through `TransformersModel`), driven by the official
`openai` client."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

pytest.importorskip("torch")
pytest.importorskip("llguidance")

import torch
from PIL import Image
from serve_support import FREE, TEXT, Running, TurnScript, call_opening, running, weather_tool

from agent import Agent
from agent.models.transformers import TransformersModel
from agent.server import create_app
from agent.testing import FunctionModel
from memory import Store

NAME = "tiny-phi4"


@pytest.fixture(scope="module")
def policy(tiny_phi4_loaded: tuple[Any, Any]) -> TurnScript:
    return TurnScript(tiny_phi4_loaded[1].tokenizer, chatml=False)


@pytest.fixture(scope="module")
def phi4_model(tiny_phi4_loaded: tuple[Any, Any], policy: TurnScript) -> TransformersModel:
    model, processor = tiny_phi4_loaded
    model.disable_adapters()
    return TransformersModel(model, processor, adapters=(), logits_processors=[policy], name=NAME)


@pytest.fixture(scope="module")
def server(phi4_model: TransformersModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    app = create_app(phi4_model, model_name=NAME, aliases=["gpt-4o-mini"])
    with running(app) as served:
        yield served


@pytest.fixture
def client(server: Running, policy: TurnScript) -> Iterator[openai.OpenAI]:
    policy.prefixes = [call_opening()]  # a call after the user's turn, text after the tool's
    policy.turns.clear()
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as made:
        yield made


def _schema_of(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"]["parameters"]  # type: ignore[no-any-return]


def _png(width: int, height: int, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---------------------------------------------------------------- tool calls


def test_required_tool_call_parses_and_validates(client: openai.OpenAI) -> None:
    tools = [weather_tool(), weather_tool("get_time")]
    reply = client.chat.completions.create(
        model=NAME,
        messages=USER,
        tools=tools,
        tool_choice="required",
        max_tokens=96,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for call in calls:
        assert call.function.name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(call.function.arguments), _schema_of(tools[0]))
    assert reply.model == NAME and reply.usage is not None and reply.usage.completion_tokens > 0


def test_named_tool_choice_calls_only_that_tool(client: openai.OpenAI) -> None:
    tools = [weather_tool(), weather_tool("get_time")]
    for _ in range(3):
        reply = client.chat.completions.create(
            model=NAME,
            messages=USER,
            tools=tools,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=96,
        )
        calls = reply.choices[0].message.tool_calls or []
        assert calls and {c.function.name for c in calls} == {"get_time"}


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI, policy: TurnScript) -> None:
    # several calls in one block are what the grammar allows by default: forced here so the test can fail
    policy.prefixes = ['<|tool_call|>[{"name": "get_weather", "arguments": {"city": "A", "unit": "C"}}, {"name": ']
    tools = [weather_tool(), weather_tool("get_time")]
    both = client.chat.completions.create(model=NAME, messages=USER, tools=tools, max_tokens=80)  # type: ignore[arg-type]
    assert len(both.choices[0].message.tool_calls or []) == 2  # several calls in one turn come back together
    policy.prefixes = [call_opening("get_weather")]
    one = client.chat.completions.create(
        model=NAME,
        messages=USER,
        tools=tools,
        parallel_tool_calls=False,
        max_tokens=80,  # type: ignore[arg-type]
    )
    assert len(one.choices[0].message.tool_calls or []) == 1


def test_streamed_tool_calls_are_openai_deltas_and_never_content(client: openai.OpenAI) -> None:
    tools = [weather_tool()]
    stream = client.chat.completions.create(
        model=NAME,
        messages=USER,
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=96,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)  # no call markup leaks as content
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    assert pieces[0].index == 0 and pieces[0].id and pieces[0].function and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert len([p for p in pieces if p.function and p.function.arguments]) > 2  # streamed in pieces, as generated
    jsonschema.validate(json.loads(arguments), _schema_of(tools[0]))
    assert all(p.id is None for p in pieces[1:])  # id and name once, then argument pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streamed_and_plain_calls_agree(client: openai.OpenAI) -> None:
    """The openai client's own stream accumulation gives the same call as the non-streamed response."""
    tools = [weather_tool()]
    args: dict[str, Any] = {
        "model": NAME,
        "messages": USER,
        "tools": tools,
        "tool_choice": "required",
        "max_tokens": 96,
    }
    plain = client.chat.completions.create(**args).choices[0].message.tool_calls or []
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in plain] == [
        (c.function.name, json.loads(c.function.arguments)) for c in streamed
    ]


def test_tool_round_trip_with_an_image_returned_in_the_tool_message(
    client: openai.OpenAI, phi4_model: TransformersModel, policy: TurnScript
) -> None:
    """The client runs its tool, which returns an image; the image reaches the model as real pixels."""
    tools = [weather_tool()]
    first = client.chat.completions.create(model=NAME, messages=USER, tools=tools, max_tokens=96)  # type: ignore[arg-type]
    call = (first.choices[0].message.tool_calls or [])[0]
    picture = _png(300, 200, "blue")
    seen: list[torch.Tensor] = []
    embed = phi4_model.model.model.embed_tokens_extend.image_embed
    handle = embed.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["image_pixel_values"].detach().clone()), with_kwargs=True
    )
    try:
        second = client.chat.completions.create(
            model=NAME,
            messages=[
                *USER,
                first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": [  # type: ignore[typeddict-item]
                        {"type": "text", "text": "Sunny; the satellite picture:"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(picture).decode()},
                        },
                    ],
                },
            ],
            tools=tools,  # type: ignore[arg-type]
            max_tokens=24,
        )
    finally:
        handle.remove()
    assert policy.turns == [0, 1]  # the second request was the turn after the tool result
    assert second.choices[0].finish_reason in ("stop", "length") and not second.choices[0].message.tool_calls
    assert second.choices[0].message.content
    expected = phi4_model.processor.image_processor(
        [Image.open(io.BytesIO(picture)).convert("RGB")], return_tensors="pt"
    )
    assert len(seen) == 1 and torch.equal(seen[0], expected["image_pixel_values"].to(seen[0].dtype))


def test_several_results_and_a_history_ending_in_a_tool_message(client: openai.OpenAI, policy: TurnScript) -> None:
    policy.prefixes = [FREE, TEXT]
    messages: list[dict[str, Any]] = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "a1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                },
                {
                    "id": "a2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "C"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a2", "content": "Rome: 20 C"},
        {"role": "tool", "tool_call_id": "a1", "content": "Paris: 12 C"},
    ]
    reply = client.chat.completions.create(model=NAME, messages=messages, tools=[weather_tool()], max_tokens=20)  # type: ignore[arg-type]
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    assert policy.turns == [1]


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "tool", "tool_call_id": "x", "content": "orphan"}], "messages[0] answers the call id 'x'"),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c2", "content": "wrong id"},
            ],
            "messages[2] answers the call id 'c2', which is not among the calls of messages[1]",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "user", "content": "no result"},
            ],
            "messages[1] calls tools whose results never came ('c1')",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "x"},
            ],
            "messages[1].tool_calls[0].function.arguments must be a JSON object",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "prefill"}],
            "messages[1] is an assistant",
        ),
    ],
)
def test_bad_histories_get_a_400_naming_the_message(
    server: Running, messages: list[dict[str, Any]], fragment: str
) -> None:
    body = {"model": NAME, "messages": messages, "tools": [weather_tool("f")]}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


# ---------------------------------------------------------------- response formats, logprobs, parameters

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "temperature": {"type": "integer", "minimum": -50, "maximum": 60},
    },
    "required": ["city", "temperature"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("strict", [True, False])
def test_response_format_json_schema_is_valid_by_construction(client: openai.OpenAI, strict: bool) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=NAME,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "weather", "schema": ANSWER_SCHEMA, "strict": strict},
            },
            max_tokens=48,
            temperature=1.0,
            seed=seed,
        )
        content = reply.choices[0].message.content or ""
        jsonschema.validate(json.loads(content), ANSWER_SCHEMA)
        assert reply.choices[0].finish_reason == "stop"


def test_response_format_json_object_and_tools_together(client: openai.OpenAI, policy: TurnScript) -> None:
    policy.prefixes = [TEXT]  # no call: the answer must then be a JSON object
    reply = client.chat.completions.create(
        model=NAME,
        messages=USER,
        response_format={"type": "json_object"},
        tools=[weather_tool()],
        max_tokens=40,  # type: ignore[arg-type]
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    policy.prefixes = [call_opening()]  # a call is still allowed beside the JSON answer
    called = client.chat.completions.create(
        model=NAME,
        messages=USER,
        response_format={"type": "json_object"},
        tools=[weather_tool()],
        max_tokens=80,  # type: ignore[arg-type]
    )
    assert called.choices[0].finish_reason == "tool_calls"


def test_logprobs_come_from_the_sampling_distribution(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=NAME, messages=USER, max_tokens=12, logprobs=True, top_logprobs=3)
    entries = (reply.choices[0].logprobs and reply.choices[0].logprobs.content) or []
    assert len(entries) == (reply.usage.completion_tokens if reply.usage else 0) - (
        reply.choices[0].finish_reason == "stop"
    )
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5


def test_logprobs_under_a_grammar_exclude_what_it_forbids(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=NAME,
        messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": ANSWER_SCHEMA}},
        max_tokens=40,
        logprobs=True,
        top_logprobs=5,
    )
    entries = (reply.choices[0].logprobs and reply.choices[0].logprobs.content) or []
    assert entries[0].token.startswith("{") and entries[0].logprob == 0.0  # the only token allowed first
    assert all(t.logprob > float("-inf") for e in entries for t in e.top_logprobs)


def test_stop_seed_and_max_completion_tokens(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=NAME, messages=USER, max_completion_tokens=9, temperature=1.0, seed=7)
    again = client.chat.completions.create(model=NAME, messages=USER, max_completion_tokens=9, temperature=1.0, seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage is not None and first.usage.completion_tokens <= 9
    assert first.choices[0].finish_reason == "length"
    text = first.choices[0].message.content or ""
    stop = text[2:5]
    stopped = client.chat.completions.create(
        model=NAME, messages=USER, max_completion_tokens=9, temperature=1.0, seed=7, stop=[stop]
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)].strip()  # the stop string cut it there


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"frequency_penalty": 0.5}, "`frequency_penalty`"),
        ({"logit_bias": {"11": 5}}, "`logit_bias`"),
        ({"top_k": 5, "repetition_penalty": 1.1}, "`repetition_penalty`, `top_k`"),
        ({"n": 2}, "n=1"),
        ({"modalities": ["text", "audio"]}, "`modalities`"),
        ({"tool_choice": "required"}, "tool_choice 'required' needs `tools`"),
        ({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "not a valid JSON schema",
        ),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ],
)
def test_unimplemented_parameters_are_named_not_ignored(server: Running, extra: dict[str, Any], fragment: str) -> None:
    body = {"model": NAME, "messages": USER, **extra}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_inert_fields_and_neutral_values_are_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=NAME, messages=USER, max_tokens=4, user="u1", metadata={"k": "v"}, store=False, frequency_penalty=0,
        presence_penalty=0, logit_bias={},
    )  # fmt: skip
    assert reply.choices[0].message.content is not None


# ---------------------------------------------------------------- names, media, storage


def test_served_names_and_aliases(client: openai.OpenAI, server: Running) -> None:
    assert [m.id for m in client.models.list()] == [NAME, "gpt-4o-mini"]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=3)
    assert reply.model == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=USER, max_tokens=3)


def test_media_for_a_text_model_is_refused_or_dropped_by_choice(tiny_chat_model: TransformersModel) -> None:
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(8, 8)).decode()},
    }
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]
    with running(create_app(tiny_chat_model, model_name="chat")) as served:
        refused = httpx.post(
            f"{served.base_url}/chat/completions", json={"messages": messages, "max_tokens": 3}, timeout=30
        )
    assert refused.status_code == 400 and "messages[0] holds an image" in refused.json()["error"]["message"]
    with running(create_app(tiny_chat_model, model_name="chat", drop_unreadable_media=True)) as served:
        dropped = httpx.post(
            f"{served.base_url}/chat/completions", json={"messages": messages, "max_tokens": 3}, timeout=30
        )
    assert dropped.status_code == 200 and "image in messages[0]" in dropped.headers["warning"]


def test_model_mode_stores_only_with_a_store(phi4_model: TransformersModel, tmp_path: Path) -> None:
    tools = [weather_tool()]
    body = {"model": NAME, "messages": USER, "tools": tools, "tool_choice": "required", "max_tokens": 80}
    with Store(tmp_path / "kept.db") as store:
        with running(create_app(phi4_model, model_name=NAME, store=store)) as served:
            kept = httpx.post(f"{served.base_url}/chat/completions", json=body, timeout=60).json()
        conversation = kept["mmagent"]["conversation_id"]
        stored = store.load_conversation(conversation)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[1].tool_calls[0].id == kept["choices"][0]["message"]["tool_calls"][0]["id"]
        assert len(store.list_conversations()) == 1
    with running(create_app(phi4_model, model_name=NAME)) as served:
        plain = httpx.post(f"{served.base_url}/chat/completions", json=body, timeout=60).json()
    assert plain["mmagent"]["conversation_id"] is None


def test_auto_mode_routes_client_tools_to_the_model_and_the_rest_to_the_agent(phi4_model: TransformersModel) -> None:
    agent = Agent(phi4_model)  # the agent's own backend serves model mode
    scripted = Agent(FunctionModel(lambda messages, info: "from the agent"))
    with running(create_app(scripted, model_name=NAME)) as served:
        plain = httpx.post(f"{served.base_url}/chat/completions", json={"messages": USER}, timeout=30).json()
        assert plain["choices"][0]["message"]["content"] == "from the agent"
    with running(create_app(agent, model_name=NAME)) as served:
        body = {"messages": USER, "tools": [weather_tool()], "tool_choice": "required", "max_tokens": 80}
        tooled = httpx.post(f"{served.base_url}/chat/completions", json=body, timeout=60).json()
        assert tooled["choices"][0]["finish_reason"] == "tool_calls"
    with running(create_app(scripted, model_name=NAME, mode="agent")) as served:
        refused = httpx.post(
            f"{served.base_url}/chat/completions", json={"messages": USER, "tools": [weather_tool()]}, timeout=30
        )
        assert refused.status_code == 400 and "model mode" in refused.json()["error"]["message"]
