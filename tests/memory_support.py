"""Shared fixtures for the memory tests: every store test runs on SQLite and on PostgreSQL.

PostgreSQL tests use a fresh schema each (selected through the URL's `search_path`) and drop it afterwards.
They skip when no server answers; `MMAGENT_TEST_POSTGRES` (a libpq conninfo string) picks the server.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from memory import Store

_CANDIDATES = (
    "host=127.0.0.1 port=5432 user=root dbname=test connect_timeout=3",
    "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3",
)


@functools.cache
def postgres_conninfo() -> str | None:
    """A conninfo string that connects, or None (with the reason in `postgres_skip_reason`)."""
    try:
        import psycopg
    except ImportError:
        return None
    candidates = [os.environ["MMAGENT_TEST_POSTGRES"]] if os.environ.get("MMAGENT_TEST_POSTGRES") else _CANDIDATES
    for conninfo in candidates:
        try:
            with psycopg.connect(conninfo):
                return conninfo
        except psycopg.Error:
            continue
    return None


def postgres_skip_reason() -> str:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return "no PostgreSQL server answers on 127.0.0.1:5432 (set MMAGENT_TEST_POSTGRES to a conninfo string)"


def _pg_url(conninfo: str, schema: str) -> str:
    import psycopg.conninfo

    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = params.get("user", "postgres")
    password = f":{quote(str(params['password']))}" if params.get("password") else ""
    host, port, dbname = params.get("host", "127.0.0.1"), params.get("port", 5432), params.get("dbname", "postgres")
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{dbname}?options=-csearch_path%3D{schema}"


def pg_execute(sql: str) -> list[tuple[object, ...]]:
    """Run one statement on the test server (autocommit) and return its rows."""
    import psycopg

    conninfo = postgres_conninfo()
    assert conninfo is not None
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(sql.encode())
        return list(cur.fetchall()) if cur.description else []


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(name="store_url", params=BACKENDS)
def store_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty store: an SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield str(tmp_path / "memory.db")
        return
    conninfo = postgres_conninfo()
    if conninfo is None:
        pytest.skip(postgres_skip_reason())
    schema = f"mmtest_{uuid.uuid4().hex[:12]}"
    pg_execute(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_url(conninfo, schema)
    finally:
        pg_execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(name="store")
def store_fixture(store_url: str) -> Iterator[Store]:
    """An open, empty store on each backend."""
    with Store(store_url) as opened:
        yield opened


def pg_schema(url: str) -> str:
    """The schema a test URL selects."""
    return url.rsplit("%3D", 1)[1]


def pg_size(url: str, tables: tuple[str, ...] | None = None) -> int:
    """Bytes in the main forks of the tables (default: all) of a test schema, with their TOAST and indexes."""
    schema = pg_schema(url)
    only = "" if tables is None else " AND t.relname IN (" + ", ".join(f"'{t}'" for t in tables) + ")"
    rows = pg_execute(
        f"""
        WITH t AS (SELECT oid, reltoastrelid FROM pg_class t
                   WHERE t.relnamespace = '{schema}'::regnamespace AND t.relkind = 'r'{only}),
        rel AS (SELECT oid FROM t
                UNION SELECT reltoastrelid FROM t WHERE reltoastrelid <> 0
                UNION SELECT i.indexrelid FROM pg_index i JOIN t ON i.indrelid IN (t.oid, t.reltoastrelid))
        SELECT coalesce(sum(pg_relation_size(oid)), 0) FROM rel
        """
    )
    return int(str(rows[0][0]))


@functools.cache
def _pgvector_available() -> bool:
    return bool(pg_execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"))


def need_vectors(store_url: str) -> None:
    """Skip, saying why, where this backend cannot store vectors here."""
    if store_url.startswith("postgresql"):
        if not _pgvector_available():
            pytest.skip("the PostgreSQL server has no pgvector extension (pg_available_extensions lacks 'vector')")
    elif importlib.util.find_spec("sqlite_vec") is None:
        pytest.skip("sqlite-vec is not installed (pip install 'mmagent[ingest]')")
