"""The OpenAI-compatible server, run for real with uvicorn on loopback, driven by the official `openai` client
and by mmagent's own `OpenAIModel`. The agent inside is a scripted `FunctionModel` with a real tool."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from serve_support import running

from agent import Agent, Message
from agent.exceptions import ModelHTTPError
from agent.messages import ImagePart, Part, TextPart
from agent.models import ModelResponse, ModelSettings, TextDelta
from agent.models.openai import OpenAIModel
from agent.server import create_app
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store

KEY = "sk-mmagent-test"
MODEL = "mmagent-test"
MAX_BODY = 256 * 1024
IN_FLIGHT: list[int] = []  # requests of the scripted model sleeping right now
PEAK: list[int] = []


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def script(messages: list[Message], info: AgentInfo) -> str | list[Part]:
    """The scripted model: what it answers depends on the last user turn, so its answers prove what it saw."""
    user = next(m for m in reversed(messages) if m.role == "user")
    text = user.text.strip()
    if messages[-1].role == "tool":
        if "explode" in text:
            raise RuntimeError("kaboom after the tool")
        return f"The sum is {messages[-1].parts[0].text}."  # type: ignore[union-attr]
    if match := re.fullmatch(r"add (\d+) (\d+)( explode)?", text):
        return [TextPart(text="Adding up."), call("add", a=int(match[1]), b=int(match[2]))]
    images = [p for p in user.parts if isinstance(p, ImagePart)]
    if images:
        width, height = images[0].size
        return f"I see a {width}x{height} image."
    if match := re.fullmatch(r"my name is (\w+)", text):
        return f"Nice to meet you, {match[1]}."
    if text == "what is my name?":
        for m in messages:
            if found := re.fullmatch(r"my name is (\w+)", m.text.strip()):
                return f"Your name is {found[1]}."
        return "I do not know your name."
    if text == "sleep":
        IN_FLIGHT.append(1)
        PEAK.append(len(IN_FLIGHT))
        await asyncio.sleep(0.4)
        IN_FLIGHT.pop()
        return "rested"
    if text == "explode":
        raise RuntimeError("kaboom")
    return f"Echo: {text} ({info.settings.max_tokens} tokens max)"


def make_agent(store: Store | None) -> tuple[Agent, FunctionModel]:
    model = FunctionModel(script, name="scripted")
    return Agent(model, tools=[add], system_prompt="You are a test.", memory=store), model


@dataclass
class Served:
    base_url: str
    model: FunctionModel
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, key: str = KEY) -> openai.OpenAI:
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=20)
        return self.clients[key]

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=KEY, max_retries=0, timeout=20)

    def post(self, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        return httpx.post(f"{self.base_url}/chat/completions", content=content, headers=headers, timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    store = Store(Path(tmp_path_factory.mktemp("server")) / "memory.db", durable=False)
    agent, model = make_agent(store)
    app = create_app(agent, api_keys={KEY}, max_body_bytes=MAX_BODY, model_name=MODEL)
    with running(app) as server:
        served = Served(server.base_url, model)
        try:
            yield served
        finally:
            for client in served.clients.values():
                client.close()
            store.close()


def png_data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "blue").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def assert_alive(served: Served) -> None:
    reply = served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "Echo: ping (1024 tokens max)"


# ---------------------------------------------------------------- the official openai client


def test_openai_client_non_streaming(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Extra rules."}, {"role": "user", "content": "hello there"}],
        max_tokens=77,
    )
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.content == "Echo: hello there (77 tokens max)"
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    extra = reply.model_extra or {}
    assert isinstance(extra["conversation_id"], str) and extra["mmagent"]["tool_calls"] == []
    assert extra["mmagent"]["model"] == "scripted"


def test_openai_client_streaming(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello streaming world"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == "Echo: hello streaming world (1024 tokens max)"
    assert len(texts) >= 3  # streamed word by word, not in one piece
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert (finals[0].model_extra or {})["conversation_id"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_openai_client_image_as_data_url(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(12, 7)}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    assert reply.choices[0].message.content == "I see a 12x7 image."


def test_openai_client_tool_runs_server_side(served: Served) -> None:
    before = len(served.model.requests)
    reply = served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "add 2 3"}])
    assert reply.choices[0].message.content == "The sum is 5."
    assert reply.choices[0].message.tool_calls is None  # executed here, not handed to the client
    calls = (reply.model_extra or {})["mmagent"]["tool_calls"]
    assert [(c["name"], c["arguments"], c["result"], c["is_error"]) for c in calls] == [
        ("add", {"a": 2, "b": 3}, "5", False)
    ]
    second_request = served.model.requests[before + 1]
    assert second_request[-1].role == "tool" and second_request[-1].parts[0].text == "5"  # type: ignore[union-attr]

    stream = served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "add 20 22"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Adding up.\n\nThe sum is 42."  # stream_steps="all": the tool step's text streams too
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert (final.model_extra or {})["mmagent"]["tool_calls"][0]["result"] == "42"


def test_conversation_ids_map_to_memory(served: Served) -> None:
    client = served.client()
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "my name is Ada"}])
    cid = (first.model_extra or {})["conversation_id"]
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "what is my name?"}], extra_body={"conversation_id": cid}
    )
    assert again.choices[0].message.content == "Your name is Ada."
    assert (again.model_extra or {})["conversation_id"] == cid
    fresh = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what is my name?"}])
    assert fresh.choices[0].message.content == "I do not know your name."
    with pytest.raises(openai.BadRequestError, match="no-such-conversation"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"conversation_id": "no-such-conversation"},
        )


def test_models_listing_and_health(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").models.list()
    assert httpx.get(served.base_url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


async def test_requests_run_concurrently(served: Served) -> None:
    client = served.async_client()
    messages: Any = [{"role": "user", "content": "sleep"}]
    start = time.monotonic()
    replies = await asyncio.gather(*(client.chat.completions.create(model=MODEL, messages=messages) for _ in range(4)))
    elapsed = time.monotonic() - start
    assert [r.choices[0].message.content for r in replies] == ["rested"] * 4
    assert max(PEAK) == 4, f"at most {max(PEAK)} of 4 requests ran at once"
    assert elapsed < 1.6, f"4 requests of 0.4 s each took {elapsed:.2f} s: not concurrent"
    await client.close()


# ---------------------------------------------------------------- bad requests; the server stays up


def test_malformed_json_is_400(served: Served) -> None:
    response = served.post(b'{"model": "mmagent-test", "messages": [')
    assert response.status_code == 400
    error = response.json()["error"]
    assert "not valid JSON" in error["message"] and error["type"] == "invalid_request_error"
    assert_alive(served)


def test_oversized_body_is_413(served: Served) -> None:
    huge = "x" * (MAX_BODY + 10_000)
    with pytest.raises(openai.APIStatusError) as info:
        served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": huge}])
    assert info.value.status_code == 413
    assert f"at most {MAX_BODY} bytes" in info.value.message

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"model": "mmagent-test", "messages": [{"role": "user", "content": "'
        yield b"y" * (MAX_BODY + 1)
        yield b'"}]}'

    response = httpx.post(
        f"{served.base_url}/chat/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 413 and "at most" in response.json()["error"]["message"]

    host, port = served.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:  # declares 1 GB, sends nothing
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n"
        )
        received = b""
        while chunk := conn.recv(65536):  # the server answers at once and closes
            received += chunk
    assert received.startswith(b"HTTP/1.1 413") and b"1000000000 bytes" in received
    assert_alive(served)


def test_bad_or_missing_token_is_401(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        served.client("sk-wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    response = httpx.post(f"{served.base_url}/chat/completions", json={"messages": []})
    assert response.status_code == 401 and "missing bearer token" in response.json()["error"]["message"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert_alive(served)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": MODEL}, 400, "messages: Field required"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400, "must come from the user"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "unsupported OpenAI message role"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=1"),
        (  # client tools are served in model mode (the default `auto`), and checked there
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools[0].function.name must be",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y"}}]}],
            },
            400,
            "remote media URLs are not fetched",
        ),
        ([1, 2], 400, "must be a JSON object"),
    ],
)
def test_bad_requests_get_a_message(served: Served, body: Any, status: int, fragment: str) -> None:
    response = served.post(json.dumps(body).encode())
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_agent_failures_are_500_and_the_server_survives(served: Served) -> None:
    with pytest.raises(openai.InternalServerError, match="kaboom"):
        served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "explode"}])
    with pytest.raises(openai.InternalServerError, match="kaboom"):  # fails before the stream starts: a status
        served.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "explode"}], stream=True
        )
    stream = served.client().chat.completions.create(  # fails mid-stream: an error event ends the stream
        model=MODEL, messages=[{"role": "user", "content": "add 1 2 explode"}], stream=True
    )
    seen: list[str] = []

    def consume() -> None:
        for c in stream:
            seen.append(c.choices[0].delta.content or "" if c.choices else "")

    with pytest.raises(openai.APIError, match="kaboom after the tool"):
        consume()
    assert "".join(seen) == "Adding up."
    assert httpx.get(f"{served.base_url}/nowhere").status_code == 404
    assert httpx.get(f"{served.base_url}/chat/completions").status_code == 405
    assert_alive(served)


# ---------------------------------------------------------------- mmagent's own OpenAIModel as the client


async def test_openai_model_round_trip(served: Served) -> None:
    model = OpenAIModel(served.base_url, MODEL, api_key=KEY, max_retries=0)
    response = await model.request([Message.user("round trip")], [], ModelSettings(max_tokens=33))
    assert response.message.text == "Echo: round trip (33 tokens max)"
    assert response.usage.input_tokens > 0 and response.model_name == MODEL

    items = [i async for i in model.request_stream([Message.user("stream me please")], [], ModelSettings())]
    deltas = [i.text for i in items if isinstance(i, TextDelta)]
    final = items[-1]
    assert isinstance(final, ModelResponse) and len(deltas) >= 3
    assert "".join(deltas) == final.message.text == "Echo: stream me please (1024 tokens max)"
    assert final.usage.output_tokens > 0  # from the include_usage chunk

    image = Message.user("what is it?", images=[base64.b64decode(png_data_url(30, 20).split(",")[1])])
    assert (await model.request([image], [], ModelSettings())).message.text == "I see a 30x20 image."
    await model.aclose()


async def test_openai_model_errors_from_the_server(served: Served) -> None:
    wrong_key = OpenAIModel(served.base_url, MODEL, api_key="nope", max_retries=3)
    with pytest.raises(ModelHTTPError, match=r"HTTP 401.*invalid API key.*Check api_key") as info:
        await wrong_key.request([Message.user("x")], [], ModelSettings())
    assert info.value.status_code == 401
    unknown = OpenAIModel(served.base_url, "other-model", api_key=KEY)
    with pytest.raises(ModelHTTPError, match="HTTP 404"):
        await unknown.request([Message.user("x")], [], ModelSettings())
    failing = OpenAIModel(served.base_url, MODEL, api_key=KEY, max_retries=1, retry_backoff=0.01)
    with pytest.raises(ModelHTTPError, match=r"HTTP 500.*kaboom.*2 attempts"):
        await failing.request([Message.user("explode")], [], ModelSettings())
    for m in (wrong_key, unknown, failing):
        await m.aclose()


def test_agent_over_openai_model_in_consecutive_event_loops(served: Served) -> None:
    model = OpenAIModel(served.base_url, MODEL, api_key=KEY)
    agent = Agent(model)
    assert agent.run_sync("one").output == "Echo: one (1024 tokens max)"
    assert agent.run_sync("two").output == "Echo: two (1024 tokens max)"  # a new loop: a new HTTP client
    asyncio.run(model.aclose())


# ---------------------------------------------------------------- in-process (ASGI transport) checks


async def test_stream_steps_final_sends_only_the_answer() -> None:
    agent, _ = make_agent(None)
    app = create_app(lambda: agent, model_name=MODEL, stream_steps="final")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "add 4 5"}], "stream": True}
        response = await client.post("/v1/chat/completions", json=body)
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == "The sum is 9."
        assert "conversation_id" not in chunks[-1]  # no memory store: no conversation ids
        # without memory, a conversation id cannot be honoured
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "conversation_id": "c"}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and "memory" in response.json()["error"]["message"]
        # no api_keys: no auth needed
        assert (await client.get("/v1/models")).status_code == 200


async def test_async_factory_and_bad_factory() -> None:
    agent, _ = make_agent(None)

    async def factory() -> Agent:
        return agent

    def broken() -> Any:
        return "not an agent"

    for source, status in ((factory, 200), (broken, 500)):
        app = create_app(source, model_name=MODEL)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == status, response.text
            if status == 500:
                assert "not an Agent" in response.json()["error"]["message"]
