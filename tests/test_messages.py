"""Messages: immutability, role rules, the exact JSON round trip, and the OpenAI format."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from agent.exceptions import MediaError, UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolDefinition,
    ToolResultPart,
    as_audio_part,
    as_image_part,
    dump_messages,
    from_openai,
    load_messages,
    to_openai,
)


def _png(w: int = 7, h: int = 5, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _conversation() -> list[Message]:
    samples = np.random.default_rng(1).uniform(-1, 1, 1600).astype(np.float32)
    return [
        Message.system("You are terse."),
        Message.user("What is in these?", images=[_png()], audio=[(samples, 16_000)]),
        Message.assistant(
            "Let me look.",
            [ToolCallPart(id="c1", name="zoom", arguments={"box": [1, 2, 3, 4], "opts": {"scale": 2.5, "q": None}})],
        ),
        Message(
            role="tool",
            parts=(
                ToolResultPart(
                    call_id="c1",
                    name="zoom",
                    content=(TextPart(text="crop"), ImagePart(data=_png(3, 3, 2), media_type="image/png")),
                ),
                RetryPart(message="bad args", call_id="c2", name="ocr"),
            ),
        ),
        Message.assistant("A cat, saying \u00e9\u00e8 <|end|>."),
    ]


def test_json_round_trip_is_exact_including_media() -> None:
    history = _conversation()
    data = dump_messages(history)
    back = load_messages(data)
    assert back == history
    assert back[1].parts[0].data == history[1].parts[0].data  # type: ignore[union-attr]
    assert dump_messages(back) == data


def test_audio_samples_survive_bit_for_bit() -> None:
    samples = np.random.default_rng(3).normal(0, 0.3, 4000).astype(np.float32)
    part = AudioPart.from_samples(samples, 16_000)
    back = load_messages(dump_messages([Message.user(audio=[part])]))[0].parts[0]
    assert isinstance(back, AudioPart)
    np.testing.assert_array_equal(back.samples(), samples)
    assert back.sample_rate == 16_000


def test_audio_is_resampled_to_16k_on_request() -> None:
    t = np.arange(44_100) / 44_100
    part = AudioPart.from_samples(np.sin(2 * np.pi * 440 * t).astype(np.float32), 44_100)
    out = part.samples()
    assert len(out) == 16_000
    assert part.samples(None).shape == (44_100,)


def test_messages_are_immutable_and_role_checked() -> None:
    m = Message.user("hi")
    with pytest.raises(ValidationError):
        m.role = "assistant"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="cannot hold a tool-call part"):
        Message(role="user", parts=(ToolCallPart(id="x", name="y"),))
    with pytest.raises(ValidationError, match="cannot hold a image part"):
        Message(role="assistant", parts=(ImagePart(data=_png()),))
    with pytest.raises(UserError):
        Message.user("")


def test_media_coercion_accepts_paths_bytes_pil_and_rejects_junk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    png = _png()
    path = tmp_path / "x.png"
    path.write_bytes(png)
    assert as_image_part(path).data == png
    assert as_image_part(png).media_type == "image/png"
    pil = Image.open(io.BytesIO(png))
    assert as_image_part(pil).to_pil().size == (7, 5)
    with pytest.raises(MediaError, match="not a known image format"):
        as_image_part(b"hello")
    with pytest.raises(MediaError, match="cannot read image file"):
        as_image_part(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="not a known audio format"):
        as_audio_part(png)
    with pytest.raises(MediaError, match="cannot decode image"):
        ImagePart(data=b"\x89PNG\r\n\x1a\nbroken").to_pil()


def test_openai_round_trip_keeps_every_value() -> None:
    history = [m for m in _conversation() if not any(isinstance(p, RetryPart) for p in m.parts)]
    history.append(
        Message(role="tool", parts=(ToolResultPart(call_id="c1", name="zoom", content=(TextPart(text="ok"),)),))
    )
    exported = to_openai(history)
    assert exported[1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert exported[1]["content"][1]["type"] == "input_audio"
    assert exported[1]["content"][1]["input_audio"]["format"] == "wav"
    assert exported[2]["tool_calls"][0]["function"]["name"] == "zoom"
    assert from_openai(exported) == history


def test_openai_import_errors_are_clear() -> None:
    with pytest.raises(MediaError, match="remote media URLs are not fetched"):
        from_openai([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    with pytest.raises(UserError, match="unsupported OpenAI message role"):
        from_openai([{"role": "wizard", "content": "hi"}])
    with pytest.raises(UserError, match="malformed OpenAI message"):
        from_openai([{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{"}}]}])
    assert from_openai([{"role": "developer", "content": "rules"}]) == [Message.system("rules")]


def test_tool_definition_reads_openai_and_mcp_shapes() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    openai_entry = {"type": "function", "function": {"name": "search", "description": "d", "parameters": schema}}
    mcp_entry = {"name": "search", "description": "d", "inputSchema": schema}
    assert ToolDefinition.from_openai(openai_entry) == ToolDefinition.from_openai(mcp_entry)
    assert ToolDefinition.from_openai(openai_entry).to_openai() == openai_entry


def test_load_messages_rejects_garbage() -> None:
    with pytest.raises(UserError, match="not a valid mmagent message history"):
        load_messages(b'[{"role": "user", "parts": [{"kind": "laser"}]}]')


def test_strings_in_message_values_must_be_valid_utf8() -> None:
    lone = "half \ud83d an emoji"
    for build in (
        lambda: TextPart(text=lone),
        lambda: RetryPart(message=lone),
        lambda: RetryPart(message="ok", name=lone),
        lambda: ToolCallPart(id="1", name=lone),
        lambda: ToolCallPart(id="1", name="f", arguments={"xs": [{"deep": lone}]}),
        lambda: ToolCallPart(id="1", name="f", arguments={lone: 1}),
        lambda: ToolResultPart(call_id=lone, name="f", content=()),
    ):
        with pytest.raises(ValidationError, match=r"lone surrogate '\\ud83d' at index 5"):
            build()
    assert TextPart(text="a valid pair: \U0001f600").text.endswith("\U0001f600")


def _call_with_arguments(arguments: str) -> dict[str, object]:
    return {"id": "1", "function": {"name": "f", "arguments": arguments}}


def test_constructors_and_the_openai_reader_name_invalid_utf8_as_a_user_error() -> None:
    for build in (
        lambda: Message.user("bad \udc80"),
        lambda: Message.system("bad \udc80"),
        lambda: Message.assistant("bad \udc80"),
        lambda: from_openai([{"role": "user", "content": "bad \udc80"}]),
        lambda: from_openai([{"role": "user", "content": [{"type": "text", "text": "bad \udc80"}]}]),
        lambda: from_openai([{"role": "assistant", "tool_calls": [_call_with_arguments('{"q": "\\udc80"}')]}]),
    ):
        with pytest.raises(UserError, match=r"lone surrogate '\\udc80'"):
            build()


def test_replace_surrogates_repairs_text_from_tools_and_decoders() -> None:
    from agent.messages import replace_surrogates

    assert replace_surrogates("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    assert replace_surrogates("plain é \U0001f600") == "plain é \U0001f600"
    TextPart(text=replace_surrogates("x\ud800"))
