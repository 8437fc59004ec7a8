"""The MCP server (agent/mcp_server.py), driven by the MCP SDK's own client over stdio, Streamable HTTP and in
process, on the tiny random Phi-4 (forward pre-hooks show that media reached the model) and on scripted models."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("mcp")

import httpx2
import mcp_types as types
import uvicorn
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp_server_script import add  # the same tool the stdio subprocess serves
from PIL import Image

from agent import Agent, AudioPart, ImagePart, Message, ModelSettings
from agent.exceptions import UserError
from agent.mcp_server import TRANSCRIBE_PROMPT, build_mcp_server, create_http_app
from agent.testing import FunctionModel, call
from memory import Store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mcp_server_script.py"
SPEECH = ROOT / "examples" / "data" / "request.wav"
MODEL_TOOLS = ["transcribe", "describe_image", "ask"]
SHORT = ModelSettings(max_tokens=8)


def _png(width: int = 40, height: int = 30, color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header declares `width` x `height` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


def _echo_model() -> FunctionModel:
    return FunctionModel(lambda messages, info: "unused")


# ---------------------------------------------------------------- Streamable HTTP on 127.0.0.1


@contextlib.contextmanager
def _serving(server: Server[Any], *, api_keys: set[str] | None = None) -> Iterator[str]:
    """Run `server` over Streamable HTTP with uvicorn in a thread on a free port; yield the endpoint's URL."""
    app = create_http_app(server, api_keys=api_keys)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    runner = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        runner.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.asynccontextmanager
async def _http_client(url: str, token: str | None = None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0)) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def _initialize_body() -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }


@pytest.fixture
def image_inputs(tiny_phi4: Any) -> Iterator[list[Any]]:
    """Every `image_pixel_values` tensor the tiny Phi-4's image tower receives while the test runs."""
    seen: list[Any] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["image_pixel_values"].detach().clone())

    handle = tiny_phi4.model.model.embed_tokens_extend.image_embed.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


@pytest.fixture
def audio_inputs(tiny_phi4: Any) -> Iterator[list[tuple[Any, Any]]]:
    """(features, input ids) each time the tiny Phi-4's audio tower runs while the test runs."""
    seen: list[tuple[Any, Any]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        seen.append((kwargs["audio_input_features"].detach().clone(), ids.clone()))

    handle = tiny_phi4.model.model.embed_tokens_extend.audio_embed.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


async def test_http_lists_and_calls_with_a_bearer_token() -> None:
    agent = Agent(_echo_model(), tools=[add])
    with _serving(build_mcp_server(agent), api_keys={"s3cret", "other"}) as url:
        async with _http_client(url, "s3cret") as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            assert list(listed) == ["add", *MODEL_TOOLS]
            assert listed["add"].input_schema == agent.registry.get("add").parameters  # type: ignore[union-attr]
            result = await client.call_tool("add", {"a": 2, "b": 40})
            assert not result.is_error
            assert _text(result) == "42"


def test_http_refuses_a_missing_or_wrong_bearer_token() -> None:
    with _serving(build_mcp_server(Agent(_echo_model(), tools=[add])), api_keys={"s3cret"}) as url:
        accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        body = json.dumps(_initialize_body())
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = httpx.post(url, content=body, headers={**accept, **headers})
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "bearer token" in response.json()["error_description"]
        response = httpx.post(url, content=body, headers={**accept, "Authorization": "Bearer s3cret"})
        assert response.status_code == 200  # the same request, with the token, is served


async def test_http_describe_image_sends_the_pixels_to_the_model(tiny_phi4: Any, image_inputs: list[Any]) -> None:
    import torch

    png = _png(64, 48, "blue")
    agent = Agent(tiny_phi4, settings=SHORT)
    with _serving(build_mcp_server(agent)) as url:
        async with _http_client(url) as client:
            result = await client.call_tool("describe_image", {"image": "data:image/png;base64," + _b64(png)})
    assert not result.is_error, _text(result)
    assert isinstance(result.content[0], types.TextContent)  # noise from random weights, but text
    expected = tiny_phi4.processor.image_processor([ImagePart(data=png).to_pil()], return_tensors="pt")
    assert len(image_inputs) == 1
    assert torch.equal(image_inputs[0], expected["image_pixel_values"].to(image_inputs[0].dtype))


async def test_http_ask_returns_the_agents_final_answer_and_continues_the_conversation(
    tiny_phi4: Any, tmp_path: Path
) -> None:
    from agent.models.tiny import ScriptedOutputs
    from agent.models.transformers import TransformersModel

    def step(name: str, **arguments: Any) -> str:
        return f"<|tool_call|>{json.dumps([{'name': name, 'arguments': arguments}])}<|/tool_call|><|end|>"

    scripts = [step("add", a=2, b=40), "The answer is 42.<|end|>", "Still 42.<|end|>"]
    model = TransformersModel(
        tiny_phi4.model, tiny_phi4.processor, logits_processors=[ScriptedOutputs(tiny_phi4.tokenizer, scripts)]
    )
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(model, tools=[add], memory=store, settings=ModelSettings(max_tokens=64))
        with _serving(build_mcp_server(agent)) as url:
            async with _http_client(url) as client:
                first = await client.call_tool("ask", {"prompt": "What is 2 + 40?"})
                assert not first.is_error, _text(first)
                assert isinstance(first.content[0], types.TextContent)
                assert first.content[0].text == "The answer is 42."  # the final answer, after the add call
                cid = first.structured_content["conversation_id"]
                assert first.structured_content == {"answer": "The answer is 42.", "conversation_id": cid}
                assert cid in _text(first)
                second = await client.call_tool("ask", {"prompt": "And now?", "conversation_id": cid})
                assert second.structured_content == {"answer": "Still 42.", "conversation_id": cid}
                unknown = await client.call_tool("ask", {"prompt": "hi", "conversation_id": "nope"})
                assert unknown.is_error
                assert "nope" in _text(unknown)
        stored = store.load_conversation(cid)
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert stored[2].parts[0].content[0].text == "42"  # type: ignore[union-attr]


async def test_http_recall_returns_stored_text_and_images(tmp_path: Path) -> None:
    png = _png(32, 32, "red")
    with Store(tmp_path / "memory.db") as store:
        cid = store.create_conversation(
            [Message.user("Here is the red square logo.", images=[png]), Message.assistant("A red square on white.")]
        )
        store.create_conversation([Message.user("Something about tea."), Message.assistant("Green tea.")])
        agent = Agent(_echo_model(), memory=store)
        with _serving(build_mcp_server(agent)) as url:
            async with _http_client(url) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                assert names == [*MODEL_TOOLS, "recall"]
                result = await client.call_tool("recall", {"query": "red square"})
                scoped = await client.call_tool("recall", {"query": "tea", "conversation_id": cid})
    assert not result.is_error, _text(result)
    assert "red square logo" in _text(result)
    assert cid in _text(result)
    images = [c for c in result.content if isinstance(c, types.ImageContent)]
    assert len(images) == 1
    assert images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data) == png
    assert "Nothing in memory matches" in _text(scoped)  # tea is in the other conversation


async def test_http_hostile_media_and_unknown_tools_are_errors_and_the_server_goes_on() -> None:
    model = FunctionModel(lambda messages, info: pytest.fail("the model must not run on refused media"))
    with _serving(build_mcp_server(Agent(model, tools=[add]))) as url:
        async with _http_client(url) as client:
            cases = {
                _b64(_declared_png(60_000, 60_000)): "over the limit of 50 megapixels",
                _b64(b"definitely not an image" * 10): "not a known image format",
                "not base64 at all!": "not valid base64",
                "data:image/png,rawbytes": "a data URL must be base64",
            }
            for image, message in cases.items():
                result = await client.call_tool("describe_image", {"image": image})
                assert result.is_error
                assert _text(result).startswith("argument 'image': ")
                assert message in _text(result)
                assert _text(await client.call_tool("add", {"a": 1, "b": 1})) == "2"  # still serving
            bad_audio = await client.call_tool("ask", {"prompt": "hi", "audio": [_b64(b"RIFF....junk")]})
            assert bad_audio.is_error
            assert _text(bad_audio).startswith("argument 'audio[0]': ")
            with pytest.raises(MCPError) as raised:
                await client.call_tool("no_such_tool", {})
            assert raised.value.code == types.INVALID_PARAMS
            assert "unknown tool 'no_such_tool'" in raised.value.message
            assert _text(await client.call_tool("add", {"a": 2, "b": 2})) == "4"


# ---------------------------------------------------------------- stdio, in a subprocess


async def test_stdio_subprocess_lists_and_calls_tools(tiny_phi4_dir: Path, tmp_path: Path) -> None:
    png = _png(50, 20, "green")
    picture = tmp_path / "picture.png"
    picture.write_bytes(png)
    params = StdioServerParameters(
        command=sys.executable,
        args=[str(SCRIPT), str(tiny_phi4_dir), str(picture)],
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},  # the SDK passes on only HOME, PATH, USER, ...
        cwd=ROOT,
    )
    async with Client(params, read_timeout_seconds=120) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert list(listed) == ["add", "picture", "boom", *MODEL_TOOLS]
        assert listed["add"].input_schema["required"] == ["a", "b"]
        assert listed["add"].description == "Add two integers."
        assert listed["transcribe"].input_schema["required"] == ["audio"]
        assert set(listed["ask"].input_schema["properties"]) == {"prompt", "images", "audio"}  # no memory: no id
        assert listed["ask"].output_schema is not None

        added = await client.call_tool("add", {"a": 20, "b": 22})
        assert (added.is_error, _text(added)) == (False, "42")

        image = await client.call_tool("picture", {})
        assert not image.is_error
        assert [type(c) for c in image.content] == [types.ImageContent]
        assert image.content[0].mime_type == "image/png"  # type: ignore[union-attr]
        assert base64.b64decode(image.content[0].data) == png  # type: ignore[union-attr]

        failed = await client.call_tool("boom", {})
        assert failed.is_error
        assert _text(failed) == "the tool failed: RuntimeError: kaboom"

        invalid = await client.call_tool("add", {"a": "two"})
        assert invalid.is_error
        assert _text(invalid) == "missing required argument 'b'; argument 'a': expected type \"integer\", got \"two\""

        heard = await client.call_tool("transcribe", {"audio": _b64(SPEECH.read_bytes())})
        assert not heard.is_error, _text(heard)
        assert [type(c) for c in heard.content] == [types.TextContent]

        with pytest.raises(MCPError, match="unknown tool 'nope'"):
            await client.call_tool("nope", {})
        assert _text(await client.call_tool("add", {"a": 1, "b": 2})) == "3"


# ---------------------------------------------------------------- in process


async def test_transcribe_sends_the_clip_to_the_audio_tower(
    tiny_phi4: Any, audio_inputs: list[tuple[Any, Any]]
) -> None:
    import torch

    agent = Agent(tiny_phi4, settings=SHORT)
    async with Client(build_mcp_server(agent)) as client:
        result = await client.call_tool("transcribe", {"audio": _b64(SPEECH.read_bytes())})
    assert not result.is_error, _text(result)
    samples = AudioPart(data=SPEECH.read_bytes()).samples(16_000)
    extractor = tiny_phi4.processor.audio_processor
    expected = extractor([samples], sampling_rate=16_000, return_tensors="pt")["audio_input_features"]
    assert len(audio_inputs) == 1
    features, ids = audio_inputs[0]
    assert torch.equal(features, expected.to(features.dtype))
    prompt = tiny_phi4.tokenizer.decode(ids[0])
    assert prompt.endswith(f"{TRANSCRIBE_PROMPT}<|end|><|assistant|>")  # Phi-4's own instruction, after the clip


async def test_a_text_only_model_gets_no_media_tools() -> None:
    model = _echo_model()
    model.input_modalities = frozenset({"text"})
    server = build_mcp_server(Agent(model, tools=[add]))
    async with Client(server) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert list(listed) == ["add", "ask"]
        assert set(listed["ask"].input_schema["properties"]) == {"prompt"}
        assert "reads no images or audio" in (client.instructions or "")
        refused = await client.call_tool("ask", {"prompt": "hi", "images": [_b64(_png())]})
        assert refused.is_error
        assert "unexpected arguments" in _text(refused)


async def test_model_tools_can_be_left_out_and_registered_tools_win() -> None:
    def ask(question: str) -> str:
        """The application's own ask."""
        return f"own: {question}"

    model = FunctionModel(lambda messages, info: "from the agent")
    async with Client(build_mcp_server(Agent(model, tools=[add]), model_tools=False)) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["add"]
    async with Client(build_mcp_server(Agent(model, tools=[ask]))) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["ask", "transcribe", "describe_image"]
        assert _text(await client.call_tool("ask", {"question": "q"})) == "own: q"
        assert "the agent's own tool 'ask' is served" in (client.instructions or "")


async def test_ask_reports_a_failed_run_as_an_error_result() -> None:
    model = FunctionModel(lambda messages, info: [call("add", a=1, b=1)])  # never answers
    agent = Agent(model, tools=[add], max_steps=2)
    async with Client(build_mcp_server(agent)) as client:
        result = await client.call_tool("ask", {"prompt": "loop"})
        assert result.is_error
        assert _text(result).startswith("MaxStepsExceeded: no final answer after 2 steps")
        assert _text(await client.call_tool("add", {"a": 3, "b": 4})) == "7"


async def test_text_that_is_not_valid_utf8_is_an_error_result() -> None:
    agent = Agent(_echo_model(), tools=[add])
    async with Client(build_mcp_server(agent)) as client:  # in process: the JSON encoder never sees the text
        registered = await client.call_tool("add", {"a": "\ud800", "b": 1})
        assert registered.is_error
        assert "lone surrogate" in _text(registered)
        asked = await client.call_tool("ask", {"prompt": "hi \ud800"})
        assert asked.is_error
        assert "lone surrogate" in _text(asked)
        assert _text(await client.call_tool("add", {"a": 1, "b": 1})) == "2"


def test_bad_arguments_are_refused_when_built() -> None:
    with pytest.raises(UserError, match="needs an Agent"):
        build_mcp_server(object())  # type: ignore[arg-type]
    server = build_mcp_server(Agent(_echo_model()))
    with pytest.raises(UserError, match="only empty strings"):
        create_http_app(server, api_keys={""})
