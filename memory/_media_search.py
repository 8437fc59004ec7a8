"""Finding segments: full-text search over feature text, nearest vectors, and reciprocal rank fusion of the two.

Full text takes a query as words only (never query syntax), as `memory._search` does, but matches features
holding *any* of them, best first (bm25 on SQLite FTS5, `ts_rank` on PostgreSQL, English stemming): queries
here are often questions in natural language ("what did the speaker say about the budget"), which rarely hold
only words the text has. Common English words are left out of the query while others remain (PostgreSQL drops
its own stop words). A segment ranks by its best feature.

Vectors arrive computed (a store never runs a model). Each embedder (a name and a dimension, in `mm_embedders`)
gets its own table `mm_vec_<id>` on first use, holding up to one vector per segment and modality (text, image):

- SQLite: a sqlite-vec `vec0` virtual table (cosine distance; row id `segment_id * 2 + modality`) with the
  segment's collection, source, kind and times as metadata columns, so every filter is applied inside the
  nearest-neighbour scan. A virtual table has no foreign keys: deleting segments deletes their vectors
  explicitly (`delete_vectors`), in the same transaction. sqlite-vec comes with `pip install 'mmagent[ingest]'`
  and is loaded into a connection the first time it touches vectors. Where Python's `sqlite3` was built without
  extension loading (pyenv's default), it is registered once per process, when an SQLite store opens, as an
  automatic extension through SQLite's C API (`sqlite3_auto_extension`): every SQLite connection opened later
  in the process gets its functions.
- PostgreSQL: pgvector (`CREATE EXTENSION IF NOT EXISTS vector` on first use), a table with a `vector(dim)`
  column, a foreign key to the segment (deletes cascade) and an HNSW cosine index.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import math
import sqlite3
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    ColumnElement,
    Connection,
    bindparam,
    column,
    func,
    insert,
    literal_column,
    or_,
    select,
    table,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Select

from agent.exceptions import StoreError, UserError
from memory import _schema as s
from memory._engine import Database
from memory._search import terms

MODALITIES = ("text", "image")
RRF_K = 60  # reciprocal rank fusion: score = sum over lists of 1 / (RRF_K + rank)
MAX_DEPTH = 1000  # the most candidates taken from each list
_VEC0_MAX_K = 4096  # sqlite-vec's largest k
_NO_START, _NO_END = 1e308, -1e308  # an untimed segment's times in vec0 (metadata cannot be NULL): never overlap
_MAX_WORDS = 32  # words of a full-text query looked for; the rest are ignored
_STOP_TEXT = (
    "a about above after again all am an and any are as at be been before being below between both but by can "
    "could did do does doing down during each few for from further had has have having he her here hers him his "
    "how i if in into is it its me more most my no nor not of off on once only or other our out over own same she "
    "should so some such than that the their them then there these they this those through to too under until up "
    "very was we were what when where which while who whom why will with would you your"
)
STOP_WORDS = frozenset(_STOP_TEXT.split())
"""Common English words a full-text query leaves out (when it has others): with any-word matching they would
match nearly every feature."""
_MMAP_BYTES = 1 << 30  # SQLite connections that scan vectors read the file through mmap (~1.6x faster scans)
_PG_LOCK = "hashtext('mmagent.memory.embedders')"
_PG_HNSW_MAX_DIM = 2000  # pgvector indexes vector columns of up to 2,000 dimensions
_INSTALL = "pip install 'mmagent[ingest]'"
_VEC_READY = "mmagent.sqlite_vec"  # key in a pooled connection's info: sqlite-vec is loaded there


class Embedder(NamedTuple):
    """A row of `mm_embedders`."""

    id: int
    name: str
    dim: int

    @property
    def table(self) -> str:
        return f"mm_vec_{self.id}"


@dataclass(frozen=True, slots=True)
class Filters:
    """What `search_media` narrows both lists to (None: no restriction)."""

    collection_id: int | None = None
    kinds: tuple[str, ...] | None = None
    source_id: int | None = None
    start: float | None = None
    end: float | None = None


class SegmentMeta(NamedTuple):
    """What a vec0 row repeats of its segment, to filter inside the scan."""

    collection_id: int
    source_id: int
    kind: str
    start: float | None
    end: float | None


# ------------------------------------------------------------------ sqlite-vec loading

_lock = threading.Lock()
_auto: str | None = None  # None: not tried; "" registered; else why it could not be
_keep: list[ctypes.CDLL] = []  # the libraries whose functions SQLite now calls


def _vec_library() -> Path:
    try:
        sqlite_vec: Any = importlib.import_module("sqlite_vec")  # no type information shipped
    except ImportError:
        raise UserError(f"vectors in an SQLite memory store need sqlite-vec: {_INSTALL}") from None
    base = Path(sqlite_vec.loadable_path())
    for suffix in (".so", ".dylib", ".dll"):
        if base.with_suffix(suffix).is_file():
            return base.with_suffix(suffix)
    raise UserError(f"sqlite-vec is installed without its library ({base}.*): reinstall it ({_INSTALL})")


def prepare(db: Database) -> None:
    """Before an SQLite store's first connection: where `sqlite3` cannot load extensions, register sqlite-vec
    as an automatic extension (once per process) if it is installed. Nothing else is loaded here."""
    global _auto
    if db.dialect != "sqlite" or hasattr(sqlite3.Connection, "enable_load_extension") or _auto is not None:
        return
    try:
        installed = importlib.util.find_spec("sqlite_vec") is not None
    except (ImportError, ValueError):  # e.g. blocked through sys.modules
        installed = False
    if not installed:
        return  # vectors raise a UserError naming the install when used
    with _lock:
        if _auto is not None:
            return
        try:
            capi = ctypes.CDLL(importlib.import_module("_sqlite3").__file__)
            vec = ctypes.CDLL(str(_vec_library()))
            register = capi.sqlite3_auto_extension
            register.argtypes, register.restype = [ctypes.c_void_p], ctypes.c_int
            code = register(ctypes.cast(vec.sqlite3_vec_init, ctypes.c_void_p))
            _auto = "" if code == 0 else f"sqlite3_auto_extension returned {code}"
            _keep.extend((capi, vec))
        except (OSError, AttributeError, TypeError, UserError) as exc:
            _auto = f"{type(exc).__name__}: {exc}"


def ensure_vec(conn: Connection) -> None:
    """Make sure sqlite-vec is loaded on this SQLite connection (a no-op elsewhere).

    Raises:
        UserError: sqlite-vec is not installed, or this Python's `sqlite3` cannot load it.
    """
    if conn.dialect.name != "sqlite":
        return
    pooled = conn.connection
    if pooled.info.get(_VEC_READY):
        return
    raw: Any = pooled.driver_connection
    try:
        raw.execute("SELECT vec_version()")
    except sqlite3.OperationalError:
        if not hasattr(raw, "enable_load_extension"):
            _vec_library()  # names the install when it is missing
            why = _auto or "the connection was opened before sqlite-vec was registered"
            raise UserError(
                "this Python's sqlite3 module cannot load extensions and sqlite-vec could not be registered "
                f"through SQLite's C API ({why}): use a Python built with --enable-loadable-sqlite-extensions"
            ) from None
        path = _vec_library()
        raw.enable_load_extension(True)
        try:
            raw.load_extension(str(path.with_suffix("")))
        except sqlite3.OperationalError as exc:
            raise UserError(f"cannot load sqlite-vec from {path}: {exc}") from exc
        finally:
            raw.enable_load_extension(False)
    raw.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
    pooled.info[_VEC_READY] = True


# ------------------------------------------------------------------ embedders and their tables


def embedders(conn: Connection) -> list[Embedder]:
    """Every registered embedder."""
    e = s.embedders.c
    return [Embedder(r.id, r.name, r.dim) for r in conn.execute(select(e.id, e.name, e.dim).order_by(e.id))]


def find_embedder(conn: Connection, name: str) -> Embedder | None:
    """The embedder with this name, if any vectors were ever stored under it."""
    e = s.embedders.c
    row = conn.execute(select(e.id, e.name, e.dim).where(e.name == name)).first()
    return None if row is None else Embedder(row.id, row.name, row.dim)


def ensure_embedder(conn: Connection, name: str, dim: int, now: Any) -> Embedder:
    """The embedder `name`, registered with its vector table on first use.

    Raises:
        UserError: `name` was registered with another dimension.
        StoreError: PostgreSQL lacks pgvector.
    """
    found = find_embedder(conn, name)
    if found is None and conn.dialect.name == "postgresql":
        conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})"))
        found = find_embedder(conn, name)  # another process may have registered it meanwhile
    if found is not None:
        if found.dim != dim:
            raise UserError(
                f"embedder {name!r} stores {found.dim}-dimensional vectors, not {dim}: use another name for "
                "another model (or delete its sources and re-embed)"
            )
        return found
    ensure_vec(conn)
    if conn.dialect.name == "postgresql":
        _create_pgvector(conn)
    elif conn.dialect.name != "sqlite":
        raise UserError(f"vectors need SQLite (sqlite-vec) or PostgreSQL (pgvector), not {conn.dialect.name}")
    new_id = conn.execute(
        insert(s.embedders).values(name=name, dim=dim, created_at=now).returning(s.embedders.c.id)
    ).scalar_one()
    made = Embedder(int(new_id), name, dim)
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            f"CREATE VIRTUAL TABLE {made.table} USING vec0(embedding float[{dim}] distance_metric=cosine, "
            "collection_id integer, source_id integer, kind text, start_s float, end_s float)"
        )
    else:
        conn.exec_driver_sql(
            f"CREATE TABLE {made.table} (segment_id BIGINT NOT NULL REFERENCES mm_segments (id) ON DELETE CASCADE, "
            f"modality VARCHAR(8) NOT NULL, embedding vector({dim}) NOT NULL, PRIMARY KEY (segment_id, modality))"
        )
        if dim <= _PG_HNSW_MAX_DIM:
            conn.exec_driver_sql(
                f"CREATE INDEX {made.table}_hnsw ON {made.table} USING hnsw (embedding vector_cosine_ops)"
            )
    return made


def _create_pgvector(conn: Connection) -> None:
    if conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is None:
        raise StoreError(
            "vectors in a PostgreSQL memory store need the pgvector extension, which this server lacks: install "
            "pgvector on the server (https://github.com/pgvector/pgvector)"
        )
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS vector")
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise StoreError(f"cannot enable pgvector (CREATE EXTENSION vector) in this database: {reason}") from exc


# ------------------------------------------------------------------ writing and deleting vectors


def as_vector(value: Sequence[float] | npt.NDArray[Any], dim: int, what: str) -> npt.NDArray[np.float32]:
    """A vector as float32, checked: length `dim`, finite, not all zeros."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} is not a vector of numbers: {exc}") from None
    if array.ndim != 1 or array.shape[0] != dim:
        raise UserError(f"{what} has {array.shape[0] if array.ndim == 1 else array.shape} values, not {dim}")
    if not np.isfinite(array).all():
        raise UserError(f"{what} holds NaN or infinite values")
    if not array.any():
        raise UserError(f"{what} is all zeros: it has no direction to compare by cosine")
    return array


def _pg_text(vector: npt.NDArray[np.float32]) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


def write_vectors(
    conn: Connection,
    embedder: Embedder,
    rows: dict[tuple[int, str], npt.NDArray[np.float32]],
    meta: dict[int, SegmentMeta],
) -> None:
    """Insert or replace one vector per (segment, modality)."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        ensure_vec(conn)
        ids = [segment * 2 + MODALITIES.index(modality) for segment, modality in rows]
        for i in range(0, len(ids), 500):  # vec0 has no upsert: replace = delete + insert
            chunk = ids[i : i + 500]
            conn.exec_driver_sql(
                f"DELETE FROM {embedder.table} WHERE rowid IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )
        values = []
        for rowid, ((segment, _), vector) in zip(ids, rows.items(), strict=True):
            m = meta[segment]
            start = _NO_START if m.start is None else m.start
            end = _NO_END if m.end is None else m.end
            values.append((rowid, vector.tobytes(), m.collection_id, m.source_id, m.kind, start, end))
        conn.exec_driver_sql(
            f"INSERT INTO {embedder.table} (rowid, embedding, collection_id, source_id, kind, start_s, end_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            text(
                f"INSERT INTO {embedder.table} (segment_id, modality, embedding) VALUES (:s, :m, CAST(:v AS vector)) "
                "ON CONFLICT (segment_id, modality) DO UPDATE SET embedding = excluded.embedding"
            ),
            [{"s": segment, "m": modality, "v": _pg_text(vector)} for (segment, modality), vector in rows.items()],
        )


def delete_vectors(conn: Connection, segment_ids: Sequence[int]) -> None:
    """SQLite: delete every embedder's vectors of these segments (vec0 has no foreign keys). PostgreSQL's vector
    tables cascade from the segments."""
    if conn.dialect.name != "sqlite" or not segment_ids:
        return
    registered = embedders(conn)
    if not registered:
        return
    ensure_vec(conn)
    rowids = [segment * 2 + m for segment in segment_ids for m in range(len(MODALITIES))]
    for embedder in registered:
        for i in range(0, len(rowids), 500):
            chunk = rowids[i : i + 500]
            conn.exec_driver_sql(
                f"DELETE FROM {embedder.table} WHERE rowid IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )


def stored_vectors(conn: Connection, embedder: Embedder, segment_ids: Sequence[int]) -> set[tuple[int, str]]:
    """(segment_id, modality) of the vectors this embedder holds for these segments."""
    out: set[tuple[int, str]] = set()
    if conn.dialect.name == "sqlite":
        ensure_vec(conn)
        rowids = [segment * 2 + m for segment in segment_ids for m in range(len(MODALITIES))]
        for i in range(0, len(rowids), 500):
            chunk = rowids[i : i + 500]
            found = conn.exec_driver_sql(
                f"SELECT rowid FROM {embedder.table} WHERE rowid IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )
            out.update((rowid // 2, MODALITIES[rowid % 2]) for (rowid,) in found)
        return out
    for i in range(0, len(segment_ids), 500):
        chunk = list(segment_ids[i : i + 500])
        found = conn.execute(
            text(f"SELECT segment_id, modality FROM {embedder.table} WHERE segment_id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"ids": chunk},
        )
        out.update((int(r.segment_id), str(r.modality)) for r in found)
    return out


# ------------------------------------------------------------------ ranked lists


def _segment_filters(filters: Filters) -> list[ColumnElement[bool]]:
    g, src = s.segments.c, s.sources.c
    out: list[ColumnElement[bool]] = []
    if filters.collection_id is not None:
        out.append(src.collection_id == filters.collection_id)
    if filters.kinds is not None:
        out.append(g.kind.in_(filters.kinds))
    if filters.source_id is not None:
        out.append(g.source_id == filters.source_id)
    if filters.start is not None:
        out.append(g.end_s >= filters.start)
    if filters.end is not None:
        out.append(g.start_s <= filters.end)
    return out


def _joined(stmt: Select[Any], filters: Filters, on: Any) -> Select[Any]:
    """Join the segment (and its source, to filter by collection) to a statement whose rows name a segment."""
    g = s.segments
    joined = stmt.join(g, g.c.id == on)
    if filters.collection_id is not None:
        joined = joined.join(s.sources, s.sources.c.id == g.c.source_id)
    return joined.where(*_segment_filters(filters))


def query_words(query: str) -> list[str]:
    """The words a full-text query looks for: `terms(query)` less common English words (unless only those are
    there), at most `_MAX_WORDS`."""
    words = terms(query)
    kept = [w for w in words if w not in STOP_WORDS]
    return (kept or words)[:_MAX_WORDS]


def text_ranked(conn: Connection, query: str, filters: Filters, depth: int) -> list[int]:
    """The best `depth` segments whose feature text holds any word of `query`, best first."""
    words = query_words(query)
    if not words:
        return []
    f = s.features
    if conn.dialect.name == "sqlite":
        fts = table(s.FEATURES_FTS_TABLE, column("rowid"), column("rank"))
        best: Any = func.min(fts.c.rank)
        match = " OR ".join(f'"{w}"' for w in words)
        stmt = (
            select(f.c.segment_id, best.label("r"))
            .select_from(fts.join(f, f.c.id == fts.c.rowid))
            .where(text(f"{s.FEATURES_FTS_TABLE} MATCH :match").bindparams(match=match))
        )
        order: list[Any] = [best, f.c.segment_id]
    elif conn.dialect.name == "postgresql":
        # Literal config and length: the expression must match the GIN index's to use it.
        config: ColumnElement[Any] = literal_column(f"'{s.PG_FTS_CONFIG}'")
        doc = func.to_tsvector(config, func.left(f.c.text, literal_column(str(s.PG_FTS_MAX_CHARS))))
        each = [func.plainto_tsquery(config, bindparam(f"q{i}", w)) for i, w in enumerate(words)]
        tsq: ColumnElement[Any] = each[0]
        for more in each[1:]:
            tsq = tsq.op("||")(more)  # tsquery OR
        best = func.max(func.ts_rank(doc, tsq))
        stmt = select(f.c.segment_id, best.label("r")).select_from(f).where(doc.op("@@")(tsq))
        order = [best.desc(), f.c.segment_id]
    else:  # any other database: a substring scan
        stmt = select(f.c.segment_id, func.count().label("r")).where(or_(*(f.c.text.ilike(f"%{w}%") for w in words)))
        order = [f.c.segment_id]
    stmt = _joined(stmt, filters, f.c.segment_id).group_by(f.c.segment_id).order_by(*order).limit(depth)
    return [int(r.segment_id) for r in conn.execute(stmt)]


def vector_ranked(
    conn: Connection, embedder: Embedder, vector: npt.NDArray[np.float32], filters: Filters, depth: int
) -> list[int]:
    """The `depth` segments nearest `vector` (cosine; a segment counts by its nearest modality), nearest first."""
    k = min(_VEC0_MAX_K, depth * len(MODALITIES))
    if conn.dialect.name == "sqlite":
        ensure_vec(conn)
        where = ["embedding MATCH ?", "k = ?"]
        params: list[Any] = [vector.tobytes(), k]
        if filters.collection_id is not None:
            where.append("collection_id = ?")
            params.append(filters.collection_id)
        if filters.kinds is not None:
            where.append(f"kind IN ({','.join('?' * len(filters.kinds))})")
            params.extend(filters.kinds)
        if filters.source_id is not None:
            where.append("source_id = ?")
            params.append(filters.source_id)
        if filters.start is not None:
            where.append("end_s >= ?")
            params.append(filters.start)
        if filters.end is not None:
            where.append("start_s <= ?")
            params.append(filters.end)
        rows = conn.exec_driver_sql(
            f"SELECT rowid, distance FROM {embedder.table} WHERE {' AND '.join(where)}", tuple(params)
        ).all()
        found = [(int(rowid) // 2, float(distance)) for rowid, distance in rows]
    else:
        narrowed = any(v is not None for v in (filters.collection_id, filters.kinds, filters.source_id))
        conn.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(min(1000, max(40, k)))})
        if narrowed or filters.start is not None or filters.end is not None:  # keep scanning past filtered rows
            conn.execute(text("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)"))
        v = table(embedder.table, column("segment_id"), column("embedding"))
        nearness = v.c.embedding.op("<=>")(text("CAST(:q AS vector)")).label("d")
        stmt = _joined(select(v.c.segment_id, nearness).select_from(v), filters, v.c.segment_id)
        rows = conn.execute(stmt.order_by(literal_column("d")).limit(k), {"q": _pg_text(vector)}).all()
        found = [(int(r.segment_id), float(r.d)) for r in rows]
    best: dict[int, float] = {}
    for segment, distance in found:
        if not math.isnan(distance) and distance < best.get(segment, math.inf):
            best[segment] = distance
    return [segment for segment, _ in sorted(best.items(), key=lambda item: (item[1], item[0]))][:depth]


def fuse(lists: Mapping[str, Sequence[int]], limit: int) -> list[tuple[int, float, dict[str, int]]]:
    """Reciprocal rank fusion: (segment_id, score, ranks by list) of the best `limit` segments."""
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, ids in lists.items():
        for rank, segment in enumerate(ids, start=1):
            scores[segment] = scores.get(segment, 0.0) + 1.0 / (RRF_K + rank)
            ranks.setdefault(segment, {})[name] = rank
    ordered = sorted(scores, key=lambda sid: (-scores[sid], min(ranks[sid].values()), sid))
    return [(sid, scores[sid], ranks[sid]) for sid in ordered[:limit]]


def segment_meta(conn: Connection, segment_ids: Iterable[int]) -> dict[int, SegmentMeta]:
    """Collection, source, kind and times of these segments (those that exist)."""
    g, src = s.segments.c, s.sources.c
    out: dict[int, SegmentMeta] = {}
    wanted = sorted(set(segment_ids))
    for i in range(0, len(wanted), 500):
        rows = conn.execute(
            select(g.id, src.collection_id, g.source_id, g.kind, g.start_s, g.end_s)
            .join(s.sources, src.id == g.source_id)
            .where(g.id.in_(wanted[i : i + 500]))
        )
        out.update((int(r.id), SegmentMeta(r.collection_id, r.source_id, r.kind, r.start_s, r.end_s)) for r in rows)
    return out


def check_kinds(kinds: Collection[str] | None, allowed: Sequence[str]) -> tuple[str, ...] | None:
    """`kinds` as a tuple, checked against `allowed`."""
    if kinds is None:
        return None
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise UserError(f"unknown segment kind(s) {unknown}: use {list(allowed)}")
    return tuple(dict.fromkeys(kinds))
