"""What the agent loop needs from a memory store and from a context policy (structural types).

`memory.Store` implements `RunStore`; `agent.context.ContextPolicy` implements `ContextFitter`. Any object
with the same methods can stand in for them.

A run holds its conversation's *lease* from `begin_run` (or `resume_run`) to `end_run` (or `release`), so two
runs never interleave their messages. The loop renews it with every commit, and from a heartbeat every third
of `lease_ttl` while a model request or tool takes longer; it releases it when the run is cancelled.
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
    lease_ttl: float | None = None  # seconds the run's lease lasts after each renewal; None: no lease


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run as committed, for `Agent.resume`."""

    run_id: str
    conversation_id: str
    status: Literal["running", "completed", "failed", "paused", "interrupted"]
    messages: list[Message]  # the conversation up to the last committed step (no system prompt)
    new_message_count: int  # how many of `messages` this run added
    next_step: int
    usage: Usage
    lease_ttl: float | None = None  # set by `resume_run`, which took the lease; None from `load_run`


class RunStore(Protocol):
    """Persistence for runs. Each method is one transaction; the loop calls them from a worker thread.

    Methods that take or hold a conversation's lease raise `ConversationBusyError` when another run has it.
    """

    def begin_run(
        self,
        *,
        conversation_id: str | None,
        new_messages: Sequence[Message],
        model_name: str,
        system_prompt: str | None,
        parent_run_id: str | None = None,
    ) -> StartedRun:
        """Take the conversation's lease (waiting for a busy one, as the store is configured), create the run
        (and the conversation when `conversation_id` is None) and commit the new messages. `parent_run_id`: the
        run whose tool started this one (delegation); the agent passes it only when there is one."""
        ...

    def resume_run(self, run_id: str) -> StoredRun:
        """Take the lease of the run's conversation (waiting as `begin_run` does) and return everything needed
        to continue the run from its last committed step. A completed run raises `UserError`."""
        ...

    def commit_step(self, run_id: str, step: int, phase: Phase, messages: Sequence[Message], usage: Usage) -> None:
        """Commit one phase of a step: the model's response, or the tool results. `usage` is cumulative.
        Renews the run's lease in the same transaction."""
        ...

    def renew(self, run_id: str) -> None:
        """Extend the run's lease by the store's TTL (a heartbeat while a long step runs)."""
        ...

    def release(self, run_id: str) -> None:
        """Give up the run's lease without changing its status (it stays resumable)."""
        ...

    def end_run(
        self, run_id: str, status: Literal["completed", "failed", "paused", "interrupted"], error: str | None = None
    ) -> None:
        """Mark the run finished, paused for approvals (resumable), or interrupted by the user (a voice answer cut
        short: not resumable), and release its lease."""
        ...

    def load_run(self, run_id: str) -> StoredRun:
        """Everything needed to continue a run from its last committed step (read only: takes no lease)."""
        ...


class ContextFitter(Protocol):
    """Makes a history fit the model's context before each request."""

    def fit(self, messages: Sequence[Message], tools: Sequence[ToolDefinition], model: Model) -> list[Message]:
        """Return the messages to send: within budget, tool calls and results kept in pairs."""
        ...
