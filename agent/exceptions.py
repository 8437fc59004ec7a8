"""Every error mmagent raises, in one tree.

```
MMAgentError                      base of everything below
├── UserError                     the caller misused the API (bad argument, bad media, bad config)
│   ├── ToolDefinitionError       a tool's signature or schema cannot be used; raised once, at registration
│   └── MediaError                an image or audio clip cannot be read, or is over a size limit
├── ModelError                    the model backend failed
│   ├── ModelLoadError            weights missing or unreadable; the message says what to pass instead
│   ├── ModelHTTPError            an OpenAI-compatible server answered with an error or not at all
│   └── ContextOverflowError      the prompt cannot fit the model's context, even after eviction
├── RunError                      an agent run stopped before a final answer; `.messages` holds the transcript
│   ├── RetryBudgetExceeded       the model kept producing unusable calls past the retry budget
│   ├── MaxStepsExceeded          the run used all its steps
│   ├── UsageLimitExceeded        a token or request limit was reached
│   └── ApprovalRequired          the run paused: calls wait for a person (`agent.resume(run_id, approvals=...)`)
└── StoreError                    the memory store failed
    ├── SchemaVersionError        the database was written by a newer mmagent
    └── ConversationBusyError     another run holds the conversation's lease (a conflict: retry later)

ToolArgumentsError                arguments from a model do not match a tool's schema (an MMAgentError)
ModelRetry                        raised *by a tool* to ask the model to try again; control flow, not a failure
```

Validation errors and `ModelRetry` never leave the agent loop while a retry budget remains: they go back to
the model as a retry request. Backend-specific failures (CUDA out of memory, HTTP errors, missing files) are
mapped into this tree at the backend seam, so callers catch `MMAgentError` subclasses, never torch's or httpx's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime as dt

    from agent.messages import Message, ToolCallPart

__all__ = [
    "ApprovalRequired",
    "ContextOverflowError",
    "ConversationBusyError",
    "MMAgentError",
    "MaxStepsExceeded",
    "MediaError",
    "ModelError",
    "ModelHTTPError",
    "ModelLoadError",
    "ModelRetry",
    "RetryBudgetExceeded",
    "RunError",
    "SchemaVersionError",
    "StoreError",
    "ToolArgumentsError",
    "ToolDefinitionError",
    "UsageLimitExceeded",
    "UserError",
]


class MMAgentError(Exception):
    """Base class of every error raised by mmagent."""


class UserError(MMAgentError):
    """The caller misused the API: fix the call, not the model."""


class ToolDefinitionError(UserError):
    """A tool cannot be registered. The message lists every problem found, naming function and parameter."""

    def __init__(self, tool_name: str, problems: Sequence[str]) -> None:
        self.tool_name = tool_name
        self.problems = tuple(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"tool {tool_name!r} cannot be registered:\n{listed}")


class MediaError(UserError):
    """An image or audio input cannot be decoded, has an unsupported format, or exceeds a size limit."""


class ModelError(MMAgentError):
    """The model backend failed."""


class ModelLoadError(ModelError):
    """Weights or processor files could not be loaded."""


class ModelHTTPError(ModelError):
    """An OpenAI-compatible server returned an error status, or could not be reached."""

    def __init__(self, message: str, *, status_code: int | None = None, body: str | None = None) -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(message)


class ContextOverflowError(ModelError):
    """The request cannot fit in the model's context window."""


class RunError(MMAgentError):
    """A run ended without a final answer. `messages` is the transcript up to the failure."""

    def __init__(self, message: str, messages: Sequence[Message] = ()) -> None:
        self.messages: list[Message] = list(messages)
        super().__init__(message)


class RetryBudgetExceeded(RunError):
    """A tool (or the model's output format) needed more retries than its budget allows."""


class MaxStepsExceeded(RunError):
    """The run reached `max_steps` model requests without a final answer."""


class UsageLimitExceeded(RunError):
    """A usage limit (requests, tokens, tool calls) was reached."""


class ApprovalRequired(RunError):
    """The run paused before calls of tools marked `requires_approval`, with no approver to ask: it is stored as
    `paused` and continues, from any process, with `agent.resume(run_id, approvals={call_id: True | Deny(...)})`.

    Attributes:
        run_id: the paused run.
        calls: the calls waiting for a decision (`ToolCallPart`s: id, tool name, arguments).
    """

    def __init__(self, run_id: str, calls: Sequence[ToolCallPart], messages: Sequence[Message] = ()) -> None:
        self.run_id = run_id
        self.calls: tuple[ToolCallPart, ...] = tuple(calls)
        names = ", ".join(f"{c.name} ({c.id})" for c in self.calls)
        super().__init__(f"run {run_id} paused: {names} wait(s) for approval", messages)


class StoreError(MMAgentError):
    """The memory store failed."""


class SchemaVersionError(StoreError):
    """The store's schema is newer than this version of mmagent understands."""


class ConversationBusyError(StoreError):
    """A conversation is in use by another run: its history takes one run at a time.

    Raised when a run (or `Store.append`) waited `lease_wait` seconds for another run's lease on the
    conversation, and when a run lost its lease (it lapsed and another run or append wrote to the
    conversation), so continuing would interleave two runs' messages. Retrying later may succeed.

    Attributes:
        conversation_id: the conversation.
        run_id: the run holding the lease, or that wrote after the lapsed run (None: a plain append).
        expires_at: when that lease expires unless renewed (aware, UTC); None when no lease is held.
    """

    def __init__(
        self, message: str, *, conversation_id: str, run_id: str | None, expires_at: dt.datetime | None
    ) -> None:
        self.conversation_id = conversation_id
        self.run_id = run_id
        self.expires_at = expires_at
        super().__init__(message)


class ToolArgumentsError(MMAgentError):
    """Arguments do not validate against a tool's schema. `message` is written for the model to act on."""

    def __init__(self, tool_name: str, message: str) -> None:
        self.tool_name = tool_name
        self.message = message
        super().__init__(f"{tool_name}: {message}")


class ModelRetry(Exception):
    """Raise from a tool to send `message` back to the model and let it try again."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)
