"""Full-text search over text parts and tool-result text: SQLite FTS5, PostgreSQL tsvector, LIKE elsewhere.

A query is reduced to its words, all of which must match (FTS5 phrase-quoted terms, `plainto_tsquery`), so
user text never reaches the database as query syntax. English stemming on both backends.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import Any, get_args

from sqlalchemy import ColumnElement, Connection, bindparam, column, func, literal_column, select, table, text
from sqlalchemy.sql import Select

from agent.exceptions import UserError
from memory import _schema as s
from memory._values import SearchHit, SearchKind

_WORD = re.compile(r"\w+", re.UNICODE)
KINDS: tuple[str, ...] = get_args(SearchKind)
_SNIPPET = 240


def terms(query: str) -> list[str]:
    """The words of a query, lower-cased, duplicates removed."""
    return list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))


def _filters(
    conversation_id: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    kinds: Collection[str] | None,
) -> list[ColumnElement[bool]]:
    p, m = s.parts.c, s.messages.c
    out: list[ColumnElement[bool]] = []
    if conversation_id is not None:
        out.append(m.conversation_id == conversation_id)
    if since is not None:
        out.append(m.created_at >= since)
    if until is not None:
        out.append(m.created_at < until)
    if kinds is not None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise UserError(f"unknown search kind(s) {sorted(unknown)}: use {list(KINDS)}")
        if not kinds:
            out.append(p.sub < 0)  # nothing
        elif set(kinds) == {"text"}:
            out.append(p.sub == 0)
        elif set(kinds) == {"tool-result"}:
            out.append(p.sub > 0)
    return out


def _base(rank: ColumnElement[Any]) -> Select[Any]:
    p, m = s.parts.c, s.messages.c
    return select(
        p.message_id,
        p.position,
        p.sub,
        p.text,
        m.conversation_id,
        m.position.label("message_position"),
        m.role,
        m.created_at,
        m.run_id,
        rank.label("score"),
    )


def search(
    conn: Connection,
    query: str,
    *,
    conversation_id: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    kinds: Collection[str] | None,
    limit: int,
) -> list[SearchHit]:
    """Best-matching parts first."""
    if limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    filters = _filters(conversation_id, since, until, kinds)
    words = terms(query)
    if not words:
        return []
    p, m = s.parts, s.messages
    dialect = conn.dialect.name
    if dialect == "sqlite":
        fts = table(s.FTS_TABLE, column("rowid"), column("rank"))
        stmt = (
            _base(-fts.c.rank)
            .select_from(fts.join(p, p.c.id == fts.c.rowid).join(m, m.c.id == p.c.message_id))
            .where(text(f"{s.FTS_TABLE} MATCH :match").bindparams(match=" ".join(f'"{w}"' for w in words)))
            .order_by(fts.c.rank)
        )
    elif dialect == "postgresql":
        # Literal config, length and kind: the expressions must match the GIN index's to use it.
        config: ColumnElement[Any] = literal_column(f"'{s.PG_FTS_CONFIG}'")
        doc = func.to_tsvector(config, func.left(p.c.text, literal_column(str(s.PG_FTS_MAX_CHARS))))
        tsq = func.plainto_tsquery(config, bindparam("q", " ".join(words)))
        stmt = (
            _base(func.ts_rank(doc, tsq))
            .select_from(p.join(m, m.c.id == p.c.message_id))
            .where(p.c.kind == literal_column("'text'"), doc.op("@@")(tsq))
            .order_by(literal_column("score").desc())
        )
    else:  # any other database: a substring scan
        stmt = (
            _base(literal_column("0.0"))
            .select_from(p.join(m, m.c.id == p.c.message_id))
            .where(p.c.kind == "text", *(p.c.text.ilike(f"%{w}%") for w in words))
            .order_by(m.c.created_at.desc())
        )
    rows = conn.execute(stmt.where(*filters).order_by(p.c.id).limit(limit)).all()
    return _hits(conn, rows, words)


def _hits(conn: Connection, rows: Sequence[Any], words: list[str]) -> list[SearchHit]:
    if not rows:
        return []
    p = s.parts.c
    ids = list({r.message_id for r in rows})
    extras = conn.execute(
        select(p.message_id, p.position, p.sub, p.kind, p.payload, p.artifact_sha256)
        .where(p.message_id.in_(ids), (p.artifact_sha256.is_not(None)) | (p.kind == "tool-result"))
        .order_by(p.message_id, p.position, p.sub)
    ).all()
    media: dict[tuple[int, int | None], list[str]] = defaultdict(list)
    tool_names: dict[tuple[int, int], str] = {}
    for e in extras:
        if e.kind == "tool-result":
            tool_names[(e.message_id, e.position)] = (e.payload or {}).get("name", "")
        elif e.sub == 0:
            media[(e.message_id, None)].append(e.artifact_sha256)
        else:
            media[(e.message_id, e.position)].append(e.artifact_sha256)
    hits = []
    for r in rows:
        in_result = r.sub > 0
        key = (r.message_id, r.position if in_result else None)
        hits.append(
            SearchHit(
                conversation_id=r.conversation_id,
                message_index=r.message_position,
                role=r.role,
                kind="tool-result" if in_result else "text",
                text=r.text,
                snippet=snippet(r.text, words),
                score=float(r.score),
                created_at=r.created_at,
                run_id=r.run_id,
                tool_name=tool_names.get((r.message_id, r.position)) if in_result else None,
                media=tuple(dict.fromkeys(media.get(key, []))),
            )
        )
    return hits


def snippet(body: str, words: Sequence[str], width: int = _SNIPPET) -> str:
    """About `width` characters of `body` around the first word that matches (by prefix, for stems)."""
    if len(body) <= width:
        return body
    lowered = body.lower()
    found = [i for w in words if (i := lowered.find(w[: max(3, len(w) - 2)])) >= 0]
    centre = min(found) if found else 0
    start = max(0, min(centre - width // 3, len(body) - width))
    piece = body[start : start + width]
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(body) else "")
