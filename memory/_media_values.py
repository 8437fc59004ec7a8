"""What the store's media methods take and return: sources, segments, features and search hits.

Plain frozen records like `memory._values`. Ingestion (`agent.ingest`) hands the store `NewSegment`s with their
keyframes and clips as `agent.messages` parts; the store keeps the bytes once per sha256 (as message media) and
hands back `MediaSegment`s that name them by hash (`Store.artifact(sha256)` gives the part back).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from agent.messages import AudioPart, ImagePart

MediaKind = Literal["video", "audio", "image", "document"]
SegmentKind = Literal["scene", "audio", "image", "page"]
MediaRole = Literal["keyframe", "clip"]
Modality = Literal["text", "image"]


@dataclass(frozen=True, slots=True)
class NewSegment:
    """A segment of a source, as ingestion hands it to `Store.add_segments`.

    Attributes:
        kind: `scene` (a video shot), `audio` (a window of speech or sound), `image` (a whole picture) or
            `page` (a document page).
        index: 0, 1, ... within (source, kind): with the kind, the segment's identity in its source.
        start: seconds into the media where it starts (scene, audio).
        end: seconds into the media where it ends.
        page: the 1-based page number (page).
        media: `(role, time, part)` for each keyframe (an `ImagePart`) or clip (an `AudioPart`), in order; `time`
            is seconds into the media, or None.
    """

    kind: SegmentKind
    index: int
    start: float | None = None
    end: float | None = None
    page: int | None = None
    media: tuple[tuple[MediaRole, float | None, ImagePart | AudioPart], ...] = ()


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A keyframe or clip stored with a segment.

    Attributes:
        role: `keyframe` or `clip`.
        time: seconds into the media, or None.
        sha256: the artifact's hash: `Store.artifact(sha256)` gives the part back.
        media_type: its media type (`image/jpeg`, `audio/wav`, ...).
    """

    role: MediaRole
    time: float | None
    sha256: str
    media_type: str


@dataclass(frozen=True, slots=True)
class MediaSegment:
    """A stored segment.

    Attributes:
        id: its id in the store.
        source_id: the source it belongs to.
        kind: `scene`, `audio`, `image` or `page`.
        index: 0, 1, ... within (source, kind).
        start: seconds into the media where it starts, if timed.
        end: seconds into the media where it ends, if timed.
        page: the 1-based page number, for pages.
        media: its keyframes and clips, in the order given.
    """

    id: int
    source_id: int
    kind: SegmentKind
    index: int
    start: float | None
    end: float | None
    page: int | None
    media: tuple[MediaRef, ...]


@dataclass(frozen=True, slots=True)
class MediaSource:
    """A stored media file (video, recording, picture, document) in a collection.

    Attributes:
        id: its id in the store.
        collection: the collection's name.
        uri: where it came from; unique within the collection.
        sha256: the hash of the file's bytes when it was (last) added.
        kind: `video`, `audio`, `image` or `document`.
        media_type: the file's media type.
        size: its size in bytes.
        duration: seconds of media (video, audio).
        pages: how many pages (document).
        local_path: where the file lies on this machine, if known.
        metadata: the application's JSON object for it.
        complete: whether ingestion finished segmenting it (`Store.complete_source`).
        created_at: when it was first added (aware, UTC).
        updated_at: when it last changed (aware, UTC); equal to `created_at` until then.
    """

    id: int
    collection: str
    uri: str
    sha256: str
    kind: MediaKind
    media_type: str
    size: int
    duration: float | None
    pages: int | None
    local_path: str | None
    metadata: dict[str, Any]
    complete: bool
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """A collection of sources.

    Attributes:
        name: its name.
        sources: how many sources it holds.
        segments: how many segments those sources hold.
        created_at: when it was created (aware, UTC).
    """

    name: str
    sources: int
    segments: int
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class MediaFeature:
    """What an extractor found in a segment (a caption, a transcript, a page's text).

    Attributes:
        segment_id: the segment.
        extractor: the extractor's name (one feature per segment and extractor).
        version: the extractor's version when it ran.
        text: the searchable text.
        data: the extractor's structured output (a JSON object).
    """

    segment_id: int
    extractor: str
    version: str
    text: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MediaHit:
    """A segment that matched a `Store.search_media` query.

    Attributes:
        segment: the segment, with its keyframes and clips.
        source: the source it belongs to.
        features: extractor name -> text, for this segment.
        snippet: about 240 characters of feature text around the first matching word (the start of the first
            feature for a hit found by its vectors alone).
        score: the fused score (reciprocal rank fusion over the ranked lists that found it); higher is better.
        ranks: `text` and/or `vector` -> the segment's 1-based rank in that list.
    """

    segment: MediaSegment
    source: MediaSource
    features: dict[str, str]
    snippet: str
    score: float
    ranks: dict[str, int]
