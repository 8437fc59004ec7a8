"""Statements of the hot paths, built once with bind parameters.

Building a Core statement and deriving its cache key cost more than executing it (~125 µs against ~25 µs on
SQLite): these are built at import, and SQLAlchemy finds their compiled form in its cache on every execution.
INSERTs and UPDATEs without `.values()` take their columns from the parameters at execution (one compiled
form per set of keys). `Store.commit_step` uses six: `STEP_STATE`, an insert into `mm_steps`, `TOUCH_RETURNING`
(its RETURNING gives the next message position), `INSERT_MESSAGES`, `INSERT_PARTS` and `UPDATE_RUN`; the
messages and parts go in one executemany each, however many there are.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from memory import _schema as s

_c, _r, _m, _st = s.conversations.c, s.runs.c, s.messages.c, s.steps.c

RUN = select(s.runs).where(_r.id == bindparam("run_id"))

# Serialise a conversation's writers (row lock on PostgreSQL; SQLite's BEGIN IMMEDIATE holds the write lock).
LOCK_CONVERSATION = (
    select(_c.id, _c.lease_run_id, _c.lease_holder, _c.lease_expires_at)
    .where(_c.id == bindparam("cid"))
    .with_for_update()
)

# A step's run and its conversation's lease in one row, the conversation locked. The run row is not locked:
# writers lock the conversation first, then touch its runs (`end_run` too), so the order stays the same.
STEP_STATE = (
    select(
        _r.status,
        _r.first_position,
        _c.id,
        _c.lease_run_id,
        _c.lease_holder,
        _c.lease_expires_at,
    )
    .select_from(s.runs.join(s.conversations, _c.id == _r.conversation_id))
    .where(_r.id == bindparam("run_id"))
    .with_for_update(of=s.conversations)
)

NEXT_POSITION = select(func.coalesce(func.max(_m.position) + 1, 0)).where(_m.conversation_id == bindparam("cid"))
# Set the conversation columns given as parameters. TOUCH_RETURNING also reads the next free message position,
# in a statement that starts after the caller's lock was granted (on PostgreSQL it sees every earlier writer).
TOUCH = update(s.conversations).where(_c.id == bindparam("cid"))
TOUCH_RETURNING = TOUCH.returning(NEXT_POSITION.scalar_subquery())

STEP_DONE = select(func.count()).where(
    _st.run_id == bindparam("run_id"), _st.step == bindparam("step"), _st.phase == bindparam("phase")
)
# A taken key inserts nothing and returns no row (rowcount is not reliable after an INSERT on every driver).
_INSERT_STEP = {
    "sqlite": sqlite.insert(s.steps).on_conflict_do_nothing().returning(_st.step),
    "postgresql": postgresql.insert(s.steps).on_conflict_do_nothing().returning(_st.step),
}

INSERT_STEP_SQLITE = _INSERT_STEP["sqlite"]

INSERT_RUN = insert(s.runs)
INSERT_MESSAGES = insert(s.messages)
# A part finds its message by (conversation, position), the unique key: no ids are read back, so any number of
# messages takes two statements (RETURNING ids in order cost one INSERT per message on SQLite).
INSERT_PARTS = insert(s.parts).values(
    message_id=select(_m.id)
    .where(_m.conversation_id == bindparam("cid"), _m.position == bindparam("message_position"))
    .scalar_subquery()
)
UPDATE_RUN = update(s.runs).where(_r.id == bindparam("rid"))

# A lapsed lease is taken back only if nobody else wrote since the run's first message (`Leases.claim`).
OTHER_WRITER = (
    select(_m.run_id)
    .where(
        _m.conversation_id == bindparam("cid"),
        _m.position >= bindparam("since"),
        _m.run_id.is_distinct_from(bindparam("run_id")),
    )
    .order_by(_m.position)
    .limit(1)
)


def insert_step(conn: Connection, row: dict[str, Any]) -> bool:
    """Insert a `mm_steps` row; False if that step phase is already there (the key taken)."""
    stmt = _INSERT_STEP.get(conn.dialect.name)
    if stmt is not None:  # ON CONFLICT DO NOTHING: the transaction goes on (PostgreSQL aborts it on an error)
        return conn.execute(stmt, row).first() is not None
    if conn.execute(STEP_DONE, row).scalar_one():
        return False
    conn.execute(insert(s.steps), row)
    return True


def touch(conn: Connection, cid: str, values: dict[str, Any]) -> int:
    """Set `values` on the conversation `cid` (locked by the caller) and return its next message position."""
    if values and conn.dialect.update_returning:
        return int(conn.execute(TOUCH_RETURNING, {"cid": cid, **values}).scalar_one())
    if values:
        conn.execute(TOUCH, {"cid": cid, **values})
    return int(conn.execute(NEXT_POSITION, {"cid": cid}).scalar_one())
