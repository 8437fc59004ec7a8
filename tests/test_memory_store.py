"""memory.Store: round trips, dedup, schema versions, management, search — on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from memory_support import pg_execute, pg_schema, pg_size, store_fixture, store_url_fixture  # noqa: F401
from PIL import Image
from sqlalchemy import create_engine, inspect, text

import memory
from agent import Agent
from agent.exceptions import MediaError, SchemaVersionError, StoreError, UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from agent.models import Usage
from agent.testing import AgentInfo, FunctionModel
from memory import Store
from memory import _schema as schema
from tools import Tool

pytestmark = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")


def png(width: int, height: int, seed: int = 0) -> ImagePart:
    """A real PNG of random pixels (incompressible)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ImagePart(data=buffer.getvalue(), media_type="image/png")


def tone(seconds: float = 0.25, rate: int = 16_000) -> AudioPart:
    """Noise, not a sine: np.sin may differ in the last bit between calls (SIMD alignment)."""
    samples = np.random.default_rng(int(seconds * 1000)).uniform(-0.3, 0.3, int(seconds * rate))
    return AudioPart.from_samples(samples.astype(np.float32), rate)


def multimodal_conversation() -> list[Message]:
    cat, chart = png(64, 48, seed=1), png(32, 32, seed=2)
    return [
        Message.system("You are a careful assistant. Ünïcödé ✓"),
        Message.user("What is in this photo and this clip?", images=[cat], audio=[tone()]),
        Message.assistant(
            "Let me look closer.",
            [
                ToolCallPart(id="call_a", name="zoom", arguments={"box": [0.1, 0.2, 0.5, 0.5], "scale": 2.5}),
                ToolCallPart(id="call_b", name="transcribe", arguments={"lang": None, "nested": {"k": ["v", 1]}}),
            ],
        ),
        Message(
            role="tool",
            parts=(
                ToolResultPart(call_id="call_a", name="zoom", content=(TextPart(text="zoomed crop"), chart, cat)),
                ToolResultPart(call_id="call_b", name="transcribe", content=(TextPart(text="a cat purring"),)),
                RetryPart(message="argument 'x' is required", call_id="call_c", name="plot"),
            ),
        ),
        Message.assistant("", [ToolCallPart(id="call_d", name="beep", arguments={})]),
        Message(
            role="tool",
            parts=(ToolResultPart(call_id="call_d", name="beep", content=(tone(0.1), cat), is_error=True),),
        ),
        Message(role="user", parts=(RetryPart(message="Answer in text."),)),
        Message(role="assistant", parts=()),
        Message.user("Same photo again", images=[cat, cat]),
        Message.assistant("A cat on a sofa, purring."),
    ]


def test_public_names_are_pinned() -> None:
    assert sorted(memory.__all__) == [
        "CollectionInfo", "ConversationInfo", "EXPORT_FORMAT", "MediaFeature", "MediaHit", "MediaKind", "MediaRef",
        "MediaSegment", "MediaSource", "NewSegment", "RunInfo", "SCHEMA_VERSION", "SchemaVersionError", "SearchHit",
        "SegmentKind", "Store", "StoreError", "recall_tool",
    ]  # fmt: skip


def test_multimodal_round_trip_is_equal_value_for_value(store: Store) -> None:
    conversation = multimodal_conversation()
    cid = store.create_conversation(conversation[:4], metadata={"user": "u1", "n": [1, 2]})
    store.append(cid, conversation[4:])
    loaded = store.load_conversation(cid)
    assert loaded == conversation
    for got, want in zip(loaded, conversation, strict=True):  # bytes included, part by part
        assert [getattr(p, "data", None) for p in got.parts] == [getattr(p, "data", None) for p in want.parts]
    info = store.conversation(cid)
    assert info.metadata == {"user": "u1", "n": [1, 2]}
    assert info.title == "What is in this photo and this clip?"
    assert info.message_count == len(conversation)
    assert info.created_at.tzinfo is not None and info.updated_at >= info.created_at


def test_each_artifact_is_stored_once(store: Store) -> None:
    cid = store.create_conversation(multimodal_conversation())
    store.create_conversation(multimodal_conversation())
    with store._database.transaction(write=False) as conn:  # white-box: count rows
        artifacts = conn.execute(text("SELECT count(*) FROM mm_artifacts")).scalar_one()
    assert artifacts == 4  # two images and two audio clips, across two conversations
    assert store.load_conversation(cid) == multimodal_conversation()


def _size(url: str, tables: tuple[str, ...] | None = None) -> int:
    if url.startswith("postgresql"):
        return pg_size(url, tables)
    with sqlite3.connect(url) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if tables is not None:
            return int(conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name IN ('mm_artifacts')").fetchone()[0])
    wal = Path(url + "-wal")
    return os.path.getsize(url) + (wal.stat().st_size if wal.exists() else 0)


async def test_dedup_100_tool_results_of_one_image_cost_one_image(store_url: str) -> None:
    """An agent calls a screenshot tool 100 times (10 steps of 10 parallel calls); every result is the same
    ~1 MB incompressible image. Whole-database growth on SQLite (after a checkpoint) stays within 1.05x the
    image. PostgreSQL cannot store one bytea within 1.05x (TOAST chunks and their index cost ~7%): there the
    artifact table stays within 1.10x and the whole schema far below a second copy."""
    image = png(600, 580, seed=3)
    assert 0.95e6 < len(image.data) < 1.2e6

    def script(messages: list[Message], info: AgentInfo) -> str | list[ToolCallPart]:
        step = sum(1 for m in messages if m.role == "assistant")
        if step < 10:
            return [ToolCallPart(id=f"c{step}-{i}", name="snap", arguments={}) for i in range(10)]
        return "done"

    with Store(store_url) as store:
        cid = store.create_conversation([Message.user("take 100 snapshots")])
        before, artifacts_before = _size(store_url), _size(store_url, ("mm_artifacts",))
        agent = Agent(FunctionModel(script), tools=[Tool.from_function(lambda: image, name="snap")], memory=store)
        result = await agent.run("go", conversation_id=cid)
        growth = _size(store_url) - before
        artifact_growth = _size(store_url, ("mm_artifacts",)) - artifacts_before
        loaded = store.load_run(result.run_id or "")
    print(
        f"{store_url.split(':')[0]}: grew {growth} bytes ({growth / len(image.data):.3f}x), artifacts {artifact_growth}"
    )
    results = [p for m in loaded.messages for p in m.parts if isinstance(p, ToolResultPart)]
    assert len(results) == 100 and all(r.content == (image,) for r in results)
    if store_url.startswith("postgresql"):  # bytea lives in 2 KB TOAST chunks: ~7% over the raw bytes
        assert artifact_growth <= 1.10 * len(image.data), f"artifacts grew {artifact_growth} bytes"
        assert growth < 1.5 * len(image.data), f"grew {growth} bytes for a {len(image.data)}-byte image"
    else:
        assert growth <= 1.05 * len(image.data), f"grew {growth} bytes for a {len(image.data)}-byte image"


def test_artifact_size_limit_is_a_clear_media_error(store_url: str) -> None:
    with Store(store_url, max_artifact_bytes=10_000) as store:
        store.create_conversation([Message.user("small", images=[ImagePart(data=b"x" * 10_000)])])
        big = ImagePart(data=b"x" * 10_001)
        with pytest.raises(MediaError, match=r"over the memory store's per-artifact limit.*max_artifact_bytes"):
            store.create_conversation([Message.user("big", images=[big])])
        assert len(store.list_conversations()) == 1  # nothing of the refused write was kept
    with pytest.raises(UserError, match="max_artifact_bytes"):
        Store(store_url, max_artifact_bytes=0)


def test_newer_schema_is_refused_and_left_unchanged(store_url: str) -> None:
    with Store(store_url) as store:
        assert store.schema_version == memory.SCHEMA_VERSION
        store.create_conversation([Message.user("keep me")])
    future = memory.SCHEMA_VERSION + 1
    sql = f"INSERT INTO mm_schema_version (version, applied_at) VALUES ({future}, CURRENT_TIMESTAMP)"
    if store_url.startswith("postgresql"):
        pg_execute(f"SET search_path TO {pg_schema(store_url)}; {sql}")
    else:
        with sqlite3.connect(store_url) as conn:
            conn.execute(sql)
    with pytest.raises(SchemaVersionError, match=rf"schema version {future}.*up to {memory.SCHEMA_VERSION}.*upgrade"):
        Store(store_url)
    if not store_url.startswith("postgresql"):
        with sqlite3.connect(store_url) as conn:
            assert conn.execute("SELECT count(*) FROM mm_conversations").fetchone() == (1,)


def test_migrated_database_matches_the_declared_schema(store: Store) -> None:
    engine = store._database.engine
    found = inspect(engine)
    for table in schema.metadata.sorted_tables:
        columns = {c["name"]: c for c in found.get_columns(table.name)}
        assert set(columns) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            assert bool(columns[column.name]["nullable"]) == column.nullable or column.primary_key, column.name


def test_opening_twice_migrates_once_and_sqlite_settings_apply(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    Store(path).close()
    with Store(f"sqlite:///{path}") as store, store._database.transaction(write=False) as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("SELECT count(*) FROM mm_schema_version").scalar() == memory.SCHEMA_VERSION


def test_bad_targets_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unable to open database file"):
        Store(tmp_path / "missing-dir" / "m.db")
    with pytest.raises(UserError, match="cannot use database URL"):
        Store("nosuchdb+driver://x/y")
    with pytest.raises(UserError, match="needs an SQLite database file"):
        Store(":memory:", file_artifacts_over=10)
    store = Store(":memory:")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_conversations()


def test_unknown_ids_are_user_errors(store: Store) -> None:
    for call in (
        lambda: store.load_conversation("nope"),
        lambda: store.append("nope", [Message.user("x")]),
        lambda: store.delete_conversation("nope"),
        lambda: store.load_run("nope"),
        lambda: store.end_run("nope", "completed"),
        lambda: store.artifact("0" * 64),
        lambda: store.begin_run(conversation_id="nope", new_messages=[], model_name="m", system_prompt=None),
    ):
        with pytest.raises(UserError, match=r"no (conversation|run|artifact) '(nope|0+)' in the memory store"):
            call()


def test_run_store_protocol(store: Store) -> None:
    started = store.begin_run(
        conversation_id=None, new_messages=[Message.user("hello")], model_name="m", system_prompt="sys"
    )
    assert started.history == []
    fresh = store.load_run(started.run_id)
    assert (fresh.status, fresh.next_step, fresh.new_message_count, fresh.usage) == ("running", 0, 1, Usage())
    call = ToolCallPart(id="c1", name="t", arguments={"q": 1})
    store.commit_step(started.run_id, 0, "model", [Message.assistant("", [call])], Usage(1, 10, 2))
    assert store.load_run(started.run_id).next_step == 0  # the calls are still to run
    result = Message(role="tool", parts=(ToolResultPart(call_id="c1", name="t", content=(TextPart(text="ok"),)),))
    store.commit_step(started.run_id, 0, "tools", [result], Usage(1, 10, 2))
    with pytest.raises(UserError, match="already committed"):
        store.commit_step(started.run_id, 0, "tools", [result], Usage(1, 10, 2))
    loaded = store.load_run(started.run_id)
    assert (loaded.next_step, loaded.new_message_count, loaded.usage) == (1, 3, Usage(1, 10, 2))
    assert loaded.messages[-1] == result
    store.end_run(started.run_id, "failed", "boom")
    [info] = store.list_runs(conversation_id=started.conversation_id)
    assert (info.status, info.error, info.steps, info.system_prompt) == ("failed", "boom", 2, "sys")
    store.commit_step(started.run_id, 1, "model", [Message.assistant("done")], Usage(2, 20, 4))  # resumed
    assert store.list_runs(status="running")[0].id == started.run_id
    store.end_run(started.run_id, "completed")
    with pytest.raises(UserError, match="already completed"):
        store.commit_step(started.run_id, 2, "model", [Message.assistant("x")], Usage())
    second = store.begin_run(
        conversation_id=started.conversation_id, new_messages=[Message.user("more")], model_name="m", system_prompt=None
    )
    assert second.history == store.load_conversation(started.conversation_id)[:-1]
    assert store.load_run(started.run_id).messages == second.history  # a later run does not leak into it


def test_list_update_delete_and_orphan_collection(store: Store) -> None:
    shared, own = png(16, 16, seed=10), png(16, 16, seed=11)
    a = store.create_conversation([Message.user("alpha zebra", images=[shared, own])], title="A")
    time.sleep(0.002)
    b = store.create_conversation([Message.user("beta zebra", images=[shared])], metadata={"k": 1})
    assert [c.id for c in store.list_conversations()] == [b, a]
    store.update_conversation(a, title="A2", metadata={"x": True})
    assert [c.id for c in store.list_conversations(limit=1)] == [a]
    assert store.conversation(a).title == "A2" and store.conversation(a).metadata == {"x": True}
    run = store.begin_run(conversation_id=a, new_messages=[Message.user("q")], model_name="m", system_prompt=None)
    store.commit_step(run.run_id, 0, "model", [Message.assistant("zebra answer")], Usage())
    sha = {p.data: __import__("hashlib").sha256(p.data).hexdigest() for p in (shared, own)}

    store.delete_conversation(a)
    assert [c.id for c in store.list_conversations()] == [b]
    assert store.artifact(sha[shared.data]) == shared
    with pytest.raises(UserError):
        store.artifact(sha[own.data])  # only A used it: collected
    assert store.list_runs() == []
    assert [h.conversation_id for h in store.search("zebra")] == [b]  # the index forgot A's text
    store.delete_conversation(b)
    with pytest.raises(UserError):
        store.artifact(sha[shared.data])
    with store._database.transaction(write=False) as conn:
        for table in ("mm_messages", "mm_parts", "mm_artifacts", "mm_runs", "mm_steps"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table
    assert store.collect_garbage() == 0


def test_export_import_round_trip(store: Store) -> None:
    without_retries = [
        Message(role=m.role, parts=tuple(p for p in m.parts if not isinstance(p, RetryPart)))
        for m in multimodal_conversation()
    ]
    conversation = [m for m in without_retries if m.parts]
    cid = store.create_conversation(conversation, title="Photo", metadata={"app": "demo"})
    exported = store.export_conversation(cid)
    assert exported["format"] == memory.EXPORT_FORMAT and exported["title"] == "Photo"
    assert exported["messages"][1]["role"] == "user" and exported["tool_errors"] == ["call_d"]
    assert len(exported["artifacts"]) == 4
    copy = store.import_conversation(exported)
    assert copy != cid
    assert store.load_conversation(copy) == conversation
    assert store.conversation(copy).metadata == {"app": "demo"}
    tampered = {**exported, "artifacts": exported["artifacts"][:-1]}
    with pytest.raises(UserError, match="do not match"):
        store.import_conversation(tampered)
    with pytest.raises(UserError, match="'messages' list"):
        store.import_conversation({"nothing": 1})
    with pytest.raises(UserError, match="unknown export format"):
        store.import_conversation({**exported, "format": "other/9"})


def test_truncating_a_spoken_answer_keeps_only_what_was_heard(store: Store) -> None:
    answer = Message(
        role="assistant", parts=(TextPart(text="The station is north. "), TextPart(text="Walk ten minutes."))
    )
    cid = store.create_conversation([Message.user("Where is the station?", audio=[tone()]), answer])
    store.append(cid, [Message.user("thanks")])
    assert [h.conversation_id for h in store.search("minutes")] == [cid]
    store.truncate_message(cid, 1, "The station is north.")
    messages = store.load_conversation(cid)
    assert [m.role for m in messages] == ["user", "assistant", "user"] and messages[2].text == "thanks"
    assert messages[1].parts == (TextPart(text="The station is north."),)
    assert store.search("minutes") == [] and [h.conversation_id for h in store.search("north")] == [cid]
    assert store.conversation(cid).message_count == 3
    store.truncate_message(cid, 1, "The station is north.")  # the same again changes nothing
    store.truncate_message(cid, 1, "")  # nothing was heard
    assert store.load_conversation(cid)[1].text == "" and store.search("north") == []
    with pytest.raises(UserError, match="not the start of message 2's text"):
        store.truncate_message(cid, 2, "no thanks")
    with pytest.raises(UserError, match="is not text only"):
        store.truncate_message(cid, 0, "Where")  # the user's turn holds audio
    with pytest.raises(UserError, match="has no message at position 7"):
        store.truncate_message(cid, 7, "")
    with pytest.raises(UserError, match="no conversation 'nope'"):
        store.truncate_message("nope", 0, "")
    assert store.load_conversation(cid)[2].text == "thanks"


def test_search_filters_by_conversation_time_and_kind(store: Store) -> None:
    photo = png(8, 8, seed=20)
    first = store.create_conversation(
        [
            Message.user("Where did I park the bicycle?", images=[photo]),
            Message.assistant("", [ToolCallPart(id="c1", name="notes", arguments={"q": "bicycle"})]),
            Message(
                role="tool",
                parts=(
                    ToolResultPart(
                        call_id="c1", name="notes", content=(TextPart(text="Bicycles parked at the station"), photo)
                    ),
                ),
            ),
        ]
    )
    time.sleep(0.01)
    middle = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    second = store.create_conversation([Message.user("The bicycle has a flat tyre")])

    hits = store.search("bicycle")
    assert {(h.conversation_id, h.kind) for h in hits} == {(first, "text"), (first, "tool-result"), (second, "text")}
    assert all(h.score > 0 for h in hits) and hits == sorted(hits, key=lambda h: -h.score)
    assert [h.conversation_id for h in store.search("bicycle", conversation_id=second)] == [second]
    assert {h.conversation_id for h in store.search("bicycle", since=middle)} == {second}
    assert {h.conversation_id for h in store.search("bicycle", until=middle.replace(tzinfo=None))} == {first}
    [tool_hit] = store.search("parked station", kinds={"tool-result"})
    assert (tool_hit.tool_name, tool_hit.message_index, tool_hit.role) == ("notes", 2, "tool")
    assert store.artifact(tool_hit.media[0]) == photo
    [text_hit] = store.search("park", kinds=["text"], conversation_id=first)
    assert text_hit.message_index == 0 and len(text_hit.media) == 1
    assert store.search("bicycle unicorn") == [] and store.search("  ?! ") == []
    assert len(store.search('"bicycle*" -(flat:')) == 1  # query syntax is never interpreted
    assert len(store.search("bicycle", limit=1)) == 1
    with pytest.raises(UserError, match="unknown search kind"):
        store.search("x", kinds={"image"})


def test_file_artifacts_live_next_to_the_database(tmp_path: Path) -> None:
    path = tmp_path / "files.db"
    big, small = png(200, 200, seed=30), ImagePart(data=b"tiny")
    with Store(path, file_artifacts_over=10_000) as store:
        cid = store.create_conversation([Message.user("pics", images=[big, small, big])])
        files = list((tmp_path / "files.db.artifacts").rglob("*"))
        assert [f.name for f in files if f.is_file()] == [__import__("hashlib").sha256(big.data).hexdigest()]
        assert store.load_conversation(cid)[0].parts[:3] == (big, small, big)
        (tmp_path / "files.db.artifacts" / "ab").mkdir()
        (tmp_path / "files.db.artifacts" / "ab" / ("ab" + "0" * 62)).write_bytes(b"stray")
        assert store.collect_garbage() == 1
        store.delete_conversation(cid)
        assert not [f for f in (tmp_path / "files.db.artifacts").rglob("*") if f.is_file()]
    with Store(path) as reopened:  # reading needs no threshold
        reopened.create_conversation([Message.user("x", images=[small])])


def test_in_memory_store_is_shared_across_threads() -> None:
    import concurrent.futures

    with Store(":memory:") as store:
        cid = store.create_conversation()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: store.append(cid, [Message.user(f"m{i}")]), range(40)))
        assert sorted(m.text for m in store.load_conversation(cid)) == sorted(f"m{i}" for i in range(40))


def test_store_opened_through_sqlalchemy_url_sees_same_data(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    with Store(path) as store:
        cid = store.create_conversation([Message.user("hi")])
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM mm_conversations")).scalar_one() == cid
    engine.dispose()
