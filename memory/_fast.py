"""The per-step statements of `Store.commit_step`, executed two ways behind one interface.

`CoreSteps` runs `_sql`'s statements through SQLAlchemy (any database). `SqliteSteps` runs the same statements,
compiled once by SQLAlchemy for the store's own SQLite dialect, straight on the sqlite3 connection inside the
transaction SQLAlchemy opened (`BEGIN IMMEDIATE`, then its commit): SQLAlchemy's execution machinery (events,
result objects, parameter construction) cost about 60% of a commit here, the driver's own work about 5%.
Values are converted by the columns' own bind and result processors (the same `UTCDateTime` floats, the same
compact JSON), so rows are identical either way (tests/test_memory_fast.py compares both paths).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect

from memory import _schema as s
from memory import _sql


@dataclass(frozen=True, slots=True)
class StepState:
    """A run's status and first position with its conversation's lease (what `Leases.claim` reads)."""

    status: str
    first_position: int
    id: str
    lease_run_id: str | None
    lease_holder: str | None
    lease_expires_at: dt.datetime | None


class CoreSteps:
    """The statements through SQLAlchemy Core."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def state(self, run_id: str) -> Any:
        return self.conn.execute(_sql.STEP_STATE, {"run_id": run_id}).first()

    def insert_step(self, row: dict[str, Any]) -> bool:
        return _sql.insert_step(self.conn, row)

    def touch(self, cid: str, values: dict[str, Any]) -> int:
        return _sql.touch(self.conn, cid, values)

    def insert_messages(self, rows: list[dict[str, Any]], part_rows: list[dict[str, Any]]) -> None:
        self.conn.execute(_sql.INSERT_MESSAGES, rows)
        if part_rows:
            self.conn.execute(_sql.INSERT_PARTS, part_rows)

    def update_run(self, values: dict[str, Any]) -> None:
        self.conn.execute(_sql.UPDATE_RUN, values)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement as the driver's SQL, its positional parameter names and their bind processors."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    constants: dict[str, Any]  # literals the statement binds itself (the 1 and 0 of `coalesce(max + 1, 0)`)

    def params(self, values: dict[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, proc in zip(self.names, self.processors, strict=True):
            value = values[name] if name in values else self.constants[name]
            out.append(value if proc is None else proc(value))
        return tuple(out)


def _compile(stmt: Any, dialect: Dialect, keys: Sequence[str] | None = None) -> _Compiled:
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
    names = tuple(compiled.positiontup or ())
    binds = compiled.binds
    processors = tuple(binds[name].type.bind_processor(dialect) for name in names)
    constants = {name: binds[name].effective_value for name in names if not binds[name].required}
    return _Compiled(str(compiled), names, processors, constants)


class SqliteStatements:
    """`commit_step`'s statements compiled once for one SQLite dialect (a `Store` keeps one)."""

    _PART_KEYS = ("cid", "message_position", "position", "sub", "kind", "text", "media_type", "payload",
                  "artifact_sha256")  # fmt: skip
    _MESSAGE_KEYS = ("conversation_id", "position", "role", "run_id", "step", "created_at")
    _STEP_KEYS = ("run_id", "step", "phase", "usage", "committed_at")
    _RUN_KEYS = ("status", "error", "finished_at", "usage", "updated_at")
    _LEASE_KEYS = ("lease_run_id", "lease_holder", "lease_expires_at")

    def __init__(self, dialect: Dialect) -> None:
        self.state = _compile(_sql.STEP_STATE, dialect)
        self.insert_step = _compile(_sql.INSERT_STEP_SQLITE, dialect, self._STEP_KEYS)
        self.touch: dict[tuple[str, ...], _Compiled] = {
            keys: _compile(_sql.TOUCH_RETURNING, dialect, keys)
            for keys in (self._LEASE_KEYS, (*self._LEASE_KEYS, "updated_at"))
        }
        self.messages = _compile(_sql.INSERT_MESSAGES, dialect, self._MESSAGE_KEYS)
        self.parts = _compile(_sql.INSERT_PARTS, dialect, self._PART_KEYS)
        self.update_run = _compile(_sql.UPDATE_RUN, dialect, self._RUN_KEYS)
        expires = s.conversations.c.lease_expires_at.type.result_processor(dialect, None)
        self.expires: Callable[[Any], Any] = expires if expires is not None else (lambda value: value)


class SqliteSteps:
    """The statements on the sqlite3 connection under the caller's SQLAlchemy transaction."""

    def __init__(self, conn: Connection, statements: SqliteStatements) -> None:
        self.conn = conn
        self.raw: Any = conn.connection.driver_connection
        self.sql = statements

    def state(self, run_id: str) -> StepState | None:
        row = self.raw.execute(self.sql.state.sql, self.sql.state.params({"run_id": run_id})).fetchone()
        if row is None:
            return None
        status, first, cid, lease_run, holder, expires = row
        return StepState(status, first, cid, lease_run, holder, self.sql.expires(expires))

    def insert_step(self, row: dict[str, Any]) -> bool:
        stmt = self.sql.insert_step
        return self.raw.execute(stmt.sql, stmt.params(row)).fetchone() is not None

    def touch(self, cid: str, values: dict[str, Any]) -> int:
        stmt = self.sql.touch.get(tuple(values))
        if stmt is None:  # another set of columns: the general path
            return _sql.touch(self.conn, cid, values)
        return int(self.raw.execute(stmt.sql, stmt.params({"cid": cid, **values})).fetchone()[0])

    def insert_messages(self, rows: list[dict[str, Any]], part_rows: list[dict[str, Any]]) -> None:
        self.raw.executemany(self.sql.messages.sql, [self.sql.messages.params(r) for r in rows])
        if part_rows:
            self.raw.executemany(self.sql.parts.sql, [self.sql.parts.params(r) for r in part_rows])

    def update_run(self, values: dict[str, Any]) -> None:
        self.raw.execute(self.sql.update_run.sql, self.sql.update_run.params(values))
