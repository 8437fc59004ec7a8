"""Messages to rows and back. Media bytes leave the rows here: parts carry the artifact's sha256 only."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from agent.exceptions import MediaError, StoreError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    Part,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)

ContentPart = TextPart | ImagePart | AudioPart


@dataclass(slots=True)
class Artifact:
    """Bytes to store once, by hash."""

    sha256: str
    media_type: str
    data: bytes


@dataclass(slots=True)
class Encoded:
    """Rows for a batch of messages: one role and its part rows per message, and the artifacts they use."""

    roles: list[str] = field(default_factory=list)
    parts: list[list[dict[str, Any]]] = field(default_factory=list)
    artifacts: dict[str, Artifact] = field(default_factory=dict)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def encode(messages: Sequence[Message], max_artifact_bytes: int) -> Encoded:
    """Rows for `messages`. Raises `MediaError` when a media item is over `max_artifact_bytes`."""
    out = Encoded()
    for message in messages:
        rows: list[dict[str, Any]] = []
        for position, part in enumerate(message.parts):
            rows.append(_part_row(part, position, 0, out, max_artifact_bytes))
            if isinstance(part, ToolResultPart):
                for sub, item in enumerate(part.content, start=1):
                    rows.append(_part_row(item, position, sub, out, max_artifact_bytes))
        out.roles.append(message.role)
        out.parts.append(rows)
    return out


def _part_row(part: Part, position: int, sub: int, out: Encoded, limit: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "position": position,
        "sub": sub,
        "kind": part.kind,
        "text": None,
        "media_type": None,
        "payload": None,
        "artifact_sha256": None,
    }
    if isinstance(part, TextPart):
        row["text"] = part.text
    elif isinstance(part, ImagePart | AudioPart):
        if len(part.data) > limit:
            raise MediaError(
                f"{part.kind} of {_mib(len(part.data))} ({len(part.data)} bytes) is over the memory store's "
                f"per-artifact limit of {_mib(limit)}: downscale or trim it, or open the store with a larger "
                "Store(..., max_artifact_bytes=...)"
            )
        sha = hashlib.sha256(part.data).hexdigest()
        if sha not in out.artifacts:
            out.artifacts[sha] = Artifact(sha, part.media_type, part.data)
        row["media_type"] = part.media_type
        row["artifact_sha256"] = sha
    elif isinstance(part, ToolCallPart):
        row["payload"] = {"id": part.id, "name": part.name, "arguments": part.arguments}
    elif isinstance(part, ToolResultPart):
        row["payload"] = {"call_id": part.call_id, "name": part.name, **({"is_error": True} if part.is_error else {})}
    elif isinstance(part, RetryPart):
        row["text"] = part.message
        row["payload"] = {k: v for k, v in (("call_id", part.call_id), ("name", part.name)) if v is not None} or None
    else:  # pragma: no cover - the Part union is closed
        raise StoreError(f"cannot store a part of kind {part.kind!r}")
    return row


def media_part(media_type: str, data: bytes, kind: str | None = None) -> ImagePart | AudioPart:
    """An image or audio part from stored bytes (`kind` from the part row, else from the media type)."""
    if (kind or media_type.split("/")[0]) == "audio":
        return AudioPart(data=data, media_type=media_type)
    return ImagePart(data=data, media_type=media_type)


def _payload(raw: Any) -> dict[str, Any]:
    """The payload column, read raw (JSON text on SQLite, already parsed by psycopg on PostgreSQL)."""
    if raw is None:
        return {}
    value = json.loads(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(value, dict):
        raise StoreError(f"corrupt memory store: a part payload is {type(value).__name__}, not an object")
    return value


_MESSAGES: TypeAdapter[list[Message]] = TypeAdapter(list[Message])


def _part(
    kind: str, text: str | None, media_type: str | None, payload: Any, sha: str | None, blobs: Mapping[str, bytes]
) -> dict[str, Any]:
    if kind == "text":
        return {"kind": kind, "text": text}
    if kind in ("image", "audio"):
        return {"kind": kind, "data": blobs[sha or ""], "media_type": media_type}
    values = _payload(payload)
    if kind == "tool-call":
        return {"kind": kind, "id": values.get("id"), "name": values.get("name"), "arguments": values.get("arguments")}
    if kind == "tool-result":
        return {
            "kind": kind,
            "call_id": values.get("call_id"),
            "name": values.get("name"),
            "is_error": values.get("is_error", False),
            "content": [],
        }
    if kind == "retry":
        return {"kind": kind, "message": text, "call_id": values.get("call_id"), "name": values.get("name")}
    raise StoreError(f"the store holds a part of unknown kind {kind!r}: was it written by a newer mmagent?")


def decode(rows: Iterable[Sequence[Any]], blobs: Mapping[str, bytes]) -> list[Message]:
    """Messages from rows ordered by (message position, part position, sub).

    Each row is `(message_position, role, position, sub, kind, text, media_type, payload, artifact_sha256)`;
    `kind` is None for a message without parts. The rows become plain dicts validated in one pass (much
    faster than building each frozen value on its own, and the values are checked again on the way out).
    """
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    result: dict[str, Any] | None = None
    current: int | None = None
    for message_position, role, _, sub, kind, text, media_type, payload, sha in rows:
        if message_position != current:
            current, parts, result = message_position, [], None
            messages.append({"role": role, "parts": parts})
        if kind is None:
            continue
        part = _part(kind, text, media_type, payload, sha, blobs)
        if sub == 0:
            parts.append(part)
            result = part if kind == "tool-result" else None
        elif result is not None and kind in ("text", "image", "audio"):
            result["content"].append(part)
        else:
            raise StoreError(f"corrupt memory store: a {kind} item outside a tool result in message {current}")
    try:
        return _MESSAGES.validate_python(messages)
    except ValidationError as exc:
        raise StoreError(f"corrupt memory store: stored messages do not validate: {exc}") from exc
