"""Opening a database: URL handling, SQLite connection settings, transactions, error mapping."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from agent.exceptions import StoreError, UserError

_BEGIN = "mmagent_begin"


@dataclass(slots=True)
class Database:
    """An engine plus what the store needs to know about it."""

    engine: Engine
    where: str  # for messages: a file path or the URL without its password
    path: Path | None  # the SQLite file, None for in-memory and server databases
    lock: AbstractContextManager[Any]  # serialises access to a single shared connection (in-memory SQLite)
    # The engine with each kind of transaction's options set once (not on every connection: that costs a step).
    _reader: Engine = field(init=False)
    _writer: Engine = field(init=False)

    def __post_init__(self) -> None:
        self._reader = self._writer = self.engine
        if self.dialect == "sqlite":
            self._reader = self.engine.execution_options(**{_BEGIN: "DEFERRED"})
            self._writer = self.engine.execution_options(**{_BEGIN: "IMMEDIATE"})
        elif self.dialect == "postgresql":
            self._reader = self.engine.execution_options(isolation_level="REPEATABLE READ")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Connection]:
        """One transaction. SQLite writes take the write lock up front (`BEGIN IMMEDIATE`), so concurrent
        writers queue on the busy timeout instead of failing to upgrade a read lock; PostgreSQL reads run in
        REPEATABLE READ so a multi-statement read sees one snapshot."""
        with self.lock:
            try:
                with (self._writer if write else self._reader).connect() as conn, conn.begin():
                    yield conn
            except OperationalError as exc:
                raise StoreError(f"memory store {self.where}: {_reason(exc)}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"memory store {self.where}: {type(exc).__name__}: {_reason(exc)}") from exc


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_database(target: str | os.PathLike[str], *, busy_timeout: float, durable: bool, echo: bool) -> Database:
    """Create the engine for a path or URL (no connection is made yet)."""
    if isinstance(target, os.PathLike) or ("://" not in target and target != ":memory:"):
        url = make_url("sqlite://").set(database=os.fspath(target))
    elif target == ":memory:":
        url = make_url("sqlite://")
    else:
        try:
            url = make_url(target)
        except ArgumentError as exc:
            raise UserError(f"not a database path or SQLAlchemy URL: {target!r} ({exc})") from exc
    where = url.render_as_string(hide_password=True)
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _compact_json}
    path: Path | None = None
    lock: AbstractContextManager[Any] = nullcontext()
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        memory = database in ("", ":memory:") or database.startswith("file::memory:")
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
        if memory:
            kwargs["poolclass"] = StaticPool  # one shared connection: every thread sees the same database
            lock = threading.RLock()
            where = ":memory:"
        else:
            path = Path(database).expanduser().absolute()
            where = str(path)
    try:
        engine = create_engine(url, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        hint = " (PostgreSQL needs `pip install 'psycopg[binary]'`)" if "postgres" in url.drivername else ""
        raise UserError(f"cannot use database URL {where!r}: {exc}{hint}") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, busy_timeout=busy_timeout, durable=durable, wal=path is not None)
    return Database(engine=engine, where=where, path=path, lock=lock)


def _configure_sqlite(engine: Engine, *, busy_timeout: float, durable: bool, wal: bool) -> None:
    pragmas = [f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}", "PRAGMA foreign_keys = ON"]
    if wal:
        pragmas.append("PRAGMA journal_mode = WAL")
    # WAL + NORMAL survives any process crash; FULL also survives power loss (one fsync per commit).
    pragmas.append(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun explicitly below
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: SQLAlchemy's statement path would cost more than the BEGIN itself.
        sql = f"BEGIN {conn.get_execution_options().get(_BEGIN, 'DEFERRED')}"
        try:
            conn.connection.driver_connection.execute(sql)  # type: ignore[union-attr]
        except sqlite3.Error as exc:  # e.g. "database is locked" past the busy timeout
            raise DBAPIError.instance(sql, (), exc, sqlite3.Error) from exc
