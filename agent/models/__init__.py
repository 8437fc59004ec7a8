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
from typing import Literal

from agent.messages import Message, Part, ToolDefinition

__all__ = [
    "Model",
    "ModelResponse",
    "ModelSettings",
    "ParsedCompletion",
    "TextDelta",
    "ToolChoice",
    "Usage",
]

ToolChoice = Literal["auto", "required", "none"] | str
"""`auto` (text or calls), `required` (at least one call), `none` (text only), or a tool name."""


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Generation settings a backend honours where it can."""

    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tool_choice: ToolChoice = "auto"
    stop: tuple[str, ...] = ()


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
class ModelResponse:
    """One model turn: the parsed assistant message and what it cost."""

    message: Message
    usage: Usage = field(default_factory=lambda: Usage(requests=1))
    model_name: str = ""
    raw_text: str | None = None
    parse_errors: tuple[str, ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedCompletion:
    """A parser's reading of raw model text: parts for the assistant message, and what could not be read."""

    parts: tuple[Part, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of assistant text, streamed as it is generated."""

    text: str


class Model(abc.ABC):
    """A model backend."""

    #: Context window in tokens, or None when unknown.
    context_length: int | None = None

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
    ) -> AsyncIterator[TextDelta | ModelResponse]:
        """Yield text deltas as they come, then the `ModelResponse`. The default streams nothing early."""
        response = await self.request(messages, tools, settings)
        if response.message.text:
            yield TextDelta(response.message.text)
        yield response

    def count_tokens(self, messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> int:
        """Exact prompt length in tokens, without running the model. Backends that know it override this."""
        raise NotImplementedError(f"{type(self).__name__} cannot count tokens")
