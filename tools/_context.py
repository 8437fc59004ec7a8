"""The context a tool may ask for by annotating its first parameter with `ToolContext`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.models import Usage


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Facts about the call in progress, handed to tools that ask for them.

    Attributes:
        call_id: id of the tool call being run.
        tool_name: the tool's registered name.
        step: index of the model request that produced the call (0-based).
        run_id: the run's id in memory, when the agent has a store.
        conversation_id: the conversation's id in memory, when the agent has a store.
        deps: whatever the application passed as `Agent.run(..., deps=...)`.
        memory: the agent's memory store, or None.
        progress: `progress(done, total, message)` reports how far the call got (an agent turns it into a
            `ToolProgressEvent`); None when nobody listens.
        add_usage: `add_usage(usage)` adds model usage the tool caused (a delegated agent's run) to the calling
            run's usage, so limits and totals count it; None outside an agent run.
    """

    call_id: str
    tool_name: str
    step: int = 0
    run_id: str | None = None
    conversation_id: str | None = None
    deps: Any = None
    memory: Any = None
    progress: Callable[[float, float | None, str | None], None] | None = None
    add_usage: Callable[[Usage], None] | None = None
