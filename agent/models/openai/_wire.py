"""The OpenAI chat-completions wire format for `OpenAIModel`: pure functions, no I/O.

Request bodies are built from mmagent values (`to_openai`, `ToolDefinition.to_openai`); response bodies and
streamed chunks are read back into a `ModelResponse`. Tool-call arguments that are not a JSON object become
parse errors (the agent loop turns them into retry requests); they never raise.
"""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agent.exceptions import UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    Part,
    TextPart,
    ToolCallPart,
    ToolDefinition,
    ToolResultPart,
    replace_surrogates,
    to_openai,
)
from agent.models import ModelResponse, ModelSettings, Usage

LORA_KEYS = frozenset({"vision", "speech"})
_EXCERPT = 500


class WireFormatError(ValueError):
    """A 2xx body that is not a chat completion (the caller maps it to `ModelHTTPError`)."""


# ---------------------------------------------------------------- requests


def tool_choice_to_openai(choice: str, tools: Sequence[ToolDefinition]) -> str | dict[str, Any]:
    """`auto`/`required`/`none` as they are; any other value names a tool and becomes the function shape."""
    if choice in ("auto", "required", "none"):
        return choice
    names = [t.name for t in tools]
    if choice not in names:
        raise UserError(f"tool_choice {choice!r} names no tool of this request (tools: {', '.join(names) or 'none'})")
    return {"type": "function", "function": {"name": choice}}


def has_media(messages: Sequence[Message]) -> tuple[bool, bool]:
    """(any image, any audio) anywhere in the history, tool results included."""
    image = audio = False
    for message in messages:
        for part in _flat_parts(message.parts):
            image = image or isinstance(part, ImagePart)
            audio = audio or isinstance(part, AudioPart)
    return image, audio


def _flat_parts(parts: Iterable[Part]) -> Iterable[Any]:
    for part in parts:
        if isinstance(part, ToolResultPart):
            yield from part.content
        else:
            yield part


def route_model(messages: Sequence[Message], base: str, lora_models: Mapping[str, str] | None) -> str:
    """The served model name for this history: the vision LoRA when any image is present, the speech LoRA when
    only audio is, the base model otherwise (Phi-4-multimodal's own routing)."""
    if not lora_models:
        return base
    image, audio = has_media(messages)
    if image:
        return lora_models.get("vision", base)
    if audio:
        return lora_models.get("speech", base)
    return base


def build_body(
    model: str,
    messages: Sequence[Message],
    tools: Sequence[ToolDefinition],
    settings: ModelSettings,
    *,
    stream: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of one `POST /chat/completions`."""
    body: dict[str, Any] = {
        "model": model,
        "messages": to_openai(messages),
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    if settings.stop:
        body["stop"] = list(settings.stop)
    if tools:
        body["tools"] = [t.to_openai() for t in tools]
        body["tool_choice"] = tool_choice_to_openai(settings.tool_choice, tools)
        if not settings.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    answer = settings.response_format
    if answer is not None:
        body["response_format"] = (
            {"type": "json_object"}
            if answer.schema is None
            else {
                "type": "json_schema",
                "json_schema": {"name": answer.name, "schema": answer.schema, "strict": answer.strict},
            }
        )
    if settings.logprobs is not None:
        body["logprobs"] = True
        if settings.logprobs:
            body["top_logprobs"] = settings.logprobs
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if extra:
        body.update(extra)
    return body


# ---------------------------------------------------------------- responses


def parse_arguments(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Decode a call's `arguments` (a JSON string, or an object some servers send as is)."""
    if isinstance(raw, dict):
        return raw, None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}, None
    if not isinstance(raw, str):
        return None, f"arguments must be a JSON object string, got {type(raw).__name__}"
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"arguments are not valid JSON ({exc.msg} at position {exc.pos}): {_clip(raw, 200)}"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}: {_clip(raw, 200)}"
    return value, None


def _tool_call(index: int, call_id: Any, name: Any, arguments: Any) -> tuple[ToolCallPart | None, str | None]:
    label = f"tool call {index}" + (f" ({name!r})" if name else "")
    if not isinstance(name, str) or not name:
        return None, f"{label} has no function name"
    args, error = parse_arguments(arguments)
    if args is None:
        return None, f"{label}: {error}"
    cid = call_id if isinstance(call_id, str) and call_id else f"call_{uuid.uuid4().hex[:24]}"
    try:
        return ToolCallPart(id=cid, name=name, arguments=args), None
    except ValidationError as exc:  # a lone surrogate (a "\ud800" escape) in a name, id or argument
        return None, f"{label}: not valid Unicode ({exc.errors()[0]['msg'].removeprefix('Value error, ')})"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer with content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise WireFormatError(f"message content is a {type(content).__name__}, not text")


def usage_from(data: Any) -> Usage:
    """Token counts from an OpenAI `usage` object (`prefill_tokens` excludes cached prompt tokens)."""
    if not isinstance(data, dict):
        return Usage(requests=1)
    prompt = _int(data.get("prompt_tokens"))
    details = data.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(
        requests=1,
        input_tokens=prompt,
        output_tokens=_int(data.get("completion_tokens")),
        prefill_tokens=max(prompt - cached, 0),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def assemble(
    text: str,
    raw_calls: Iterable[tuple[Any, Any, Any]],
    *,
    usage: Usage,
    model_name: str,
    finish_reason: str | None,
) -> ModelResponse:
    """An assistant `ModelResponse` from text and `(id, name, arguments)` triples; bad calls become errors."""
    text = replace_surrogates(text)  # the server's text is the model's output, not the caller's input
    parts: list[Part] = [TextPart(text=text)] if text else []
    errors: list[str] = []
    for index, (call_id, name, arguments) in enumerate(raw_calls):
        call, error = _tool_call(index, call_id, name, arguments)
        if call is not None:
            parts.append(call)
        if error is not None:
            errors.append(error)
    return ModelResponse(
        message=Message(role="assistant", parts=tuple(parts)),
        usage=usage,
        model_name=model_name,
        raw_text=text,
        parse_errors=tuple(errors),
        finish_reason=finish_reason,
    )


def parse_completion(data: Any, requested_model: str) -> ModelResponse:
    """Read a `chat.completion` body. Raises `WireFormatError` when it is not one."""
    if not isinstance(data, dict):
        raise WireFormatError(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise WireFormatError("the response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise WireFormatError("choices[0] has no message")
    raw_calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        fn = fn if isinstance(fn, dict) else {}
        raw_calls.append((call.get("id") if isinstance(call, dict) else None, fn.get("name"), fn.get("arguments")))
    return assemble(
        _content_text(message.get("content")),
        raw_calls,
        usage=usage_from(data.get("usage")),
        model_name=str(data.get("model") or requested_model),
        finish_reason=choices[0].get("finish_reason"),
    )


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class StreamAccumulator:
    """Collects `chat.completion.chunk` events: text, tool-call fragments by index, usage, finish reason."""

    requested_model: str
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    usage: Usage | None = None
    model_name: str = ""
    finish_reason: str | None = None

    def add(self, chunk: Any) -> str:
        """Take one chunk; return its new text (empty when it has none). Raises `WireFormatError`."""
        if not isinstance(chunk, dict):
            raise WireFormatError(f"a stream event is a {type(chunk).__name__}, not a JSON object")
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model_name = chunk["model"]
        if chunk.get("usage"):
            self.usage = usage_from(chunk["usage"])
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return ""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise WireFormatError("a stream chunk's delta is not an object")
        for fragment in delta.get("tool_calls") or []:
            self._add_call(fragment)
        text = _content_text(delta.get("content"))
        if text:
            self.text.append(text)
        return text

    def _add_call(self, fragment: Any) -> None:
        if not isinstance(fragment, dict):
            raise WireFormatError("a tool-call delta is not an object")
        index = fragment.get("index")
        index = index if isinstance(index, int) else len(self.calls)
        partial = self.calls.setdefault(index, _PartialCall())
        if isinstance(fragment.get("id"), str) and fragment["id"]:
            partial.id = fragment["id"]
        fn = fragment.get("function") or {}
        if isinstance(fn.get("name"), str):
            partial.name += fn["name"]
        arguments = fn.get("arguments")
        if isinstance(arguments, str):
            partial.arguments += arguments
        elif isinstance(arguments, dict):  # a server that sends the object whole
            partial.arguments += json.dumps(arguments)

    def response(self) -> ModelResponse:
        """The complete turn, once the stream has ended."""
        calls = [(c.id, c.name, c.arguments) for _, c in sorted(self.calls.items())]
        return assemble(
            "".join(self.text),
            calls,
            usage=self.usage or Usage(requests=1),
            model_name=self.model_name or self.requested_model,
            finish_reason=self.finish_reason,
        )


class SSEDecoder:
    """Server-sent events, line by line: yields each event's `data` (multi-line data joined with newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its newline); return an event's data when the line completes one."""
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """Data of an event left open at the end of the stream."""
        return self.feed("")


# ---------------------------------------------------------------- errors and retries


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds a server asked us to wait (`retry-after-ms`, `Retry-After` seconds or HTTP date), else None."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def error_detail(body: str) -> str:
    """The human part of an error body: OpenAI's `error.message` (or FastAPI's `detail`), else an excerpt."""
    try:
        data = json.loads(body)
    except ValueError:
        return _clip(body.strip(), _EXCERPT)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _clip(error["message"], _EXCERPT)
        if isinstance(error, str):
            return _clip(error, _EXCERPT)
        if isinstance(data.get("message"), str):
            return _clip(data["message"], _EXCERPT)
        if "detail" in data:
            return _clip(str(data["detail"]), _EXCERPT)
    return _clip(body.strip(), _EXCERPT)


def excerpt(body: str) -> str:
    """The start of a body, for error messages and `ModelHTTPError.body`."""
    return _clip(body, _EXCERPT)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
