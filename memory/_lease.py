"""The run lease on a conversation: which run may append to it, held by which `Store`, until when.

The lease lives in three columns of `mm_conversations` (`lease_run_id`, `lease_holder`, `lease_expires_at`),
read by the `SELECT ... FOR UPDATE` that already serialises a conversation's writers and written by the
`UPDATE` that already touches `updated_at`, so holding it costs a step no statement of its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, update

from agent.exceptions import ConversationBusyError
from memory import _schema as s
from memory import _sql
from memory._engine import Database

_FIRST_POLL, _MAX_POLL = 0.005, 0.25  # seconds between tries for a busy conversation: doubling, capped
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True)
class Busy:
    """Another run holds a conversation's lease."""

    conversation_id: str
    run_id: str
    expires_at: dt.datetime


def _when(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Leases:
    """One store's side of the leases: its holder id, the TTL it grants itself, how long it waits for others.

    `row` arguments are conversation rows with the lease columns, locked by the caller's write transaction.
    """

    def __init__(self, ttl: float, wait: float) -> None:
        self.ttl = ttl
        self.wait = wait
        self.holder = uuid.uuid4().hex  # this store's name in the leases it holds

    def values(self, run_id: str, now: dt.datetime) -> dict[str, Any]:
        """The conversation columns that give `run_id` the lease, held by this store, for `ttl` from `now`."""
        return {
            "lease_run_id": run_id,
            "lease_holder": self.holder,
            "lease_expires_at": now + dt.timedelta(seconds=self.ttl),
        }

    @staticmethod
    def holding(row: Any, now: dt.datetime) -> Busy | None:
        """Who holds the lease of `row` at `now`, if anyone (an expired lease holds nothing)."""
        if row.lease_run_id is None or row.lease_expires_at is None or row.lease_expires_at <= now:
            return None
        return Busy(row.id, row.lease_run_id, row.lease_expires_at)

    def ours(self, row: Any, run_id: str) -> bool:
        """Does `row`'s lease name this run and this store (expired or not)?"""
        return bool(row.lease_run_id == run_id and row.lease_holder == self.holder)

    def claim(
        self, conn: Connection, row: Any, run_id: str | None, now: dt.datetime, *, since: int | None = None
    ) -> Busy | None:
        """None if `run_id` (None: a plain append) may write to the conversation `row` now, else who holds it.

        With `since` (a run continuing from that position), a lease nobody holds right now is only taken back
        if every message from `since` on is the run's: otherwise the run's messages would no longer be
        contiguous, and `ConversationBusyError` says who wrote in between.
        """
        holder = self.holding(row, now)
        if holder is not None:
            return None if run_id is not None and self.ours(row, run_id) else holder  # ours: the per-step path
        if since is not None and run_id is not None:
            other = conn.execute(_sql.OTHER_WRITER, {"cid": row.id, "since": since, "run_id": run_id}).first()
            if other is not None:
                who = f"run {other.run_id}" if other.run_id else "a message appended outside any run"
                raise ConversationBusyError(
                    f"run {run_id} cannot continue conversation {row.id!r}: its lease lapsed and {who} was stored "
                    "after it began, so its messages would interleave with another writer's",
                    conversation_id=row.id,
                    run_id=other.run_id,
                    expires_at=None,
                )
        return None

    def clear(self, conn: Connection, cid: str, run_id: str, *, only_ours: bool) -> None:
        """Release `run_id`'s lease on the conversation (only if this store holds it, with `only_ours`)."""
        c = s.conversations.c
        where = [c.id == cid, c.lease_run_id == run_id, *([c.lease_holder == self.holder] if only_ours else [])]
        conn.execute(
            update(s.conversations).where(*where).values(lease_run_id=None, lease_holder=None, lease_expires_at=None)
        )

    def retry(self, database: Database, attempt: Callable[[Connection, dt.datetime], _T | Busy]) -> _T:
        """Run `attempt` in a write transaction until no other run's lease refuses it, for up to `wait` seconds
        (polling with jittered exponential backoff, never sleeping past the holder's expiry)."""
        deadline = time.monotonic() + self.wait
        delay = _FIRST_POLL
        while True:
            with database.transaction(write=True) as conn:
                outcome = attempt(conn, dt.datetime.now(dt.UTC))
            if not isinstance(outcome, Busy):
                return outcome
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConversationBusyError(
                    f"conversation {outcome.conversation_id!r} is busy: run {outcome.run_id} holds its lease until "
                    f"{_when(outcome.expires_at)} (waited {self.wait:g} s; Store(lease_wait=...) sets how long)",
                    conversation_id=outcome.conversation_id,
                    run_id=outcome.run_id,
                    expires_at=outcome.expires_at,
                )
            expiry = (outcome.expires_at - dt.datetime.now(dt.UTC)).total_seconds() + 0.001
            time.sleep(max(0.0, min(delay * random.uniform(0.5, 1.0), left, expiry)))
            delay = min(2 * delay, _MAX_POLL)

    @staticmethod
    def lost(run_id: str, cid: str, busy: Busy | None) -> ConversationBusyError:
        """The error for a run that no longer holds its conversation's lease."""
        if busy is None:
            return ConversationBusyError(
                f"run {run_id} does not hold the lease on conversation {cid!r} (it was released, or lapsed)",
                conversation_id=cid,
                run_id=None,
                expires_at=None,
            )
        holder = "this run, in another store," if busy.run_id == run_id else f"run {busy.run_id}"
        return ConversationBusyError(
            f"run {run_id} lost the lease on conversation {cid!r}: {holder} holds it until {_when(busy.expires_at)} "
            "(a step outlasted Store(lease_ttl=...) without a renewal, or the run was resumed elsewhere)",
            conversation_id=cid,
            run_id=busy.run_id,
            expires_at=busy.expires_at,
        )
