"""Model mode of `agent.server`: a plain OpenAI-compatible model endpoint for a client's own agent.

The client's tools are rendered in the model's own format, decoding is constrained by its `tool_choice`,
`parallel_tool_calls` and `response_format`, and the calls come back as OpenAI `tool_calls`. The history the
client sends back (assistant `tool_calls`, `role: tool` results with text, images or audio) is checked
before anything runs: a result without its call, or a call without its result, is a 400 naming the message.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema_rs

from agent._server_wire import ChatRequest, HTTPProblem, chunk_body, envelope, usage_body
from agent.exceptions import UserError
from agent.messages import Message, Part, ToolCallPart, ToolDefinition, from_openai
from agent.models import Model, ModelResponse, ModelSettings, ResponseFormat, TokenLogprob, ToolCallDelta, ToolChoice

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MEDIA_KINDS = {"image_url": "image", "input_audio": "audio"}


@dataclass(slots=True)
class ModelCall:
    """What one model-mode request asks of the backend."""

    messages: list[Message]
    tools: list[ToolDefinition]
    settings: ModelSettings
    dropped: list[str] = field(default_factory=list)  # media left out (opt-in), for the warning header


def prepare(chat: ChatRequest, model: Model, base: ModelSettings, *, drop_media: bool) -> ModelCall:
    """Check and convert a request for the model; an `HTTPProblem` (400) says what is wrong and where."""
    raw, dropped = check_media(chat.messages, model, drop=drop_media)
    check_history(raw)
    try:
        messages = from_openai(raw)
    except UserError as exc:
        raise HTTPProblem(400, str(exc), param="messages") from exc
    tools = read_tools(chat.tools or [])
    choice = read_tool_choice(chat.tool_choice, tools)
    answer = read_response_format(chat, model)
    changes: dict[str, Any] = {"tool_choice": choice, "response_format": answer}
    max_tokens = chat.max_completion_tokens or chat.max_tokens
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(chat, name) is not None:
            changes[name] = getattr(chat, name)
    if chat.stop is not None:
        changes["stop"] = (chat.stop,) if isinstance(chat.stop, str) else tuple(chat.stop)
    if chat.parallel_tool_calls is not None:
        changes["parallel_tool_calls"] = chat.parallel_tool_calls
    changes["logprobs"] = (chat.top_logprobs or 0) if chat.logprobs else None
    return ModelCall(messages, tools, replace(base, **changes), dropped)


# ---------------------------------------------------------------- the request's parts


def check_media(raw: list[dict[str, Any]], model: Model, *, drop: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Refuse images or audio the model cannot read (400 naming the message), or with `drop`, leave them out
    and say what was dropped."""
    readable = model.input_modalities
    dropped: list[str] = []
    out: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        kept = []
        for part in content:
            kind = _MEDIA_KINDS.get(str(part.get("type"))) if isinstance(part, dict) else None
            if kind is None or kind in readable:
                kept.append(part)
                continue
            if not drop:
                raise HTTPProblem(
                    400,
                    f"messages[{index}] holds {'an image' if kind == 'image' else 'audio'}, which {model.name} "
                    f"cannot read (it reads {', '.join(sorted(readable))}); serve a model that reads it, or "
                    "start the server with --drop-unreadable-media to leave such parts out",
                    param="messages",
                    code="unsupported_media",
                )
            dropped.append(f"{kind} in messages[{index}]")
        out.append({**message, "content": kept} if len(kept) != len(content) else message)
    return out, dropped


def check_history(raw: list[dict[str, Any]]) -> None:
    """The conversation a client sends back must pair every call with its result, in OpenAI's order: an
    assistant message's `tool_calls`, then one `role: tool` message per call id, before anything else."""
    pending: dict[str, int] = {}  # call id -> index of the assistant message that made it
    asked_at = -1
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise HTTPProblem(400, f"{where} is not a JSON object", param="messages")
        role = str(message.get("role"))
        if role != "tool" and pending:
            missing = ", ".join(repr(c) for c in pending)
            raise HTTPProblem(
                400,
                f"messages[{asked_at}] calls tools whose results never came ({missing}): each call id needs a "
                f"`role: tool` message before {where}",
                param="messages",
            )
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise HTTPProblem(400, f"{where}.tool_calls must be a list", param="messages")
            for j, call in enumerate(calls):
                call_id = _check_call(call, f"{where}.tool_calls[{j}]")
                if call_id in pending:
                    raise HTTPProblem(400, f"{where}.tool_calls[{j}] repeats the id {call_id!r}", param="messages")
                pending[call_id] = index
            asked_at = index
        elif role == "tool":
            answered = message.get("tool_call_id")
            if not isinstance(answered, str) or not answered:
                raise HTTPProblem(400, f"{where} is a tool message without a `tool_call_id`", param="messages")
            call_id = answered
            if call_id not in pending:
                before = (
                    f"the calls of messages[{asked_at}]" if asked_at >= 0 else "any assistant message with tool_calls"
                )
                raise HTTPProblem(
                    400, f"{where} answers the call id {call_id!r}, which is not among {before}", param="messages"
                )
            del pending[call_id]
        elif role not in ("system", "developer", "user"):
            raise HTTPProblem(400, f"{where} has the unsupported role {role!r}", param="messages")
    if pending:
        missing = ", ".join(repr(c) for c in pending)
        raise HTTPProblem(
            400, f"messages[{asked_at}] calls tools whose results never came ({missing})", param="messages"
        )
    last = raw[-1].get("role") if raw else None
    if last == "assistant":
        raise HTTPProblem(
            400, f"messages[{len(raw) - 1}] is an assistant message: the last message must be the user's, a tool "
            "result or a system message (continuing an assistant turn is not supported)",
            param="messages",
        )  # fmt: skip


def _check_call(call: Any, where: str) -> str:
    if not isinstance(call, dict):
        raise HTTPProblem(400, f"{where} is not a JSON object", param="messages")
    call_id, fn = call.get("id"), call.get("function")
    if not isinstance(call_id, str) or not call_id:
        raise HTTPProblem(400, f"{where} has no `id`", param="messages")
    if call.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise HTTPProblem(400, f"{where} must be a function call with a `function.name`", param="messages")
    arguments = fn.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError) as exc:
            raise HTTPProblem(400, f"{where}.function.arguments is not valid JSON", param="messages") from exc
    if not isinstance(arguments, dict):
        raise HTTPProblem(400, f"{where}.function.arguments must be a JSON object", param="messages")
    return call_id


def read_tools(raw: list[dict[str, Any]]) -> list[ToolDefinition]:
    """The client's function tools; a 400 names a bad entry."""
    tools: list[ToolDefinition] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(entry, dict) or entry.get("type", "function") != "function":
            kind = entry.get("type") if isinstance(entry, dict) else type(entry).__name__
            raise HTTPProblem(400, f"{where}: only function tools are supported, got {kind!r}", param="tools")
        fn = entry.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _TOOL_NAME.match(fn["name"]):
            raise HTTPProblem(400, f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", param="tools")
        name = fn["name"]
        if name in seen:
            raise HTTPProblem(400, f"{where}: the tool name {name!r} is given twice", param="tools")
        seen.add(name)
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise HTTPProblem(400, f"{where}.function.parameters must be a JSON schema object", param="tools")
        _check_schema(parameters, f"{where}.function.parameters", "tools")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise HTTPProblem(400, f"{where}.function.description must be a string", param="tools")
        tools.append(ToolDefinition(name=name, description=description, parameters=parameters))
    return tools


def _check_schema(schema: dict[str, Any], where: str, param: str) -> None:
    """A 400 unless `schema` is a valid JSON schema (draft 2020-12 metaschema; jsonschema-rs, ~1 us)."""
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        path = "".join(f"[{p!r}]" for p in exc.instance_path)
        raise HTTPProblem(400, f"{where}{path} is not a valid JSON schema: {exc.message[:200]}", param=param) from exc
    except (ValueError, jsonschema_rs.ReferencingError) as exc:
        raise HTTPProblem(400, f"{where} is not a usable JSON schema: {str(exc)[:200]}", param=param) from exc


def read_tool_choice(value: str | dict[str, Any] | None, tools: Sequence[ToolDefinition]) -> ToolChoice:
    """OpenAI's `tool_choice` as ours: `auto`, `none`, `required` or a tool name."""
    names = [t.name for t in tools]
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise HTTPProblem(
                400, f"tool_choice must be auto, none, required or a function, got {value!r}", param="tool_choice"
            )
        if value == "required" and not tools:
            raise HTTPProblem(400, "tool_choice 'required' needs `tools`", param="tool_choice")
        return value if tools else "none"
    if value.get("type") != "function":
        raise HTTPProblem(
            400, f"tool_choice of type {value.get('type')!r} is not supported (use auto, none, required or a "
            "function)", param="tool_choice",
        )  # fmt: skip
    fn = value.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise HTTPProblem(
            400, f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(names) or 'none'})", param="tool_choice",
        )  # fmt: skip
    return str(name)


def read_response_format(chat: ChatRequest, model: Model) -> ResponseFormat | None:
    """`response_format` as a `ResponseFormat`; a schema the backend's grammar cannot enforce is a 400."""
    spec = chat.response_format
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return ResponseFormat()
    assert spec.json_schema is not None and spec.json_schema.schema_ is not None  # checked by parse_request
    schema = spec.json_schema.schema_
    _check_schema(schema, "response_format.json_schema.schema", "response_format")
    if getattr(model, "constrained", False):  # the in-process backend enforces it with its grammar
        from agent.models._grammar import check_answer_schema

        support = check_answer_schema(schema)
        if support.level == "unconstrained":
            raise HTTPProblem(
                400,
                f"response_format.json_schema.schema cannot be enforced: {'; '.join(support.problems)}",
                param="response_format",
            )
    return ResponseFormat(schema=schema, name=spec.json_schema.name, strict=bool(spec.json_schema.strict))


# ---------------------------------------------------------------- responses


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(response: ModelResponse) -> str:
    if response.message.tool_calls:
        return "tool_calls"
    return "length" if response.finish_reason == "length" else "stop"


def content_of(response: ModelResponse) -> str | None:
    """The message content: the text; when nothing parsed as a call but something failed to, the raw text
    (so that nothing the model wrote is lost); None for a turn of calls only."""
    text = response.message.text
    if response.parse_errors and not response.message.tool_calls and response.raw_text:
        text = response.raw_text.strip()
    return text or (None if response.message.tool_calls else "")


def tool_calls_body(calls: Iterable[ToolCallPart], ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "id": ids[i] if ids is not None else call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
        }
        for i, call in enumerate(calls)
    ]


def logprobs_body(logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None

    def entry(token: str, value: float) -> dict[str, Any]:
        return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8", "replace"))}

    return {
        "content": [entry(p.token, p.logprob) | {"top_logprobs": [entry(t, v) for t, v in p.top]} for p in logprobs],
        "refusal": None,
    }


def completion_body(
    completion_id: str, model: str, created: int, response: ModelResponse, extension: dict[str, Any]
) -> dict[str, Any]:
    """A `chat.completion` for one model turn."""
    message: dict[str, Any] = {"role": "assistant", "content": content_of(response), "refusal": None}
    if response.message.tool_calls:
        message["tool_calls"] = tool_calls_body(response.message.tool_calls)
    return envelope(
        completion_id,
        model,
        created,
        message,
        finish_reason(response),
        response.usage,
        logprobs=logprobs_body(response.logprobs),
        extra={"mmagent": extension},
    )


@dataclass(slots=True)
class ChunkWriter:
    """Turns a backend's stream (text deltas, call deltas, the response) into `chat.completion.chunk` bodies.

    Calls streamed by the backend go out as they come (index, id and name first, then argument pieces);
    calls the backend did not stream are sent whole from the response. The response is authoritative: the
    ids sent are the ones the finished message carries.
    """

    completion_id: str
    model: str
    created: int
    ids: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    text: str = ""

    def start(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def text_delta(self, text: str) -> dict[str, Any]:
        self.text += text
        return self._chunk({"content": text})

    def call_delta(self, delta: ToolCallDelta) -> dict[str, Any] | None:
        if delta.index == len(self.ids) and delta.name is not None:
            self.ids.append(new_call_id())
            self.arguments.append(delta.arguments)
            call = {"index": delta.index, "id": self.ids[-1], "type": "function"}
            return self._chunk(
                {"tool_calls": [call | {"function": {"name": delta.name, "arguments": delta.arguments}}]}
            )
        if delta.index < len(self.ids) and delta.arguments:
            self.arguments[delta.index] += delta.arguments
            return self._chunk({"tool_calls": [{"index": delta.index, "function": {"arguments": delta.arguments}}]})
        return None  # out of order: the response will carry it

    def finish(self, response: ModelResponse) -> tuple[list[dict[str, Any]], Message, list[str]]:
        """The closing chunks, the assistant message with the ids sent, and any disagreement between what was
        streamed and the parsed response (empty when they agree)."""
        chunks: list[dict[str, Any]] = []
        problems: list[str] = []
        if not self.ids and not self.text and response.parse_errors and (content := content_of(response)):
            chunks.append(self._chunk({"content": content}))  # the raw text, as the non-streamed content
        calls = response.message.tool_calls
        for index, call in enumerate(calls):
            whole = json.dumps(call.arguments, ensure_ascii=False)
            if index >= len(self.ids):
                self.ids.append(new_call_id())
                self.arguments.append(whole)
                head = {"index": index, "id": self.ids[-1], "type": "function"}
                chunks.append(
                    self._chunk({"tool_calls": [head | {"function": {"name": call.name, "arguments": whole}}]})
                )
                continue
            try:
                same = json.loads(self.arguments[index]) == call.arguments
            except json.JSONDecodeError:
                same = False
            if not same:
                problems.append(f"call {index} was streamed as {self.arguments[index][:80]!r} but parsed otherwise")
        parts: list[Part] = [p for p in response.message.parts if not isinstance(p, ToolCallPart)]
        parts += [call.model_copy(update={"id": self.ids[i]}) for i, call in enumerate(calls)]
        chunks.append(self._chunk({}, finish_reason=finish_reason(response), logprobs=response.logprobs))
        return chunks, Message(role="assistant", parts=tuple(parts)), problems

    def usage(self, response: ModelResponse) -> dict[str, Any]:
        return chunk_body(
            self.completion_id, self.model, self.created, None, extra={"usage": usage_body(response.usage)}
        )

    def _chunk(
        self,
        delta: dict[str, Any],
        *,
        finish_reason: str | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        body = chunk_body(self.completion_id, self.model, self.created, delta, finish_reason=finish_reason)
        if logprobs is not None:
            body["choices"][0]["logprobs"] = logprobs_body(logprobs)
        return body
