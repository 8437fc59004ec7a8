"""Conversation values: immutable messages made of typed parts, and their one serialiser.

A `Message` has a role and a tuple of parts. Parts are frozen Pydantic models told apart by `kind`:

| part | kind | allowed in roles |
|---|---|---|
| `TextPart` | `text` | system, user, assistant |
| `ImagePart` (encoded bytes + media type) | `image` | user |
| `AudioPart` (encoded bytes + media type) | `audio` | user |
| `ToolCallPart` (id, name, arguments) | `tool-call` | assistant |
| `ToolResultPart` (call id, content parts, is_error) | `tool-result` | tool |
| `RetryPart` (a request to the model to try again) | `retry` | tool, user |

Every string in a part (text, retry messages, ids, names, the strings inside tool-call arguments) must be
valid UTF-8: a lone surrogate such as "\\ud800" is refused when the part is built (a Pydantic
`ValidationError`; `UserError` from `Message.user`/`system`/`assistant` and `from_openai`), before it can
reach a tokenizer or a database. `replace_surrogates` repairs text that comes from a tool or a decoder.
Media from outside passes the gate in `agent._media` (`as_image_part`, `as_audio_part`, `ImagePart.from_pil`
and `from_openai` call it); the `ImagePart(data=...)` constructor itself checks nothing, like
`load_messages`.

Values carry no database ids: identity is the memory store's business. `dump_messages`/`load_messages`
round-trip a history exactly, media bytes included; `to_openai`/`from_openai` convert to and from the
OpenAI chat-completions format that apps already hold.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from agent import _media
from agent.exceptions import MediaError, UserError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from PIL import Image

__all__ = [
    "AudioPart",
    "ImagePart",
    "Message",
    "Part",
    "RetryPart",
    "TextPart",
    "ToolCallPart",
    "ToolDefinition",
    "ToolResultPart",
    "as_audio_part",
    "as_image_part",
    "dump_messages",
    "from_openai",
    "load_messages",
    "replace_surrogates",
    "to_openai",
]

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` with each lone surrogate (not valid UTF-8) replaced by U+FFFD, for text from tools and decoders."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def _utf8(text: str) -> str:
    if not text.isascii():  # O(1): an ASCII string holds no surrogate
        match = _SURROGATE.search(text)
        if match is not None:
            raise ValueError(
                f"holds a lone surrogate {match.group()!r} at index {match.start()}, which is not valid UTF-8"
            )
    return text


def _utf8_tree(value: dict[str, Any]) -> dict[str, Any]:
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _utf8(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return value


_Text = Annotated[str, AfterValidator(_utf8)]


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class TextPart(_Value):
    """Plain text."""

    kind: Literal["text"] = "text"
    text: _Text


class ImagePart(_Value):
    """An encoded image (PNG, JPEG, ...). Build one with `ImagePart.from_pil` or `as_image_part`."""

    kind: Literal["image"] = "image"
    data: bytes
    media_type: str = "image/png"

    @classmethod
    def from_pil(cls, image: Image.Image) -> ImagePart:
        """Encode a PIL image losslessly as PNG (modes PNG cannot hold, such as CMYK, become RGB or RGBA).

        Raises:
            MediaError: the image is over `agent._media.MAX_PIXELS` or cannot be encoded.
        """
        data, media_type = _media.pil_to_bytes(image)
        return cls(data=data, media_type=media_type)

    def to_pil(self) -> Image.Image:
        """Decode to an RGB PIL image."""
        return _media.open_image(self.data)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the header."""
        return _media.image_size(self.data)


class AudioPart(_Value):
    """An encoded audio clip (WAV, FLAC, ...). `AudioPart.from_samples` keeps float samples exactly."""

    kind: Literal["audio"] = "audio"
    data: bytes
    media_type: str = "audio/wav"

    @classmethod
    def from_samples(cls, samples: Sequence[float] | npt.NDArray[Any], sample_rate: int = 16_000) -> AudioPart:
        """Store mono samples as a 32-bit float WAV (bit-exact round trip through `samples`)."""
        return cls(data=_media.samples_to_wav(samples, sample_rate), media_type="audio/wav")

    def samples(self, sample_rate: int | None = _media.TARGET_SAMPLE_RATE) -> npt.NDArray[np.float32]:
        """Decode to mono float32 samples, resampled to `sample_rate` (None keeps the clip's own rate)."""
        samples, rate = _media.decode_audio(self.data)
        return samples if sample_rate is None else _media.resample(samples, rate, sample_rate)

    @property
    def sample_rate(self) -> int:
        """The clip's own sample rate."""
        return _media.decode_audio(self.data)[1]


class ToolCallPart(_Value):
    """A call the model asked for. `arguments` is the decoded JSON object, not yet validated."""

    kind: Literal["tool-call"] = "tool-call"
    id: _Text
    name: _Text
    arguments: Annotated[dict[str, Any], AfterValidator(_utf8_tree)] = Field(default_factory=dict)


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="kind")]


class ToolResultPart(_Value):
    """What a tool returned for the call `call_id`: text, images and audio, in order."""

    kind: Literal["tool-result"] = "tool-result"
    call_id: _Text
    name: _Text
    content: tuple[ContentPart, ...]
    is_error: bool = False

    @property
    def text(self) -> str:
        """The text parts joined."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class RetryPart(_Value):
    """A request to the model to try again: invalid arguments, an unknown tool, a failed tool, bad output."""

    kind: Literal["retry"] = "retry"
    message: _Text
    call_id: _Text | None = None
    name: _Text | None = None


Part = Annotated[
    TextPart | ImagePart | AudioPart | ToolCallPart | ToolResultPart | RetryPart, Field(discriminator="kind")
]
Role = Literal["system", "user", "assistant", "tool"]

_ALLOWED: dict[str, frozenset[str]] = {
    "system": frozenset({"text"}),
    "user": frozenset({"text", "image", "audio", "retry"}),
    "assistant": frozenset({"text", "tool-call"}),
    "tool": frozenset({"tool-result", "retry"}),
}


class Message(_Value):
    """One turn of a conversation."""

    role: Role
    parts: tuple[Part, ...]

    @model_validator(mode="after")
    def _check_parts(self) -> Message:
        allowed = _ALLOWED[self.role]
        for part in self.parts:
            if part.kind not in allowed:
                raise ValueError(f"a {self.role} message cannot hold a {part.kind} part")
        return self

    @classmethod
    def system(cls, text: str) -> Message:
        """A system message.

        Raises:
            UserError: the text is not valid UTF-8 (a lone surrogate).
        """
        with _as_user_error("a system message"):
            return cls(role="system", parts=(TextPart(text=text),))

    @classmethod
    def user(
        cls,
        text: str = "",
        *,
        images: Iterable[Any] = (),
        audio: Iterable[Any] = (),
    ) -> Message:
        """A user turn: media first (as Phi-4's own examples place them), then the text.

        Raises:
            MediaError: an image or clip does not pass the media gate.
            UserError: no content, or text that is not valid UTF-8 (a lone surrogate).
        """
        parts: list[Part] = [as_image_part(i) for i in images]
        parts.extend(as_audio_part(a) for a in audio)
        with _as_user_error("a user message"):
            if text:
                parts.append(TextPart(text=text))
            if not parts:
                raise UserError("a user message needs text, an image or audio")
            return cls(role="user", parts=tuple(parts))

    @classmethod
    def assistant(cls, text: str = "", tool_calls: Iterable[ToolCallPart] = ()) -> Message:
        """An assistant turn with optional text followed by tool calls.

        Raises:
            UserError: the text is not valid UTF-8 (a lone surrogate).
        """
        with _as_user_error("an assistant message"):
            parts: list[Part] = [TextPart(text=text)] if text else []
            parts.extend(tool_calls)
            return cls(role="assistant", parts=tuple(parts))

    @property
    def text(self) -> str:
        """The text parts joined."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def tool_calls(self) -> list[ToolCallPart]:
        """The tool calls in this message, in order."""
        return [p for p in self.parts if isinstance(p, ToolCallPart)]


class ToolDefinition(_Value):
    """What the model is told about a tool: a name, a description and a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @classmethod
    def from_openai(cls, entry: dict[str, Any]) -> ToolDefinition:
        """Read an OpenAI `tools` entry (or a bare function definition, or an MCP tool listing)."""
        fn = entry.get("function", entry)
        schema = fn.get("parameters", fn.get("inputSchema", fn.get("input_schema")))
        return cls(
            name=fn["name"],
            description=fn.get("description") or "",
            parameters=schema if schema is not None else {"type": "object", "properties": {}},
        )


@contextlib.contextmanager
def _as_user_error(what: str) -> Iterator[None]:
    try:
        yield
    except ValidationError as exc:
        raise UserError(f"cannot build {what}: {_validation_problems(exc)}") from exc


def _validation_problems(exc: ValidationError) -> str:
    """A short reading of a ValidationError from a message value: where, and what is wrong."""
    problems = [
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()[:3]
    ]
    return "; ".join(problems)


_HISTORY = TypeAdapter(list[Message])


def dump_messages(messages: Sequence[Message]) -> bytes:
    """Serialise a history to JSON bytes (media as base64). `load_messages` gives back equal values."""
    return _HISTORY.dump_json(list(messages))


def load_messages(data: str | bytes) -> list[Message]:
    """Parse JSON written by `dump_messages`."""
    try:
        return _HISTORY.validate_json(data)
    except ValidationError as exc:
        raise UserError(f"not a valid mmagent message history: {exc}") from exc


# ---------------------------------------------------------------- media coercion


def as_image_part(value: Any) -> ImagePart:
    """Accept an `ImagePart` (as it is), a PIL image, encoded bytes, or a file path.

    Bytes, files and PIL images pass the media gate (`agent._media`): a supported format, at most
    `agent._media.MAX_PIXELS` pixels read from the header, data that verifies.

    Raises:
        MediaError: the value is not an image, or does not pass the gate.
    """
    if isinstance(value, ImagePart):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return ImagePart(data=data, media_type=_media.check_image(data))
    if isinstance(value, str | Path):
        return as_image_part(_read_file(Path(value), "image"))
    if hasattr(value, "save") and hasattr(value, "size"):
        return ImagePart.from_pil(value)
    raise MediaError(f"cannot use {type(value).__name__} as an image: pass a path, bytes or a PIL image")


def as_audio_part(value: Any) -> AudioPart:
    """Accept an `AudioPart` (as it is), encoded bytes, a file path, or a `(samples, sample_rate)` pair.

    Bytes and files pass the media gate (`agent._media`): a supported format, a length within
    `agent._media.MAX_AUDIO_SECONDS` read from the header, a first block that decodes.

    Raises:
        MediaError: the value is not audio, or does not pass the gate.
    """
    if isinstance(value, AudioPart):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return AudioPart(data=data, media_type=_media.check_audio(data))
    if isinstance(value, str | Path):
        return as_audio_part(_read_file(Path(value), "audio"))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return AudioPart.from_samples(value[0], value[1])
    raise MediaError(
        f"cannot use {type(value).__name__} as audio: pass a path, bytes, or a (samples, sample_rate) pair"
    )


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {what} file {str(path)!r}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------- OpenAI chat-completions format


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _content_to_openai(parts: Iterable[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            out.append({"type": "image_url", "image_url": {"url": _data_url(part.data, part.media_type)}})
        elif isinstance(part, AudioPart):
            out.append(
                {
                    "type": "input_audio",
                    "input_audio": {
                        "data": base64.b64encode(part.data).decode("ascii"),
                        "format": _media.audio_format_name(part.media_type),
                    },
                }
            )
        elif isinstance(part, RetryPart):
            out.append({"type": "text", "text": part.message})
    return out


def _simplify(content: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if all(c["type"] == "text" for c in content):
        return "".join(c["text"] for c in content)
    return content


def to_openai(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Convert to OpenAI chat-completions messages.

    Images become data URLs and audio `input_audio` parts; a tool message becomes one `tool` message per
    result (media kept as content parts, which vLLM accepts); a retry request tied to a call becomes that
    call's `tool` message.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role in ("system", "user"):
            out.append({"role": message.role, "content": _simplify(_content_to_openai(message.parts))})
        elif message.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": message.text or None}
            calls = message.tool_calls
            if calls:
                entry["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    }
                    for c in calls
                ]
            out.append(entry)
        else:
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": part.call_id,
                            "name": part.name,
                            "content": _simplify(_content_to_openai(part.content)),
                        }
                    )
                elif isinstance(part, RetryPart):
                    if part.call_id is not None:
                        out.append({"role": "tool", "tool_call_id": part.call_id, "content": part.message})
                    else:
                        out.append({"role": "user", "content": part.message})
    return out


def _decode_data_url(url: str) -> bytes:
    if not url.startswith("data:"):
        raise MediaError(f"remote media URLs are not fetched ({url[:60]!r}): download the file and pass its bytes")
    payload = url.partition(",")[2]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"bad base64 in data URL: {exc}") from exc


def _content_from_openai(content: Any) -> list[TextPart | ImagePart | AudioPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(text=content)] if content else []
    parts: list[TextPart | ImagePart | AudioPart] = []
    for item in content:
        kind = item.get("type")
        if kind == "text":
            parts.append(TextPart(text=item["text"]))
        elif kind == "image_url":
            url = item["image_url"]["url"] if isinstance(item["image_url"], dict) else item["image_url"]
            parts.append(as_image_part(_decode_data_url(url)))  # the bytes, not the URL's label, say the format
        elif kind == "input_audio":
            try:
                data = base64.b64decode(item["input_audio"]["data"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MediaError(f"bad base64 in input_audio: {exc}") from exc
            parts.append(as_audio_part(data))  # the bytes, not the "format" field, say the format
        else:
            raise UserError(f"unsupported OpenAI content part type {kind!r}")
    return parts


def from_openai(messages: Sequence[dict[str, Any]]) -> list[Message]:
    """Read OpenAI chat-completions messages ("developer" is read as "system")."""
    out: list[Message] = []
    names: dict[str, str] = {}
    try:
        for raw in messages:
            role = raw.get("role")
            if role in ("system", "developer"):
                text = "".join(p.text for p in _content_from_openai(raw.get("content")) if isinstance(p, TextPart))
                out.append(Message.system(text))
            elif role == "user":
                out.append(Message(role="user", parts=tuple(_content_from_openai(raw.get("content")))))
            elif role == "assistant":
                parts: list[Part] = list(_content_from_openai(raw.get("content")))
                for call in raw.get("tool_calls") or []:
                    fn = call["function"]
                    args = fn.get("arguments") or "{}"
                    arguments = json.loads(args) if isinstance(args, str) else args
                    names[call["id"]] = fn["name"]
                    parts.append(ToolCallPart(id=call["id"], name=fn["name"], arguments=arguments))
                out.append(Message(role="assistant", parts=tuple(parts)))
            elif role == "tool":
                call_id = raw["tool_call_id"]
                result = ToolResultPart(
                    call_id=call_id,
                    name=raw.get("name") or names.get(call_id, ""),
                    content=tuple(_content_from_openai(raw.get("content"))),
                )
                if out and out[-1].role == "tool":  # consecutive results belong to one tool turn
                    out[-1] = Message(role="tool", parts=(*out[-1].parts, result))
                else:
                    out.append(Message(role="tool", parts=(result,)))
            else:
                raise UserError(f"unsupported OpenAI message role {role!r}")
    except ValidationError as exc:
        raise UserError(f"malformed OpenAI message: {_validation_problems(exc)}") from exc
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise UserError(f"malformed OpenAI message: {exc!r}") from exc
    return out
