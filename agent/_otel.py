"""The spans behind `agent.tracing`: imported by `enable()` only, so `import agent` never loads opentelemetry.

Conventions: OpenTelemetry GenAI semantic conventions v1.41 (`gen_ai.provider.name`, not the older
`gen_ai.system`; content as the JSON messages of `gen_ai.input.messages` / `gen_ai.output.messages`).

| span | kind | parent |
|---|---|---|
| `invoke_agent {agent name}` (or `invoke_agent`) | INTERNAL | the caller's current span |
| `chat {model}` | CLIENT for `OpenAIModel`, INTERNAL in process | the run |
| `execute_tool {tool}` | INTERNAL, current while the tool runs | the run |

Parents are passed explicitly, never through the current context of the loop's generators (a context attached
across a `yield` would leak into the consumer); a tool's span is attached inside the task that runs the call,
so spans the tool makes itself nest under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from agent.events import AgentEvent
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    Part,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolDefinition,
    ToolResultPart,
)
from agent.models import Model, ModelResponse, ModelSettings, TextDelta, ToolCallDelta

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from opentelemetry.util.types import AttributeValue

    from agent._loop import Agent, _RunState
    from tools._registry import Registry, Tool

SCHEMA_URL = "https://opentelemetry.io/schemas/1.41.0"

# attribute names (GenAI semantic conventions)
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
AGENT_NAME = "gen_ai.agent.name"
CONVERSATION_ID = "gen_ai.conversation.id"
REQUEST_MODEL = "gen_ai.request.model"
MAX_TOKENS = "gen_ai.request.max_tokens"
TEMPERATURE = "gen_ai.request.temperature"
TOP_P = "gen_ai.request.top_p"
SEED = "gen_ai.request.seed"
STOP_SEQUENCES = "gen_ai.request.stop_sequences"
OUTPUT_TYPE = "gen_ai.output.type"
RESPONSE_MODEL = "gen_ai.response.model"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_TYPE = "gen_ai.tool.type"
TOOL_DESCRIPTION = "gen_ai.tool.description"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
RUN_ID = "mmagent.run.id"
# opt-in content
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
TOOL_DEFINITIONS = "gen_ai.tool.definitions"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"

_TOOL_FAILED = re.compile(r"the tool failed: ([A-Za-z_][\w.]*)")  # tools._registry's message for an exception


class Tracer:
    """Starts the spans of runs (one per `enable()`)."""

    def __init__(self, provider: TracerProvider | None, *, capture_content: bool) -> None:
        self.capture_content = capture_content
        self._tracer = trace.get_tracer("mmagent", _version(), tracer_provider=provider, schema_url=SCHEMA_URL)

    async def run(
        self, agent: Agent[Any], state: _RunState, events: AsyncIterator[AgentEvent]
    ) -> AsyncIterator[AgentEvent]:
        """`events` (the run) inside an `invoke_agent` span; `state.trace` gives the run's requests and calls
        their parent."""
        model = _ModelIdentity.of(agent.model)
        name = agent.name
        attributes: dict[str, AttributeValue] = {
            OPERATION: "invoke_agent",
            PROVIDER: model.provider,
            REQUEST_MODEL: model.request_model,
            **_settings_attributes(state.settings),
        }
        if isinstance(name, str) and name:
            attributes[AGENT_NAME] = name
        if state.conversation_id is not None:
            attributes[CONVERSATION_ID] = state.conversation_id
        if state.run_id is not None:
            attributes[RUN_ID] = state.run_id
        if self.capture_content:
            attributes.update(_content_attributes(state.messages[: state.first_new], state.messages[state.first_new :]))
        span = self._tracer.start_span(
            f"invoke_agent {name}" if isinstance(name, str) and name else "invoke_agent",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        )
        state.trace = RunTrace(self, span, model, state)
        try:
            async for event in events:
                yield event
        except GeneratorExit:  # the caller stopped reading: no error of the run's own
            raise
        except BaseException as exc:
            _fail(span, exc, type(exc).__qualname__, self.capture_content)
            raise
        else:
            last = state.messages[-1]
            if self.capture_content and last.role == "assistant":
                span.set_attribute(OUTPUT_MESSAGES, _dumps([_message(last)]))
        finally:
            span.set_attributes({INPUT_TOKENS: state.usage.input_tokens, OUTPUT_TOKENS: state.usage.output_tokens})
            span.end()


class RunTrace:
    """One traced run: the parent of its `chat` and `execute_tool` spans."""

    def __init__(self, tracer: Tracer, span: Span, model: _ModelIdentity, state: _RunState) -> None:
        self._tracer = tracer._tracer
        self._capture = tracer.capture_content
        self._context = trace.set_span_in_context(span)
        self._model = model
        self._state = state

    async def chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
        settings: ModelSettings,
        stream: AsyncIterator[TextDelta | ToolCallDelta | ModelResponse],
    ) -> AsyncIterator[TextDelta | ToolCallDelta | ModelResponse]:
        """A model request's `stream` inside a `chat {model}` span."""
        model = self._model
        attributes: dict[str, AttributeValue] = {
            OPERATION: "chat",
            PROVIDER: model.provider,
            REQUEST_MODEL: model.request_model,
            **_settings_attributes(settings),
        }
        if model.address is not None:
            attributes[SERVER_ADDRESS] = model.address
            if model.port is not None:
                attributes[SERVER_PORT] = model.port
        if self._state.conversation_id is not None:
            attributes[CONVERSATION_ID] = self._state.conversation_id
        if self._capture:
            attributes.update(_content_attributes(messages))
            if tools:
                attributes[TOOL_DEFINITIONS] = _dumps([_definition(d) for d in tools])
        span = self._tracer.start_span(
            f"chat {model.request_model}",
            context=self._context,
            kind=SpanKind.CLIENT if model.remote else SpanKind.INTERNAL,
            attributes=attributes,
        )
        response: ModelResponse | None = None
        try:
            async for item in stream:
                if isinstance(item, ModelResponse):
                    response = item
                yield item
        except GeneratorExit:
            raise
        except BaseException as exc:
            _fail(span, exc, type(exc).__qualname__, self._capture)
            raise
        else:
            if response is None:
                _fail(span, None, "no_response", self._capture)
            else:
                reason = response.finish_reason or ("tool_call" if response.message.tool_calls else "stop")
                span.set_attributes(
                    {
                        RESPONSE_MODEL: response.model_name or model.request_model,
                        FINISH_REASONS: [reason],
                        INPUT_TOKENS: response.usage.input_tokens,
                        OUTPUT_TOKENS: response.usage.output_tokens,
                    }
                )
                if self._capture:
                    span.set_attribute(OUTPUT_MESSAGES, _dumps([_message(response.message)]))
        finally:
            span.end()

    async def tool(
        self, call: ToolCallPart, registry: Registry, execution: Awaitable[ToolResultPart | RetryPart]
    ) -> ToolResultPart | RetryPart:
        """Await a tool call's `execution` inside an `execute_tool {tool}` span, current while it runs."""
        found = registry.get(call.name)
        attributes: dict[str, AttributeValue] = {
            OPERATION: "execute_tool",
            TOOL_NAME: call.name,
            TOOL_CALL_ID: call.id,
            TOOL_TYPE: _tool_type(found),
        }
        if found is not None and found.description:
            attributes[TOOL_DESCRIPTION] = found.description
        if self._capture:
            attributes[TOOL_ARGUMENTS] = _dumps(call.arguments)
        span = self._tracer.start_span(
            f"execute_tool {call.name}", context=self._context, kind=SpanKind.INTERNAL, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, self._context))  # this call's own task
        try:
            outcome = await execution
        except BaseException as exc:  # only the run's own cancellation gets here (the registry never raises)
            _fail(span, exc, type(exc).__qualname__, self._capture)
            raise
        else:
            if self._capture:
                result = _response(outcome)
                span.set_attribute(TOOL_RESULT, result if isinstance(result, str) else _dumps(result))
            error = _tool_error(outcome, found is not None)
            if error is not None:
                message = outcome.message if isinstance(outcome, RetryPart) else outcome.text
                _fail(span, None, error, self._capture, message)
            return outcome
        finally:
            otel_context.detach(token)
            span.end()


class _ModelIdentity:
    """What the conventions call the model's provider, its name, and where it is served."""

    __slots__ = ("address", "port", "provider", "remote", "request_model")

    def __init__(self, provider: str, request_model: str, address: str | None = None, port: int | None = None):
        self.provider = provider
        self.request_model = request_model
        self.address = address
        self.port = port
        self.remote = address is not None

    @classmethod
    def of(cls, model: Model) -> _ModelIdentity:
        module = type(model).__module__
        if module.startswith("agent.models.openai"):  # any OpenAI-compatible server (vLLM, mmagent serve)
            parts = urlsplit(str(getattr(model, "base_url", "")))
            port = None
            with contextlib.suppress(ValueError):
                port = parts.port
            return cls("openai", str(getattr(model, "model", model.name)), parts.hostname or "", port)
        if module.startswith("agent.models.transformers"):
            return cls("transformers", model.name)
        return cls("mmagent", model.name)  # test doubles and custom backends


def _version() -> str | None:
    try:
        return importlib.metadata.version("mmagent")
    except importlib.metadata.PackageNotFoundError:
        return None


def _settings_attributes(settings: ModelSettings) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        MAX_TOKENS: settings.max_tokens,
        TEMPERATURE: float(settings.temperature),
        TOP_P: float(settings.top_p),
    }
    if settings.seed is not None:
        attributes[SEED] = settings.seed
    if settings.stop:
        attributes[STOP_SEQUENCES] = list(settings.stop)
    if settings.response_format is not None:
        attributes[OUTPUT_TYPE] = "json"
    return attributes


def _fail(span: Span, exc: BaseException | None, error_type: str, capture: bool, message: str | None = None) -> None:
    """Status ERROR and `error.type`; the message (which may quote arguments or output) only with content."""
    span.set_attribute(ERROR_TYPE, error_type)
    if capture and exc is not None:
        span.record_exception(exc)
        message = message or str(exc)
    span.set_status(Status(StatusCode.ERROR, message if capture else None))


def _tool_error(outcome: ToolResultPart | RetryPart, known: bool) -> str | None:
    """A low-cardinality `error.type` for a call that did not give a result, or None."""
    if isinstance(outcome, ToolResultPart):
        if not outcome.is_error:
            return None
        return "denied" if outcome.text.startswith("Call denied") else "tool_error"
    if not known:
        return "unknown_tool"
    if outcome.message.startswith("the tool timed out"):
        return "timeout"
    failed = _TOOL_FAILED.match(outcome.message)
    if failed is not None:
        return failed.group(1)  # the exception's class
    return "tool_retry"  # ModelRetry, or arguments that do not match the schema


def _tool_type(found: Tool | None) -> str:
    if found is not None and getattr(found.function, "__module__", None) == "tools.mcp":
        return "extension"  # runs on an MCP server
    return "function"


# ---------------------------------------------------------------- content (opt-in), media as sha256 only

_digests: weakref.WeakKeyDictionary[ImagePart | AudioPart, str] = weakref.WeakKeyDictionary()


def _media(part: ImagePart | AudioPart) -> dict[str, Any]:
    """A `file` part naming the bytes by sha256 (the memory store's artifact key): never the bytes."""
    digest = _digests.get(part)
    if digest is None:
        digest = hashlib.sha256(part.data).hexdigest()
        _digests[part] = digest
    return {
        "type": "file",
        "modality": "image" if isinstance(part, ImagePart) else "audio",
        "mime_type": part.media_type,
        "file_id": f"sha256:{digest}",
    }


def _part(part: Part) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "content": part.text}
    if isinstance(part, ImagePart | AudioPart):
        return _media(part)
    if isinstance(part, ToolCallPart):
        return {"type": "tool_call", "id": part.id, "name": part.name, "arguments": part.arguments}
    if isinstance(part, ToolResultPart):
        return {"type": "tool_call_response", "id": part.call_id, "response": _response(part)}
    if part.call_id is not None:  # a retry for a call
        return {"type": "tool_call_response", "id": part.call_id, "response": part.message, "is_error": True}
    return {"type": "text", "content": part.message}


def _response(outcome: ToolResultPart | RetryPart) -> Any:
    """A tool's result: its text, or its parts when it holds media."""
    if isinstance(outcome, RetryPart):
        return outcome.message
    if all(isinstance(p, TextPart) for p in outcome.content):
        return outcome.text
    return [_part(p) for p in outcome.content]


def _message(message: Message) -> dict[str, Any]:
    return {"role": message.role, "parts": [_part(p) for p in message.parts]}


def _content_attributes(messages: Sequence[Message], new: Iterable[Message] | None = None) -> dict[str, AttributeValue]:
    """`gen_ai.system_instructions` and `gen_ai.input.messages` (of `new` when given, else of `messages`)."""
    system = [{"type": "text", "content": m.text} for m in messages if m.role == "system"]
    chat = [_message(m) for m in (messages if new is None else new) if m.role != "system"]
    attributes: dict[str, AttributeValue] = {INPUT_MESSAGES: _dumps(chat)}
    if system:
        attributes[SYSTEM_INSTRUCTIONS] = _dumps(system)
    return attributes


def _definition(definition: ToolDefinition) -> dict[str, Any]:
    return {
        "type": "function",
        "name": definition.name,
        "description": definition.description,
        "parameters": definition.parameters,
    }


def _dumps(value: Any) -> str:
    # Whatever is not JSON is named by its type: bytes never reach an attribute, not even as a repr.
    return json.dumps(value, ensure_ascii=False, default=lambda o: f"<{type(o).__name__}>")
