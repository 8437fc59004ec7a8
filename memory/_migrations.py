"""Schema migrations: plain functions, applied in order on open, recorded in `mm_schema_version`.

Migration `n` (1-based) moves a database from version `n - 1` to `n`. All pending migrations run in one
write transaction (SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so processes opening a fresh
database at the same moment migrate it exactly once. A database whose version is newer than the last
migration here is refused with `SchemaVersionError`.

To change the schema: edit the tables in `_schema.py` and append a migration that alters an existing
database to match (new databases run every migration in turn, so migration 1 must never create columns
added later: it creates `mm_conversations` from its own frozen copy; the schema test compares a migrated
database with `_schema.metadata`). A migration spells out the columns it adds rather than reading them from
`_schema`, so it keeps doing what it did when later versions change them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.types import TypeEngine

from agent.exceptions import SchemaVersionError
from memory import _schema

version_table = Table(
    _schema.SCHEMA_VERSION_TABLE,
    MetaData(),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", _schema.UTCDateTime, nullable=False),
)


def _m1_initial(conn: Connection) -> None:
    """Conversations, runs, steps, messages, parts, artifacts, and the full-text index."""
    conversations_v1 = Table(
        "mm_conversations",
        MetaData(),
        Column("id", String(64), primary_key=True),
        Column("title", Text, nullable=True),
        Column("metadata", JSON, nullable=False),
        Column("created_at", _schema.UTCDateTime, nullable=False),
        Column("updated_at", _schema.UTCDateTime, nullable=False),
        Index("mm_conversations_updated", "updated_at"),
    )
    runs_v1 = Table(
        "mm_runs",
        conversations_v1.metadata,
        Column("id", String(64), primary_key=True),
        Column("conversation_id", ForeignKey("mm_conversations.id", ondelete="CASCADE"), nullable=False),
        Column("status", String(16), nullable=False),
        Column("model_name", Text, nullable=False),
        Column("system_prompt", Text, nullable=True),
        Column("error", Text, nullable=True),
        Column("usage", JSON, nullable=False),
        Column("first_position", Integer, nullable=False),
        Column("created_at", _schema.UTCDateTime, nullable=False),
        Column("updated_at", _schema.UTCDateTime, nullable=False),
        Column("finished_at", _schema.UTCDateTime, nullable=True),
        Index("mm_runs_conversation", "conversation_id"),
        Index("mm_runs_status", "status"),
    )
    conversations_v1.create(conn)
    runs_v1.create(conn)
    # The other version-1 tables, by name: tables added later are created by their own migrations.
    v1 = ("mm_steps", "mm_messages", "mm_artifacts", "mm_parts")
    _schema.metadata.create_all(conn, tables=[_schema.metadata.tables[name] for name in v1])
    if conn.dialect.name == "sqlite":
        # External-content FTS5 over text parts, kept in sync by triggers (cascading deletes fire them too).
        conn.exec_driver_sql(
            f"CREATE VIRTUAL TABLE {_schema.FTS_TABLE} USING fts5(text, content='mm_parts', content_rowid='id', "
            "tokenize='porter unicode61 remove_diacritics 2')"
        )
        fts = _schema.FTS_TABLE
        new_text = "new.kind = 'text' AND new.text IS NOT NULL"
        old_text = "old.kind = 'text' AND old.text IS NOT NULL"
        add = f"INSERT INTO {fts}(rowid, text) SELECT new.id, new.text WHERE {new_text};"
        remove = f"INSERT INTO {fts}({fts}, rowid, text) SELECT 'delete', old.id, old.text WHERE {old_text};"
        conn.exec_driver_sql(f"CREATE TRIGGER mm_parts_fts_ai AFTER INSERT ON mm_parts BEGIN {add} END")
        conn.exec_driver_sql(f"CREATE TRIGGER mm_parts_fts_ad AFTER DELETE ON mm_parts BEGIN {remove} END")
        conn.exec_driver_sql(f"CREATE TRIGGER mm_parts_fts_au AFTER UPDATE ON mm_parts BEGIN {remove} {add} END")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "CREATE INDEX mm_parts_fts ON mm_parts USING GIN "
            f"(to_tsvector('{_schema.PG_FTS_CONFIG}', left(text, {_schema.PG_FTS_MAX_CHARS}))) WHERE kind = 'text'"
        )


def _m2_conversation_lease(conn: Connection) -> None:
    """The run lease on each conversation: the run that may append, the store holding it, until when."""
    added: tuple[tuple[str, TypeEngine[Any]], ...] = (
        ("lease_run_id", String(64)),
        ("lease_holder", String(64)),
        ("lease_expires_at", _schema.UTCDateTime()),
    )
    for name, type_ in added:
        conn.exec_driver_sql(f"ALTER TABLE mm_conversations ADD COLUMN {name} {type_.compile(dialect=conn.dialect)}")


def _m3_parent_run(conn: Connection) -> None:
    """Delegation: a run started by a tool of another run points at it."""
    conn.exec_driver_sql("ALTER TABLE mm_runs ADD COLUMN parent_run_id VARCHAR(64)")
    conn.exec_driver_sql("CREATE INDEX mm_runs_parent ON mm_runs (parent_run_id)")


def _m4_media(conn: Connection) -> None:
    """Media ingestion: collections, sources, segments, their media and features (full-text indexed), and the
    registry of embedders (whose vector tables are made on first use)."""
    frozen = MetaData()
    Table("mm_artifacts", frozen, Column("sha256", String(64), primary_key=True))  # referenced, not created
    row_id = BigInteger().with_variant(Integer(), "sqlite")
    created = [
        Table(
            "mm_collections",
            frozen,
            Column("id", row_id, primary_key=True, autoincrement=True),
            Column("name", String(255), nullable=False, unique=True),
            Column("created_at", _schema.UTCDateTime, nullable=False),
        ),
        Table(
            "mm_sources",
            frozen,
            Column("id", row_id, primary_key=True, autoincrement=True),
            Column("collection_id", ForeignKey("mm_collections.id", ondelete="CASCADE"), nullable=False),
            Column("uri", Text, nullable=False),
            Column("sha256", String(64), nullable=False),
            Column("kind", String(16), nullable=False),
            Column("media_type", String(255), nullable=False),
            Column("size", BigInteger, nullable=False),
            Column("duration", Float, nullable=True),
            Column("pages", Integer, nullable=True),
            Column("local_path", Text, nullable=True),
            Column("metadata", JSON, nullable=False),
            Column("complete", Boolean, nullable=False),
            Column("created_at", _schema.UTCDateTime, nullable=False),
            Column("updated_at", _schema.UTCDateTime, nullable=False),
            UniqueConstraint("collection_id", "uri", name="mm_sources_uri"),
        ),
        Table(
            "mm_segments",
            frozen,
            Column("id", row_id, primary_key=True, autoincrement=True),
            Column("source_id", ForeignKey("mm_sources.id", ondelete="CASCADE"), nullable=False),
            Column("kind", String(16), nullable=False),
            Column("idx", Integer, nullable=False),
            Column("start_s", Float, nullable=True),
            Column("end_s", Float, nullable=True),
            Column("page", Integer, nullable=True),
            UniqueConstraint("source_id", "kind", "idx", name="mm_segments_order"),
        ),
        Table(
            "mm_segment_media",
            frozen,
            Column("segment_id", ForeignKey("mm_segments.id", ondelete="CASCADE"), nullable=False),
            Column("position", Integer, nullable=False),
            Column("role", String(16), nullable=False),
            Column("time_s", Float, nullable=True),
            Column("artifact_sha256", ForeignKey("mm_artifacts.sha256"), nullable=False),
            PrimaryKeyConstraint("segment_id", "position", name="mm_segment_media_pk"),
            Index("mm_segment_media_artifact", "artifact_sha256"),
        ),
        Table(
            "mm_features",
            frozen,
            Column("id", row_id, primary_key=True, autoincrement=True),
            Column("segment_id", ForeignKey("mm_segments.id", ondelete="CASCADE"), nullable=False),
            Column("extractor", String(255), nullable=False),
            Column("version", String(255), nullable=False),
            Column("text", Text, nullable=False),
            Column("data", JSON, nullable=False),
            Column("created_at", _schema.UTCDateTime, nullable=False),
            UniqueConstraint("segment_id", "extractor", name="mm_features_extractor"),
        ),
        Table(
            "mm_embedders",
            frozen,
            Column("id", row_id, primary_key=True, autoincrement=True),
            Column("name", String(255), nullable=False, unique=True),
            Column("dim", Integer, nullable=False),
            Column("created_at", _schema.UTCDateTime, nullable=False),
        ),
    ]
    frozen.create_all(conn, tables=created)
    if conn.dialect.name == "sqlite":
        # Feature text in FTS5, kept in sync by triggers as mm_parts_fts is (cascading deletes fire them too).
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE mm_features_fts USING fts5(text, content='mm_features', content_rowid='id', "
            "tokenize='porter unicode61 remove_diacritics 2')"
        )
        add = "INSERT INTO mm_features_fts(rowid, text) VALUES (new.id, new.text);"
        remove = "INSERT INTO mm_features_fts(mm_features_fts, rowid, text) VALUES ('delete', old.id, old.text);"
        conn.exec_driver_sql(f"CREATE TRIGGER mm_features_fts_ai AFTER INSERT ON mm_features BEGIN {add} END")
        conn.exec_driver_sql(f"CREATE TRIGGER mm_features_fts_ad AFTER DELETE ON mm_features BEGIN {remove} END")
        conn.exec_driver_sql(
            f"CREATE TRIGGER mm_features_fts_au AFTER UPDATE OF text ON mm_features BEGIN {remove} {add} END"
        )
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "CREATE INDEX mm_features_fts ON mm_features USING GIN (to_tsvector('english', left(text, 100000)))"
        )


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _m1_initial,
    _m2_conversation_lease,
    _m3_parent_run,
    _m4_media,
)
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    """The database's schema version (0 for a database mmagent never touched)."""
    if not inspect(conn).has_table(_schema.SCHEMA_VERSION_TABLE):
        return 0
    return int(conn.execute(select(func.coalesce(func.max(version_table.c.version), 0))).scalar_one())


def check_supported(version: int, where: str) -> None:
    """Refuse a database written by a newer mmagent."""
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the memory store at {where} has schema version {version}, but this mmagent knows versions up to "
            f"{SCHEMA_VERSION}: upgrade mmagent to open it (the database was left unchanged)"
        )


def migrate(conn: Connection, where: str) -> int:
    """Apply pending migrations inside the caller's write transaction; return the resulting version."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('mmagent.memory.migrate'))"))
    version_table.create(conn, checkfirst=True)
    version = current_version(conn)
    check_supported(version, where)
    for number in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[number - 1](conn)
        conn.execute(version_table.insert().values(version=number, applied_at=dt.datetime.now(dt.UTC)))
    return SCHEMA_VERSION
