"""The model seam: one async `request()` per backend, plus a streaming variant.

A backend receives the whole message history and the tool definitions, renders them in its own format,
runs the model, and parses the raw output back into an assistant `Message`. Output the backend cannot
parse never raises: it is reported in `ModelResponse.parse_errors` and the loop turns it into a retry.

Backends: `agent.models.transformers.TransformersModel` (Phi-4-multimodal and plain chat models, in
process), `agent.testing.FunctionModel` and `agent.testing.ReplayModel` (test doubles that ship with the
library). Heavy backends are imported from their own modules so `import agent` needs no torch.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.messages import Message, Part, ToolDefinition

__all__ = [
    "Model",
    "ModelResponse",
    "ModelSettings",
    "ParsedCompletion",
    "ResponseFormat",
    "TextDelta",
    "TokenLogprob",
    "ToolCallDelta",
    "ToolChoice",
    "Usage",
]

ToolChoice = Literal["auto", "required", "none"] | str
"""`auto` (text or calls), `required` (at least one call), `none` (text only), or a tool name."""


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The answer must be JSON (OpenAI's `response_format`): any object, or a value matching `schema`.

    Attributes:
        schema: a JSON schema the answer must match; None means any JSON object (`json_object`).
        name: the schema's name (OpenAI's `json_schema.name`).
        strict: the client asked for strict adherence; the grammar enforces the schema either way.
    """

    schema: dict[str, Any] | None = None
    name: str = "response"
    strict: bool = True

    def json_schema(self) -> dict[str, Any]:
        """The schema to enforce (`{"type": "object"}` for `json_object`)."""
        return self.schema if self.schema is not None else {"type": "object"}


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Generation settings a backend honours where it can.

    Attributes:
        max_tokens: the most tokens to generate.
        temperature: 0 decodes greedily.
        top_p: nucleus sampling mass.
        seed: makes sampling repeatable.
        tool_choice: `auto`, `required`, `none` or a tool name.
        stop: strings that end the output (not included in it).
        parallel_tool_calls: the model may call several tools in one turn (False: at most one call).
        response_format: the answer must be JSON (with tools and `auto`: that JSON, or calls).
        logprobs: None for none; 0 for the log probability of each generated token; k for the k most likely
            alternatives at each position too (see `ModelResponse.logprobs`).
    """

    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tool_choice: ToolChoice = "auto"
    stop: tuple[str, ...] = ()
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts. `prefill_tokens` is what the backend really computed (less than input with KV reuse)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prefill_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.requests + other.requests,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.prefill_tokens + other.prefill_tokens,
        )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token with its log probability, and the most likely alternatives at its position.

    Attributes:
        token: the token's text (a lone piece of a multi-byte character decodes as U+FFFD).
        logprob: its natural-log probability under the distribution it was sampled from.
        top: (token, logprob) of the most likely tokens at that position, best first.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """One model turn: the parsed assistant message and what it cost.

    Attributes:
        message: the assistant message (text and tool calls).
        usage: tokens and requests.
        model_name: the model that answered.
        raw_text: the completion as generated, markup included.
        parse_errors: why parts of the output could not be read as calls (the loop sends a retry).
        finish_reason: `stop`, `length` or `cancelled`.
        logprobs: per generated token, when `ModelSettings.logprobs` asked for them and the backend has them.
        steered_tokens: with grammar-constrained decoding in process, how many output tokens the grammar chose
            rather than the model (0 at temperature 0: free decoding writes the same output); None otherwise.
    """

    message: Message
    usage: Usage = field(default_factory=lambda: Usage(requests=1))
    model_name: str = ""
    raw_text: str | None = None
    parse_errors: tuple[str, ...] = ()
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    steered_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ParsedCompletion:
    """A parser's reading of raw model text: parts for the assistant message, and what could not be read."""

    parts: tuple[Part, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of assistant text, streamed as it is generated."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call, streamed as it is generated: first the call's name (with `arguments` empty),
    then pieces of its arguments' JSON text, which concatenate to the whole. The `ModelResponse` that ends
    the stream holds the parsed calls and is authoritative.

    Attributes:
        index: which call of the turn (0, 1, ...).
        name: the tool's name, on the first delta of a call only.
        arguments: the next piece of the arguments' JSON text.
    """

    index: int
    name: str | None = None
    arguments: str = ""


class Model(abc.ABC):
    """A model backend."""

    #: Context window in tokens, or None when unknown.
    context_length: int | None = None

    #: What the model reads besides text ("image", "audio"); a server refuses media it cannot read.
    input_modalities: frozenset[str] = frozenset({"text", "image", "audio"})

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A name saying which model runs (shown to users, stored with each run)."""

    @abc.abstractmethod
    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> ModelResponse:
        """Run the model on a history and return its parsed turn."""

    async def request_stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ToolCallDelta | ModelResponse]:
        """Yield text (and tool-call) deltas as they come, then the `ModelResponse`. The default streams the
        text at the end; callers that do not stream calls ignore `ToolCallDelta`s."""
        response = await self.request(messages, tools, settings)
        if response.message.text:
            yield TextDelta(response.message.text)
        yield response

    def count_tokens(self, messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> int:
        """Exact prompt length in tokens, without running the model. Backends that know it override this."""
        raise NotImplementedError(f"{type(self).__name__} cannot count tokens")
