"""Test doubles that ship with mmagent: drive the real loop without weights.

* `FunctionModel`: a Python function writes each model turn from the messages and tool definitions.
* `ReplayModel`: plays back recorded raw completions through a real backend's parser (Phi-4's by default),
  so golden outputs exercise exactly the parsing a live model would.

Both record every request they receive in `.requests`, so a test can assert what the model was sent.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.exceptions import ModelError
from agent.messages import Message, Part, TextPart, ToolCallPart, ToolDefinition
from agent.models import Model, ModelResponse, ModelSettings, ParsedCompletion, TextDelta, Usage

__all__ = ["AgentInfo", "FunctionModel", "ReplayModel", "call"]


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What a `FunctionModel` function is told besides the messages."""

    tools: list[ToolDefinition]
    settings: ModelSettings
    request_index: int


FunctionResult = ModelResponse | Message | str | Sequence[Part]
ModelFunction = Callable[[list[Message], AgentInfo], FunctionResult | Awaitable[FunctionResult]]

_ids = itertools.count()


def call(name: str, **arguments: Any) -> ToolCallPart:
    """A tool call with a fresh id, for scripting test models."""
    return ToolCallPart(id=f"call_{next(_ids)}", name=name, arguments=arguments)


def _estimate_tokens(messages: Sequence[Message]) -> int:
    """A rough count: words of text plus 8 per non-text part."""
    return sum(1 + (len(p.text.split()) if isinstance(p, TextPart) else 8) for m in messages for p in m.parts)


class _PrefixCount:
    """Counts a growing history in O(new messages): the agent loop only ever appends between requests."""

    def __init__(self) -> None:
        self._last: Message | None = None
        self._length = 0
        self._total = 0

    def __call__(self, messages: Sequence[Message]) -> int:
        n = self._length
        if not (0 < n <= len(messages) and messages[n - 1] is self._last):
            n, self._total = 0, 0
        self._total += _estimate_tokens(messages[n:])
        self._length, self._last = len(messages), (messages[-1] if messages else None)
        return self._total


class FunctionModel(Model):
    """A model whose turns come from `function(messages, info)`.

    `token_counter` and `context_length` let it stand in for a backend that counts tokens exactly.
    The function may return a `ModelResponse`, an assistant `Message`, a string (final text), or a list of
    parts (text and `ToolCallPart`s, see `agent.testing.call`); it may be async. Text is streamed word by word.
    `requests` and `infos` record what each request received.
    """

    def __init__(
        self,
        function: ModelFunction,
        *,
        name: str = "function-model",
        token_counter: Callable[[Sequence[Message], Sequence[ToolDefinition]], int] | None = None,
        context_length: int | None = None,
    ) -> None:
        self.function = function
        self._name = name
        self._token_counter = token_counter
        self.context_length = context_length
        self.requests: list[list[Message]] = []
        self.infos: list[AgentInfo] = []
        self._count = _PrefixCount()

    @property
    def name(self) -> str:
        return self._name

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> ModelResponse:
        history = list(messages)
        self.requests.append(history)
        info = AgentInfo(tools=list(tools), settings=settings, request_index=len(self.requests) - 1)
        self.infos.append(info)
        out = self.function(history, info)
        if inspect.isawaitable(out):
            out = await out
        if isinstance(out, ModelResponse):
            return out
        if isinstance(out, str):
            message = Message.assistant(out)
        elif isinstance(out, Message):
            message = out
        else:
            message = Message(role="assistant", parts=tuple(out))
        return ModelResponse(
            message=message,
            usage=Usage(requests=1, input_tokens=self._count(history), output_tokens=_estimate_tokens([message])),
            model_name=self._name,
        )

    def count_tokens(self, messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> int:
        """The `token_counter` given at construction (for context-policy tests)."""
        if self._token_counter is None:
            return super().count_tokens(messages, tools)
        return self._token_counter(messages, tools)

    async def request_stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ModelResponse]:
        response = await self.request(messages, tools, settings)
        for word in _chunks(response.message.text):
            yield TextDelta(word)
        yield response


def _chunks(text: str) -> Iterable[str]:
    start = 0
    for i, ch in enumerate(text):
        if ch == " " and i > start:
            yield text[start:i]
            start = i
    if start < len(text):
        yield text[start:]


Parser = Callable[[str], ParsedCompletion]


class ReplayModel(Model):
    """Plays back recorded raw completions, parsed by a real backend parser.

    Args:
        outputs: raw completion texts, one per request, in order.
        parser: turns raw text into parts and errors; default is Phi-4-multimodal's parser.
    """

    def __init__(self, outputs: Iterable[str], *, parser: Parser | None = None, name: str = "replay") -> None:
        self.outputs = list(outputs)
        self._parser = parser
        self._name = name
        self.requests: list[list[Message]] = []

    @property
    def name(self) -> str:
        return self._name

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> ModelResponse:
        index = len(self.requests)
        self.requests.append(list(messages))
        if index >= len(self.outputs):
            raise ModelError(f"ReplayModel has {len(self.outputs)} recorded outputs; request {index + 1} has none")
        raw = self.outputs[index]
        parser = self._parser
        if parser is None:
            from agent.models.phi4_format import parse_completion

            parser = parse_completion
        parsed = parser(raw)
        message = Message(role="assistant", parts=parsed.parts)
        return ModelResponse(
            message=message,
            usage=Usage(requests=1, input_tokens=_estimate_tokens(messages), output_tokens=len(raw.split())),
            model_name=self._name,
            raw_text=raw,
            parse_errors=parsed.errors,
        )
