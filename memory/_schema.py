"""The current schema as SQLAlchemy Core tables (what queries use; migrations create it).

Every table is prefixed `mm_` so the store can share a PostgreSQL database with an application's own tables.

```
mm_conversations  id, title, metadata, created_at, updated_at,
                  lease_run_id, lease_holder, lease_expires_at (the run that may append, see `Store`)
mm_runs           id, conversation -> mm_conversations, status, model_name, system_prompt, error, usage,
                  first_position (the position of the run's first message), created/updated/finished_at
mm_steps          (run -> mm_runs, step, phase "model" | "tools"), usage (cumulative), committed_at
mm_messages       id, conversation -> mm_conversations, position (0, 1, ... per conversation), role,
                  run id (null for messages stored outside a run), step, created_at
mm_parts          id, message -> mm_messages, position, sub, kind, text, media_type, payload (JSON),
                  artifact -> mm_artifacts
mm_artifacts      sha256 (hex, primary key), media_type, size, data (null when the bytes live in a file)

mm_collections    id, name (unique), created_at
mm_sources        id, collection -> mm_collections, uri (unique per collection), sha256, kind, media_type, size,
                  duration, pages, local_path, metadata, complete, created_at, updated_at
mm_segments       id, source -> mm_sources, kind, idx (unique per source and kind), start_s, end_s, page
mm_segment_media  (segment -> mm_segments, position), role "keyframe" | "clip", time_s, artifact -> mm_artifacts
mm_features       id, segment -> mm_segments, extractor (unique per segment), version, text, data, created_at
mm_embedders      id, name (unique), dim, created_at; each embedder's vectors live in a table `mm_vec_<id>`
                  made on first use (`memory._media_search`): sqlite-vec's vec0 on SQLite, pgvector on PostgreSQL
```

A part row with `sub = 0` is the message's part at `position`; a tool result's content items are stored as
rows with the same `position` and `sub = 1, 2, ...`, so text and media inside tool results are indexed and
deduplicated like any other part. Deleting a conversation cascades to its runs, steps, messages and parts.

Media (migration 4): a collection holds sources (files), a source holds segments (scenes, audio windows, pages,
a whole image), a segment holds its keyframes and clips (artifacts, shared with messages) and one feature per
extractor; feature text is indexed for full-text search like text parts. Deleting a collection or a source
cascades down to its features; artifacts stay until `Store.collect_garbage`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

SCHEMA_VERSION_TABLE = "mm_schema_version"
FTS_TABLE = "mm_parts_fts"
FEATURES_FTS_TABLE = "mm_features_fts"
PG_FTS_CONFIG = "english"
PG_FTS_MAX_CHARS = 100_000  # PostgreSQL indexes the first 100K characters of a part (tsvector size limit)

# SQLite wants INTEGER PRIMARY KEY (the rowid) for autoincrementing keys; PostgreSQL gets BIGINT identity.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime: seconds since the epoch (REAL, 8 bytes) on SQLite, naive-UTC TIMESTAMP elsewhere."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(Float() if dialect.name == "sqlite" else DateTime())

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        if dialect.name == "sqlite":
            return aware.timestamp()
        return aware.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, int | float):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        if not isinstance(value, dt.datetime):  # pragma: no cover
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


metadata = MetaData()

conversations = Table(
    "mm_conversations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("title", Text, nullable=True),
    Column("metadata", JSON, nullable=False, key="meta"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The lease (migration 2): the run that may append, the `Store` instance running it, until when.
    Column("lease_run_id", String(64), nullable=True),
    Column("lease_holder", String(64), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Index("mm_conversations_updated", "updated_at"),
)

runs = Table(
    "mm_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("conversation_id", ForeignKey("mm_conversations.id", ondelete="CASCADE"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("model_name", Text, nullable=False),
    Column("system_prompt", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("usage", JSON, nullable=False),
    Column("first_position", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("parent_run_id", String(64), nullable=True),  # the run whose tool started this one (delegation)
    Index("mm_runs_conversation", "conversation_id"),
    Index("mm_runs_status", "status"),
    Index("mm_runs_parent", "parent_run_id"),
)

steps = Table(
    "mm_steps",
    metadata,
    Column("run_id", ForeignKey("mm_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("phase", String(8), nullable=False),
    Column("usage", JSON, nullable=False),
    Column("committed_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("run_id", "step", "phase", name="mm_steps_pk"),
    sqlite_with_rowid=False,  # the primary key is the table: no second copy of run ids
)

messages = Table(
    "mm_messages",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("conversation_id", ForeignKey("mm_conversations.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    # No foreign key: a run's messages go with its conversation, and a key would need another index.
    Column("run_id", String(64), nullable=True),
    Column("step", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("conversation_id", "position", name="mm_messages_order"),
)

artifacts = Table(
    "mm_artifacts",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("media_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
)

parts = Table(
    "mm_parts",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("message_id", ForeignKey("mm_messages.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("sub", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("text", Text, nullable=True),
    Column("media_type", String(255), nullable=True),
    Column("payload", JSON(none_as_null=True), nullable=True),  # SQL NULL, not the JSON text "null"
    Column("artifact_sha256", ForeignKey("mm_artifacts.sha256"), nullable=True),
    UniqueConstraint("message_id", "position", "sub", name="mm_parts_order"),
)
_has_artifact = parts.c.artifact_sha256.is_not(None)
Index("mm_parts_artifact", parts.c.artifact_sha256, sqlite_where=_has_artifact, postgresql_where=_has_artifact)

collections = Table(
    "mm_collections",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
)

sources = Table(
    "mm_sources",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("collection_id", ForeignKey("mm_collections.id", ondelete="CASCADE"), nullable=False),
    Column("uri", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("media_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("duration", Float, nullable=True),
    Column("pages", Integer, nullable=True),
    Column("local_path", Text, nullable=True),
    Column("metadata", JSON, nullable=False, key="meta"),
    Column("complete", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("collection_id", "uri", name="mm_sources_uri"),
)

segments = Table(
    "mm_segments",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("source_id", ForeignKey("mm_sources.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("start_s", Float, nullable=True),
    Column("end_s", Float, nullable=True),
    Column("page", Integer, nullable=True),
    UniqueConstraint("source_id", "kind", "idx", name="mm_segments_order"),
)

segment_media = Table(
    "mm_segment_media",
    metadata,
    Column("segment_id", ForeignKey("mm_segments.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("time_s", Float, nullable=True),
    Column("artifact_sha256", ForeignKey("mm_artifacts.sha256"), nullable=False),
    PrimaryKeyConstraint("segment_id", "position", name="mm_segment_media_pk"),
    Index("mm_segment_media_artifact", "artifact_sha256"),
)

features = Table(
    "mm_features",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("segment_id", ForeignKey("mm_segments.id", ondelete="CASCADE"), nullable=False),
    Column("extractor", String(255), nullable=False),
    Column("version", String(255), nullable=False),
    Column("text", Text, nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("segment_id", "extractor", name="mm_features_extractor"),
)

embedders = Table(
    "mm_embedders",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("dim", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)
