"""One run at a time per conversation: the lease in the store (SQLite and PostgreSQL).

The reproduction from the hardening issue comes first: processes running agent turns on one conversation at
once. Without the lease, a run's tool call was followed by another run's user message (every trial of
`overlapping_turns` failed on the code before the lease); with it the runs take turns.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from typing import Any

import memory_child
import pytest
from memory_support import store_url_fixture  # noqa: F401
from sqlalchemy import create_engine, inspect, select, text

from agent import Agent
from agent.exceptions import ConversationBusyError, UserError
from agent.messages import Message, ToolCallPart, ToolResultPart
from agent.models import Usage
from agent.testing import FunctionModel
from memory import Store, _migrations
from memory import _schema as schema
from tools import Tool

_fork = multiprocessing.get_context("fork")


def _engine_url(url: str) -> str:
    return url if "://" in url else f"sqlite:///{url}"


def history_problems(url: str, conversation_id: str) -> list[str]:
    """What makes a stored conversation invalid for the model: a tool call not answered by the very next
    message (a tool message with exactly those call ids), or a run whose messages are not contiguous."""
    problems: list[str] = []
    with Store(url) as store:
        messages = store.load_conversation(conversation_id)
    for i, message in enumerate(messages):
        if message.role != "assistant" or not message.tool_calls:
            continue
        calls = sorted(call.id for call in message.tool_calls)
        after = messages[i + 1] if i + 1 < len(messages) else None
        answered = sorted(p.call_id for p in after.parts if isinstance(p, ToolResultPart)) if after else []
        if after is None or after.role != "tool" or answered != calls:
            got = "nothing" if after is None else f"{after.role} {after.text or answered!r}"
            problems.append(f"message {i}: calls {calls} are followed by {got}")
    engine = create_engine(_engine_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT position, run_id FROM mm_messages WHERE conversation_id = :c ORDER BY position"),
                {"c": conversation_id},
            ).all()
    finally:
        engine.dispose()
    spans: dict[str, list[int]] = {}
    for position, run_id in rows:
        if run_id is not None:
            spans.setdefault(run_id, []).append(int(position))
    for run_id, positions in spans.items():
        if positions != list(range(positions[0], positions[0] + len(positions))):
            problems.append(f"run {run_id[:8]} is not contiguous: positions {positions}")
    return problems


def overlapping_turns(url: str, processes: int, options: dict[str, Any]) -> list[str]:
    """`processes` processes each run one agent turn (tool call, pause, answer) on one conversation at once;
    return what is wrong with the stored conversation afterwards."""
    with Store(url) as store:
        cid = store.create_conversation([Message.user("hello"), Message.assistant("hi")])
    barrier = _fork.Barrier(processes)
    children = [
        _fork.Process(target=memory_child.turn_worker, args=(url, f"p{i}", cid, barrier, options))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0] * processes
    with Store(url) as store:
        assert len(store.load_conversation(cid)) == 2 + 4 * processes
        assert [r.status for r in store.list_runs(conversation_id=cid)] == ["completed"] * processes
    return history_problems(url, cid)


def test_concurrent_turns_on_one_conversation_keep_the_history_valid(store_url: str) -> None:
    """The issue's reproduction: six processes, one conversation, overlapping tool calls."""
    assert overlapping_turns(store_url, 6, {"lease_wait": 60}) == []


# ---------------------------------------------------------------- helpers for the in-process tests


def pause_tool(seconds: float, started: asyncio.Event | None = None) -> Tool:
    async def pause() -> str:
        if started is not None:
            started.set()
        await asyncio.sleep(seconds)
        return "paused"

    return Tool.from_function(pause)


def turn_agent(store: Store, seconds: float = 0.05, started: asyncio.Event | None = None) -> Agent:
    """An agent whose turn `turn <tag>` is a `pause` call, then `done <tag>` (`memory_child.turn_script`)."""
    return Agent(FunctionModel(memory_child.turn_script), tools=[pause_tool(seconds, started)], memory=store)


def lease_of(store: Store, conversation_id: str) -> tuple[str | None, str | None]:
    """White box: the conversation's lease columns (run, holder)."""
    c = schema.conversations.c
    with store._database.transaction(write=False) as conn:
        row = conn.execute(select(c.lease_run_id, c.lease_holder).where(c.id == conversation_id)).one()
    return row.lease_run_id, row.lease_holder


def begin(store: Store, conversation_id: str | None, prompt: str = "hi") -> str:
    return store.begin_run(
        conversation_id=conversation_id, new_messages=[Message.user(prompt)], model_name="m", system_prompt=None
    ).run_id


# ---------------------------------------------------------------- waiting, refusing, expiring


async def test_two_runs_in_one_process_take_turns(store_url: str) -> None:
    """One store shared by concurrent requests (a server): the second run waits for the first."""
    with Store(store_url) as store:
        cid = store.create_conversation([Message.user("hello")])
        agent = turn_agent(store)
        results = await asyncio.gather(*(agent.run(f"turn t{i}", conversation_id=cid) for i in range(3)))
        assert sorted(r.output for r in results) == ["done t0", "done t1", "done t2"]
        assert lease_of(store, cid) == (None, None)  # every run released it
    assert history_problems(store_url, cid) == []


async def test_a_busy_conversation_is_waited_for(store_url: str) -> None:
    with Store(store_url) as store, Store(store_url, lease_wait=30) as other:
        first = store.begin_run(
            conversation_id=None, new_messages=[Message.user("first")], model_name="m", system_prompt=None
        )
        assert lease_of(store, first.conversation_id)[0] == first.run_id  # a new conversation comes leased
        began = time.monotonic()
        second = asyncio.ensure_future(turn_agent(other).run("turn b", conversation_id=first.conversation_id))
        await asyncio.sleep(0.3)
        assert not second.done()
        store.commit_step(first.run_id, 0, "model", [Message.assistant("one")], Usage(requests=1))
        store.end_run(first.run_id, "completed")
        result = await second
        assert time.monotonic() - began >= 0.3
        stored = store.load_conversation(first.conversation_id)
    assert [(m.role, m.text) for m in stored] == [
        ("user", "first"), ("assistant", "one"), ("user", "turn b"), ("assistant", ""), ("tool", ""),
        ("assistant", "done b"),
    ]  # fmt: skip
    assert result.new_messages == stored[2:]


def test_past_lease_wait_a_clear_error_names_the_holder(store_url: str) -> None:
    with Store(store_url) as store, Store(store_url, lease_wait=0.2) as other:
        cid = store.create_conversation([Message.user("hello")])
        holder = begin(store, cid)
        began = time.monotonic()
        with pytest.raises(ConversationBusyError) as caught:
            begin(other, cid, "refused")
        assert time.monotonic() - began >= 0.2
        error = caught.value
        assert (error.conversation_id, error.run_id) == (cid, holder)
        assert error.expires_at is not None and error.expires_at.tzinfo is not None
        assert f"conversation {cid!r} is busy: run {holder} holds its lease until" in str(error)
        assert "lease_wait" in str(error)
        with pytest.raises(ConversationBusyError, match=f"run {holder}"):
            other.append(cid, [Message.user("appended")])  # a plain append does not slip in between either
        with Store(store_url, lease_wait=0) as impatient, pytest.raises(ConversationBusyError):
            impatient.append(cid, [Message.user("at once")])
        assert [m.text for m in store.load_conversation(cid)] == ["hello", "hi"]  # nothing refused was kept
        assert len(store.list_runs(conversation_id=cid)) == 1
        store.end_run(holder, "completed")
        other.append(cid, [Message.user("appended")])
        assert store.load_conversation(cid)[-1].text == "appended"


def test_an_expired_lease_is_taken_over_and_the_lapsed_run_cannot_continue(store_url: str) -> None:
    """A store that stops renewing (its process was killed) holds the conversation until the lease expires."""
    with Store(store_url, lease_ttl=0.3) as crashed, Store(store_url, lease_wait=10) as other:
        cid = crashed.create_conversation([Message.user("hello")])
        lapsed = begin(crashed, cid, "lapsed")
        call = ToolCallPart(id="x", name="pause", arguments={})
        crashed.commit_step(lapsed, 0, "model", [Message.assistant("", [call])], Usage(requests=1))
        with Store(store_url, lease_wait=0) as third, pytest.raises(ConversationBusyError, match=f"run {lapsed}"):
            third.resume_run(lapsed)  # this very run, but its lease is the crashed store's
        began = time.monotonic()
        taker = begin(other, cid, "taker")  # waits for the expiry, then takes the conversation
        assert 0.1 < time.monotonic() - began < 5
        assert lease_of(other, cid)[0] == taker
        result = Message(role="tool", parts=(ToolResultPart(call_id="x", name="pause", content=()),))
        with pytest.raises(ConversationBusyError, match=f"run {lapsed} lost the lease.*run {taker} holds it"):
            crashed.commit_step(lapsed, 0, "tools", [result], Usage(requests=1))
        other.end_run(taker, "completed")
        with pytest.raises(ConversationBusyError, match=f"its lease lapsed and run {taker} was stored after"):
            crashed.commit_step(lapsed, 0, "tools", [result], Usage(requests=1))  # free now, but overtaken
        with pytest.raises(ConversationBusyError, match="would interleave"):
            other.resume_run(lapsed)
        assert [m.text for m in other.load_conversation(cid)] == ["hello", "lapsed", "", "taker"]


def test_a_lapsed_lease_nobody_took_is_renewed_by_the_next_commit(store_url: str) -> None:
    with Store(store_url, lease_ttl=0.05) as store:
        started = store.begin_run(
            conversation_id=None, new_messages=[Message.user("slow")], model_name="m", system_prompt=None
        )
        time.sleep(0.1)
        store.commit_step(started.run_id, 0, "model", [Message.assistant("fine")], Usage(requests=1))
        assert lease_of(store, started.conversation_id)[0] == started.run_id
        store.end_run(started.run_id, "completed")
        assert lease_of(store, started.conversation_id) == (None, None)
        with pytest.raises(ConversationBusyError, match="does not hold the lease"):
            store.renew(started.run_id)


async def test_the_heartbeat_keeps_the_lease_through_a_tool_longer_than_the_ttl(store_url: str) -> None:
    with Store(store_url, lease_ttl=0.3) as store, Store(store_url, lease_wait=0) as other:
        cid = store.create_conversation([Message.user("hello")])
        task = asyncio.ensure_future(turn_agent(store, seconds=0.8).run("turn slow", conversation_id=cid))
        await asyncio.sleep(0.6)  # the tool runs: no commit since ~0.0 s, twice the TTL
        assert not task.done()
        with pytest.raises(ConversationBusyError):
            await asyncio.to_thread(begin, other, cid)
        assert (await task).output == "done slow"
        begin(other, cid)
    assert history_problems(store_url, cid) == []


# ---------------------------------------------------------------- cancellation and resume


async def test_cancelling_a_run_releases_the_lease_and_keeps_it_resumable(store_url: str) -> None:
    with Store(store_url) as store:
        cid = store.create_conversation([Message.user("hello")])
        started = asyncio.Event()
        task = asyncio.ensure_future(turn_agent(store, seconds=60, started=started).run("turn c", conversation_id=cid))
        await asyncio.wait_for(started.wait(), 10)  # the model asked for the tool, the call is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [run] = store.list_runs(conversation_id=cid)
        assert (run.status, run.error, run.steps) == ("running", None, 1)  # not failed: resumable
        assert lease_of(store, cid) == (None, None)
    with Store(store_url, lease_wait=0) as fresh:  # no waiting for an expiry: the lease was released
        result = await turn_agent(fresh).resume(run.id)
        assert result.output == "done c"
        assert fresh.list_runs(conversation_id=cid)[0].status == "completed"
    assert history_problems(store_url, cid) == []


class SlowCommits(Store):
    """A store whose step commits take a while: `committing` is set as one begins."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.committing = threading.Event()

    def commit_step(self, *args: Any, **kwargs: Any) -> None:
        self.committing.set()
        time.sleep(0.3)
        super().commit_step(*args, **kwargs)


async def test_a_run_cancelled_while_committing_returns_once_the_commit_landed(store_url: str) -> None:
    """The caller that cancelled finds the store as the run left it (no write still landing behind its back)."""
    with SlowCommits(store_url) as store:
        model = FunctionModel(lambda messages, info: "the answer")
        task = asyncio.ensure_future(Agent(model, memory=store).run("question"))
        await asyncio.to_thread(store.committing.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [run] = store.list_runs()
        assert (run.status, run.steps) == ("running", 1)  # the answer's commit landed; the run did not end
        assert [m.text for m in store.load_conversation(run.conversation_id)] == ["question", "the answer"]
        assert lease_of(store, run.conversation_id) == (None, None)


async def test_cancelled_while_waiting_for_the_lease_leaves_nothing_held(store_url: str) -> None:
    with Store(store_url) as store, Store(store_url, lease_wait=30) as waiter:
        cid = store.create_conversation([Message.user("hello")])
        holder = begin(store, cid)
        task = asyncio.ensure_future(turn_agent(waiter).run("turn w", conversation_id=cid))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.end_run(holder, "completed")  # the waiting thread now takes the lease: it must give it back
        for _ in range(200):  # up to 10 s for the thread to take the lease and give it back
            # the runs first: a lease read before the waiter's commit would be None and stale
            if len(store.list_runs(conversation_id=cid)) == 2 and lease_of(store, cid) == (None, None):
                break
            await asyncio.sleep(0.05)
        assert lease_of(store, cid) == (None, None)  # the abandoned run (its prompt stored) holds nothing


async def test_resume_takes_the_lease(store_url: str) -> None:
    with Store(store_url, lease_wait=0) as store, Store(store_url, lease_wait=0) as other:
        started = store.begin_run(
            conversation_id=None, new_messages=[Message.user("turn r")], model_name="m", system_prompt=None
        )
        call = ToolCallPart(id="r-call", name="pause", arguments={})
        store.commit_step(started.run_id, 0, "model", [Message.assistant("", [call])], Usage(requests=1))
        store.release(started.run_id)  # as if the run had been cancelled
        assert lease_of(store, started.conversation_id) == (None, None)
        assert store.load_run(started.run_id).lease_ttl is None  # reading takes no lease

        running = asyncio.Event()
        task = asyncio.ensure_future(turn_agent(other, seconds=0.5, started=running).resume(started.run_id))
        await asyncio.wait_for(running.wait(), 10)
        assert lease_of(store, started.conversation_id) == (started.run_id, other._leases.holder)
        with pytest.raises(ConversationBusyError, match=f"run {started.run_id}"):
            await asyncio.to_thread(store.append, started.conversation_id, [Message.user("no")])
        assert (await task).output == "done r"
        assert lease_of(store, started.conversation_id) == (None, None)
        with pytest.raises(UserError, match="already completed"):
            store.resume_run(started.run_id)


def test_lease_settings_are_checked(store_url: str) -> None:
    for bad in ({"lease_ttl": 0}, {"lease_ttl": float("inf")}, {"lease_wait": -1}, {"lease_wait": float("nan")}):
        with pytest.raises(UserError, match="lease_"):
            Store(store_url, **bad)


# ---------------------------------------------------------------- the migration


def test_a_version_1_database_migrates_to_the_lease(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database written before the lease (schema version 1) opens, gains the lease columns, and works."""
    with monkeypatch.context() as old:
        old.setattr(_migrations, "MIGRATIONS", _migrations.MIGRATIONS[:1])
        old.setattr(_migrations, "SCHEMA_VERSION", 1)
        with Store(store_url) as v1:
            assert v1.schema_version == 1
            cid = v1.create_conversation([Message.user("written by version 1")])
        engine = create_engine(_engine_url(store_url))
        columns = {c["name"] for c in inspect(engine).get_columns("mm_conversations")}
        engine.dispose()
        assert not {"lease_run_id", "lease_holder", "lease_expires_at"} & columns
    with Store(store_url) as store:
        assert store.schema_version == _migrations.SCHEMA_VERSION == 4
        with store._database.transaction(write=False) as conn:
            versions = conn.execute(text("SELECT version FROM mm_schema_version ORDER BY version")).scalars().all()
            found = {c["name"]: c for c in inspect(conn).get_columns("mm_conversations")}
            runs = {c["name"] for c in inspect(conn).get_columns("mm_runs")}
        assert versions == [1, 2, 3, 4]
        assert set(found) == {c.name for c in schema.conversations.columns}
        assert runs == {c.name for c in schema.runs.columns}  # migration 3: parent_run_id
        assert all(found[name]["nullable"] for name in ("lease_run_id", "lease_holder", "lease_expires_at"))
        assert lease_of(store, cid) == (None, None)
        assert [m.text for m in store.load_conversation(cid)] == ["written by version 1"]
        run_id = begin(store, cid, "after the upgrade")
        assert lease_of(store, cid)[0] == run_id
