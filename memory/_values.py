"""What the store's read methods return (plain frozen records; messages themselves stay `agent.messages`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.models import Usage

SearchKind = Literal["text", "tool-result"]
RunStatus = Literal["running", "completed", "failed", "paused", "interrupted"]


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    """A stored conversation, without its messages.

    Attributes:
        id: the conversation's id.
        title: a title (by default the first line of the first user text, cut to 80 characters).
        metadata: the application's JSON object for this conversation.
        created_at: when it was created (aware, UTC).
        updated_at: when a message, run or field last changed (aware, UTC).
        message_count: how many messages it holds.
    """

    id: str
    title: str | None
    metadata: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    message_count: int


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A stored run.

    Attributes:
        id: the run's id.
        conversation_id: the conversation it appended to.
        status: `running` (in progress, or interrupted: resumable), `completed`, `failed`, or `paused` (calls wait
            for approval: resume with `Agent.resume(run_id, approvals=...)`).
        model_name: the model's name when the run began.
        system_prompt: the system prompt it ran with.
        error: why it failed, for failed runs.
        usage: cumulative usage up to the last committed step.
        steps: how many step phases were committed.
        created_at: when it began (aware, UTC).
        updated_at: when it last committed (aware, UTC).
        finished_at: when it completed or failed.
        parent_run_id: the run whose tool started this one (`Agent.as_tool`), or None.
    """

    id: str
    conversation_id: str
    status: RunStatus
    model_name: str
    system_prompt: str | None
    error: str | None
    usage: Usage
    steps: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    parent_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One part that matched a `Store.search` query.

    Attributes:
        conversation_id: the conversation holding the part.
        message_index: the message's position in the conversation (0-based, as `load_conversation` lists it).
        role: the message's role.
        kind: `text` for a message's own text, `tool-result` for text a tool returned.
        text: the part's whole text.
        snippet: up to ~240 characters around the first matching term.
        score: relevance, higher is better (comparable within one query only).
        created_at: when the message was stored (aware, UTC).
        run_id: the run that added the message, if any.
        tool_name: for `tool-result` hits, the tool that returned the text.
        media: sha256 hashes of the images and audio stored with the hit (the same tool result, or the same
            message for a message's own text); `Store.artifact(sha256)` gives the part back.
    """

    conversation_id: str
    message_index: int
    role: str
    kind: SearchKind
    text: str
    snippet: str
    score: float
    created_at: dt.datetime
    run_id: str | None = None
    tool_name: str | None = None
    media: tuple[str, ...] = field(default=())
