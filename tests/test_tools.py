"""Tool registry: schemas from signatures, registration errors, validation messages, execution outcomes."""

from __future__ import annotations

import asyncio
import enum
import io
from typing import Annotated, Literal

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from agent.messages import AudioPart, ImagePart, RetryPart, TextPart, ToolCallPart, ToolResultPart
from tools import Deny, ModelRetry, Registry, Tool, ToolArgumentsError, ToolContext, ToolDefinitionError, tool


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Box(BaseModel):
    x: int
    y: int
    label: str = ""


def _ctx(name: str = "t") -> ToolContext:
    return ToolContext(call_id="c", tool_name=name)


def test_schema_from_signature_and_docstring() -> None:
    @tool
    def paint(
        box: Box,
        color: Color,
        mode: Literal["fill", "outline"] = "fill",
        width: Annotated[int, Field(ge=1, le=10, description="stroke width")] = 2,
        note: str | None = None,
    ) -> str:
        """Paint a box.

        Longer explanation.

        Args:
            box: where to paint.
            color: which color.
        """
        return "ok"

    spec = Registry([paint]).get("paint")
    assert spec is not None
    assert spec.description == "Paint a box.\n\nLonger explanation."
    schema = spec.parameters
    assert schema["required"] == ["box", "color"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["box"]["description"] == "where to paint."
    assert props["mode"]["enum"] == ["fill", "outline"]
    assert props["width"] == {
        "default": 2,
        "description": "stroke width",
        "maximum": 10,
        "minimum": 1,
        "type": "integer",
    }
    assert "Color" in schema["$defs"] and schema["$defs"]["Color"]["enum"] == ["red", "blue"]
    assert paint(Box(x=1, y=2), Color.RED) == "ok"  # the decorated function is still a function


def test_validated_arguments_are_coerced_into_python_types() -> None:
    seen = {}

    def paint(box: Box, color: Color, tags: list[str] | None = None) -> str:
        seen.update(box=box, color=color, tags=tags)
        return "ok"

    reg = Registry([paint])
    args = reg.validate("paint", {"box": {"x": 1, "y": 2}, "color": "blue"})
    assert args == {"box": Box(x=1, y=2), "color": Color.BLUE, "tags": None}


class Opaque:
    pass


def test_registration_reports_every_problem_once_naming_the_function() -> None:
    def bad(a: Opaque, *rest: int, b: int = 1) -> None: ...

    with pytest.raises(ToolDefinitionError) as info:
        tool(bad)
    message = str(info.value)
    assert "tool 'bad'" in message
    assert "parameter 'a'" in message and "parameter 'rest'" in message
    assert len(info.value.problems) == 2


def test_unresolvable_annotation_is_reported_per_parameter() -> None:
    class Local(BaseModel):
        x: int

    def f(a: Local, b: int) -> None: ...

    with pytest.raises(ToolDefinitionError) as info:
        tool(f)
    assert info.value.problems == (info.value.problems[0],)
    assert "parameter 'a': cannot resolve type 'Local'" in info.value.problems[0]


def test_registration_rejects_bad_names_schemas_and_duplicates() -> None:
    for bad in ("bad name!", "", "x" * 129, "a:b"):
        with pytest.raises(ToolDefinitionError, match="names are 1-128 letters"):
            Tool.from_schema(bad, {"type": "object"}, lambda: None)
    for good in ("math.add", "fs/read_file", "x" * 128, "météo"):  # MCP's names (and any letter, as before)
        assert Tool.from_schema(good, {"type": "object"}, lambda: None).name == good
    with pytest.raises(ToolDefinitionError, match="invalid JSON schema"):
        Tool.from_schema("t", {"type": "object", "properties": {"a": {"type": "nonsense"}}}, lambda: None)
    with pytest.raises(ToolDefinitionError, match="must describe an object"):
        Tool.from_schema("t", {"type": "string"}, lambda: None)

    def f() -> None: ...

    reg = Registry([f])
    with pytest.raises(ToolDefinitionError, match="already registered"):
        reg.add(f)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"a": "x", "b": 1}, 'argument \'a\': expected type "integer", got "x"'),
        ({"a": 1}, "missing required argument 'b'"),
        ({"a": 1, "b": 2, "c": 3}, "unexpected arguments are not allowed ('c' was unexpected)"),
        ({"a": 1, "b": 99}, "argument 'b': 99 is greater than the maximum of 10"),
        ([1, 2], "arguments must be a JSON object, got [1, 2]"),
    ],
)
def test_validation_messages_name_argument_expectation_and_value(arguments: object, expected: str) -> None:
    def f(a: int, b: Annotated[int, Field(le=10)]) -> int:
        return a + b

    with pytest.raises(ToolArgumentsError) as info:
        Registry([f]).validate("f", arguments)
    assert expected in info.value.message


def test_unknown_tool_lists_the_available_ones() -> None:
    def f() -> None: ...

    with pytest.raises(ToolArgumentsError, match=r"unknown tool 'g'; available: f"):
        Registry([f]).validate("g", {})


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


async def test_outputs_become_text_json_image_and_audio_parts() -> None:
    samples = np.linspace(-1, 1, 320, dtype=np.float32)

    def text() -> str:
        return "hello"

    def data() -> dict[str, object]:
        return {"n": 1, "xs": [1, 2]}

    def model() -> Box:
        return Box(x=1, y=2)

    def pil() -> Image.Image:
        return Image.new("RGB", (4, 4))

    def raw() -> bytes:
        return _png()

    def audio() -> AudioPart:
        return AudioPart.from_samples(samples)

    def mixed() -> list[object]:
        return [ImagePart(data=_png()), AudioPart.from_samples(samples)]

    reg = Registry([text, data, model, pil, raw, audio, mixed])

    async def run(name: str) -> ToolResultPart:
        out = await reg.execute(ToolCallPart(id="1", name=name), _ctx(name))
        assert isinstance(out, ToolResultPart)
        return out

    assert (await run("text")).content == (TextPart(text="hello"),)
    assert (await run("data")).text == '{"n": 1, "xs": [1, 2]}'
    assert (await run("model")).text == '{"x":1,"y":2,"label":""}'
    assert isinstance((await run("pil")).content[0], ImagePart)
    assert (await run("raw")).content == (ImagePart(data=_png(), media_type="image/png"),)
    audio_part = (await run("audio")).content[0]
    assert isinstance(audio_part, AudioPart)
    np.testing.assert_array_equal(audio_part.samples(), samples)
    assert [p.kind for p in (await run("mixed")).content] == ["image", "audio"]


async def test_failures_become_retry_requests() -> None:
    def asks() -> str:
        raise ModelRetry("use a smaller number")

    def crashes() -> str:
        raise ValueError("boom")

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    def unusable() -> object:
        return object()

    reg = Registry([asks, crashes, unusable, Tool.from_function(slow, timeout=0.05)])
    outcomes = {
        name: await reg.execute(ToolCallPart(id="1", name=name), _ctx(name))
        for name in ("asks", "crashes", "slow", "unusable")
    }
    assert outcomes["asks"] == RetryPart(message="use a smaller number", call_id="1", name="asks")
    assert isinstance(outcomes["crashes"], RetryPart) and "ValueError: boom" in outcomes["crashes"].message
    assert isinstance(outcomes["slow"], RetryPart) and "timed out after 0.05 s" in outcomes["slow"].message
    assert isinstance(outcomes["unusable"], ToolResultPart) and outcomes["unusable"].is_error


async def test_approval_allows_denies_and_defaults_to_deny() -> None:
    calls: list[str] = []

    @tool(requires_approval=True)
    def delete(path: str) -> str:
        calls.append(path)
        return "deleted"

    reg = Registry([delete])

    async def approver(call: ToolCallPart, ctx: ToolContext) -> bool | Deny:
        return True if call.arguments["path"] == "ok.txt" else Deny("not that file")

    ok = await reg.execute(ToolCallPart(id="1", name="delete", arguments={"path": "ok.txt"}), _ctx(), approver)
    no = await reg.execute(ToolCallPart(id="2", name="delete", arguments={"path": "/etc"}), _ctx(), approver)
    none = await reg.execute(ToolCallPart(id="3", name="delete", arguments={"path": "ok.txt"}), _ctx())
    assert isinstance(ok, ToolResultPart) and ok.text == "deleted"
    assert isinstance(no, ToolResultPart) and no.is_error and no.text == "Call denied: not that file"
    assert isinstance(none, ToolResultPart) and none.is_error and "no approval callback" in none.text
    assert calls == ["ok.txt"]


async def test_context_parameter_is_injected_and_hidden_from_schema() -> None:
    def whoami(ctx: ToolContext, greeting: str) -> str:
        return f"{greeting} {ctx.call_id} {ctx.deps}"

    reg = Registry([whoami])
    assert list(reg.get("whoami").parameters["properties"]) == ["greeting"]  # type: ignore[union-attr]
    ctx = ToolContext(call_id="abc", tool_name="whoami", deps="D")
    out = await reg.execute(ToolCallPart(id="abc", name="whoami", arguments={"greeting": "hi"}), ctx)
    assert isinstance(out, ToolResultPart) and out.text == "hi abc D"


async def test_openai_and_mcp_definitions_register_and_validate_the_same_way() -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
    }
    reg = Registry()
    reg.add_openai(
        [
            {"type": "function", "function": {"name": "forecast", "description": "Weather.", "parameters": schema}},
            {"name": "lookup", "description": "MCP tool.", "inputSchema": schema},
        ],
        {"forecast": lambda city, days=1: f"{city}:{days}", "lookup": lambda **kw: kw},
    )
    assert reg.names == ["forecast", "lookup"]
    ok = await reg.execute(ToolCallPart(id="1", name="forecast", arguments={"city": "Oslo", "days": 2}), _ctx())
    assert isinstance(ok, ToolResultPart) and ok.text == "Oslo:2"
    bad = await reg.execute(ToolCallPart(id="2", name="lookup", arguments={"days": 0}), _ctx())
    assert isinstance(bad, RetryPart)
    assert "missing required argument 'city'" in bad.message and "0 is less than the minimum of 1" in bad.message
    with pytest.raises(ToolDefinitionError, match="no function was given"):
        reg.add_openai([{"name": "ghost", "inputSchema": schema}], {})
