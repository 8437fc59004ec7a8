"""Typed events yielded by `Agent.run_stream`, and the result of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic

from typing_extensions import TypeVar

from agent.messages import Message, RetryPart, ToolCallPart, ToolResultPart
from agent.models import ModelResponse, Usage

__all__ = [
    "AgentEvent",
    "FinalEvent",
    "ModelResponseEvent",
    "PartialOutputEvent",
    "RetryEvent",
    "RunResult",
    "TextDeltaEvent",
    "ToolCallEvent",
    "ToolProgressEvent",
    "ToolResultEvent",
    "UsageEvent",
]


OutputT = TypeVar("OutputT", default=str)
"""The type of `RunResult.output`: `str`, or the agent's `output_type`."""


@dataclass(frozen=True, slots=True)
class RunResult(Generic[OutputT]):
    """The outcome of a run.

    Attributes:
        output: the final answer: the assistant's text, or with `Agent(output_type=T)` a validated `T`.
        messages: the whole transcript sent to and received from the model (system prompt included).
        new_messages: the messages this run added (its user turn onwards).
        usage: tokens and requests summed over the run.
        run_id: id of the run in memory (None without a store).
        conversation_id: id of the conversation in memory (None without a store).
        model_name: which model produced the answer.
    """

    output: OutputT
    messages: list[Message]
    new_messages: list[Message]
    usage: Usage
    run_id: str | None = None
    conversation_id: str | None = None
    model_name: str = ""


@dataclass(frozen=True, slots=True)
class TextDeltaEvent:
    """Assistant text as it is generated."""

    text: str
    step: int


@dataclass(frozen=True, slots=True)
class ModelResponseEvent:
    """A complete model turn (after its deltas)."""

    response: ModelResponse
    step: int


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The model asked for a call; it starts now."""

    call: ToolCallPart
    step: int


@dataclass(frozen=True, slots=True)
class ToolProgressEvent:
    """A running call reported how far it got (an MCP server's progress notification, or `ToolContext.progress`).

    Attributes:
        call_id: the call.
        progress: how much is done (units are the tool's).
        total: how much there is in all, when known.
        message: what it is doing, when it says.
    """

    call_id: str
    progress: float
    total: float | None
    message: str | None
    step: int


@dataclass(frozen=True, slots=True)
class ToolResultEvent:
    """A call finished (or was denied)."""

    result: ToolResultPart
    step: int


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A retry request goes back to the model (bad arguments, unknown tool, tool failure, bad output)."""

    retry: RetryPart
    step: int


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """Usage so far in this run, after each model response."""

    usage: Usage
    step: int


@dataclass(frozen=True, slots=True)
class PartialOutputEvent:
    """With `Agent(output_type=T)`, while the answer streams: the JSON so far validated as a partial `T` (its
    last string or list may still grow; fields not yet written take their defaults). Sent when it changes."""

    output: Any
    step: int


@dataclass(frozen=True, slots=True)
class FinalEvent:
    """The run finished with an answer."""

    result: RunResult[Any]
    step: int = field(default=0)


AgentEvent = (
    TextDeltaEvent
    | ModelResponseEvent
    | ToolCallEvent
    | ToolProgressEvent
    | ToolResultEvent
    | RetryEvent
    | UsageEvent
    | PartialOutputEvent
    | FinalEvent
)
