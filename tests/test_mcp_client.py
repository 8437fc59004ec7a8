"""MCP servers' tools in the agent: a real MCP server written with the official SDK (tests/mcp_servers/demo.py),
started as a subprocess over stdio and over Streamable HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("mcp")

from agent import Agent, Message
from agent.events import ToolProgressEvent, ToolResultEvent
from agent.exceptions import UserError
from agent.messages import AudioPart, ImagePart, Part, TextPart, ToolResultPart
from agent.testing import AgentInfo, FunctionModel, call
from tools.mcp import MCPTools

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "tests" / "mcp_servers" / "demo.py")
sys.path.insert(0, str(ROOT / "tests" / "mcp_servers"))
import demo  # noqa: E402  (the server's own helpers: the exact bytes its tools return)

DEVNULL = open(os.devnull, "w")  # noqa: SIM115  (the servers' stderr, for the whole module)


def stdio(**kwargs: Any) -> MCPTools:
    return MCPTools.stdio(sys.executable, DEMO, "stdio", errlog=DEVNULL, **kwargs)


def script(*turns: Any) -> FunctionModel:
    """A model whose turn i is `turns[i]` (a tool call list or text); it records the tools each request had."""

    def reply(messages: list[Message], info: AgentInfo) -> Any:
        turn = turns[min(info.request_index, len(turns) - 1)]
        return turn(messages, info) if callable(turn) else turn

    return FunctionModel(reply, name="scripted")


def results(messages: list[Message]) -> list[Part]:
    return [p for m in messages if m.role == "tool" for p in m.parts]


# ---------------------------------------------------------------- stdio


def test_tools_are_listed_with_their_schemas_and_mcp_names() -> None:
    async def go() -> None:
        async with stdio() as server:
            names = [t.name for t in server.tools]
            assert names[:3] == ["math.add", "picture", "clip"]  # a dotted name, as MCP allows
            add = server.tools[0]
            assert add.parameters["required"] == ["a", "b"] and add.parameters["properties"]["a"]["type"] == "integer"
            assert server.name == "demo"

    asyncio.run(go())


def test_an_agent_runs_mcp_tools_and_validates_their_arguments() -> None:
    model = script([call("math.add", a=2, b="three")], [call("math.add", a=2, b=3)], lambda m, i: m[-1].parts[0].text)
    result = Agent(model, mcp=[stdio()]).run_sync("2 + 3?")  # run_sync: the server starts and stops with the run
    assert result.output == "5"
    retry = results(result.messages)[0]
    assert retry.kind == "retry" and "'b'" in retry.message  # type: ignore[union-attr]
    assert "math.add" in [t.name for t in model.infos[0].tools]


def test_image_and_audio_results_reach_the_tiny_phi4_as_exact_pixels_and_samples(tiny_phi4: Any) -> None:
    import torch

    from agent.models.tiny import ScriptedOutputs
    from agent.models.transformers import TransformersModel

    model = TransformersModel(
        tiny_phi4.model,
        tiny_phi4.processor,
        adapters=(),
        logits_processors=[
            ScriptedOutputs(
                tiny_phi4.tokenizer,
                [
                    '<|tool_call|>[{"name": "picture", "arguments": {}}, {"name": "clip", "arguments": {}}]'
                    "<|/tool_call|><|end|>",
                    "Seen and heard.<|end|>",
                ],
            )
        ],
    )
    seen: dict[str, torch.Tensor] = {}
    extend = model.model.model.embed_tokens_extend

    def record(key: str) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            seen[key] = kwargs[key].detach().clone()

        return hook

    handles = [
        extend.image_embed.register_forward_pre_hook(record("image_pixel_values"), with_kwargs=True),
        extend.audio_embed.register_forward_pre_hook(record("audio_input_features"), with_kwargs=True),
    ]
    try:
        result = Agent(model, mcp=[stdio()]).run_sync("Look and listen.")
    finally:
        for handle in handles:
            handle.remove()
    assert result.output == "Seen and heard."
    parts = [c for p in results(result.messages) if isinstance(p, ToolResultPart) for c in p.content]
    image = next(p for p in parts if isinstance(p, ImagePart))
    audio = next(p for p in parts if isinstance(p, AudioPart))
    assert image.data == demo.picture_bytes() and audio.data == demo.clip_bytes()  # the server's exact bytes
    from PIL import Image

    expected = model.processor.image_processor([Image.open(io.BytesIO(image.data)).convert("RGB")], return_tensors="pt")
    assert torch.equal(seen["image_pixel_values"], expected["image_pixel_values"].to(seen["image_pixel_values"].dtype))
    extractor = getattr(model.processor, "audio_processor", None) or model.processor.feature_extractor
    samples = audio.samples(16_000)
    features = extractor([samples], sampling_rate=16_000, return_tensors="pt")["audio_input_features"]
    assert torch.allclose(seen["audio_input_features"].float(), features.float(), atol=1e-5)


def test_an_error_result_goes_back_to_the_model_as_a_retry() -> None:
    model = script([call("fail", reason="disk full")], "gave up")
    result = Agent(model, mcp=[stdio()]).run_sync("try")
    assert result.output == "gave up"
    retry = results(result.messages)[0]
    assert retry.kind == "retry" and "Error executing tool fail" in retry.message  # type: ignore[union-attr]


def test_a_server_killed_mid_call_is_a_clear_error_and_the_run_goes_on() -> None:
    model = script([call("die")], [call("ping")], "carried on")
    result = Agent(model, mcp=[stdio()]).run_sync("go", settings=None)
    assert result.output == "carried on"
    first, second = results(result.messages)
    for part in (first, second):
        assert part.kind == "retry" and "'demo' is not running any more" in part.message  # type: ignore[union-attr]


def test_a_hanging_server_times_out_and_the_run_goes_on() -> None:
    model = script([call("hang")], "moved on")
    started = time.monotonic()
    result = Agent(model, mcp=[stdio(timeout=0.5)]).run_sync("go")
    assert result.output == "moved on" and time.monotonic() - started < 20
    assert "timed out after 0.5 s" in results(result.messages)[0].message  # type: ignore[union-attr]


def test_tool_list_changes_are_picked_up_before_the_next_request() -> None:
    model = script([call("grow")], [call("extra")], lambda m, i: m[-1].parts[0].text)
    result = Agent(model, mcp=[stdio()]).run_sync("grow")
    assert result.output == "from the new tool"
    assert "extra" not in [t.name for t in model.infos[0].tools]
    assert "extra" in [t.name for t in model.infos[1].tools]


def test_progress_notifications_are_events() -> None:
    async def go() -> list[Any]:
        agent = Agent(script([call("slow", steps=3)], "ok"), mcp=[stdio()])
        return [e async for e in agent.run_stream("go")]

    events = asyncio.run(go())
    progress = [e for e in events if isinstance(e, ToolProgressEvent)]
    assert [(e.progress, e.total, e.message) for e in progress] == [
        (1, 3, "step 1"),
        (2, 3, "step 2"),
        (3, 3, "step 3"),
    ]
    done = next(i for i, e in enumerate(events) if isinstance(e, ToolResultEvent))
    assert events.index(progress[-1]) < done  # progress arrives while the call runs


def test_async_with_keeps_one_server_for_many_runs_and_clashing_names_get_a_prefix() -> None:
    async def go() -> tuple[list[str], list[Any]]:
        def turn(messages: list[Message], info: AgentInfo) -> Any:
            if messages[-1].role == "user":
                return [call("pid"), call("b.pid")]
            return ",".join(p.text for p in messages[-1].parts)  # type: ignore[union-attr]

        model = FunctionModel(turn)
        agent = Agent(model, mcp=[stdio(name="a"), stdio(name="b")])
        async with agent:
            first = await agent.run("which?")
            second = await agent.run("again?")
        return [t.name for t in model.infos[0].tools], [first.output, second.output]

    names, outputs = asyncio.run(go())
    assert "pid" in names and "b.pid" in names and "b.math.add" in names  # the later server's names are prefixed
    assert outputs[0] == outputs[1]  # the same two server processes served both runs
    assert len(set(outputs[0].split(","))) == 2  # two servers, two processes


def test_resources_prompts_and_elicitation() -> None:
    async def go() -> None:
        asked: list[str] = []

        async def answer(message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
            asked.append(message)
            return {"ok": True}

        async with stdio(resources=True, on_elicit=answer) as server:
            assert [p.text for p in await server.read_resource("note://hello")] == [  # type: ignore[union-attr]
                "[resource note://hello]\nHello from a resource."
            ]
            assert [r["uri"] for r in await server.list_resources()] == ["note://hello"]
            assert await server.prompt("review", {"topic": "MCP"}) == [Message.user("Please review MCP.")]
            assert "read_resource" in [t.name for t in server.tools]
            agent = Agent(script([call("confirm", action="delete")], lambda m, i: m[-1].parts[0].text), mcp=[server])
            result = await agent.run("go")
            assert asked == ["Really delete?"] and result.output.startswith("accept")
        async with stdio() as server:  # no callback: declined
            agent = Agent(script([call("confirm", action="delete")], lambda m, i: m[-1].parts[0].text), mcp=[server])
            assert (await agent.run("go")).output.startswith("decline")

    asyncio.run(go())


def test_a_server_that_cannot_start_is_one_clear_error() -> None:
    agent = Agent(script("x"), mcp=[MCPTools.stdio(sys.executable, "-c", "import sys; sys.exit(5)", errlog=DEVNULL)])
    with pytest.raises(UserError, match="cannot connect to the MCP server"):
        agent.run_sync("go")
    with pytest.raises(UserError, match="needs an http"):
        MCPTools.http("ftp://x")


# ---------------------------------------------------------------- Streamable HTTP


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, DEMO, "http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_streamable_http_server_tools_run_in_the_agent(http_server: str) -> None:
    model = script([call("math.add", a=40, b=2), call("picture")], "done")
    result = Agent(model, mcp=[MCPTools.http(http_server, token="not-needed-here")]).run_sync("go")
    assert result.output == "done"
    add, picture = results(result.messages)
    assert add.text == "42"  # type: ignore[union-attr]
    assert picture.content[0].data == demo.picture_bytes()  # type: ignore[union-attr]


def test_json_only_results_become_text() -> None:
    from tools.mcp import _parts

    class Block:
        type = "text"
        text = json.dumps({"a": 1})

    assert [p.text for p in _parts([Block()], resource_tool=False)] == ['{"a": 1}']  # type: ignore[union-attr]


def test_refused_media_from_a_server_is_a_note_not_a_crash() -> None:
    from tools.mcp import _parts

    class Bomb:
        type = "image"
        data = __import__("base64").b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
        mime_type = "image/png"

    class Junk:
        type = "audio"
        data = "!!not base64!!"
        mime_type = "audio/wav"

    texts = [p.text for p in _parts([Bomb(), Junk()], resource_tool=False) if isinstance(p, TextPart)]
    assert len(texts) == 2 and texts[0].startswith("[image (image/png) left out:") and "audio" in texts[1]


def test_the_chart_example_sends_the_mcp_image_to_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mcp_chart", ROOT / "examples" / "mcp_chart.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert asyncio.run(example.main(["--model", "tiny-phi4"])) == 0
    printed = capsys.readouterr().out
    assert "-> sales_chart(" in printed and "<- sales_chart: an image 480x320" in printed


def test_concurrent_runs_share_the_connected_servers() -> None:
    """`mmagent serve` shares one agent (and its MCP sessions) between concurrent requests."""

    def turn(messages: list[Message], info: AgentInfo) -> Any:
        if messages[-1].role == "user":
            n = int(messages[-1].text)
            return [call("math.add", a=n, b=n), call("pid")]
        return ",".join(p.text for p in messages[-1].parts)  # type: ignore[union-attr]

    async def go() -> list[str]:
        agent = Agent(FunctionModel(turn), mcp=[stdio()])
        async with agent:
            results = await asyncio.gather(*(agent.run(str(n)) for n in range(1, 6)))
        return [r.output for r in results]

    outputs = asyncio.run(go())
    assert [o.split(",")[0] for o in outputs] == ["2", "4", "6", "8", "10"]
    assert len({o.split(",")[1] for o in outputs}) == 1  # one server process answered them all
