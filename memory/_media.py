"""`MediaStoreMixin`: the media half of `Store` — collections, sources, segments, features, vectors and search.

Ingestion (`agent.ingest`) decodes and segments files and runs the models; the store only keeps what it is handed
(vectors arrive computed): a source per file in a named collection, its segments with their keyframes and clips
(artifacts, stored once per sha256 and shared with message media), one feature per segment and extractor, and
vectors per embedder. Every write is one transaction; re-running ingestion finds what is already there
(`add_source` on an unchanged file writes nothing, `add_segments` keeps stored segments, `put_feature` skips an
unchanged feature, `feature_versions` and `embedded` say what is done).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, get_args

import numpy.typing as npt
from sqlalchemy import ColumnElement, Connection, delete, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from agent.exceptions import MediaError, UserError
from agent.messages import AudioPart, ImagePart
from memory import _media_search as ms
from memory import _schema as s
from memory._codec import Artifact
from memory._media_values import (
    CollectionInfo,
    MediaFeature,
    MediaHit,
    MediaKind,
    MediaRef,
    MediaSegment,
    MediaSource,
    Modality,
    NewSegment,
    SegmentKind,
)
from memory._search import snippet, terms

if TYPE_CHECKING:
    from memory._engine import Database

MEDIA_KINDS: tuple[str, ...] = get_args(MediaKind)
SEGMENT_KINDS: tuple[str, ...] = get_args(SegmentKind)
_ROLES = ("keyframe", "clip")
_NAME_CHARS = 255
_URI_BYTES = 2048  # PostgreSQL's unique index on (collection, uri) takes keys of up to ~2.7 KB
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500

_g, _src, _col, _f, _sm = s.segments.c, s.sources.c, s.collections.c, s.features.c, s.segment_media.c
_SOURCE = select(s.sources, _col.name.label("collection")).join(s.collections, _col.id == _src.collection_id)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _NAME_CHARS:
        raise UserError(f"{what} must be a non-empty string of at most {_NAME_CHARS} characters, got {value!r}")
    return value


def _count(value: Any, what: str, *, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{what} must be an integer >= {least}, got {value!r}")
    return value


def _seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be a finite number of seconds >= 0 or None, got {value!r}")
    return float(value)


def _json_object(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{what} must be a mapping (a JSON object), got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} must be JSON-serialisable: {exc}") from None
    return dict(value)


def _source_value(row: Any) -> MediaSource:
    return MediaSource(
        id=int(row.id),
        collection=row.collection,
        uri=row.uri,
        sha256=row.sha256,
        kind=row.kind,
        media_type=row.media_type,
        size=int(row.size),
        duration=row.duration,
        pages=row.pages,
        local_path=row.local_path,
        metadata=dict(row.meta or {}),
        complete=bool(row.complete),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _insert_new(conn: Connection, target: Any, values: dict[str, Any], keys: list[str]) -> int | None:
    """Insert a row unless its unique `keys` are taken (then None); return its id. Safe between processes."""
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        make = sqlite.insert if dialect == "sqlite" else postgresql.insert
        stmt = make(target).values(**values).on_conflict_do_nothing(index_elements=keys).returning(target.c.id)
        found = conn.execute(stmt).scalar()
        return None if found is None else int(found)
    taken = conn.execute(select(target.c.id).where(*(target.c[k] == values[k] for k in keys))).first()
    if taken is not None:
        return None
    key = conn.execute(insert(target).values(**values)).inserted_primary_key
    assert key is not None
    return int(key[0])


def _media_artifact(part: Any, limit: int, what: str) -> Artifact:
    if not isinstance(part, ImagePart | AudioPart):
        raise UserError(f"{what} must be an ImagePart or AudioPart, got {type(part).__name__}")
    if len(part.data) > limit:
        raise MediaError(
            f"{what}: {part.kind} of {len(part.data)} bytes is over the memory store's per-artifact limit of "
            f"{limit} bytes: downscale or trim it, or open the store with a larger Store(..., max_artifact_bytes=...)"
        )
    return Artifact(hashlib.sha256(part.data).hexdigest(), part.media_type, part.data)


_Media = list[tuple[str, float | None, Artifact]]  # (role, time, artifact) of a new segment


def _check_segment(segment: Any, limit: int, n: int) -> tuple[dict[str, Any], _Media]:
    """The row of a `NewSegment` and its media, checked."""
    what = f"segment {n}"
    if not isinstance(segment, NewSegment):
        raise UserError(f"{what} must be a NewSegment, got {type(segment).__name__}")
    if segment.kind not in SEGMENT_KINDS:
        raise UserError(f"{what}: kind must be one of {list(SEGMENT_KINDS)}, got {segment.kind!r}")
    index = _count(segment.index, f"{what}: index")
    start, end = _seconds(segment.start, f"{what}: start"), _seconds(segment.end, f"{what}: end")
    if start is not None and end is not None and end < start:
        raise UserError(f"{what}: end ({end}) is before start ({start})")
    page = None if segment.page is None else _count(segment.page, f"{what}: page", least=1)
    media: _Media = []
    for i, item in enumerate(segment.media):
        if not isinstance(item, tuple) or len(item) != 3:
            raise UserError(f"{what}: media items are (role, time, part) tuples, got {item!r:.80}")
        role, time, part = item
        if role not in _ROLES:
            raise UserError(f"{what}: media role must be 'keyframe' or 'clip', got {role!r}")
        media.append(
            (role, _seconds(time, f"{what}: media {i} time"), _media_artifact(part, limit, f"{what}: media {i}"))
        )
    row = {"kind": segment.kind, "idx": index, "start_s": start, "end_s": end, "page": page}
    return row, media


class MediaStoreMixin:
    """Media ingestion's storage and retrieval, mixed into `Store` (which provides the database and artifacts)."""

    if TYPE_CHECKING:  # provided by `Store`
        max_artifact_bytes: int

        @property
        def _database(self) -> Database: ...

        def _put_artifacts(self, conn: Connection, artifacts: Mapping[str, Artifact], now: dt.datetime) -> None: ...

        def _missing(self, what: str, key: str) -> UserError: ...

    # ------------------------------------------------------------------ sources

    def add_source(
        self,
        collection: str,
        uri: str,
        *,
        sha256: str,
        kind: MediaKind,
        media_type: str,
        size: int,
        duration: float | None = None,
        pages: int | None = None,
        local_path: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[MediaSource, bool]:
        """Record a file in a collection (created if missing), unless it is there already with the same bytes.

        Args:
            collection: the collection's name.
            uri: where the file came from (a path or URL); unique within the collection.
            sha256: the hex hash of the file's bytes.
            kind: `video`, `audio`, `image` or `document`.
            media_type: the file's media type.
            size: its size in bytes.
            duration: seconds of media, for video and audio.
            pages: the page count, for documents.
            local_path: where the file lies on this machine.
            metadata: any JSON object the application wants kept with it.

        Returns:
            `(source, written)`: the stored source and False when (collection, uri) was already there with this
            sha256 (nothing is written); the new source and True; or, when the file changed (another sha256),
            the updated source and True: its segments, features and vectors are deleted and it is incomplete.

        Raises:
            UserError: a bad argument.
        """
        collection = _name(collection, "collection")
        if not isinstance(uri, str) or not uri or len(uri.encode("utf-8", "surrogatepass")) > _URI_BYTES:
            raise UserError(f"uri must be a non-empty string of at most {_URI_BYTES} bytes, got {uri!r:.100}")
        digest = sha256.lower() if isinstance(sha256, str) else ""
        if not _SHA256.fullmatch(digest):
            raise UserError(f"sha256 must be 64 hex digits, got {sha256!r}")
        if kind not in MEDIA_KINDS:
            raise UserError(f"kind must be one of {list(MEDIA_KINDS)}, got {kind!r}")
        values = {
            "sha256": digest,
            "kind": kind,
            "media_type": _name(media_type, "media_type"),
            "size": _count(size, "size"),
            "duration": _seconds(duration, "duration"),
            "pages": None if pages is None else _count(pages, "pages"),
            "local_path": local_path if local_path is None else str(local_path),
            "meta": _json_object(metadata, "metadata"),
            "complete": False,
        }
        known = self.find_source(collection, uri)  # the common case on a re-run, without the write lock
        if known is not None and known.sha256 == digest:
            return known, False
        now = _now()
        with self._database.transaction(write=True) as conn:
            collection_id = self._collection_id(conn, collection, now)
            fresh = {"collection_id": collection_id, "uri": uri, "created_at": now, "updated_at": now, **values}
            new_id = _insert_new(conn, s.sources, fresh, ["collection_id", "uri"])
            if new_id is not None:
                return self._source(conn, new_id), True
            row = conn.execute(
                select(_src.id, _src.sha256)
                .where(_src.collection_id == collection_id, _src.uri == uri)
                .with_for_update()
            ).one()
            if row.sha256 == digest:
                return self._source(conn, row.id), False
            self._drop_segments(conn, _g.source_id == row.id)
            conn.execute(update(s.sources).where(_src.id == row.id).values(updated_at=now, **values))
            return self._source(conn, row.id), True

    def find_source(self, collection: str, uri: str) -> MediaSource | None:
        """The source with this uri in this collection, or None."""
        with self._database.transaction(write=False) as conn:
            row = conn.execute(_SOURCE.where(_col.name == collection, _src.uri == uri)).first()
        return None if row is None else _source_value(row)

    def media_source(self, source_id: int) -> MediaSource:
        """The source with this id.

        Raises:
            UserError: no such source.
        """
        with self._database.transaction(write=False) as conn:
            return self._source(conn, source_id)

    def list_sources(self, collection: str | None = None) -> list[MediaSource]:
        """Every source (of one collection), by collection name, then in the order they were added."""
        stmt = _SOURCE.order_by(_col.name, _src.id)
        if collection is not None:
            stmt = stmt.where(_col.name == collection)
        with self._database.transaction(write=False) as conn:
            return [_source_value(row) for row in conn.execute(stmt)]

    def list_collections(self) -> list[CollectionInfo]:
        """Every collection with its source and segment counts, by name."""
        n_sources = select(func.count()).where(_src.collection_id == _col.id).scalar_subquery()
        n_segments = (
            select(func.count())
            .select_from(s.segments.join(s.sources, _src.id == _g.source_id))
            .where(_src.collection_id == _col.id)
            .scalar_subquery()
        )
        stmt = select(_col.name, _col.created_at, n_sources.label("n_sources"), n_segments.label("n_segments"))
        with self._database.transaction(write=False) as conn:
            rows = conn.execute(stmt.order_by(_col.name)).all()
        return [CollectionInfo(r.name, int(r.n_sources), int(r.n_segments), r.created_at) for r in rows]

    def complete_source(self, source_id: int) -> None:
        """Mark a source as completely segmented.

        Raises:
            UserError: no such source.
        """
        with self._database.transaction(write=True) as conn:
            done = conn.execute(update(s.sources).where(_src.id == source_id).values(complete=True, updated_at=_now()))
            if done.rowcount == 0:
                raise self._unknown("media source", source_id)

    def delete_source(self, source_id: int) -> None:
        """Delete a source with its segments, features and vectors (its artifacts stay until `collect_garbage`).

        Raises:
            UserError: no such source.
        """
        with self._database.transaction(write=True) as conn:
            if conn.execute(select(_src.id).where(_src.id == source_id).with_for_update()).first() is None:
                raise self._unknown("media source", source_id)
            self._drop_segments(conn, _g.source_id == source_id)
            conn.execute(delete(s.sources).where(_src.id == source_id))

    def delete_collection(self, name: str) -> None:
        """Delete a collection with its sources, segments, features and vectors (artifacts stay until
        `collect_garbage`).

        Raises:
            UserError: no such collection.
        """
        with self._database.transaction(write=True) as conn:
            row = conn.execute(select(_col.id).where(_col.name == name).with_for_update()).first()
            if row is None:
                raise self._missing("collection", name)
            in_collection = select(_src.id).where(_src.collection_id == row.id).scalar_subquery()
            self._drop_segments(conn, _g.source_id.in_(in_collection))
            conn.execute(delete(s.collections).where(_col.id == row.id))

    # ------------------------------------------------------------------ segments

    def add_segments(self, source_id: int, segments: Sequence[NewSegment]) -> list[MediaSegment]:
        """Store segments of a source with their keyframes and clips, in one transaction.

        A segment whose (kind, index) the source already holds is kept as stored (its media are not added
        again). Media bytes are stored once per sha256, as message media are.

        Returns:
            The stored segments, in the order given.

        Raises:
            UserError: no such source, a malformed segment, or one (kind, index) twice in `segments`.
            MediaError: a keyframe or clip is over `max_artifact_bytes`.
        """
        checked = [_check_segment(seg, self.max_artifact_bytes, n) for n, seg in enumerate(segments)]
        keys = [(row["kind"], row["idx"]) for row, _ in checked]
        seen: set[tuple[str, int]] = set()
        for key in keys:
            if key in seen:
                raise UserError(f"segment ({key[0]!r}, {key[1]}) is given twice")
            seen.add(key)
        if not checked:
            with self._database.transaction(write=False) as conn:
                self._source(conn, source_id)
            return []
        now = _now()
        with self._database.transaction(write=True) as conn:
            if conn.execute(select(_src.id).where(_src.id == source_id).with_for_update()).first() is None:
                raise self._unknown("media source", source_id)
            stored = self._segment_ids(conn, source_id, keys)
            new = [(row, media) for row, media in checked if (row["kind"], row["idx"]) not in stored]
            if new:
                conn.execute(insert(s.segments), [{"source_id": source_id, **row} for row, _ in new])
                stored = self._segment_ids(conn, source_id, keys)
                self._put_artifacts(conn, {a.sha256: a for _, media in new for _, _, a in media}, now)
                media_rows = [
                    {
                        "segment_id": stored[(row["kind"], row["idx"])],
                        "position": position,
                        "role": role,
                        "time_s": time,
                        "artifact_sha256": artifact.sha256,
                    }
                    for row, media in new
                    for position, (role, time, artifact) in enumerate(media)
                ]
                if media_rows:
                    conn.execute(insert(s.segment_media), media_rows)
            ids = [stored[key] for key in keys]
            found = {seg.id: seg for seg in self._segments(conn, ids=ids)}
        return [found[i] for i in ids]

    def media_segments(self, source_id: int) -> list[MediaSegment]:
        """A source's segments, by kind, then index.

        Raises:
            UserError: no such source.
        """
        with self._database.transaction(write=False) as conn:
            found = self._segments(conn, source_id=source_id)
            if not found:
                self._source(conn, source_id)
            return found

    # ------------------------------------------------------------------ features

    def feature_versions(self, source_id: int) -> dict[tuple[int, str], str]:
        """`(segment_id, extractor) -> version` of every feature stored for a source's segments.

        Raises:
            UserError: no such source.
        """
        stmt = (
            select(_f.segment_id, _f.extractor, _f.version)
            .join(s.segments, _g.id == _f.segment_id)
            .where(_g.source_id == source_id)
        )
        with self._database.transaction(write=False) as conn:
            rows = conn.execute(stmt).all()
            if not rows:
                self._source(conn, source_id)
        return {(int(r.segment_id), r.extractor): r.version for r in rows}

    def put_feature(
        self, segment_id: int, extractor: str, version: str, text: str, data: Mapping[str, Any] | None = None
    ) -> bool:
        """Store what an extractor found in a segment, replacing that extractor's earlier feature.

        Args:
            segment_id: the segment.
            extractor: the extractor's name.
            version: its version: a new version replaces the stored feature.
            text: the searchable text.
            data: the extractor's structured output (a JSON object).

        Returns:
            False (and nothing written) when the same version and text are already stored; True otherwise.

        Raises:
            UserError: no such segment, or a bad argument.
        """
        values = {
            "segment_id": segment_id,
            "extractor": _name(extractor, "extractor"),
            "version": _name(version, "version"),
            "text": text,
            "data": _json_object(data, "data"),
            "created_at": _now(),
        }
        if not isinstance(text, str):
            raise UserError(f"feature text must be a string, got {type(text).__name__}")
        with self._database.transaction(write=True) as conn:
            if conn.execute(select(_g.id).where(_g.id == segment_id)).first() is None:
                raise self._unknown("media segment", segment_id)
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):
                make = sqlite.insert if dialect == "sqlite" else postgresql.insert
                stmt = make(s.features).values(**values)
                changed = or_(_f.version != stmt.excluded.version, _f.text != stmt.excluded.text)
                upsert = stmt.on_conflict_do_update(
                    index_elements=["segment_id", "extractor"],
                    set_={k: stmt.excluded[k] for k in ("version", "text", "data", "created_at")},
                    where=changed,
                ).returning(_f.id)
                return conn.execute(upsert).first() is not None
            key = (_f.segment_id == segment_id, _f.extractor == extractor)
            old = conn.execute(select(_f.version, _f.text).where(*key)).first()
            if old is not None and (old.version, old.text) == (version, text):
                return False
            conn.execute(delete(s.features).where(*key))
            conn.execute(insert(s.features).values(**values))
            return True

    def media_features(self, segment_id: int) -> list[MediaFeature]:
        """A segment's features, by extractor name.

        Raises:
            UserError: no such segment.
        """
        stmt = select(_f.extractor, _f.version, _f.text, _f.data).where(_f.segment_id == segment_id)
        with self._database.transaction(write=False) as conn:
            rows = conn.execute(stmt.order_by(_f.extractor)).all()
            if not rows and conn.execute(select(_g.id).where(_g.id == segment_id)).first() is None:
                raise self._unknown("media segment", segment_id)
        return [MediaFeature(segment_id, r.extractor, r.version, r.text, dict(r.data or {})) for r in rows]

    # ------------------------------------------------------------------ vectors

    def put_embeddings(
        self,
        embedder: str,
        dim: int,
        rows: Sequence[tuple[int, Modality, Sequence[float] | npt.NDArray[Any]]],
    ) -> int:
        """Store vectors an embedder computed for segments: one per (segment, modality), replacing any stored.

        Args:
            embedder: the embedder's name; its vectors are searched only against each other.
            dim: their dimension; fixed for the name by its first vectors.
            rows: `(segment_id, modality, vector)`, modality `text` or `image`; the last of duplicates wins.

        Returns:
            How many vectors were written.

        Raises:
            UserError: a vector of another length, an embedder name first used with another `dim`, an unknown
                segment, or sqlite-vec missing (SQLite).
            StoreError: PostgreSQL without pgvector.
        """
        name = _name(embedder, "embedder")
        _count(dim, "dim", least=1)
        vectors: dict[tuple[int, str], Any] = {}
        for n, item in enumerate(rows):
            if not isinstance(item, tuple | list) or len(item) != 3:
                raise UserError(f"embedding {n} must be (segment_id, modality, vector), got {type(item).__name__}")
            segment_id, modality, vector = item
            if modality not in ms.MODALITIES:
                raise UserError(f"embedding {n}: modality must be 'text' or 'image', got {modality!r}")
            key = (_count(segment_id, f"embedding {n}: segment_id"), modality)
            vectors[key] = ms.as_vector(vector, dim, f"embedding {n} (segment {segment_id}, {modality})")
        if not vectors:
            return 0
        with self._database.transaction(write=True) as conn:
            meta = ms.segment_meta(conn, (sid for sid, _ in vectors))
            unknown = sorted({sid for sid, _ in vectors} - meta.keys())
            if unknown:
                raise UserError(f"no media segment {unknown[0]} in the memory store ({len(unknown)} unknown)")
            found = ms.ensure_embedder(conn, name, dim, _now())
            ms.write_vectors(conn, found, vectors, meta)
        return len(vectors)

    def embedded(self, embedder: str, source_id: int) -> set[tuple[int, str]]:
        """`(segment_id, modality)` of a source's segments that hold a vector from this embedder (none for an
        embedder that never stored any)."""
        with self._database.transaction(write=False) as conn:
            found = ms.find_embedder(conn, embedder)
            if found is None:
                return set()
            ids = list(conn.execute(select(_g.id).where(_g.source_id == source_id)).scalars())
            return ms.stored_vectors(conn, found, ids)

    # ------------------------------------------------------------------ search

    def search_media(
        self,
        query: str,
        *,
        vector: Sequence[float] | npt.NDArray[Any] | None = None,
        embedder: str | None = None,
        collection: str | None = None,
        kinds: Collection[SegmentKind] | None = None,
        source_id: int | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = 10,
    ) -> list[MediaHit]:
        """Segments matching words and/or near a vector, best first.

        Full text always: features holding any word of `query` (common English words left out while others
        remain; English stemming; query syntax is never interpreted), ranked by bm25 (SQLite) or `ts_rank`
        (PostgreSQL), so segments holding more of the words, and rarer ones, come first. With `vector` and
        `embedder`, the segments nearest the vector by cosine too (a segment counts by its nearest vector, text
        or image). The two rankings are fused by reciprocal rank (k = 60); filters apply to both before ranking.

        Args:
            query: words to look for ("" with a vector: by the vector alone).
            vector: the query embedded by the same model as `embedder`'s vectors.
            embedder: the name the segments' vectors were stored under.
            collection: only this collection.
            kinds: only these segment kinds.
            source_id: only this source.
            start: only segments ending at or after this many seconds into their media (untimed ones drop out).
            end: only segments starting at or before this many seconds.
            limit: the most hits to return.

        Raises:
            UserError: a bad argument, or a vector whose length is not the embedder's dimension.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UserError(f"limit must be at least 1, got {limit!r}")
        if not isinstance(query, str):
            raise UserError(f"query must be a string, got {type(query).__name__}")
        if (vector is None) != (embedder is None):
            raise UserError("search_media takes a vector and its embedder's name together, or neither")
        wanted = ms.check_kinds(kinds, SEGMENT_KINDS)
        start, end = _seconds(start, "start"), _seconds(end, "end")
        if start is not None and end is not None and end < start:
            raise UserError(f"end ({end}) is before start ({start})")
        words = terms(query)
        if (not words and vector is None) or wanted == ():
            return []
        depth = min(ms.MAX_DEPTH, max(50, 3 * limit))
        with self._database.transaction(write=False) as conn:
            collection_id = None
            if collection is not None:
                collection_id = conn.execute(select(_col.id).where(_col.name == collection)).scalar()
                if collection_id is None:
                    return []
            filters = ms.Filters(collection_id, wanted, source_id, start, end)
            lists: dict[str, list[int]] = {}
            if words:
                lists["text"] = ms.text_ranked(conn, query, filters, depth)
            found = ms.find_embedder(conn, embedder) if embedder is not None else None
            if found is not None and vector is not None:
                query_vector = ms.as_vector(vector, found.dim, f"the query vector for embedder {found.name!r}")
                lists["vector"] = ms.vector_ranked(conn, found, query_vector, filters, depth)
            fused = ms.fuse(lists, limit)
            return self._hits(conn, fused, words)

    # ------------------------------------------------------------------ internals

    def _unknown(self, what: str, key: int) -> UserError:
        return UserError(f"no {what} {key!r} in the memory store at {self._database.where}")

    def _collection_id(self, conn: Connection, name: str, now: dt.datetime) -> int:
        made = _insert_new(conn, s.collections, {"name": name, "created_at": now}, ["name"])
        if made is not None:
            return made
        return int(conn.execute(select(_col.id).where(_col.name == name)).scalar_one())

    def _source(self, conn: Connection, source_id: int) -> MediaSource:
        row = conn.execute(_SOURCE.where(_src.id == source_id)).first()
        if row is None:
            raise self._unknown("media source", source_id)
        return _source_value(row)

    def _drop_segments(self, conn: Connection, where: ColumnElement[bool]) -> None:
        """Delete segments (features and media cascade) and their vectors."""
        ids = list(conn.execute(select(_g.id).where(where)).scalars())
        ms.delete_vectors(conn, ids)
        conn.execute(delete(s.segments).where(where))

    def _segment_ids(self, conn: Connection, source_id: int, keys: Sequence[tuple[str, int]]) -> dict[Any, int]:
        kinds = sorted({k for k, _ in keys})
        low, high = min(i for _, i in keys), max(i for _, i in keys)
        rows = conn.execute(
            select(_g.id, _g.kind, _g.idx).where(
                _g.source_id == source_id, _g.kind.in_(kinds), _g.idx.between(low, high)
            )
        )
        return {(r.kind, r.idx): int(r.id) for r in rows}

    def _segments(
        self, conn: Connection, *, source_id: int | None = None, ids: Sequence[int] = ()
    ) -> list[MediaSegment]:
        """Segments of a source (by kind, index), or with these ids; with their media."""
        a = s.artifacts.c
        media_stmt = select(_sm.segment_id, _sm.role, _sm.time_s, _sm.artifact_sha256, a.media_type).join(
            s.artifacts, a.sha256 == _sm.artifact_sha256
        )
        rows: list[Any] = []
        media: list[Any] = []
        if source_id is not None:
            rows = list(conn.execute(select(s.segments).where(_g.source_id == source_id).order_by(_g.kind, _g.idx)))
            of_source = select(_g.id).where(_g.source_id == source_id).scalar_subquery()
            media = list(
                conn.execute(media_stmt.where(_sm.segment_id.in_(of_source)).order_by(_sm.segment_id, _sm.position))
            )
        else:
            for chunk in _chunks(sorted(set(ids))):
                rows.extend(conn.execute(select(s.segments).where(_g.id.in_(chunk))))
                media.extend(
                    conn.execute(media_stmt.where(_sm.segment_id.in_(chunk)).order_by(_sm.segment_id, _sm.position))
                )
        refs: dict[int, list[MediaRef]] = {}
        for m in media:
            refs.setdefault(int(m.segment_id), []).append(MediaRef(m.role, m.time_s, m.artifact_sha256, m.media_type))
        return [
            MediaSegment(
                id=int(r.id),
                source_id=int(r.source_id),
                kind=r.kind,
                index=int(r.idx),
                start=r.start_s,
                end=r.end_s,
                page=r.page,
                media=tuple(refs.get(int(r.id), ())),
            )
            for r in rows
        ]

    def _hits(
        self, conn: Connection, fused: list[tuple[int, float, dict[str, int]]], words: list[str]
    ) -> list[MediaHit]:
        if not fused:
            return []
        ids = [sid for sid, _, _ in fused]
        segments = {seg.id: seg for seg in self._segments(conn, ids=ids)}
        source_ids = sorted({seg.source_id for seg in segments.values()})
        sources = {
            int(r.id): _source_value(r)
            for chunk in _chunks(source_ids)
            for r in conn.execute(_SOURCE.where(_src.id.in_(chunk)))
        }
        texts: dict[int, dict[str, str]] = {}
        for chunk in _chunks(ids):
            stmt = select(_f.segment_id, _f.extractor, _f.text).where(_f.segment_id.in_(chunk))
            for r in conn.execute(stmt.order_by(_f.segment_id, _f.extractor)):
                texts.setdefault(int(r.segment_id), {})[r.extractor] = r.text
        hits = []
        for sid, score, ranks in fused:
            segment = segments[sid]
            features = texts.get(sid, {})
            hits.append(
                MediaHit(
                    segment=segment,
                    source=sources[segment.source_id],
                    features=features,
                    snippet=_snippet(features, words if "text" in ranks else []),
                    score=score,
                    ranks=ranks,
                )
            )
        return hits


def unreferenced() -> ColumnElement[bool]:
    """No message part and no media segment uses the artifact (for garbage collection)."""
    a = s.artifacts.c
    return ~exists().where(s.parts.c.artifact_sha256 == a.sha256) & ~exists().where(_sm.artifact_sha256 == a.sha256)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _snippet(features: Mapping[str, str], words: list[str]) -> str:
    """Around the first matching word of the feature that holds the most words; else the first feature's start."""
    texts = [t for t in features.values() if t.strip()]
    if not texts:
        return ""
    stems = [w[: max(3, len(w) - 2)] for w in words]
    best = max(texts, key=lambda t: sum(stem in t.lower() for stem in stems)) if stems else texts[0]
    return snippet(best, words)
