"""Crash safety and concurrency: SIGKILLed agent processes and 8 concurrent writers (SQLite and PostgreSQL).

Children are forked (`tests/memory_child.py`), so they start in milliseconds with everything imported;
each opens its own store.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import select
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import memory_child
import pytest
from memory_support import store_url_fixture  # noqa: F401
from sqlalchemy import create_engine, text

import memory
from agent.messages import Message, ToolCallPart, ToolResultPart
from memory import Store

_fork = multiprocessing.get_context("fork")


class Lines:
    """Lines a child writes to a pipe, read with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.lines, self.closed = fd, b"", list[str](), False

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.closed = True
        self.buffer += chunk
        *done, self.buffer = self.buffer.split(b"\n")
        self.lines.extend(line.decode() for line in done)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            self._pump(0.05)
        found = [line for line in self.lines if line.startswith(prefix)]
        if not found:
            raise AssertionError(f"the child never reported {prefix!r}; it said {self.lines}")
        return found[0]

    def wait_for_count(self, prefix: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(line.startswith(prefix) for line in self.lines) < count and not self.closed:
            if time.monotonic() > deadline:
                raise AssertionError(f"the child reported fewer than {count} {prefix!r} lines: {self.lines}")
            self._pump(0.01)

    def drain(self) -> list[str]:
        while not self.closed:
            self._pump(5.0)
        return self.lines


def _engine_url(url: str) -> str:
    return url if "://" in url else f"sqlite:///{url}"


def _committed_steps(url: str, run_id: str) -> set[tuple[int, str]]:
    engine = create_engine(_engine_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT step, phase FROM mm_steps WHERE run_id = :r"), {"r": run_id}).all()
    finally:
        engine.dispose()
    return {(int(step), str(phase)) for step, phase in rows}


def _results(messages: list[Message]) -> list[str]:
    return [p.call_id for m in messages for p in m.parts if isinstance(p, ToolResultPart)]


def _calls(messages: list[Message]) -> list[str]:
    return [p.id for m in messages for p in m.parts if isinstance(p, ToolCallPart)]


def _log(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _spawn(
    url: str, log: Path, tag: str, conversation: str | None
) -> tuple[multiprocessing.process.BaseProcess, Lines]:
    read_fd, write_fd = os.pipe()
    child = _fork.Process(target=memory_child.agent_child, args=(url, str(log), tag, conversation, write_fd))
    child.start()
    os.close(write_fd)
    return child, Lines(read_fd)


def crash_and_resume(url: str, tmp_path: Path, iterations: int, seed: int) -> Counter[str]:
    """Kill agent children at random moments; after each kill check the store and resume the run."""
    rng = random.Random(seed)
    log = tmp_path / "calls.log"
    log.touch()
    outcome: Counter[str] = Counter()
    conversation: str | None = None
    for i in range(iterations):
        tag = f"t{i}"
        child, lines = _spawn(url, log, tag, conversation if i % 2 else None)
        try:
            first = lines.wait_for("RUN ", timeout=60)
            # A random moment: after a random number of commits (any of the run's 2 * STEPS + 1), plus a
            # random delay of up to a few commits' time, so kills land inside tools, transactions and fsyncs.
            lines.wait_for_count("STEP ", rng.randint(0, 2 * memory_child.STEPS + 1), timeout=60)
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(child.pid or 0, signal.SIGKILL)
            child.join(30)
            reported = lines.drain()
        finally:
            os.close(lines.fd)
        _, run_id, conversation = first.split()
        steps = [line.split() for line in reported if line.startswith("STEP ")]

        if not url.startswith("postgresql"):
            with sqlite3.connect(url) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"iteration {i}"
                assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        committed = _committed_steps(url, run_id)
        for _, rid, step, phase, *_ in steps:
            assert rid == run_id and (int(step), phase) in committed, f"reported step {step} {phase} was lost"

        with Store(url) as store:
            stored = store.load_run(run_id)
            reported_results = {cid for line in steps for cid in line[4:]}
            committed_results = set(_results(stored.messages))
            assert reported_results <= committed_results
            before = len(_log(log))
            if stored.status == "completed":
                outcome["finished before the kill"] += 1
            else:
                outcome["killed mid-run"] += 1
                result = asyncio.run(memory_child.build_agent(store, str(log)).resume(run_id))
                assert result.output == f"done {tag}"
            rerun = _log(log)[before:]
            assert not set(rerun) & committed_results, "a committed tool call ran again"
            final = store.load_run(run_id)
        assert final.status == "completed"
        own = final.messages[len(final.messages) - final.new_message_count :]
        expected = [f"{tag}-{k}-{j}" for k in range(memory_child.STEPS) for j in range(memory_child.CALLS)]
        assert sorted(_calls(own)) == sorted(expected)
        assert sorted(_results(own)) == sorted(expected)  # every call answered exactly once
        executions = Counter(line for line in _log(log) if line.startswith(f"{tag}-"))
        assert max(executions.values()) <= 2  # at most once before the kill and once after
    return outcome


def test_sigkill_at_random_moments_loses_nothing_and_resumes(store_url: str, tmp_path: Path) -> None:
    outcome = crash_and_resume(store_url, tmp_path, iterations=5, seed=5)
    assert outcome["killed mid-run"] >= 3, outcome


@pytest.mark.slow
def test_sigkill_50_times(store_url: str, tmp_path: Path) -> None:
    outcome = crash_and_resume(store_url, tmp_path, iterations=50, seed=50)
    print(outcome)
    assert outcome["killed mid-run"] >= 35, outcome


def test_eight_processes_append_concurrently(store_url: str) -> None:
    """8 processes open a fresh store at once (migrating it once), then append to one shared conversation
    and to their own, with runs and artifacts: no errors, no lost or duplicated rows, a gapless order."""
    workers, count = 8, 15
    barrier = _fork.Barrier(workers + 1)
    children = [
        _fork.Process(target=memory_child.append_worker, args=(store_url, w, count, barrier, "shared"))
        for w in range(workers)
    ]
    for child in children:
        child.start()
    barrier.wait(timeout=120)
    with Store(store_url) as store:
        store.create_conversation(conversation_id="shared", title="shared")
        barrier.wait(timeout=60)
        for child in children:
            child.join(300)
        assert [child.exitcode for child in children] == [0] * workers
        shared = store.load_conversation("shared")
        expected = {f"worker{w} item{i} token{w}x{i}" for w in range(workers) for i in range(count)}
        assert len(shared) == workers * count and {m.text for m in shared} == expected
        for w in range(workers):  # each worker's own order is kept
            mine = [int(m.text.split()[1][4:]) for m in shared if m.text.startswith(f"worker{w} ")]
            assert mine == list(range(count))
        own = [c for c in store.list_conversations(limit=None) if c.id != "shared"]
        runs_per_worker = len(range(0, count, 5))
        assert sorted(c.message_count for c in own) == [count + 2 * runs_per_worker] * workers
        assert len(store.list_runs(status="completed", limit=None)) == workers * runs_per_worker
        assert [h.text for h in store.search("token3x7", conversation_id="shared")] == ["worker3 item7 token3x7"]
        assert store.schema_version == memory.SCHEMA_VERSION
    engine = create_engine(_engine_url(store_url))
    with engine.connect() as conn:
        positions = conn.execute(
            text("SELECT position FROM mm_messages WHERE conversation_id = 'shared' ORDER BY position")
        ).scalars()
        assert list(positions) == list(range(workers * count))
        assert conn.execute(text("SELECT count(*) FROM mm_artifacts")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM mm_schema_version")).scalar_one() == memory.SCHEMA_VERSION
    engine.dispose()
