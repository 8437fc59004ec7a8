"""`Store`: conversations, runs and content-addressed artifacts in one SQL database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import os
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import Connection, Text, bindparam, delete, func, insert, select, text, type_coerce, update
from sqlalchemy.dialects import postgresql, sqlite

from agent.exceptions import StoreError, UserError
from agent.messages import AudioPart, ImagePart, Message, ToolResultPart, from_openai, to_openai
from agent.models import Usage
from agent.protocols import Phase, StartedRun, StoredRun
from memory import _media_search, _migrations, _search, _sql
from memory import _schema as s
from memory._blobs import BlobFiles
from memory._codec import Artifact, Encoded, decode, encode, media_part
from memory._engine import Database, open_database
from memory._fast import CoreSteps, SqliteStatements, SqliteSteps
from memory._lease import Busy, Leases
from memory._media import MediaStoreMixin, unreferenced
from memory._values import ConversationInfo, RunInfo, RunStatus, SearchHit

MiB = 1 << 20
EXPORT_FORMAT = "mmagent.conversation/1"
_ARTIFACT_LOCK = "hashtext('mmagent.memory.artifacts')"
_CHUNK = 500
_TITLE_CHARS = 80
_UNSET: Any = object()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))


def _usage_json(usage: Usage) -> dict[str, int]:
    return {k: v for k in _USAGE_FIELDS if (v := getattr(usage, k))}  # zeros left out: small rows


def _usage(data: Mapping[str, Any] | None) -> Usage:
    fields = {f.name for f in dataclasses.fields(Usage)}
    return Usage(**{k: int(v) for k, v in (data or {}).items() if k in fields})


def _title(messages: Sequence[Message]) -> str | None:
    for message in messages:
        if message.role == "user" and message.text.strip():
            line = message.text.strip().splitlines()[0]
            return line if len(line) <= _TITLE_CHARS else line[: _TITLE_CHARS - 1] + "…"
    return None


class Store(MediaStoreMixin):
    """Conversations, runs and media in SQLite (default) or any SQLAlchemy database; implements `RunStore`.

    Every message, part and step is committed as it happens, each write in one transaction. Media bytes are
    stored once per sha256 and referenced from parts; values handed back are plain `agent.messages`
    values, equal to what was stored, with no database ids in them.

    The same database keeps ingested media (`MediaStoreMixin`): collections of sources, their segments with
    keyframes and clips (artifacts shared with messages), extractors' features and embedders' vectors, and
    `search_media` over them.

    The constructor opens the database and applies pending schema migrations (creating the tables in a new
    or empty database); it does nothing else. Use it as a context manager or call `close()`. A store is
    safe to use from many threads; open one per process (connections do not survive `fork`). Any number of
    processes may share one SQLite file or PostgreSQL database.

    One run at a time per conversation: a run holds its conversation's *lease* (stored on the conversation
    row: the run, this `Store` instance, an expiry) from `begin_run` or `resume_run` until `end_run` or
    `release`, so two runs never interleave their messages (a tool call is always followed by its results).
    Taking the lease happens in the transaction that begins or resumes the run; every `commit_step` renews it
    for `lease_ttl` seconds in the statement that already updates the conversation. The agent loop also
    renews it from a heartbeat when a model request or a tool outlasts a third of `lease_ttl`, and releases it
    when the run is cancelled (the run stays resumable). Code driving a run by hand whose steps may outlast
    `lease_ttl` must call `renew`. A process killed outright leaves the lease until it expires; then another
    run may take the conversation, or `resume_run` (`Agent.resume`) the interrupted run.

    A run that finds the conversation leased by another run (or by the same run in another store) waits up
    to `lease_wait` seconds, polling with backoff, and then raises `ConversationBusyError` naming the holder
    and the lease's expiry; `append` waits and refuses the same way. Waiting is not first-come first-served.
    A run whose lease lapsed and whose conversation another run or `append` wrote to since cannot continue
    (`commit_step` and `resume_run` raise `ConversationBusyError`): its history would interleave. Expiry
    times come from the clocks of the processes sharing the store: keep them in sync (NTP).

    Args:
        url: a file path or `sqlite:///path` (SQLite with WAL, foreign keys and a busy timeout),
            `":memory:"`, or any SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db` for many
            application servers sharing one store.
        max_artifact_bytes: the largest image or audio clip accepted; larger ones raise `MediaError`.
        file_artifacts_over: SQLite files only: artifacts of at least this many bytes are kept as files in
            the directory `<database>.artifacts/` next to it (named by hash) instead of inside the database.
            None keeps everything in the database.
        busy_timeout: seconds a writer waits for another process's write to finish (SQLite).
        durable: SQLite: commit with `synchronous=FULL` (survives power loss) rather than NORMAL (survives
            any process crash, faster).
        echo: log every SQL statement (SQLAlchemy's `echo`; SQLite then sends `commit_step`'s statements through
            SQLAlchemy too, rather than straight to the driver, so that they are logged).
        lease_ttl: seconds a run's lease on its conversation lasts after it was taken or last renewed: how
            long a conversation stays blocked after its process was killed.
        lease_wait: seconds `begin_run`, `resume_run` and `append` wait for another run's lease before
            raising `ConversationBusyError` (0: fail at once).

    Raises:
        SchemaVersionError: the database was written by a newer mmagent.
        StoreError: the database cannot be opened or migrated.
        UserError: the URL is malformed or its driver is not installed.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        max_artifact_bytes: int = 64 * MiB,
        file_artifacts_over: int | None = None,
        busy_timeout: float = 30.0,
        durable: bool = True,
        echo: bool = False,
        lease_ttl: float = 60.0,
        lease_wait: float = 5.0,
    ) -> None:
        if max_artifact_bytes < 1:
            raise UserError(f"max_artifact_bytes must be positive, got {max_artifact_bytes}")
        if busy_timeout < 0:
            raise UserError(f"busy_timeout cannot be negative, got {busy_timeout}")
        if not (lease_ttl > 0 and math.isfinite(lease_ttl)):
            raise UserError(f"lease_ttl must be a positive number of seconds, got {lease_ttl}")
        if not (lease_wait >= 0 and math.isfinite(lease_wait)):
            raise UserError(f"lease_wait must be a non-negative number of seconds, got {lease_wait}")
        self.max_artifact_bytes = max_artifact_bytes
        self._leases = Leases(lease_ttl, lease_wait)
        self._db: Database | None = open_database(url, busy_timeout=busy_timeout, durable=durable, echo=echo)
        self._file_threshold = file_artifacts_over
        # commit_step on the sqlite3 driver (memory._fast), unless every statement should be logged (`echo`)
        self._fast_sqlite = not echo
        self._sqlite_statements: SqliteStatements | None = None
        if file_artifacts_over is not None and self._db.path is None:
            self._db.engine.dispose()
            raise UserError("file_artifacts_over needs an SQLite database file (artifacts go next to it)")
        _media_search.prepare(self._db)  # sqlite-vec, where sqlite3 cannot load extensions (before any connection)
        path = self._db.path
        # Files are always readable next to an SQLite file; new ones are written only with the threshold set.
        self._files = BlobFiles(path.with_name(path.name + ".artifacts")) if path is not None else None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        db = self._database
        with db.transaction(write=False) as conn:
            version = _migrations.current_version(conn)
        _migrations.check_supported(version, db.where)
        if version < _migrations.SCHEMA_VERSION:
            with db.transaction(write=True) as conn:
                _migrations.migrate(conn, db.where)

    @property
    def _database(self) -> Database:
        if self._db is None:
            raise StoreError("the memory store is closed")
        return self._db

    @property
    def url(self) -> str:
        """Where the store lives (a file path, `:memory:`, or the URL without its password)."""
        return self._database.where

    @property
    def lease_ttl(self) -> float:
        """Seconds a run's lease lasts after it was taken or renewed."""
        return self._leases.ttl

    @property
    def lease_wait(self) -> float:
        """Seconds a run (or `append`) waits for another run's lease."""
        return self._leases.wait

    @property
    def schema_version(self) -> int:
        """The schema version this store was migrated to."""
        return _migrations.SCHEMA_VERSION

    def close(self) -> None:
        """Release every connection. Further calls raise `StoreError`."""
        if self._db is not None:
            self._db.engine.dispose()
            self._db = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._db.where if self._db else 'closed'!r})"

    # ------------------------------------------------------------------ RunStore

    def begin_run(
        self,
        *,
        conversation_id: str | None,
        new_messages: Sequence[Message],
        model_name: str,
        system_prompt: str | None,
        parent_run_id: str | None = None,
    ) -> StartedRun:
        """Take the conversation's lease, create a run (and a conversation, already leased, when
        `conversation_id` is None) and commit its first messages, all in one transaction. `parent_run_id` links
        a run started by a tool of another run (delegation) to it.

        Raises:
            UserError: `conversation_id` names no stored conversation.
            ConversationBusyError: another run held the conversation for all of `lease_wait`.
        """
        encoded = encode(new_messages, self.max_artifact_bytes)
        run_id = uuid.uuid4().hex

        def attempt(conn: Connection, now: dt.datetime) -> StartedRun | Busy:
            cid = conversation_id
            if cid is None:
                cid = self._create(conn, None, _title(new_messages), {}, now)
                history: list[Message] = []
            else:
                busy = self._leases.claim(conn, self._lock_conversation(conn, cid), run_id, now)
                if busy is not None:
                    return busy
                history = self._load(conn, cid)
            start = self._next_position(conn, cid)
            conn.execute(
                _sql.INSERT_RUN,
                {
                    "id": run_id,
                    "conversation_id": cid,
                    "status": "running",
                    "model_name": model_name,
                    "system_prompt": system_prompt,
                    "usage": _usage_json(Usage()),
                    "first_position": start,
                    "created_at": now,
                    "updated_at": now,
                    "parent_run_id": parent_run_id,
                },
            )
            self._insert(conn, cid, start, encoded, now, run_id=run_id, lease=self._leases.values(run_id, now))
            return StartedRun(run_id=run_id, conversation_id=cid, history=history, lease_ttl=self.lease_ttl)

        return self._leases.retry(self._database, attempt)

    def resume_run(self, run_id: str) -> StoredRun:
        """Take the lease of the run's conversation (waiting as `begin_run` does) and load the run, in one
        transaction: `load_run`'s answer, for a caller that will continue the run.

        Raises:
            UserError: unknown run, or a completed one.
            ConversationBusyError: another run (or this run in another store) held the conversation for all
                of `lease_wait`, or the run's lease lapsed and the conversation moved on without it.
        """

        def attempt(conn: Connection, now: dt.datetime) -> StoredRun | Busy:
            cid = self._run_row(conn, run_id).conversation_id
            row = self._lock_conversation(conn, cid)
            run = self._run_row(conn, run_id)  # read again under the lock
            if run.status == "completed":
                raise UserError(f"run {run_id} already completed")
            if run.status == "interrupted":
                raise UserError(f"run {run_id} was interrupted by its user: it cannot be resumed")
            busy = self._leases.claim(conn, row, run_id, now, since=run.first_position)
            if busy is not None:
                return busy
            conn.execute(_sql.TOUCH, {"cid": cid, **self._leases.values(run_id, now)})
            return self._stored(conn, run, lease_ttl=self.lease_ttl)

        return self._leases.retry(self._database, attempt)

    def commit_step(self, run_id: str, step: int, phase: Phase, messages: Sequence[Message], usage: Usage) -> None:
        """Commit one phase of a step (the model's message, or the tool results) with the cumulative usage,
        renewing the run's lease (or taking it again if it lapsed and nobody wrote since).

        Raises:
            UserError: unknown run, a completed run, or a step phase committed twice.
            ConversationBusyError: the run lost its lease: another run holds it, or wrote after it.
        """
        if phase not in ("model", "tools"):
            raise UserError(f"phase must be 'model' or 'tools', got {phase!r}")
        encoded = encode(messages, self.max_artifact_bytes)
        now = _now()
        used = _usage_json(usage)
        # Six statements, each built once (`_sql`), and those of `_put_artifacts` for new media: the run and its
        # conversation's lease (locking it), the step (a taken key inserts nothing), the conversation's lease
        # and `updated_at` (returning the next position), the messages, their parts, the run's usage.
        with self._database.transaction(write=True) as conn:
            steps = self._steps(conn)
            row = steps.state(run_id)
            if row is None:
                raise self._missing("run", run_id)
            if row.status == "completed":
                raise UserError(f"run {run_id} is already completed: it takes no more steps")
            cid = row.id
            busy = self._leases.claim(conn, row, run_id, now, since=row.first_position)
            if busy is not None:
                raise self._leases.lost(run_id, cid, busy)
            step_row = {"run_id": run_id, "step": step, "phase": phase, "usage": used, "committed_at": now}
            if not steps.insert_step(step_row):
                raise UserError(f"step {step} ({phase}) of run {run_id} is already committed")
            touch = self._leases.values(run_id, now)
            if encoded.roles:
                touch["updated_at"] = now
            start = steps.touch(cid, touch)
            if encoded.roles:
                self._put_artifacts(conn, encoded.artifacts, now)
                rows, part_rows = _message_rows(cid, start, encoded, now, run_id=run_id, step=step)
                steps.insert_messages(rows, part_rows)
            steps.update_run(
                {
                    "rid": run_id,
                    "status": "running",
                    "error": None,
                    "finished_at": None,
                    "usage": used,
                    "updated_at": now,
                }
            )

    def _steps(self, conn: Connection) -> CoreSteps | SqliteSteps:
        """The per-step statements: on SQLite straight on the driver (`memory._fast`), elsewhere through Core."""
        if conn.dialect.name != "sqlite" or not self._fast_sqlite:
            return CoreSteps(conn)
        if self._sqlite_statements is None:
            self._sqlite_statements = SqliteStatements(conn.dialect)
        return SqliteSteps(conn, self._sqlite_statements)

    def renew(self, run_id: str) -> None:
        """Extend the run's lease by `lease_ttl` from now (a heartbeat for steps that outlast the lease).

        Raises:
            UserError: unknown run.
            ConversationBusyError: this store does not hold the run's lease (released, or lost).
        """
        now = _now()
        with self._database.transaction(write=True) as conn:
            run = self._run_row(conn, run_id)
            row = self._lock_conversation(conn, run.conversation_id)
            if not self._leases.ours(row, run_id):
                raise self._leases.lost(run_id, run.conversation_id, self._leases.holding(row, now))
            self._leases.claim(conn, row, run_id, now, since=run.first_position)  # lapsed: nobody may have written
            conn.execute(_sql.TOUCH, {"cid": run.conversation_id, **self._leases.values(run_id, now)})

    def release(self, run_id: str) -> None:
        """Give up the run's lease, if this store holds it, without changing the run (it stays resumable).

        Raises:
            UserError: unknown run.
        """
        with self._database.transaction(write=True) as conn:
            run = self._run_row(conn, run_id)
            self._leases.clear(conn, run.conversation_id, run_id, only_ours=True)

    def end_run(
        self, run_id: str, status: Literal["completed", "failed", "paused", "interrupted"], error: str | None = None
    ) -> None:
        """Mark a run completed, failed, paused or interrupted (failed and paused runs can be resumed; an
        interrupted one, cut short by its user, cannot) and release its lease.

        A run that another store is driving (it resumed the run after this store's lease lapsed) is left to it.
        """
        if status not in ("completed", "failed", "paused", "interrupted"):
            raise UserError(f"status must be 'completed', 'failed', 'paused' or 'interrupted', got {status!r}")
        now = _now()
        with self._database.transaction(write=True) as conn:
            run = self._run_row(conn, run_id)
            row = self._lock_conversation(conn, run.conversation_id)
            if row.lease_run_id == run_id and not self._leases.ours(row, run_id) and self._leases.holding(row, now):
                return
            conn.execute(
                _sql.UPDATE_RUN,
                {
                    "rid": run_id,
                    "status": status,
                    "error": error,
                    "finished_at": None if status == "paused" else now,
                    "updated_at": now,
                },
            )
            if row.lease_run_id == run_id:
                self._leases.clear(conn, run.conversation_id, run_id, only_ours=False)

    def load_run(self, run_id: str) -> StoredRun:
        """The run's conversation up to its last committed step, and where to continue (takes no lease:
        `resume_run` does, for a caller that continues the run).

        Raises:
            UserError: unknown run.
        """
        with self._database.transaction(write=False) as conn:
            return self._stored(conn, self._run_row(conn, run_id), lease_ttl=None)

    # ------------------------------------------------------------------ conversations

    def create_conversation(
        self,
        messages: Sequence[Message] = (),
        *,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
    ) -> str:
        """Store a new conversation (optionally with messages) and return its id.

        Args:
            messages: messages to store, in order.
            title: a title (default: the first line of the first user text).
            metadata: any JSON object the application wants kept with it.
            conversation_id: an id of your choice (default: a random hex id).
        """
        encoded = encode(messages, self.max_artifact_bytes)
        now = _now()
        with self._database.transaction(write=True) as conn:
            cid = self._create(conn, conversation_id, title or _title(messages), dict(metadata or {}), now)
            self._insert(conn, cid, 0, encoded, now)
        return cid

    def append(self, conversation_id: str, messages: Sequence[Message]) -> None:
        """Append messages to a conversation (outside any run) in one transaction.

        Raises:
            UserError: no such conversation.
            ConversationBusyError: a run held the conversation's lease for all of `lease_wait`.
        """
        encoded = encode(messages, self.max_artifact_bytes)

        def attempt(conn: Connection, now: dt.datetime) -> Busy | None:
            busy = self._leases.claim(conn, self._lock_conversation(conn, conversation_id), None, now)
            if busy is None:
                self._insert(conn, conversation_id, self._next_position(conn, conversation_id), encoded, now)
            return busy

        self._leases.retry(self._database, attempt)

    def load_conversation(self, conversation_id: str) -> list[Message]:
        """Every message of a conversation, in order, media bytes included."""
        with self._database.transaction(write=False) as conn:
            messages = self._load(conn, conversation_id)
            if not messages:
                self._require(conn, conversation_id)
            return messages

    def conversation(self, conversation_id: str) -> ConversationInfo:
        """A conversation's title, metadata, times and message count."""
        with self._database.transaction(write=False) as conn:
            found = self._infos(conn, conversation_id=conversation_id)
        if not found:
            raise self._missing("conversation", conversation_id)
        return found[0]

    def list_conversations(self, *, limit: int | None = 100, offset: int = 0) -> list[ConversationInfo]:
        """Conversations, most recently updated first."""
        with self._database.transaction(write=False) as conn:
            return self._infos(conn, limit=limit, offset=offset)

    def update_conversation(
        self, conversation_id: str, *, title: str | None = _UNSET, metadata: Mapping[str, Any] = _UNSET
    ) -> None:
        """Change a conversation's title and/or metadata (replaced whole)."""
        values: dict[str, Any] = {"updated_at": _now()}
        if title is not _UNSET:
            values["title"] = title
        if metadata is not _UNSET:
            values["meta"] = dict(metadata)
        with self._database.transaction(write=True) as conn:
            self._lock_conversation(conn, conversation_id)
            conn.execute(update(s.conversations).where(s.conversations.c.id == conversation_id).values(**values))

    def truncate_message(self, conversation_id: str, position: int, keep: str) -> None:
        """Cut a stored text message to `keep`, a prefix of its text: what a listener heard of a spoken answer
        the user talked over (`VoiceSession.truncate`), so the conversation does not remember saying the rest.

        The message keeps its place, role and run; its text parts become one part holding `keep` (full-text
        search follows). It does not wait for the conversation's lease: a run in progress only appends after it.

        Raises:
            UserError: no such conversation or message, a message with other parts than text, or `keep` is not
                a prefix of the message's text.
        """
        m, p = s.messages.c, s.parts.c
        with self._database.transaction(write=True) as conn:
            self._lock_conversation(conn, conversation_id)
            found = conn.execute(
                select(m.id).where(m.conversation_id == conversation_id, m.position == position)
            ).scalar_one_or_none()
            if found is None:
                raise UserError(f"conversation {conversation_id!r} has no message at position {position}")
            order = (p.position, p.sub)
            rows = conn.execute(select(p.id, p.kind, p.text).where(p.message_id == found).order_by(*order)).all()
            if any(row.kind != "text" for row in rows):
                raise UserError(f"message {position} of conversation {conversation_id!r} is not text only")
            whole = "".join(row.text or "" for row in rows)
            if not whole.startswith(keep):
                raise UserError(f"the text to keep is not the start of message {position}'s text")
            if not rows or whole == keep:
                return
            conn.execute(update(s.parts).where(p.id == rows[0].id).values(text=keep))
            if len(rows) > 1:
                conn.execute(delete(s.parts).where(p.id.in_([row.id for row in rows[1:]])))
            touch = update(s.conversations).where(s.conversations.c.id == conversation_id)
            conn.execute(touch.values(updated_at=_now()))

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete a conversation with its messages, parts, runs and steps; artifacts nothing else uses go too."""
        with self._database.transaction(write=True) as conn:
            self._lock_conversation(conn, conversation_id)
            self._lock_artifacts(conn, exclusive=True)
            p, m = s.parts.c, s.messages.c
            used = (
                conn.execute(
                    select(p.artifact_sha256)
                    .distinct()
                    .select_from(s.parts.join(s.messages, m.id == p.message_id))
                    .where(m.conversation_id == conversation_id, p.artifact_sha256.is_not(None))
                )
                .scalars()
                .all()
            )
            conn.execute(delete(s.conversations).where(s.conversations.c.id == conversation_id))
            filed = self._drop_orphans(conn, used)
        self._remove_files(filed)

    def collect_garbage(self) -> int:
        """Delete artifacts no message part or media segment references, and artifact files without a row; return
        how many went."""
        with self._database.transaction(write=True) as conn:
            self._lock_artifacts(conn, exclusive=True)
            orphans = conn.execute(select(s.artifacts.c.sha256).where(unreferenced())).scalars().all()
            filed = self._drop_orphans(conn, orphans)
        removed = len(orphans)
        if self._files is not None:
            with self._database.transaction(write=True) as conn:
                known = set(conn.execute(select(s.artifacts.c.sha256)).scalars())
                stray = [name for name in self._files.names() if name not in known]
                for name in stray:
                    self._files.remove(name)
            removed += len([x for x in stray if x not in filed])
        return removed

    # ------------------------------------------------------------------ runs, artifacts, search

    def list_runs(
        self,
        *,
        conversation_id: str | None = None,
        status: RunStatus | None = None,
        parent_run_id: str | None = None,
        limit: int | None = 100,
    ) -> list[RunInfo]:
        """Runs, newest first; `status="running"` lists the ones to resume after a crash, `parent_run_id` the runs
        a run delegated to."""
        r = s.runs.c
        count = select(func.count()).where(s.steps.c.run_id == r.id).scalar_subquery()
        stmt = select(s.runs, count.label("n_steps")).order_by(r.created_at.desc(), r.id).limit(limit)
        if conversation_id is not None:
            stmt = stmt.where(r.conversation_id == conversation_id)
        if status is not None:
            stmt = stmt.where(r.status == status)
        if parent_run_id is not None:
            stmt = stmt.where(r.parent_run_id == parent_run_id)
        with self._database.transaction(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [
            RunInfo(
                id=row.id,
                conversation_id=row.conversation_id,
                status=row.status,
                model_name=row.model_name,
                system_prompt=row.system_prompt,
                error=row.error,
                usage=_usage(row.usage),
                steps=int(row.n_steps),
                created_at=row.created_at,
                updated_at=row.updated_at,
                finished_at=row.finished_at,
                parent_run_id=row.parent_run_id,
            )
            for row in rows
        ]

    def artifact(self, sha256: str) -> ImagePart | AudioPart:
        """The stored image or audio clip with this sha256 (hex).

        Raises:
            UserError: no artifact has this hash.
        """
        with self._database.transaction(write=False) as conn:
            row = conn.execute(select(s.artifacts.c.media_type).where(s.artifacts.c.sha256 == sha256)).first()
            if row is None:
                raise self._missing("artifact", sha256)
            data = self._fetch(conn, [sha256])[sha256]
        return media_part(row.media_type, data)

    def search(
        self,
        query: str,
        *,
        conversation_id: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        kinds: Collection[str] | None = None,
        limit: int = 10,
    ) -> list[SearchHit]:
        """Full-text search over message text and the text tools returned, best match first.

        Every word of `query` must match (English stemming: "cats" finds "cat"); query syntax is not
        interpreted.

        Args:
            query: words to look for.
            conversation_id: only this conversation.
            since: only messages stored at or after this time (naive datetimes are read as UTC).
            until: only messages stored before this time.
            kinds: `{"text"}` for message text, `{"tool-result"}` for tool output; None for both.
            limit: the most hits to return.
        """
        with self._database.transaction(write=False) as conn:
            return _search.search(
                conn, query, conversation_id=conversation_id, since=since, until=until, kinds=kinds, limit=limit
            )

    # ------------------------------------------------------------------ export / import

    def export_conversation(self, conversation_id: str) -> dict[str, Any]:
        """A JSON-ready dict: the messages in OpenAI chat format (media inline as base64) plus metadata.

        The OpenAI format joins adjacent text parts and turns retry requests into plain text; `tool_errors`
        lists the ids of calls whose results were errors, and `artifacts` the media by sha256.
        """
        with self._database.transaction(write=False) as conn:
            found = self._infos(conn, conversation_id=conversation_id)
            if not found:
                raise self._missing("conversation", conversation_id)
            messages = self._load(conn, conversation_id)
        info = found[0]
        artifacts: dict[str, dict[str, Any]] = {}
        errors: list[str] = []
        for message in messages:
            for part in message.parts:
                items = part.content if isinstance(part, ToolResultPart) else (part,)
                if isinstance(part, ToolResultPart) and part.is_error:
                    errors.append(part.call_id)
                for item in items:
                    if isinstance(item, ImagePart | AudioPart):
                        sha = hashlib.sha256(item.data).hexdigest()
                        artifacts.setdefault(
                            sha, {"sha256": sha, "media_type": item.media_type, "size": len(item.data)}
                        )
        return {
            "format": EXPORT_FORMAT,
            "id": info.id,
            "title": info.title,
            "metadata": info.metadata,
            "created_at": info.created_at.isoformat(),
            "updated_at": info.updated_at.isoformat(),
            "messages": to_openai(messages),
            "tool_errors": errors,
            "artifacts": list(artifacts.values()),
        }

    def import_conversation(self, data: Mapping[str, Any], *, conversation_id: str | None = None) -> str:
        """Store a conversation from `export_conversation` output (or any dict with OpenAI `messages`).

        Returns the new conversation's id (a fresh one unless `conversation_id` is given).

        Raises:
            UserError: the data is not an export, or its media do not match its `artifacts` list.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("messages"), list):
            raise UserError("import_conversation needs a dict with a 'messages' list (export_conversation's output)")
        fmt = data.get("format", EXPORT_FORMAT)
        if fmt != EXPORT_FORMAT:
            raise UserError(f"unknown export format {fmt!r}; this mmagent reads {EXPORT_FORMAT!r}")
        messages = from_openai(data["messages"])
        failed = set(data.get("tool_errors") or ())
        if failed:
            messages = [_mark_errors(message, failed) for message in messages]
        declared = {a.get("sha256") for a in data.get("artifacts") or () if isinstance(a, Mapping)}
        if declared:
            present = {
                hashlib.sha256(item.data).hexdigest()
                for message in messages
                for part in message.parts
                for item in (part.content if isinstance(part, ToolResultPart) else (part,))
                if isinstance(item, ImagePart | AudioPart)
            }
            if present != declared:
                raise UserError(
                    f"the export's media do not match its artifact list ({len(present ^ declared)} differ): "
                    "the file was altered or truncated"
                )
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise UserError(f"'metadata' must be a JSON object, got {type(metadata).__name__}")
        title = data.get("title")
        return self.create_conversation(
            messages,
            title=title if isinstance(title, str) else None,
            metadata=metadata,
            conversation_id=conversation_id,
        )

    # ------------------------------------------------------------------ internals

    def _missing(self, what: str, key: str) -> UserError:
        return UserError(f"no {what} {key!r} in the memory store at {self._database.where}")

    def _create(
        self, conn: Connection, cid: str | None, title: str | None, meta: dict[str, Any], now: dt.datetime
    ) -> str:
        if cid is None:
            cid = uuid.uuid4().hex
        elif not isinstance(cid, str) or not 0 < len(cid) <= 64:
            raise UserError(f"conversation ids are 1 to 64 characters, got {cid!r}")
        elif conn.execute(select(s.conversations.c.id).where(s.conversations.c.id == cid)).first() is not None:
            raise UserError(f"conversation {cid!r} already exists")
        conn.execute(insert(s.conversations).values(id=cid, title=title, meta=meta, created_at=now, updated_at=now))
        return cid

    def _require(self, conn: Connection, cid: str) -> None:
        if conn.execute(select(s.conversations.c.id).where(s.conversations.c.id == cid)).first() is None:
            raise self._missing("conversation", cid)

    def _lock_conversation(self, conn: Connection, cid: str) -> Any:
        """Serialise writers of one conversation (row lock on PostgreSQL; SQLite already holds the write lock);
        return its id and lease."""
        row = conn.execute(_sql.LOCK_CONVERSATION, {"cid": cid}).first()
        if row is None:
            raise self._missing("conversation", cid)
        return row

    def _lock_artifacts(self, conn: Connection, *, exclusive: bool) -> None:
        """PostgreSQL: writers share this lock, garbage collection takes it alone (no deletion of an artifact
        another transaction is about to reference). SQLite writers are serialised already."""
        if conn.dialect.name == "postgresql":
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            conn.execute(text(f"SELECT {fn}({_ARTIFACT_LOCK})"))

    def _run_row(self, conn: Connection, run_id: str) -> Any:
        row = conn.execute(_sql.RUN, {"run_id": run_id}).first()
        if row is None:
            raise self._missing("run", run_id)
        return row

    def _stored(self, conn: Connection, run: Any, *, lease_ttl: float | None) -> StoredRun:
        last = conn.execute(
            select(s.steps.c.step, s.steps.c.phase)
            .where(s.steps.c.run_id == run.id)
            .order_by(s.steps.c.step.desc(), (s.steps.c.phase == "tools").desc())
            .limit(1)
        ).first()
        m = s.messages.c
        span = conn.execute(
            select(func.max(m.position), func.count()).where(
                m.conversation_id == run.conversation_id, m.run_id == run.id
            )
        ).one()
        upto = span[0] if span[0] is not None else run.first_position - 1
        history = self._load(conn, run.conversation_id, upto=upto)
        next_step = 0 if last is None else last.step + (1 if last.phase == "tools" else 0)
        return StoredRun(
            run_id=run.id,
            conversation_id=run.conversation_id,
            status=run.status,
            messages=history,
            new_message_count=int(span[1]),
            next_step=next_step,
            usage=_usage(run.usage),
            lease_ttl=lease_ttl,
        )

    def _next_position(self, conn: Connection, cid: str) -> int:
        return int(conn.execute(_sql.NEXT_POSITION, {"cid": cid}).scalar_one())

    def _insert(
        self,
        conn: Connection,
        cid: str,
        start: int,
        encoded: Encoded,
        now: dt.datetime,
        *,
        run_id: str | None = None,
        lease: Mapping[str, Any] | None = None,
    ) -> None:
        """Insert the messages from `start`, then touch the conversation: `updated_at`, and the `lease` columns
        given, in one UPDATE (so taking a lease with the first messages costs no statement of its own)."""
        touch = dict(lease or {})
        if encoded.roles:
            self._insert_messages(conn, cid, start, encoded, now, run_id=run_id, step=None)
            touch["updated_at"] = now
        if touch:
            conn.execute(_sql.TOUCH, {"cid": cid, **touch})

    def _insert_messages(
        self,
        conn: Connection,
        cid: str,
        start: int,
        encoded: Encoded,
        now: dt.datetime,
        *,
        run_id: str | None,
        step: int | None,
    ) -> None:
        self._put_artifacts(conn, encoded.artifacts, now)
        CoreSteps(conn).insert_messages(*_message_rows(cid, start, encoded, now, run_id=run_id, step=step))

    def _put_artifacts(self, conn: Connection, artifacts: Mapping[str, Artifact], now: dt.datetime) -> None:
        if not artifacts:
            return
        self._lock_artifacts(conn, exclusive=False)
        a = s.artifacts.c
        existing: set[str] = set()
        for chunk in _chunks(list(artifacts)):
            existing.update(conn.execute(select(a.sha256).where(a.sha256.in_(chunk))).scalars())
        rows = []
        for sha, item in artifacts.items():
            if sha in existing:
                continue
            data: bytes | None = item.data
            if self._files is not None and self._file_threshold is not None and len(item.data) >= self._file_threshold:
                self._files.write(sha, item.data)
                data = None
            rows.append(
                {"sha256": sha, "media_type": item.media_type, "size": len(item.data), "data": data, "created_at": now}
            )
        if not rows:
            return
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.execute(postgresql.insert(s.artifacts).on_conflict_do_nothing(index_elements=["sha256"]), rows)
        elif dialect == "sqlite":
            conn.execute(sqlite.insert(s.artifacts).on_conflict_do_nothing(index_elements=["sha256"]), rows)
        else:
            conn.execute(insert(s.artifacts), rows)

    def _fetch(self, conn: Connection, shas: Iterable[str]) -> dict[str, bytes]:
        wanted = sorted(set(shas))
        out: dict[str, bytes] = {}
        a = s.artifacts.c
        for chunk in _chunks(wanted):
            for sha, data in conn.execute(select(a.sha256, a.data).where(a.sha256.in_(chunk))):
                if data is None:
                    if self._files is None:
                        raise StoreError(f"corrupt memory store: artifact {sha} has neither bytes nor a file")
                    data = self._files.read(sha)
                out[sha] = bytes(data)
        if len(out) != len(wanted):
            lost = sorted(set(wanted) - out.keys())
            raise StoreError(f"corrupt memory store: {len(lost)} artifact(s) referenced but missing, e.g. {lost[0]}")
        return out

    def _load(self, conn: Connection, cid: str, *, upto: int | None = None) -> list[Message]:
        stmt = _LOAD if upto is None else _LOAD_UPTO
        rows = conn.execute(stmt, {"cid": cid, "upto": upto}).all()
        blobs = self._fetch(conn, [r[8] for r in rows if r[8] is not None])
        return decode(rows, blobs)

    def _infos(
        self, conn: Connection, *, conversation_id: str | None = None, limit: int | None = None, offset: int = 0
    ) -> list[ConversationInfo]:
        c = s.conversations.c
        count = select(func.count()).where(s.messages.c.conversation_id == c.id).scalar_subquery()
        stmt = select(s.conversations, count.label("n")).order_by(c.updated_at.desc(), c.id).limit(limit).offset(offset)
        if conversation_id is not None:
            stmt = stmt.where(c.id == conversation_id)
        return [
            ConversationInfo(
                id=row.id,
                title=row.title,
                metadata=dict(row.meta or {}),
                created_at=row.created_at,
                updated_at=row.updated_at,
                message_count=int(row.n),
            )
            for row in conn.execute(stmt)
        ]

    def _drop_orphans(self, conn: Connection, candidates: Sequence[str]) -> set[str]:
        """Delete the candidate artifacts no part or segment references; return those whose bytes live in files."""
        a = s.artifacts.c
        filed: set[str] = set()
        for chunk in _chunks(list(candidates)):
            rows = conn.execute(
                select(a.sha256, a.data.is_(None).label("in_file")).where(a.sha256.in_(chunk), unreferenced())
            ).all()
            if rows:
                conn.execute(delete(s.artifacts).where(a.sha256.in_([r.sha256 for r in rows])))
                filed.update(r.sha256 for r in rows if r.in_file)
        return filed

    def _remove_files(self, shas: Collection[str]) -> None:
        """Unlink files of deleted artifacts, under the write lock and only if no row came back meanwhile."""
        if not shas or self._files is None:
            return
        with self._database.transaction(write=True) as conn:
            back = set(conn.execute(select(s.artifacts.c.sha256).where(s.artifacts.c.sha256.in_(list(shas)))).scalars())
            for sha in set(shas) - back:
                self._files.remove(sha)


def _load_statement(upto: bool) -> Any:
    m, p = s.messages.c, s.parts.c
    stmt = (
        select(
            m.position,
            m.role,
            p.position,
            p.sub,
            p.kind,
            p.text,
            p.media_type,
            type_coerce(p.payload, Text),  # decoded by the codec, only for the rows that have one
            p.artifact_sha256,
        )
        .select_from(s.messages.outerjoin(s.parts, p.message_id == m.id))
        .where(m.conversation_id == bindparam("cid"))
        .order_by(m.position, p.position, p.sub)
    )
    return stmt.where(m.position <= bindparam("upto")) if upto else stmt


# Built once: loading is the hot path (the agent reloads history at the start of every run).
_LOAD = _load_statement(upto=False)
_LOAD_UPTO = _load_statement(upto=True)


def _mark_errors(message: Message, failed: set[str]) -> Message:
    if message.role != "tool":
        return message
    parts = tuple(
        p.model_copy(update={"is_error": True}) if isinstance(p, ToolResultPart) and p.call_id in failed else p
        for p in message.parts
    )
    return Message(role="tool", parts=parts)


__all__ = ["MiB", "Store"]


def _message_rows(
    cid: str, start: int, encoded: Encoded, now: dt.datetime, *, run_id: str | None, step: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `mm_messages` rows of encoded messages stored from position `start`, and their `mm_parts` rows (each
    finding its message by conversation and position)."""
    rows = [
        {"conversation_id": cid, "position": start + i, "role": role, "run_id": run_id, "step": step, "created_at": now}
        for i, role in enumerate(encoded.roles)
    ]
    part_rows = [
        {**row, "cid": cid, "message_position": start + i} for i, rows_ in enumerate(encoded.parts) for row in rows_
    ]
    return rows, part_rows
