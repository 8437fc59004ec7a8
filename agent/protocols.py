"""What the agent loop needs from a memory store and from a context policy (structural types).

`memory.Store` implements `RunStore`; `agent.context.ContextPolicy` implements `ContextFitter`. Any object
with the same methods can stand in for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.messages import Message, ToolDefinition
from agent.models import Model, Usage

__all__ = ["ContextFitter", "RunStore", "StartedRun", "StoredRun"]

Phase = Literal["model", "tools"]


@dataclass(frozen=True, slots=True)
class StartedRun:
    """What `RunStore.begin_run` returns."""

    run_id: str
    conversation_id: str
    history: list[Message]  # the conversation's earlier messages, without the new ones


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run as committed, for `Agent.resume`."""

    run_id: str
    conversation_id: str
    status: Literal["running", "completed", "failed"]
    messages: list[Message]  # the conversation up to the last committed step (no system prompt)
    new_message_count: int  # how many of `messages` this run added
    next_step: int
    usage: Usage


class RunStore(Protocol):
    """Persistence for runs. Each method is one transaction; the loop calls them from a worker thread."""

    def begin_run(
        self,
        *,
        conversation_id: str | None,
        new_messages: Sequence[Message],
        model_name: str,
        system_prompt: str | None,
    ) -> StartedRun:
        """Create the run (and the conversation when `conversation_id` is None) and commit the new messages."""
        ...

    def commit_step(self, run_id: str, step: int, phase: Phase, messages: Sequence[Message], usage: Usage) -> None:
        """Commit one phase of a step: the model's response, or the tool results. `usage` is cumulative."""
        ...

    def end_run(self, run_id: str, status: Literal["completed", "failed"], error: str | None = None) -> None:
        """Mark the run finished."""
        ...

    def load_run(self, run_id: str) -> StoredRun:
        """Everything needed to continue a run from its last committed step."""
        ...


class ContextFitter(Protocol):
    """Makes a history fit the model's context before each request."""

    def fit(self, messages: Sequence[Message], tools: Sequence[ToolDefinition], model: Model) -> list[Message]:
        """Return the messages to send: within budget, tool calls and results kept in pairs."""
        ...
