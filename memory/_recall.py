"""The built-in `recall` tool: the model searches memory and gets matching text, images and audio back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from agent.exceptions import ModelRetry, UserError
from agent.messages import AudioPart, ImagePart, TextPart
from tools import Tool, ToolContext

if TYPE_CHECKING:
    from memory._store import Store

_DESCRIPTION = (
    "Search the stored conversation memory (earlier messages and tool results) by keywords. "
    "Returns the best-matching passages; images and audio stored with them are attached."
)


def recall_tool(
    store: Store | None = None,
    *,
    name: str = "recall",
    limit: int = 5,
    max_media: int = 4,
    description: str = _DESCRIPTION,
) -> Tool:
    """A tool the model can call to search memory: `recall(query, scope="all" | "conversation", limit)`.

    Hits from the current run are left out (the question itself would match). Images and audio stored with
    a hit (in the same message, or the same tool result) come back as real media parts, so the model sees
    the pixels again; at most `max_media` per call.

    Args:
        store: the store to search; None uses the agent's own (`ToolContext.memory`).
        name: the tool's name.
        limit: default and maximum number of passages per call.
        max_media: most images/audio clips returned per call (0 for text only).
        description: what the model is told the tool does.
    """
    if limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if max_media < 0:
        raise UserError(f"max_media cannot be negative, got {max_media}")
    most = limit

    def recall(
        ctx: ToolContext, query: str, scope: Literal["all", "conversation"] = "all", limit: int = most
    ) -> str | list[Any]:
        """Search memory.

        Args:
            query: keywords to look for.
            scope: "conversation" for the current conversation only, "all" for every stored conversation.
            limit: how many passages to return.
        """
        target = store if store is not None else ctx.memory
        if target is None:
            return "Memory is not available in this session."
        if scope == "conversation" and ctx.conversation_id is None:
            raise ModelRetry("there is no stored current conversation: use scope='all'")
        wanted = max(1, min(limit, most))
        hits = target.search(
            query,
            conversation_id=ctx.conversation_id if scope == "conversation" else None,
            limit=wanted + 20,
        )
        hits = [h for h in hits if ctx.run_id is None or h.run_id != ctx.run_id][:wanted]
        if not hits:
            return f"Nothing in memory matches {query!r}."
        lines: list[str] = []
        media: list[ImagePart | AudioPart] = []
        for number, hit in enumerate(hits, start=1):
            source = f"tool {hit.tool_name}" if hit.kind == "tool-result" else hit.role
            when = hit.created_at.strftime("%Y-%m-%d %H:%M UTC")
            line = (
                f"[{number}] {source}, {when}, conversation {hit.conversation_id} #{hit.message_index}: {hit.snippet}"
            )
            attached = []
            for sha in hit.media:
                if len(media) >= max_media:
                    break
                part = target.artifact(sha)
                if part not in media:
                    media.append(part)
                    attached.append(f"{part.kind} {len(media)}")
            if attached:
                line += f" (attached: {', '.join(attached)})"
            lines.append(line)
        summary = "\n".join(lines)
        return [TextPart(text=summary), *media] if media else summary

    return Tool.from_function(recall, name=name, description=description)
