"""OpenAIModel against scripted servers (httpx.MockTransport) and a closed port: wire format, retries, errors."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from agent import Agent, Message
from agent.exceptions import ModelHTTPError, UserError
from agent.messages import AudioPart, ImagePart, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models import ModelResponse, ModelSettings, TextDelta
from agent.models.openai import OpenAIModel
from agent.models.openai._wire import SSEDecoder, retry_after

BASE = "http://llm.test/v1"
ADD = ToolDefinition(
    name="add",
    description="Add two integers.",
    parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
)
MUL = ToolDefinition(name="mul", description="Multiply.", parameters=ADD.parameters)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A scripted server: answers requests in turn from `replies` (a response or a function of the request)."""

    def __init__(self, *replies: httpx.Response | Handler | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply(request) if callable(reply) else reply

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[index].content)  # type: ignore[no-any-return]


def model_with(recorder: Recorder, **kwargs: Any) -> tuple[OpenAIModel, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    kwargs.setdefault("retry_backoff", 0.001)
    return OpenAIModel(BASE, "phi-4-mm", http_client=client, **kwargs), client


def completion(
    content: str | None = "", tool_calls: list[dict[str, Any]] | None = None, **usage: int
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "phi-4-mm",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, **usage},
    }


def fn_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def sse_response(*events: dict[str, Any] | str, status: int = 200) -> httpx.Response:
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return httpx.Response(status, content=text.encode(), headers={"content-type": "text/event-stream"})


def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c1", "object": "chat.completion.chunk", "model": "phi-4-mm", "choices": choices, **extra}


def png(width: int = 8, height: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")
    return buf.getvalue()


SETTINGS = ModelSettings(max_tokens=64, temperature=0.2, top_p=0.9, seed=7, stop=("<|end|>",))


# ---------------------------------------------------------------- requests and responses


async def test_request_body_and_parsed_response() -> None:
    rec = Recorder(httpx.Response(200, json=completion("Adding.", [fn_call("c1", "add", '{"a": 2, "b": 3}')])))
    model, client = model_with(rec, api_key="sk-test")
    messages = [Message.system("Be brief."), Message.user("2+3?", images=[png()])]
    response = await model.request(messages, [ADD], SETTINGS)

    body = rec.body()
    assert rec.requests[0].url == "http://llm.test/v1/chat/completions"
    assert rec.requests[0].headers["authorization"] == "Bearer sk-test"
    assert body["model"] == "phi-4-mm"
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["tools"] == [ADD.to_openai()]
    assert body["tool_choice"] == "auto"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"], body["stop"]) == (
        64,
        0.2,
        0.9,
        7,
        ["<|end|>"],
    )
    assert "stream" not in body
    assert response.message.text == "Adding."
    assert response.message.tool_calls == [ToolCallPart(id="c1", name="add", arguments={"a": 2, "b": 3})]
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.requests) == (10, 5, 1)
    assert response.finish_reason == "tool_calls"
    assert response.parse_errors == ()
    await client.aclose()


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("required", "required"),
        ("none", "none"),
        ("mul", {"type": "function", "function": {"name": "mul"}}),
    ],
)
async def test_tool_choice_mapping(choice: str, expected: object) -> None:
    rec = Recorder(httpx.Response(200, json=completion("ok")))
    model, client = model_with(rec)
    await model.request([Message.user("hi")], [ADD, MUL], ModelSettings(tool_choice=choice))
    assert rec.body()["tool_choice"] == expected
    await client.aclose()


async def test_tool_choice_edge_cases() -> None:
    rec = Recorder(httpx.Response(200, json=completion("ok")))
    model, client = model_with(rec)
    await model.request([Message.user("hi")], [], ModelSettings(tool_choice="required"))
    assert "tools" not in rec.body() and "tool_choice" not in rec.body()  # servers reject a choice without tools
    with pytest.raises(UserError, match="'nope' names no tool"):
        await model.request([Message.user("hi")], [ADD], ModelSettings(tool_choice="nope"))
    assert len(rec.requests) == 1
    await client.aclose()


async def test_invalid_json_arguments_become_parse_errors() -> None:
    calls = [
        fn_call("c1", "add", '{"a": 2, "b": '),
        fn_call("c2", "add", '{"a": 1, "b": 1}'),
        fn_call("c3", "add", "[1, 2]"),
        fn_call("c4", "", "{}"),
    ]
    rec = Recorder(httpx.Response(200, json=completion(None, calls)))
    model, client = model_with(rec)
    response = await model.request([Message.user("add")], [ADD], ModelSettings())
    assert response.message.tool_calls == [ToolCallPart(id="c2", name="add", arguments={"a": 1, "b": 1})]
    assert len(response.parse_errors) == 3
    assert "not valid JSON" in response.parse_errors[0] and "'add'" in response.parse_errors[0]
    assert "must be a JSON object" in response.parse_errors[1]
    assert "no function name" in response.parse_errors[2]
    await client.aclose()


async def test_lone_surrogates_from_a_server_do_not_crash_the_backend() -> None:
    """A server's `"\\ud800"` escapes decode to lone surrogates: text gets U+FFFD, such a call is a parse error."""
    body = json.dumps(
        completion("bad \ud800 text", [fn_call("c1", "add", '{"a": "\\udc80"}'), fn_call("c2", "add", "{}")])
    )
    rec = Recorder(httpx.Response(200, content=body.encode(), headers={"content-type": "application/json"}))
    model, client = model_with(rec)
    response = await model.request([Message.user("add")], [ADD], ModelSettings())
    assert response.message.text == "bad \ufffd text"
    assert [c.id for c in response.message.tool_calls] == ["c2"]
    assert len(response.parse_errors) == 1 and "not valid Unicode" in response.parse_errors[0]
    await client.aclose()


async def test_agent_loop_retries_after_unparsable_arguments() -> None:
    rec = Recorder(
        httpx.Response(200, json=completion(None, [fn_call("c1", "add", "{oops")])),
        httpx.Response(200, json=completion(None, [fn_call("c2", "add", '{"a": 2, "b": 3}')])),
        httpx.Response(200, json=completion("The sum is 5.")),
    )
    model, client = model_with(rec)

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    result = await Agent(model, tools=[add]).run("2+3?")
    assert result.output == "The sum is 5."
    retry_turn = rec.body(1)["messages"][-1]
    assert retry_turn["role"] == "user" and "not valid JSON" in retry_turn["content"]
    tool_turn = rec.body(2)["messages"][-1]
    assert tool_turn == {"role": "tool", "tool_call_id": "c2", "name": "add", "content": "5"}
    await client.aclose()


# ---------------------------------------------------------------- streaming


async def test_stream_assembles_text_and_tool_call_deltas() -> None:
    rec = Recorder(
        sse_response(
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Let me "}),
            chunk({"content": "compute."}),
            chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "add"}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "c2", "type": "function", "function": {"name": "mul"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 2, '}}]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"a": 4, "b": 5}'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"b": 3}'}}]}),
            chunk({}, "tool_calls"),
            chunk(
                None,
                usage={"prompt_tokens": 30, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 20}},
            ),
            "[DONE]",
        )
    )
    model, client = model_with(rec)
    items = [item async for item in model.request_stream([Message.user("2+3, 4*5")], [ADD, MUL], ModelSettings())]

    body = rec.body()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert items[:2] == [TextDelta("Let me "), TextDelta("compute.")]
    response = items[-1]
    assert isinstance(response, ModelResponse) and len(items) == 3
    assert response.message.text == "Let me compute."
    assert response.message.tool_calls == [
        ToolCallPart(id="c1", name="add", arguments={"a": 2, "b": 3}),
        ToolCallPart(id="c2", name="mul", arguments={"a": 4, "b": 5}),
    ]
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.prefill_tokens) == (30, 12, 10)
    assert response.finish_reason == "tool_calls"
    await client.aclose()


async def test_stream_invalid_arguments_and_mid_stream_error() -> None:
    rec = Recorder(
        sse_response(
            chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "add", "arguments": '{"a": 1'}}]}),
            chunk({}, "tool_calls"),
            "[DONE]",
        ),
        sse_response(chunk({"content": "partial"}), {"error": {"message": "engine died", "type": "server_error"}}),
    )
    model, client = model_with(rec)
    items = [item async for item in model.request_stream([Message.user("x")], [ADD], ModelSettings())]
    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert response.message.tool_calls == [] and "not valid JSON" in response.parse_errors[0]

    seen: list[object] = []

    async def consume() -> None:
        async for item in model.request_stream([Message.user("x")], [], ModelSettings()):
            seen.append(item)

    with pytest.raises(ModelHTTPError, match="engine died"):
        await consume()
    assert seen == [TextDelta("partial")]
    await client.aclose()


async def test_stream_from_a_server_that_ignores_stream_true() -> None:
    rec = Recorder(httpx.Response(200, json=completion("whole answer")))
    model, client = model_with(rec)
    items = [item async for item in model.request_stream([Message.user("x")], [], ModelSettings())]
    assert items[0] == TextDelta("whole answer")
    assert isinstance(items[1], ModelResponse) and items[1].message.text == "whole answer"

    quiet = OpenAIModel(BASE, "phi-4-mm", http_client=client, stream=False)  # never asks for a stream
    items = [item async for item in quiet.request_stream([Message.user("x")], [], ModelSettings())]
    assert "stream" not in rec.body() and items[0] == TextDelta("whole answer") and len(items) == 2
    await client.aclose()


# ---------------------------------------------------------------- retries and errors


async def test_429_then_200_honours_retry_after() -> None:
    rec = Recorder(
        httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "0.3"}),
        httpx.Response(200, json=completion("finally")),
    )
    model, client = model_with(rec, retry_backoff=0.0)
    response = await model.request([Message.user("x")], [], ModelSettings())
    assert response.message.text == "finally"
    assert len(rec.requests) == 2
    assert rec.times[1] - rec.times[0] >= 0.29
    await client.aclose()


async def test_500_three_times_raises_model_http_error() -> None:
    rec = Recorder(httpx.Response(500, json={"error": {"message": "CUDA out of memory"}}))
    model, client = model_with(rec, max_retries=2)
    with pytest.raises(ModelHTTPError) as info:
        await model.request([Message.user("x")], [], ModelSettings())
    assert len(rec.requests) == 3
    assert info.value.status_code == 500
    assert "CUDA out of memory" in str(info.value) and "3 attempts" in str(info.value)
    assert info.value.body is not None and "CUDA out of memory" in info.value.body
    await client.aclose()


async def test_client_errors_are_not_retried() -> None:
    rec = Recorder(httpx.Response(404, json={"error": {"message": "The model `x` does not exist."}}))
    model, client = model_with(rec)
    with pytest.raises(ModelHTTPError, match=r"HTTP 404.*does not exist.*Check base_url") as info:
        await model.request([Message.user("x")], [], ModelSettings())
    assert len(rec.requests) == 1 and info.value.status_code == 404
    await client.aclose()


async def test_connection_error_then_success_and_timeouts() -> None:
    rec = Recorder(httpx.ConnectError("refused"), httpx.Response(200, json=completion("up again")))
    model, client = model_with(rec)
    assert (await model.request([Message.user("x")], [], ModelSettings())).message.text == "up again"

    rec2 = Recorder(httpx.ReadTimeout("too slow"))
    model2, client2 = model_with(rec2, max_retries=1)
    with pytest.raises(ModelHTTPError, match="did not answer in time") as info:
        await model2.request([Message.user("x")], [], ModelSettings())
    assert info.value.status_code is None and len(rec2.requests) == 2
    await client.aclose()
    await client2.aclose()


async def test_connection_refused_names_the_url() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    model = OpenAIModel(url, "phi-4-mm", max_retries=1, retry_backoff=0.01)
    with pytest.raises(ModelHTTPError) as info:
        await model.request([Message.user("x")], [], ModelSettings())
    assert f"{url}/chat/completions" in str(info.value) and "cannot reach" in str(info.value)
    assert info.value.status_code is None
    await model.aclose()


async def test_a_body_that_is_not_a_completion_is_an_http_error() -> None:
    rec = Recorder(httpx.Response(200, text="<html>proxy login</html>"), httpx.Response(200, json={"choices": []}))
    model, client = model_with(rec)
    with pytest.raises(ModelHTTPError, match="not a chat completion"):
        await model.request([Message.user("x")], [], ModelSettings())
    with pytest.raises(ModelHTTPError, match="no choices"):
        await model.request([Message.user("x")], [], ModelSettings())
    await client.aclose()


# ---------------------------------------------------------------- LoRA routing and lifetime


async def test_lora_model_routing_by_modality() -> None:
    rec = Recorder(httpx.Response(200, json=completion("ok")))
    model, client = model_with(rec, lora_models={"vision": "phi-vision", "speech": "phi-speech"})
    image, audio = ImagePart(data=png()), AudioPart.from_samples([0.0] * 1600)
    cases = [
        ([Message.user("text only")], "phi-4-mm"),
        ([Message.user("look", images=[image])], "phi-vision"),
        ([Message.user("listen", audio=[audio])], "phi-speech"),
        ([Message.user("both", images=[image], audio=[audio])], "phi-vision"),
        (
            [
                Message.user("crop it"),
                Message.assistant(tool_calls=[ToolCallPart(id="c1", name="crop")]),
                Message(role="tool", parts=(ToolResultPart(call_id="c1", name="crop", content=(image,)),)),
            ],
            "phi-vision",
        ),
    ]
    for messages, expected in cases:
        await model.request(messages, [], ModelSettings())
        assert rec.body()["model"] == expected, messages[-1]
        assert model.model_for(messages) == expected

    plain, client2 = model_with(rec, lora_models={"speech": "phi-speech"})
    await plain.request([Message.user("look", images=[image])], [], ModelSettings())
    assert rec.body()["model"] == "phi-4-mm"  # no vision adapter named: the base model
    await client.aclose()
    await client2.aclose()


async def test_constructor_checks_and_has_no_side_effects() -> None:
    model = OpenAIModel("http://localhost:8000/v1/", "m", context_length=131072)
    assert model._client is None  # created lazily
    assert model.endpoint == "http://localhost:8000/v1/chat/completions"
    assert model.context_length == 131072 and "m" in model.name
    with pytest.raises(UserError, match="http"):
        OpenAIModel("localhost:8000", "m")
    with pytest.raises(UserError, match="'vision' and/or 'speech'"):
        OpenAIModel(BASE, "m", lora_models={"image": "v"})
    with pytest.raises(UserError):
        OpenAIModel(BASE, "m", max_retries=-1)


async def test_aclose_closes_only_its_own_client() -> None:
    rec = Recorder(httpx.Response(200, json=completion("ok")))
    model, client = model_with(rec)
    await model.request([Message.user("x")], [], ModelSettings())
    await model.aclose()
    assert not client.is_closed  # the caller's client stays open
    await client.aclose()

    own = OpenAIModel(BASE, "m")
    created = await own._client_for_this_loop()
    async with own:
        pass
    assert created.is_closed and own._client is None


def test_owned_client_is_replaced_in_a_new_event_loop() -> None:
    model = OpenAIModel(BASE, "m")
    first = asyncio.run(model._client_for_this_loop())
    second = asyncio.run(model._client_for_this_loop())
    assert first is not second and first.is_closed
    asyncio.run(model.aclose())


# ---------------------------------------------------------------- wire helpers


def test_retry_after_forms() -> None:
    assert retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after(httpx.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    later = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after(httpx.Headers({"retry-after": later}), now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after(httpx.Headers({})) is None


def test_sse_decoder_joins_multiline_data_and_skips_comments() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "event: message", 'data: {"a":', "data: 1}", "", "data:[DONE]"]
    events = [e for e in (decoder.feed(line) for line in lines) if e is not None]
    assert events == ['{"a":\n1}']
    assert decoder.flush() == "[DONE]"


def test_text_parts_round_trip_into_the_request() -> None:
    # the body builder reuses to_openai: a retry part becomes user text, tool results become tool messages
    from agent.models.openai._wire import build_body

    messages = [
        Message.user("hi"),
        Message.assistant(tool_calls=[ToolCallPart(id="c1", name="add", arguments={"a": 1})]),
        Message(role="tool", parts=(ToolResultPart(call_id="c1", name="add", content=(TextPart(text="2"),)),)),
    ]
    body = build_body("m", messages, [], ModelSettings(), stream=False, extra={"top_k": 5})
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "2"}
    assert body["top_k"] == 5 and "seed" not in body and "stop" not in body
