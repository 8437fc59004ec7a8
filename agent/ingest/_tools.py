"""Agent tools over ingested media: `search_media` finds segments, `clip` cuts a span of a stored source.

Both hand media back as real parts: `search_media` the matching segments' keyframes (the model sees the
pixels), `clip` the span's audio and frames. Citations name the source, its id, and the time span or page, so
the model can quote them and ask `clip` for more. `clip` only reads files the store knows (a source's own
file, checked to be unchanged), never a path the model names.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from agent.exceptions import MediaError, ModelRetry, UserError
from agent.messages import AudioPart, ImagePart, TextPart
from tools import Tool, ToolContext

if TYPE_CHECKING:
    from agent.embedding import Embedder
    from memory import MediaHit, MediaSource, Store

SegmentKind = Literal["scene", "audio", "image", "page"]

MAX_CLIP_SECONDS = 30.0
"""The longest span `clip` cuts: what Phi-4-multimodal hears at once."""

_SEARCH_DESCRIPTION = (
    "Search ingested videos, recordings, images and documents by meaning and keywords. Returns the best "
    "segments with citations (source, time span or page) and their keyframes as images."
)
_CLIP_DESCRIPTION = (
    "Cut a span (at most 30 seconds) of an ingested video or recording and get its audio, and for video a few "
    "frames, to look and listen closely. Use a source id from search_media's citations."
)


def clock(seconds: float) -> str:
    """`m:ss.s` (or `h:mm:ss.s`) for a time in seconds."""
    whole, tenths = divmod(round(seconds * 10), 10)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}.{tenths}" if hours else f"{minutes}:{secs:02d}.{tenths}"


def citation(hit: MediaHit) -> str:
    """Where a hit is: `talk.mp4 (source 3) 1:02.0-1:09.5, scene 4` or `slides.pdf (source 4) page 2`."""
    segment, source = hit.segment, hit.source
    name = os.path.basename(source.uri.rstrip("/")) or source.uri
    where = f"{name} (source {source.id})"
    if segment.page is not None:
        return f"{where} page {segment.page}"
    if segment.start is not None and segment.end is not None:
        return f"{where} {clock(segment.start)}-{clock(segment.end)}, {segment.kind} {segment.index + 1}"
    return where


def media_tools(
    store: Store | None = None,
    *,
    embedder: Embedder | None = None,
    collection: str | None = None,
    limit: int = 5,
    max_media: int = 4,
) -> list[Tool]:
    """`search_media` and `clip` tools for an agent.

    Args:
        store: the store holding ingested media; None uses the agent's own (`ToolContext.memory`).
        embedder: the embedder the media were ingested with: queries then also search by meaning (hybrid
            ranking); None searches the text only.
        collection: the default collection to search (None: all).
        limit: default and maximum number of segments per search.
        max_media: most keyframes returned per search (0 for text only).
    """
    if limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if max_media < 0:
        raise UserError(f"max_media cannot be negative, got {max_media}")
    most, default_collection = limit, collection

    def target(ctx: ToolContext) -> Store:
        found = store if store is not None else ctx.memory
        if found is None:
            raise ModelRetry("no media store is available in this session")
        return found  # type: ignore[return-value]

    async def search_media(
        ctx: ToolContext,
        query: str,
        collection: str | None = default_collection,
        kinds: list[SegmentKind] | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = most,
    ) -> str | list[Any]:
        """Search ingested media.

        Args:
            query: what to look for, in words.
            collection: the collection to search (None: all).
            kinds: segment kinds to search: scene (video shots), audio (speech), image, page (documents).
            start: only segments ending after this many seconds into their media.
            end: only segments starting before this many seconds into their media.
            limit: how many segments to return.
        """
        if start is not None and end is not None and end < start:
            raise ModelRetry(f"end ({end}) is before start ({start})")
        media_store = target(ctx)
        vector = None
        if embedder is not None and query.strip():
            vector = (await asyncio.to_thread(embedder.embed_texts, [query]))[0]
        hits = media_store.search_media(
            query,
            vector=vector,
            embedder=embedder.name if embedder is not None else None,
            collection=collection,
            kinds=kinds,
            start=start,
            end=end,
            limit=max(1, min(limit, most)),
        )
        if not hits:
            return f"No ingested media matches {query!r}."
        lines: list[str] = []
        media: list[ImagePart] = []
        for number, hit in enumerate(hits, start=1):
            texts = "; ".join(f"{name}: {text.strip()}" for name, text in hit.features.items() if text.strip())
            line = f"[{number}] {citation(hit)}: {texts or hit.snippet}"
            frames = [ref for ref in hit.segment.media if ref.role == "keyframe"]
            if frames and len(media) < max_media:
                part = media_store.artifact(frames[0].sha256)
                if isinstance(part, ImagePart):
                    media.append(part)
                    line += f" (image {len(media)})"
            lines.append(line)
        summary = "\n".join(lines)
        return [TextPart(text=summary), *media] if media else summary

    async def clip(ctx: ToolContext, source: int, start: float, end: float) -> list[Any]:
        """Cut a span of an ingested video or recording.

        Args:
            source: the source id from a search_media citation.
            start: seconds into the media where the span starts.
            end: seconds where it ends (at most 30 seconds after start).
        """
        if not (0 <= start < end):
            raise ModelRetry(f"need 0 <= start < end, got start={start}, end={end}")
        if end - start > MAX_CLIP_SECONDS:
            raise ModelRetry(f"a clip is at most {MAX_CLIP_SECONDS:g} seconds; ask for {start}-{start + 30:g}")
        media_store = target(ctx)
        try:
            found = media_store.media_source(source)
        except UserError:
            raise ModelRetry(f"there is no ingested source {source}") from None
        if found.kind not in ("video", "audio"):
            raise ModelRetry(f"source {source} is {'a ' + found.kind}: only video and audio can be clipped")
        if found.duration is not None and start >= found.duration:
            raise ModelRetry(f"source {source} is {found.duration:.1f} s long: start is past its end")
        return await asyncio.to_thread(_cut, found, start, end)

    return [
        Tool.from_function(search_media, description=_SEARCH_DESCRIPTION),
        Tool.from_function(clip, description=_CLIP_DESCRIPTION),
    ]


def _cut(source: MediaSource, start: float, end: float) -> list[Any]:
    from agent.ingest._audio import audio_clip
    from agent.ingest._segments import Scene
    from agent.ingest._video import keyframes

    path = source.local_path
    if path is None or not os.path.isfile(path) or os.path.getsize(path) != source.size:
        raise ModelRetry(f"the file of source {source.id} is no longer available; it must be ingested again")
    parts: list[TextPart | AudioPart | ImagePart] = []
    try:
        audio = audio_clip(path, start, end)
        frames: Sequence[Any] = ()
        if source.kind == "video":
            span = Scene(index=0, start_frame=0, end_frame=1, start=start, end=end)
            frames = keyframes(path, span, 3 if end - start >= 6 else 1)
    except MediaError as exc:
        raise ModelRetry(f"cannot cut source {source.id}: {str(exc).replace(path, os.path.basename(path))}") from None
    name = os.path.basename(source.uri.rstrip("/")) or source.uri
    described = f"{name} (source {source.id}) {clock(start)}-{clock(end)}"
    if audio is not None:
        parts.append(audio)
        described += ": audio"
    if frames:
        parts.extend(f.image for f in frames)
        described += (" and " if audio is not None else ": ") + ", ".join(f"frame at {clock(f.time)}" for f in frames)
    if len(parts) == 0:
        described += ": no audio or frames in this span"
    return [TextPart(text=described), *parts]
