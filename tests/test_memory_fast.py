"""The per-step path stays short: `commit_step` in a few prebuilt statements, with the same answers and refusals
(SQLite and PostgreSQL); `run_sync` hands its result back without formatting it."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from memory_support import store_fixture, store_url_fixture  # noqa: F401
from PIL import Image
from sqlalchemy import event

from agent import Agent
from agent.events import RunResult
from agent.exceptions import MaxStepsExceeded, StoreError, UserError
from agent.messages import AudioPart, ImagePart, Message, RetryPart, TextPart, ToolCallPart, ToolResultPart
from agent.models import Usage
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store
from memory._fast import SqliteSteps
from tools import Tool

MAX_STATEMENTS = 6  # the run and its lease, the step, the conversation, messages, parts, the run (was 9 + BEGIN)


class _Counting:
    """The sqlite3 connection as the fast path uses it, noting each statement in `sinks` (an executemany once)."""

    def __init__(self, raw: Any, *sinks: list[str]) -> None:
        self.raw, self.sinks = raw, sinks

    def _note(self, sql: str) -> None:
        for sink in self.sinks:
            sink.append(sql)

    def execute(self, sql: str, params: Any = ()) -> Any:
        self._note(sql)
        return self.raw.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> Any:
        self._note(sql)
        return self.raw.executemany(sql, rows)


@contextmanager
def counted(store: Store, driver: list[str] | None = None) -> Iterator[list[str]]:
    """The SQL statements the store sends, through SQLAlchemy or (SQLite's fast path) straight to the driver,
    those also listed in `driver` (an executemany counts once)."""
    seen: list[str] = []
    engine = store._database.engine

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append(statement)

    original = store._steps

    def steps(conn: Any) -> Any:
        made = original(conn)
        if isinstance(made, SqliteSteps):
            made.raw = _Counting(made.raw, seen, *([driver] if driver is not None else []))
        return made

    event.listen(engine, "before_cursor_execute", record)
    store._steps = steps  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
        del store._steps


def png(width: int, height: int, seed: int) -> ImagePart:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ImagePart(data=buffer.getvalue(), media_type="image/png")


def tone(seconds: float, rate: int = 16_000) -> AudioPart:
    samples = np.random.default_rng(7).uniform(-0.3, 0.3, int(seconds * rate))
    return AudioPart.from_samples(samples.astype(np.float32), rate)


def tool_result(call_id: str, *content: Any) -> Message:
    return Message(role="tool", parts=(ToolResultPart(call_id=call_id, name="t", content=content),))


def test_commit_step_issues_few_statements(store: Store) -> None:
    started = store.begin_run(
        conversation_id=None, new_messages=[Message.user("go")], model_name="m", system_prompt=None
    )
    run = started.run_id
    store.commit_step(
        run, 0, "model", [Message.assistant("", [ToolCallPart(id="c0", name="t", arguments={})])], Usage()
    )
    phases: list[tuple[int, str, list[Message]]] = [
        (0, "tools", [tool_result("c0", TextPart(text="ok"))]),
        (
            1,
            "model",
            [Message.assistant("two calls", [ToolCallPart(id=f"c{i}", name="t", arguments={}) for i in (1, 2)])],
        ),
        (1, "tools", [tool_result("c1", TextPart(text="a")), tool_result("c2", TextPart(text="b"))]),  # two messages
        (2, "model", []),  # nothing to store but the step and the usage
    ]
    for step, phase, messages in phases:
        driver: list[str] = []
        with counted(store, driver) as seen:
            store.commit_step(run, step, phase, messages, Usage(step, step, step))  # type: ignore[arg-type]
        assert len(seen) <= MAX_STATEMENTS, "\n".join(seen)
        # SQLite runs them on the driver (memory._fast); PostgreSQL through SQLAlchemy
        assert (len(driver) == len(seen)) if store.url.endswith(".db") else not driver, (driver, seen)
        assert not any(s.lstrip().upper().startswith("SELECT COUNT") for s in seen), seen  # the insert says it
    assert store.load_run(run).new_message_count == 6


def test_a_step_phase_committed_twice_is_refused_and_changes_nothing(store: Store) -> None:
    started = store.begin_run(
        conversation_id=None, new_messages=[Message.user("go")], model_name="m", system_prompt=None
    )
    run = started.run_id
    first = Message.assistant("", [ToolCallPart(id="c0", name="t", arguments={"q": 1})])
    store.commit_step(run, 0, "model", [first], Usage(1, 10, 2))
    before = store.load_run(run)
    with pytest.raises(UserError, match=r"step 0 \(model\) of run .* is already committed"):
        store.commit_step(run, 0, "model", [Message.assistant("again")], Usage(2, 20, 4))
    after = store.load_run(run)
    assert (after.messages, after.usage, after.next_step) == (before.messages, Usage(1, 10, 2), 0)
    assert store.list_runs()[0].steps == 1
    # The refusal did not poison anything: the next phase commits (a PostgreSQL error would abort the transaction).
    store.commit_step(run, 0, "tools", [tool_result("c0", TextPart(text="ok"))], Usage(2, 20, 4))
    assert store.load_run(run).next_step == 1


def test_everything_committed_reads_back_identically(store: Store) -> None:
    cid = store.create_conversation([Message.system("sys"), Message.user("earlier")])
    started = store.begin_run(
        conversation_id=cid,
        new_messages=[Message.user("look", images=[png(8, 8, seed=3)])],
        model_name="m",
        system_prompt=None,
    )
    run = started.run_id
    image, clip = png(12, 10, seed=4), tone(0.05)
    committed: list[Message] = []
    look = Message.assistant("Let me see.", [ToolCallPart(id="a", name="zoom", arguments={"x": [1, 2.5]})])
    two_calls = Message(
        role="assistant",
        parts=(
            TextPart(text="Ünïcödé ✓"),
            ToolCallPart(id="b", name="t", arguments={}),
            ToolCallPart(id="c", name="t", arguments={"n": None}),
        ),
    )
    failed = Message(
        role="tool",
        parts=(
            ToolResultPart(call_id="b", name="t", content=(image,), is_error=True),
            RetryPart(message="'n' is required", call_id="c", name="t"),
        ),
    )
    script: list[tuple[int, str, list[Message], Usage]] = [
        (0, "model", [look], Usage(1, 5, 1)),
        (0, "tools", [tool_result("a", TextPart(text="crop"), image, clip)], Usage(1, 5, 1)),
        (1, "model", [two_calls], Usage(2, 9, 3)),
        (1, "tools", [failed], Usage(2, 9, 3)),
        (2, "model", [Message.assistant("first"), Message.assistant("second")], Usage(3, 12, 5)),
        (3, "model", [], Usage(4, 12, 5)),
        (3, "tools", [Message(role="user", parts=(RetryPart(message="Answer in text."),))], Usage(4, 12, 5)),
    ]
    for step, phase, messages, usage in script:
        store.commit_step(run, step, phase, messages, usage)  # type: ignore[arg-type]
        committed.extend(messages)
    loaded = store.load_run(run)
    history = [Message.system("sys"), Message.user("earlier"), Message.user("look", images=[png(8, 8, seed=3)])]
    assert loaded.messages == history + committed
    for got, want in zip(loaded.messages, history + committed, strict=True):  # media bytes too
        assert [getattr(p, "data", None) for p in got.parts] == [getattr(p, "data", None) for p in want.parts]
    assert (loaded.usage, loaded.next_step, loaded.new_message_count) == (Usage(4, 12, 5), 4, 1 + len(committed))
    assert store.load_conversation(cid) == history + committed
    [info] = store.list_runs(conversation_id=cid)
    assert (info.status, info.steps, info.usage) == ("running", len(script), Usage(4, 12, 5))
    assert store.conversation(cid).message_count == len(history) + len(committed)
    store.end_run(run, "completed")
    with pytest.raises(UserError, match="already completed"):
        store.commit_step(run, 4, "model", [Message.assistant("late")], Usage())
    with pytest.raises(UserError, match="no run 'nope'"):
        store.commit_step("nope", 0, "model", [Message.assistant("x")], Usage())
    assert store.load_conversation(cid) == history + committed


def test_a_write_locked_sqlite_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "memory.db"
    with Store(path, busy_timeout=0.05) as store:
        run = store.begin_run(conversation_id=None, new_messages=[], model_name="m", system_prompt=None).run_id
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="database is locked"):
                store.commit_step(run, 0, "model", [Message.assistant("x")], Usage())
            other.execute("ROLLBACK")
        finally:
            other.close()
        store.commit_step(run, 0, "model", [Message.assistant("x")], Usage())  # the store is fine afterwards
        assert store.load_run(run).new_message_count == 1


def test_run_sync_returns_the_result_without_formatting_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`asyncio.run` restores SIGINT through `signal.signal`, which formats its handler: a partial holding the
    finished task, whose repr held the whole RunResult (a quarter of a 200-step run)."""
    formatted: list[str] = []
    monkeypatch.setattr(RunResult, "__repr__", lambda self: formatted.append("RunResult") or "RunResult(...)")

    def add(n: int) -> int:
        """Add one."""
        return n + 1

    def model(messages: list[Message], info: AgentInfo) -> object:
        return [call("add", n=info.request_index)] if info.request_index < 3 else "done"

    with Store(tmp_path / "memory.db") as store:
        agent = Agent(FunctionModel(model), tools=[Tool.from_function(add)], memory=store)
        result = agent.run_sync("count")
        assert result.output == "done"
        assert store.load_run(result.run_id or "").new_message_count == len(result.new_messages) == 8
    assert formatted == []
    with pytest.raises(MaxStepsExceeded):  # a failed run still raises out of run_sync
        Agent(FunctionModel(model), tools=[Tool.from_function(add)], max_steps=1).run_sync("count")


PINNED = 1_796_083_200  # 2026-12-01 00:00 UTC: commit_step's clock in the test below


def _same(value: Any, run: str, cid: str) -> str:
    """A cell with the run's and conversation's random ids, and times begin_run took from the wall clock, named."""
    if isinstance(value, float) and value > PINNED + 3600:
        return "WALL-CLOCK"
    return str(value).replace(run, "RUN").replace(cid, "CID")


def test_the_sqlite_fast_path_writes_exactly_what_core_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    import memory._store

    dumps = []
    for fast in (True, False):
        clock = iter(dt.datetime.fromtimestamp(PINNED, dt.UTC) + dt.timedelta(milliseconds=i) for i in range(10_000))
        monkeypatch.setattr(memory._store, "_now", lambda ticks=clock: next(ticks))
        with Store(tmp_path / f"{fast}.db", file_artifacts_over=None) as store:
            store._fast_sqlite = fast
            started = store.begin_run(
                conversation_id=None, new_messages=[Message.user("go")], model_name="m", system_prompt="s"
            )
            run = started.run_id
            calls = [ToolCallPart(id=f"c{i}", name="t", arguments={"i": i, "s": "é\\u2028"}) for i in range(2)]
            store.commit_step(run, 0, "model", [Message.assistant("thinking", calls)], Usage(1, 10, 2, 10))
            results = [tool_result("c0", TextPart(text="ok"), png(8, 8, 1)), tool_result("c1", tone(0.1))]
            store.commit_step(run, 0, "tools", results, Usage(1, 10, 2, 10))
            retry = Message(role="user", parts=(RetryPart(message="again", name="t", call_id="c1"),))
            store.commit_step(run, 1, "model", [retry, Message.assistant("done")], Usage(2, 30, 5, 12))
            store.commit_step(run, 2, "model", [], Usage(3, 40, 6, 13))
            store.end_run(run, "completed")
            cid = started.conversation_id
        with sqlite3.connect(tmp_path / f"{fast}.db") as conn:
            dump = {}
            for table in ("mm_conversations", "mm_runs", "mm_steps", "mm_messages", "mm_parts", "mm_artifacts"):
                columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
                rows = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                keep = [i for i, c in enumerate(columns) if c != "lease_holder"]  # the store instance's own id
                dump[table] = [tuple(_same(row[i], run, cid) for i in keep) for row in rows]
        dumps.append(dump)
    fast_rows, core_rows = dumps
    for table in fast_rows:
        for a, b in zip(fast_rows[table], core_rows[table], strict=True):
            assert a == b, (table, [(x, y) for x, y in zip(a, b, strict=True) if x != y])
    assert fast_rows["mm_parts"] and fast_rows["mm_artifacts"]
