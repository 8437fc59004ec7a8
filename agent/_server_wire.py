"""Wire format of `agent.server`: the request schema, OpenAI-style bodies and errors, and the run summary."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.responses import JSONResponse

from agent.events import AgentEvent, FinalEvent, ModelResponseEvent, RetryEvent, ToolCallEvent, ToolResultEvent
from agent.exceptions import (
    ApprovalRequired,
    ContextOverflowError,
    ConversationBusyError,
    MMAgentError,
    ModelError,
    ModelHTTPError,
    RunError,
    StoreError,
    UserError,
)
from agent.messages import Message, from_openai
from agent.models import ModelSettings, Usage

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "not_found_error",
    "conflict_error",
    "upstream_error",
    "server_error",
]
_RESULT_EXCERPT = 1000


class HTTPProblem(Exception):
    """An error answered with an OpenAI-style body: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.extra = extra or {}
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error | self.extra}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def problem_for(exc: BaseException) -> HTTPProblem:
    """Map an error from a run onto an HTTP status and a message for the client."""
    name = _snake(type(exc).__name__)
    if isinstance(exc, HTTPProblem):
        return exc
    if isinstance(exc, ContextOverflowError):
        return HTTPProblem(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, ConversationBusyError):  # another run holds the stored conversation: try again later
        wait = 1
        if exc.expires_at is not None:
            wait = max(1, math.ceil((exc.expires_at - dt.datetime.now(dt.UTC)).total_seconds()))
        return HTTPProblem(
            409, str(exc), type="conflict_error", code="conversation_busy", headers={"Retry-After": str(wait)}
        )
    if isinstance(exc, ApprovalRequired):  # the run is stored as paused: decide at /v1/runs/{run_id}/approvals
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in exc.calls]
        return HTTPProblem(
            409, str(exc), type="conflict_error", code="approval_required", extra={"run_id": exc.run_id, "calls": calls}
        )
    if isinstance(exc, UserError):
        return HTTPProblem(400, str(exc), code=name)
    if isinstance(exc, ModelHTTPError):
        return HTTPProblem(502, f"the model server failed: {exc}", type="upstream_error", code=name)
    if isinstance(exc, ModelError | RunError | StoreError | MMAgentError):
        return HTTPProblem(500, f"{type(exc).__name__}: {exc}", type="server_error", code=name)
    return HTTPProblem(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


# ---------------------------------------------------------------- the request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatField(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(BaseModel):
    """A chat-completions request. Every field OpenAI defines is either honoured, accepted because it does not
    change the output (`user`, `metadata`, `store`, ...), or refused with a 400 naming it (see `UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatField | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: int | None = Field(default=None, ge=1)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    def uses_client_tools(self) -> bool:
        """Whether the request is for a plain model endpoint: it brings tools, asks for a format, or holds tool
        turns of the client's own agent."""
        if self.tools or self.logprobs or (self.response_format is not None and self.response_format.type != "text"):
            return True
        if self.tool_choice is not None and self.tool_choice != "auto":
            return True
        return any(m.get("role") == "tool" or m.get("tool_calls") for m in self.messages if isinstance(m, dict))


# Fields that do not change what is generated: accepted and not acted on.
_INERT = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
)
# Fields accepted only at their neutral value (so a client that always sends the default is served).
_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "modalities": ["text"],
    "function_call": "auto",
}
UNSUPPORTED = "audio output, prediction, web search, penalties, logit_bias, n > 1 and the legacy `functions`"

MAX_JSON_DEPTH = 64
"""How deeply a request body may nest JSON (tool schemas included); deeper bodies get a 400."""


def parse_approvals(body: bytes) -> dict[str, Any]:
    """`{"approvals": {call_id: true | false | {"deny": "reason"}}}` -> decisions for `Agent.resume`."""
    from tools import Deny

    data = _json_object(body)
    approvals = data.get("approvals")
    if not isinstance(approvals, dict) or not approvals:
        raise HTTPProblem(400, 'the body must hold "approvals": {call_id: true | false | {"deny": reason}}')
    decisions: dict[str, Any] = {}
    for call_id, decision in approvals.items():
        if isinstance(decision, bool):
            decisions[call_id] = decision
        elif isinstance(decision, dict) and set(decision) == {"deny"} and isinstance(decision["deny"], str):
            decisions[call_id] = Deny(decision["deny"][:2000])
        else:
            raise HTTPProblem(400, f'approvals[{call_id!r}] must be true, false or {{"deny": reason}}')
    return decisions


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise HTTPProblem(400, f"the request body is not UTF-8 text: {exc}", code="invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise HTTPProblem(
            400,
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from exc
    except RecursionError as exc:
        raise HTTPProblem(
            400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise HTTPProblem(400, f"the request body must be a JSON object, got {type(data).__name__}")
    check_json_value(data)
    return data


def parse_request(body: bytes) -> ChatRequest:
    """Decode and validate a request body; a `HTTPProblem` (400) says what is wrong."""
    data = _json_object(body)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise HTTPProblem(400, f"invalid request: {problems}", param=str(first[0]) if first else None) from exc
    if request.n not in (None, 1):
        raise HTTPProblem(400, "only n=1 is supported", param="n")
    refused = [
        key
        for key, value in (request.model_extra or {}).items()
        if value is not None and key not in _INERT and not (key in _NEUTRAL and value == _NEUTRAL[key])
    ]
    if refused:
        names = ", ".join(f"`{k}`" for k in sorted(refused))
        raise HTTPProblem(
            400,
            f"unsupported parameter{'s' if len(refused) > 1 else ''} {names}: this server does not implement "
            f"{UNSUPPORTED}; remove {'them' if len(refused) > 1 else 'it'} (nothing is silently ignored)",
            param=sorted(refused)[0],
            code="unsupported_parameter",
        )
    if request.response_format is not None and request.response_format.type == "json_schema":
        spec = request.response_format.json_schema
        if spec is None or spec.schema_ is None:
            raise HTTPProblem(400, "response_format json_schema needs `json_schema.schema`", param="response_format")
    if request.top_logprobs is not None and not request.logprobs:
        raise HTTPProblem(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return request


def check_json_value(data: Any) -> None:
    """Refuse JSON nested deeper than `MAX_JSON_DEPTH` and strings that are not valid Unicode (a lone surrogate
    such as `"\\ud800"`, which no database or tokenizer can take), naming where; iterative, so a hostile body
    cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise HTTPProblem(
                        400,
                        f"{where or 'the body'} holds a string that is not valid Unicode (a lone surrogate at "
                        f"character {exc.start})",
                        param=where.split(".")[0].split("[")[0] or None,
                    ) from exc
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise HTTPProblem(
                400, f"{where or 'the body'} nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, where, depth + 1))
                stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))
        else:
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def check_agent_request(request: ChatRequest) -> None:
    """Refuse what only the model mode serves (client tools, tool turns, response formats)."""
    if request.tools:
        raise HTTPProblem(
            400,
            "this endpoint runs the agent's own tools server-side; client-side `tools` are served in model mode "
            "(`mmagent serve --mode model`, or the default `--mode auto`)",
            param="tools",
        )
    if request.tool_choice not in (None, "auto", "none"):
        raise HTTPProblem(400, "tool_choice may only be 'auto' or 'none' (tools run server-side)", param="tool_choice")
    if request.response_format is not None and request.response_format.type != "text":
        raise HTTPProblem(400, "response_format is served in model mode, not by the agent", param="response_format")
    if request.logprobs:
        raise HTTPProblem(400, "logprobs are served in model mode, not by the agent", param="logprobs")


def split_messages(request: ChatRequest) -> tuple[list[Message], Message]:
    """(history, prompt): the request's messages with the last one, a user turn, as the prompt."""
    try:
        messages = from_openai(request.messages)
    except UserError as exc:
        raise HTTPProblem(400, str(exc), param="messages") from exc
    if not messages or messages[-1].role != "user":
        role = messages[-1].role if messages else "none"
        raise HTTPProblem(400, f"the last message must come from the user, got role {role!r}", param="messages")
    if not messages[-1].parts:
        raise HTTPProblem(400, "the last user message is empty", param="messages")
    return messages[:-1], messages[-1]


def settings_for(request: ChatRequest, base: ModelSettings) -> ModelSettings:
    """The agent's settings with the request's sampling fields applied."""
    changes: dict[str, Any] = {}
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    if request.temperature is not None:
        changes["temperature"] = request.temperature
    if request.top_p is not None:
        changes["top_p"] = request.top_p
    if request.seed is not None:
        changes["seed"] = request.seed
    if request.stop is not None:
        changes["stop"] = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
    if request.tool_choice == "none":
        changes["tool_choice"] = "none"
    return replace(base, **changes)


# ---------------------------------------------------------------- responses


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


@dataclass(slots=True)
class RunSummary:
    """What a run did, gathered from its events, for the `mmagent` extension field."""

    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    retries: int = 0
    finish_reason: str = "stop"
    final: FinalEvent | None = None

    def add(self, event: AgentEvent) -> None:
        if isinstance(event, ToolCallEvent):
            call = event.call
            self.calls[call.id] = {
                "id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "step": event.step,
                "is_error": False,
                "result": None,
            }
        elif isinstance(event, ToolResultEvent):
            entry = self.calls.get(event.result.call_id)
            if entry is not None:
                entry["is_error"] = event.result.is_error
                entry["result"] = _clip(event.result.text, _RESULT_EXCERPT)
        elif isinstance(event, RetryEvent):
            self.retries += 1
            entry = self.calls.get(event.retry.call_id or "")
            if entry is not None:
                entry["is_error"] = True
                entry["result"] = _clip(event.retry.message, _RESULT_EXCERPT)
        elif isinstance(event, ModelResponseEvent):
            self.finish_reason = "length" if event.response.finish_reason == "length" else "stop"
        elif isinstance(event, FinalEvent):
            self.final = event

    def extension(self) -> dict[str, Any]:
        result = self.final.result if self.final is not None else None
        return {
            "conversation_id": result.conversation_id if result else None,
            "run_id": result.run_id if result else None,
            "model": result.model_name if result else None,
            "requests": result.usage.requests if result else 0,
            "tool_calls": list(self.calls.values()),
            "retries": self.retries,
        }


def envelope(
    completion_id: str,
    model: str,
    created: int,
    message: dict[str, Any],
    finish_reason: str,
    usage: Usage,
    *,
    logprobs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `chat.completion` body with one choice (both modes answer with it)."""
    choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_body(usage),
    }
    return body | (extra or {})


def completion_body(completion_id: str, model: str, created: int, summary: RunSummary) -> dict[str, Any]:
    """A `chat.completion` with the run's final text, plus `conversation_id` and the `mmagent` extension."""
    assert summary.final is not None
    result = summary.final.result
    extra: dict[str, Any] = {"mmagent": summary.extension()}
    if result.conversation_id is not None:
        extra["conversation_id"] = result.conversation_id
    message = {"role": "assistant", "content": result.output}
    return envelope(completion_id, model, created, message, summary.finish_reason, result.usage, extra=extra)


def chunk_body(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    *,
    finish_reason: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if extra:
        body.update(extra)
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def now() -> int:
    return int(time.time())


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
