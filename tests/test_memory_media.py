"""memory.Store's media half: sources, segments, features, vectors and search_media — on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from memory_support import need_vectors, pg_execute, store_fixture, store_url_fixture  # noqa: F401
from PIL import Image
from sqlalchemy import text

import memory
from agent.exceptions import MediaError, StoreError, UserError
from agent.messages import AudioPart, ImagePart, Message
from memory import MediaSegment, MediaSource, NewSegment, Store, _media_search, _migrations

pytestmark = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")


def png(seed: int, size: int = 16) -> ImagePart:
    """A real PNG of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ImagePart(data=buffer.getvalue(), media_type="image/png")


def clip(seed: int) -> AudioPart:
    return AudioPart.from_samples(np.random.default_rng(seed).uniform(-0.3, 0.3, 1600).astype(np.float32))


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def video(store: Store, uri: str = "clips/a.mp4", collection: str = "lib", version: str = "v1") -> MediaSource:
    source, _ = store.add_source(
        collection, uri, sha256=sha(uri + version), kind="video", media_type="video/mp4", size=1000, duration=20.0
    )
    return source


def scenes(store: Store, source: MediaSource, captions: list[str], seed: int = 0) -> list[MediaSegment]:
    """Scenes 5 s long with a keyframe each and a caption feature."""
    made = store.add_segments(
        source.id,
        [
            NewSegment("scene", i, start=5.0 * i, end=5.0 * (i + 1), media=(("keyframe", 5.0 * i + 1, png(seed + i)),))
            for i in range(len(captions))
        ],
    )
    for segment, caption in zip(made, captions, strict=True):
        store.put_feature(segment.id, "scene_caption", "1", caption, {"caption": caption})
    return made


def test_add_source_is_idempotent_and_a_changed_file_resets_it(store: Store) -> None:
    first, written = store.add_source(
        "lib", "a.mp4", sha256=sha("a").upper(), kind="video", media_type="video/mp4", size=10, metadata={"k": [1]}
    )
    assert written and first.created_at == first.updated_at and not first.complete
    assert (first.collection, first.uri, first.sha256, first.metadata) == ("lib", "a.mp4", sha("a"), {"k": [1]})
    again, written = store.add_source("lib", "a.mp4", sha256=sha("a"), kind="video", media_type="video/mp4", size=99)
    assert not written and again == first  # nothing written: the stored size stays
    made = scenes(store, first, ["a red car"])
    store.complete_source(first.id)
    assert store.media_source(first.id).complete and store.find_source("lib", "a.mp4") == store.media_source(first.id)
    assert store.search_media("car") != []

    changed, written = store.add_source(
        "lib", "a.mp4", sha256=sha("b"), kind="video", media_type="video/mp4", size=20, duration=3.5
    )
    assert written and changed.id == first.id and changed.sha256 == sha("b") and not changed.complete
    assert (changed.size, changed.duration, changed.metadata) == (20, 3.5, {})
    assert changed.updated_at > changed.created_at == first.created_at
    assert store.media_segments(first.id) == [] and store.search_media("car") == []
    with pytest.raises(UserError, match="media segment"):
        store.media_features(made[0].id)

    other, _ = store.add_source("other", "a.mp4", sha256=sha("a"), kind="audio", media_type="audio/wav", size=1)
    assert other.id != first.id and store.find_source("other", "a.mp4") == other
    assert store.find_source("lib", "missing") is None
    assert [s.id for s in store.list_sources()] == [first.id, other.id]
    assert [s.id for s in store.list_sources("other")] == [other.id]
    assert [(c.name, c.sources, c.segments) for c in store.list_collections()] == [("lib", 1, 0), ("other", 1, 0)]
    with pytest.raises(UserError, match="no media source 12345"):
        store.media_source(12345)
    with pytest.raises(UserError, match="sha256 must be 64 hex digits"):
        store.add_source("lib", "b", sha256="xyz", kind="video", media_type="video/mp4", size=1)
    with pytest.raises(UserError, match="kind must be one of"):
        store.add_source("lib", "b", sha256=sha("b"), kind="movie", media_type="video/mp4", size=1)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="collection must be"):
        store.add_source("", "b", sha256=sha("b"), kind="video", media_type="video/mp4", size=1)


def test_add_source_from_many_stores_at_once_makes_one(store_url: str) -> None:
    stores = [Store(store_url) for _ in range(4)]
    results: list[bool] = []
    gate = threading.Barrier(len(stores))

    def add(s: Store) -> None:
        gate.wait()
        results.append(s.add_source("c", "x", sha256=sha("x"), kind="image", media_type="image/png", size=1)[1])

    threads = [threading.Thread(target=add, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(results) == [False, False, False, True]
        assert len(stores[0].list_sources()) == 1 and len(stores[0].list_collections()) == 1
    finally:
        for s in stores:
            s.close()


def test_add_segments_is_idempotent_and_stores_media_once(store_url: str) -> None:
    shared, other, sound = png(1, 32), png(2), clip(3)
    with Store(store_url) as store:
        source = video(store)
        first = store.add_segments(
            source.id,
            [
                NewSegment("scene", 0, 0.0, 4.0, media=(("keyframe", 1.0, shared), ("clip", None, sound))),
                NewSegment("scene", 1, 4.0, 9.5, media=(("keyframe", 5.0, shared), ("keyframe", 8.0, other))),
                NewSegment("audio", 0, 0.0, 9.5),
            ],
        )
        assert [(s.kind, s.index, s.start, s.end) for s in first] == [
            ("scene", 0, 0.0, 4.0),
            ("scene", 1, 4.0, 9.5),
            ("audio", 0, 0.0, 9.5),
        ]
        key = hashlib.sha256(shared.data).hexdigest()
        assert [(m.role, m.time, m.sha256, m.media_type) for m in first[0].media] == [
            ("keyframe", 1.0, key, "image/png"),
            ("clip", None, hashlib.sha256(sound.data).hexdigest(), "audio/wav"),
        ]
        back = store.artifact(key)
        assert isinstance(back, ImagePart) and back == shared
        assert np.array_equal(np.asarray(back.to_pil()), np.asarray(shared.to_pil()))
        assert store.artifact(first[0].media[1].sha256) == sound

        # Again, with other media for a stored segment and one new segment: stored ones are kept as they are.
        again = store.add_segments(
            source.id,
            [NewSegment("page", 0, page=1, media=(("keyframe", None, shared),)), NewSegment("scene", 1, 0.0, 1.0)],
        )
        assert again[1] == first[1] and (again[0].kind, again[0].page, again[0].media[0].sha256) == ("page", 1, key)
        assert store.media_segments(source.id) == [first[2], again[0], first[0], first[1]]  # by kind, then index
        with store._database.transaction(write=False) as conn:
            assert conn.execute(text("SELECT count(*) FROM mm_artifacts")).scalar() == 3
            assert conn.execute(text("SELECT count(*) FROM mm_segment_media")).scalar() == 5

        with pytest.raises(UserError, match=r"segment \('scene', 7\) is given twice"):
            store.add_segments(source.id, [NewSegment("scene", 7), NewSegment("scene", 7)])
        with pytest.raises(UserError, match=r"end .* is before start"):
            store.add_segments(source.id, [NewSegment("scene", 8, start=3.0, end=1.0)])
        with pytest.raises(UserError, match="media role"):
            store.add_segments(source.id, [NewSegment("scene", 8, media=(("thumb", None, shared),))])  # type: ignore[arg-type]
        with pytest.raises(UserError, match="no media source 999"):
            store.add_segments(999, [NewSegment("scene", 0)])
        assert len(store.media_segments(source.id)) == 4  # the failed calls wrote nothing
    with Store(store_url, max_artifact_bytes=100) as small, pytest.raises(MediaError, match="per-artifact limit"):
        small.add_segments(source.id, [NewSegment("image", 0, media=(("keyframe", None, shared),))])


def test_put_feature_writes_only_changes_and_search_follows(store: Store) -> None:
    (segment,) = scenes(store, video(store), ["a quiet harbour at dawn"])
    assert not store.put_feature(segment.id, "scene_caption", "1", "a quiet harbour at dawn", {"other": "data"})
    assert store.put_feature(segment.id, "scene_caption", "1", "a busy harbour at noon")
    assert store.put_feature(segment.id, "scene_caption", "2", "fishing boats leave the harbour", {"boats": 3})
    assert store.put_feature(segment.id, "transcript", "1", "hello from the pier")
    (caption, transcript) = store.media_features(segment.id)
    assert (caption.extractor, caption.version, caption.text, caption.data) == (
        "scene_caption",
        "2",
        "fishing boats leave the harbour",
        {"boats": 3},
    )
    assert transcript.extractor == "transcript"
    assert store.feature_versions(segment.source_id) == {
        (segment.id, "scene_caption"): "2",
        (segment.id, "transcript"): "1",
    }
    assert store.search_media("dawn") == [] and store.search_media("noon") == []
    (hit,) = store.search_media("boat")
    assert hit.features == {"scene_caption": "fishing boats leave the harbour", "transcript": "hello from the pier"}
    assert hit.snippet == "fishing boats leave the harbour" and hit.ranks == {"text": 1}
    with pytest.raises(UserError, match="no media segment 4242"):
        store.put_feature(4242, "x", "1", "text")
    with pytest.raises(UserError, match="no media source 4242"):
        store.feature_versions(4242)


@pytest.fixture(name="library")
def library_fixture(store: Store) -> tuple[Store, dict[str, MediaSource]]:
    """Two collections: a video of scenes and a recording (lib), a document and a photo (docs)."""
    film = video(store, "film.mp4")
    scenes(store, film, ["A dog runs along the beach", "Two dogs running in the park", "A cat sleeps"])
    talk, _ = store.add_source("lib", "talk.wav", sha256=sha("talk"), kind="audio", media_type="audio/wav", size=5)
    (speech,) = store.add_segments(talk.id, [NewSegment("audio", 0, start=0.0, end=30.0)])
    store.put_feature(speech.id, "transcript", "1", "we talked about dogs and their running habits")
    paper, _ = store.add_source("docs", "p.pdf", sha256=sha("p"), kind="document", media_type="application/pdf", size=9)
    pages = store.add_segments(paper.id, [NewSegment("page", i, page=i + 1) for i in range(2)])
    long_text = "Introduction. " + "Filler words about nothing. " * 30 + "The running dog study ends here."
    store.put_feature(pages[0].id, "page_text", "1", long_text)
    store.put_feature(pages[1].id, "page_text", "1", "References")
    photo, _ = store.add_source("docs", "dog.jpg", sha256=sha("j"), kind="image", media_type="image/jpeg", size=3)
    (picture,) = store.add_segments(photo.id, [NewSegment("image", 0, media=(("keyframe", None, png(9)),))])
    store.put_feature(picture.id, "image_caption", "1", "a dog on a sofa")
    return store, {"film": film, "talk": talk, "paper": paper, "photo": photo}


def test_search_media_full_text_stems_matches_any_word_and_filters(
    library: tuple[Store, dict[str, MediaSource]],
) -> None:
    store, src = library
    running = store.search_media("running dogs", limit=10)
    both_words = {("film.mp4", 0), ("film.mp4", 1), ("talk.wav", 0), ("p.pdf", 0)}  # "dog runs": stemmed
    found = [(h.source.uri, h.segment.index) for h in running]
    assert set(found) == both_words | {("dog.jpg", 0)} and found[0] in both_words  # "a dog on a sofa": one word
    assert all(h.ranks.keys() == {"text"} and h.score > 0 for h in running)
    assert [h.score for h in running] == sorted((h.score for h in running), reverse=True)
    page = next(h for h in running if h.source.uri == "p.pdf")
    assert page.snippet.startswith("…") and "running dog study" in page.snippet and len(page.snippet) <= 242
    assert store.search_media("the horse") == []  # no feature has "horse"; "the" is not looked for
    assert [h.features for h in store.search_media("the cat")] == [{"scene_caption": "A cat sleeps"}]
    question = store.search_media("is there a running dog and a cat?", limit=10)  # a question: any of its words
    assert {(h.source.uri, h.segment.index) for h in question} == set(found) | {("film.mp4", 2)}
    assert {h.source.uri for h in store.search_media("dog")} == {"film.mp4", "talk.wav", "p.pdf", "dog.jpg"}

    assert {h.source.collection for h in store.search_media("dog", collection="docs")} == {"docs"}
    assert store.search_media("dog", collection="nope") == []
    assert {h.segment.kind for h in store.search_media("dog", kinds=["image", "page"])} == {"image", "page"}
    assert store.search_media("dog", kinds=[]) == []
    assert {h.source.id for h in store.search_media("dog", source_id=src["talk"].id)} == {src["talk"].id}
    # Time overlap: scenes are [0, 5], [5, 10], [10, 15]; the recording [0, 30]; untimed pages drop out.
    assert {(h.source.uri, h.segment.index) for h in store.search_media("dog", start=6.0, end=9.0)} == {
        ("film.mp4", 1),
        ("talk.wav", 0),
    }
    assert {h.segment.index for h in store.search_media("dog", kinds=["scene"], start=5.5)} == {1}
    assert {h.segment.index for h in store.search_media("dog", kinds=["scene"], end=4.0)} == {0}
    assert len(store.search_media("dog", limit=2)) == 2

    hostile = '"a" OR b* NEAR( dog ) \' ; DROP TABLE mm_features; -- running'
    plain = store.search_media("b near dog drop table mm_features running", limit=10)
    assert store.search_media(hostile, limit=10) == plain != []  # only its words were looked for
    assert store.search_media('"dog*" ( running ) ^ -- ;') == store.search_media("dog running")
    assert store.search_media("   ") == [] and store.search_media("*") == []
    assert len(store.list_sources()) == 4  # nothing was dropped
    with pytest.raises(UserError, match="unknown segment kind"):
        store.search_media("dog", kinds=["video"])  # type: ignore[list-item]
    with pytest.raises(UserError, match="before start"):
        store.search_media("dog", start=5, end=1)
    with pytest.raises(UserError, match="limit"):
        store.search_media("dog", limit=0)


def test_vector_search_and_rank_fusion(store_url: str, store: Store) -> None:
    need_vectors(store_url)
    film = video(store)
    a, b, c, d = scenes(store, film, ["red car", "blue boat", "green tree", "red boat"])
    photo, _ = store.add_source("docs", "x.png", sha256=sha("x"), kind="image", media_type="image/png", size=1)
    (e,) = store.add_segments(photo.id, [NewSegment("image", 0)])
    rows = [
        (a.id, "text", [1.0, 0.0, 0.0]),
        (b.id, "text", [0.0, 1.0, 0.0]),
        (c.id, "text", np.array([0.0, 0.0, 1.0], dtype=np.float32)),
        (d.id, "text", [0.6, 0.8, 0.0]),
        (c.id, "image", [0.9, 0.0, 0.1]),  # c's image is near "x": a segment counts by its nearest vector
        (e.id, "image", [1.0, 0.05, 0.0]),
    ]
    assert store.put_embeddings("toy", 3, rows) == 6
    assert store.embedded("toy", film.id) == {(x.id, "text") for x in (a, b, c, d)} | {(c.id, "image")}
    assert store.embedded("other", film.id) == set()

    near_x = store.search_media("", vector=[1.0, 0.02, 0.0], embedder="toy", limit=10)
    assert [h.segment.id for h in near_x] == [a.id, e.id, c.id, d.id, b.id]
    assert [h.ranks for h in near_x[:2]] == [{"vector": 1}, {"vector": 2}]
    assert near_x[0].snippet == "red car" and near_x[1].snippet == "" and near_x[1].features == {}
    # Filters apply inside the nearest-neighbour search.
    assert [h.segment.id for h in store.search_media("", vector=[1, 0, 0], embedder="toy", collection="lib")][:1] == [
        a.id
    ]
    assert [h.segment.id for h in store.search_media("", vector=[1, 0, 0], embedder="toy", kinds=["image"])] == [e.id]
    assert [h.segment.id for h in store.search_media("", vector=[1, 0, 0], embedder="toy", source_id=photo.id)] == [
        e.id
    ]
    timed = store.search_media("", vector=[1, 0, 0], embedder="toy", start=6.0, end=14.0)
    assert [h.segment.id for h in timed] == [c.id, b.id]  # scenes [5, 10] and [10, 15]; the photo is untimed

    # Fusion: "red" finds a and d by text; the vector finds b first, then d: d, found by both, comes first.
    fused = store.search_media("red", vector=[0.0, 1.0, 0.0], embedder="toy", limit=3)
    assert fused[0].segment.id == d.id and fused[0].ranks == {"text": 2, "vector": 2}
    assert fused[0].score == pytest.approx(2 / 62)
    assert {h.segment.id for h in fused[1:]} == {a.id, b.id}

    # A vector put again replaces the stored one.
    assert store.put_embeddings("toy", 3, [(b.id, "text", [1.0, 0.0, 0.0]), (b.id, "text", [0.99, 0.01, 0.0])]) == 1
    assert store.search_media("", vector=[0.99, 0.01, 0.0], embedder="toy", limit=1)[0].segment.id == b.id
    assert store.search_media("", vector=[1, 0, 0], embedder="unknown") == []


def test_put_embeddings_checks_dimensions_and_segments(store_url: str, store: Store) -> None:
    need_vectors(store_url)
    (segment,) = scenes(store, video(store), ["a caption"])
    assert store.put_embeddings("e", 4, []) == 0
    store.put_embeddings("e", 4, [(segment.id, "text", [1, 2, 3, 4])])
    with pytest.raises(UserError, match="has 3 values, not 4"):
        store.put_embeddings("e", 4, [(segment.id, "text", [1, 2, 3])])
    with pytest.raises(UserError, match="embedder 'e' stores 4-dimensional vectors, not 3"):
        store.put_embeddings("e", 3, [(segment.id, "text", [1, 2, 3])])
    with pytest.raises(UserError, match="no media segment 777"):
        store.put_embeddings("e", 4, [(777, "text", [1, 2, 3, 4])])
    with pytest.raises(UserError, match="all zeros"):
        store.put_embeddings("e", 4, [(segment.id, "text", [0, 0, 0, 0])])
    with pytest.raises(UserError, match="NaN"):
        store.put_embeddings("e", 4, [(segment.id, "image", [1, float("nan"), 0, 0])])
    with pytest.raises(UserError, match="modality"):
        store.put_embeddings("e", 4, [(segment.id, "audio", [1, 2, 3, 4])])  # type: ignore[list-item]
    with pytest.raises(UserError, match=r"query vector .* has 2 values, not 4"):
        store.search_media("caption", vector=[1, 2], embedder="e")
    with pytest.raises(UserError, match="together"):
        store.search_media("caption", vector=[1, 2, 3, 4])
    assert store.embedded("e", segment.source_id) == {(segment.id, "text")}


def test_delete_source_takes_its_segments_features_and_vectors(store_url: str, store: Store) -> None:
    need_vectors(store_url)
    only, with_message, with_segment = png(11), png(12), png(13)
    doomed = video(store, "doomed.mp4")
    kept = video(store, "kept.mp4")
    gone = store.add_segments(
        doomed.id,
        [
            NewSegment("scene", 0, 0, 5, media=(("keyframe", 1.0, only), ("keyframe", 2.0, with_message))),
            NewSegment("scene", 1, 5, 9, media=(("keyframe", 6.0, with_segment),)),
        ],
    )
    (stays,) = store.add_segments(kept.id, [NewSegment("scene", 0, 0, 5, media=(("keyframe", 1.0, with_segment),))])
    store.create_conversation([Message.user("look", images=[with_message])])
    for segment, caption in ((gone[0], "walrus on ice"), (gone[1], "walrus swimming"), (stays, "walrus asleep")):
        store.put_feature(segment.id, "scene_caption", "1", caption)
    store.put_embeddings(
        "e", 2, [(gone[0].id, "text", [1, 0]), (gone[1].id, "image", [1, 0.1]), (stays.id, "text", [0, 1])]
    )

    store.delete_source(doomed.id)
    assert [h.segment.id for h in store.search_media("walrus")] == [stays.id]
    assert [h.segment.id for h in store.search_media("", vector=[1, 0], embedder="e")] == [stays.id]
    assert store.embedded("e", doomed.id) == set()
    with store._database.transaction(write=False) as conn:
        assert conn.execute(text("SELECT count(*) FROM mm_features")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM mm_segment_media")).scalar() == 1
        if not store_url.startswith("postgresql"):  # vec0 has no foreign keys: the rows went explicitly
            _media_search.ensure_vec(conn)
            assert conn.execute(text("SELECT rowid FROM mm_vec_1")).scalars().all() == [stays.id * 2]
            found = text("SELECT rowid FROM mm_features_fts WHERE mm_features_fts MATCH 'walrus'")
            assert len(conn.execute(found).all()) == 1
    with pytest.raises(UserError, match="no media source"):
        store.media_segments(doomed.id)
    with pytest.raises(UserError, match="no media source"):
        store.delete_source(doomed.id)

    keys = {p: hashlib.sha256(p.data).hexdigest() for p in (only, with_message, with_segment)}
    assert store.artifact(keys[only]) == only  # artifacts stay until garbage collection
    assert store.collect_garbage() == 1
    with pytest.raises(UserError, match="no artifact"):
        store.artifact(keys[only])
    assert store.artifact(keys[with_message]) == with_message and store.artifact(keys[with_segment]) == with_segment

    store.delete_collection("lib")
    assert store.list_collections() == [] and store.search_media("walrus") == []
    assert store.search_media("", vector=[0, 1], embedder="e") == []
    assert store.collect_garbage() == 1  # with_segment: only deleted segments used it
    with pytest.raises(UserError, match="no collection 'lib'"):
        store.delete_collection("lib")


def test_a_version_3_database_migrates_to_4_keeping_its_data(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(_migrations, "MIGRATIONS", _migrations.MIGRATIONS[:3])
        patch.setattr(_migrations, "SCHEMA_VERSION", 3)
        with Store(store_url) as old:
            cid = old.create_conversation([Message.user("a photo", images=[png(5)])], metadata={"v": 3})
            with old._database.transaction(write=False) as conn:
                assert conn.execute(text("SELECT max(version) FROM mm_schema_version")).scalar() == 3
                assert not conn.dialect.has_table(conn, "mm_sources")
    assert memory.SCHEMA_VERSION == 4
    with Store(store_url) as store:
        assert store.load_conversation(cid) == [Message.user("a photo", images=[png(5)])]
        assert store.conversation(cid).metadata == {"v": 3}
        (segment,) = scenes(store, video(store), ["the migrated store finds this"])
        assert [h.segment.id for h in store.search_media("migrated")] == [segment.id]
        assert [h.conversation_id for h in store.search("photo")] == [cid]
        with store._database.transaction(write=False) as conn:
            assert conn.execute(text("SELECT max(version) FROM mm_schema_version")).scalar() == 4


def test_missing_sqlite_vec_is_a_user_error_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sqlite_vec", None)  # import fails
    with pytest.raises(UserError, match=r"need sqlite-vec: pip install 'mmagent\[ingest\]'"):
        _media_search._vec_library()


def test_a_fresh_process_without_vectors_never_loads_sqlite_vec(tmp_path: Path) -> None:
    """Stores that never touch vectors work where sqlite-vec is not installed."""
    script = (
        "import sys; sys.modules['sqlite_vec'] = None\n"
        "from memory import Store, NewSegment\n"
        f"with Store({str(tmp_path / 'm.db')!r}) as s:\n"
        "    src, _ = s.add_source('c', 'u', sha256='a' * 64, kind='image', media_type='image/png', size=1)\n"
        "    (seg,) = s.add_segments(src.id, [NewSegment('image', 0)])\n"
        "    s.put_feature(seg.id, 'cap', '1', 'hello world')\n"
        "    assert s.search_media('hello')[0].segment == seg\n"
        "    try:\n"
        "        s.put_embeddings('e', 2, [(seg.id, 'text', [1, 0])])\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "    s.delete_source(src.id)\n"
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "UserError vectors in an SQLite memory store need sqlite-vec: pip install 'mmagent[ingest]'" in done.stdout


def test_postgres_without_pgvector_is_a_clear_store_error(store_url: str, store: Store) -> None:
    if not store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    (segment,) = scenes(store, video(store), ["x"])

    def register_on_a_server_without_pgvector() -> None:
        with store._database.transaction(write=True) as conn:  # rolled back by the error
            conn.execute(text("CREATE TEMP VIEW pg_available_extensions AS SELECT 'x'::name AS name"))  # shadows it
            _media_search.ensure_embedder(conn, "e", 2, None)

    with pytest.raises(StoreError, match="server lacks: install pgvector on the server"):
        register_on_a_server_without_pgvector()
    assert store.put_embeddings("e", 2, [(segment.id, "text", [1, 0])]) == 1  # the view went with the transaction
