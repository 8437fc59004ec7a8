"""agent.ingest's pipeline and tools: sources -> segments -> features -> search, on SQLite and PostgreSQL.

The model double (`media_support.describer`) captions what it really receives: the colour of the keyframe's
pixels and the pitch of the audio, so a search for "blue" finding the blue scene shows that the right media
reached the model and the right text reached the index. The tiny random-weight Phi-4 runs the same pipeline
(its captions are noise; that each scene gets one, and that search results' pixels reach its vision tower,
is what is checked).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from media_support import CUTS, FPS, NAMES, TONES, colour_name, describer, make_video, pitch, requests_with
from memory_support import need_vectors, store_fixture, store_url_fixture  # noqa: F401

from agent import Agent
from agent.exceptions import UserError
from agent.ingest import SCENE_CAPTION, Ingestor, media_tools
from agent.messages import AudioPart, ImagePart, TextPart, ToolResultPart
from memory import Store
from memory._search import terms

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("av", "scenedetect", "pypdfium2")),
    reason="PyAV, PySceneDetect or pypdfium2 is not installed (pip install 'mmagent[ingest]')",
)

SCENES = len(CUTS) - 1


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("pipeline") / "scenes.mp4")


def make_pdf(path: Path, pages: int = 3) -> Path:
    from PIL import Image

    images = [Image.new("RGB", (200, 280), colour) for colour in ((200, 30, 30), (30, 40, 200), (20, 90, 30))[:pages]]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:])
    return path


def counts(store: Store, source_id: int) -> tuple[int, int]:
    """(segments, features) stored for a source."""
    segments = store.media_segments(source_id)
    return len(segments), sum(len(store.media_features(s.id)) for s in segments)


# ---------------------------------------------------------------- video


def test_a_video_gets_scenes_at_its_cuts_each_with_a_caption_and_keyframe(video: Path, store: Store) -> None:
    model = describer()
    report = Ingestor(store, model).ingest_sync([video], collection="clips")
    (item,) = report.sources
    assert item.status == "new" and item.kind == "video" and item.error is None
    assert item.media_seconds == pytest.approx(CUTS[-1] / FPS, abs=0.1)
    segments = store.media_segments(item.source_id)  # type: ignore[arg-type]
    scenes = [s for s in segments if s.kind == "scene"]
    assert len(scenes) == SCENES
    for scene, first in zip(scenes, CUTS, strict=False):
        assert scene.start == pytest.approx(first / FPS, abs=1 / FPS + 1e-6)  # within one frame of the truth
    for number, scene in enumerate(scenes):
        (frame,) = [r for r in scene.media if r.role == "keyframe"]
        image = store.artifact(frame.sha256)
        assert isinstance(image, ImagePart) and colour_name(image) == NAMES[number]
        (feature,) = [f for f in store.media_features(scene.id) if f.extractor == "scene_caption"]
        # the caption came from this scene's pixels and its own audio (the tone of the scene)
        assert feature.text == f"a {NAMES[number]} scene with a tone of {round(TONES[number] / 100) * 100} hertz"
        assert feature.version == SCENE_CAPTION.version and feature.data == {"caption": feature.text}
    speech = [s for s in segments if s.kind == "audio"]
    assert speech and all(any(f.extractor == "transcript" for f in store.media_features(s.id)) for s in speech)
    assert requests_with(model, "image") == SCENES
    assert report.usage.requests == SCENES + len(speech)


def test_re_ingesting_an_unchanged_source_writes_nothing(video: Path, store: Store) -> None:
    Ingestor(store, describer()).ingest_sync([video])
    (before,) = store.list_sources()
    snapshot = counts(store, before.id)
    model = describer()
    again = Ingestor(store, model).ingest_sync([video])
    assert [s.status for s in again.sources] == ["unchanged"]
    assert again.sources[0].features == again.sources[0].vectors == 0
    assert model.requests == []  # no model call, and the video was not decoded again (stored segments reused)
    (after,) = store.list_sources()
    assert after.updated_at == before.updated_at and counts(store, after.id) == snapshot


def test_a_new_extractor_version_re_runs_only_that_extractor(video: Path, store: Store) -> None:
    Ingestor(store, describer()).ingest_sync([video])
    newer = dataclasses.replace(SCENE_CAPTION, version="2")
    model = describer()
    report = Ingestor(store, model, extractors=[newer]).ingest_sync([video])
    assert report.sources[0].status == "updated" and report.sources[0].features == SCENES
    assert len(model.requests) == SCENES and requests_with(model, "image") == SCENES
    scenes = [s for s in store.media_segments(report.sources[0].source_id) if s.kind == "scene"]  # type: ignore[arg-type]
    assert {f.version for s in scenes for f in store.media_features(s.id) if f.extractor == "scene_caption"} == {"2"}


def test_a_changed_file_starts_over(tmp_path: Path, store: Store) -> None:
    path = make_video(tmp_path / "v.mp4")
    Ingestor(store, describer()).ingest_sync([path])
    make_video(path, cuts=(0, 40, 80))  # same name, other bytes: two scenes
    report = Ingestor(store, describer()).ingest_sync([path])
    assert report.sources[0].status == "changed"
    scenes = [s for s in store.media_segments(report.sources[0].source_id) if s.kind == "scene"]  # type: ignore[arg-type]
    assert len(scenes) == 2 and len(store.list_sources()) == 1


CHILD = """
import sys
sys.path[:0] = {paths!r}
from media_support import describer
from agent.ingest import Ingestor
from memory import Store
with Store({url!r}) as store:
    Ingestor(store, describer(delay=0.25)).ingest_sync([{video!r}])
"""


def test_kill_9_mid_ingest_then_resume_stores_every_segment_once(video: Path, store_url: str) -> None:
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(paths=paths, url=store_url, video=str(video))])
    try:
        with Store(store_url) as watcher:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                sources = watcher.list_sources()
                if sources and counts(watcher, sources[0].id)[1] >= 2:
                    break
                assert child.poll() is None, "the ingest ended before it could be killed"
                time.sleep(0.05)
            else:
                pytest.fail("no feature was written within 120 s")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with Store(store_url) as store:
        (source,) = store.list_sources()
        assert not source.complete
        model = describer()
        report = Ingestor(store, model).ingest_sync([video])
        assert report.sources[0].status == "resumed"
        segments = store.media_segments(source.id)
        scenes = [s for s in segments if s.kind == "scene"]
        assert [s.index for s in scenes] == list(range(SCENES))  # each once
        for segment in segments:
            names = [f.extractor for f in store.media_features(segment.id)]
            assert names == ["scene_caption" if segment.kind == "scene" else "transcript"]
        assert len(model.requests) < len(segments)  # the features written before the kill were kept
        assert store.media_source(source.id).complete


# ---------------------------------------------------------------- other kinds, folders, URLs, failures


def test_images_pdfs_and_folders(tmp_path: Path, store: Store) -> None:
    from PIL import Image

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (30, 40, 200)).save(folder / "sub" / "blue.png")
    make_pdf(folder / "three.pdf")
    (folder / "notes.txt").write_text("not media")
    (folder / ".hidden.png").write_bytes((folder / "sub" / "blue.png").read_bytes())
    report = Ingestor(store, describer()).ingest_sync([folder])
    assert sorted((Path(s.uri).name, s.kind, s.segments) for s in report.sources) == [
        ("blue.png", "image", 1),
        ("three.pdf", "document", 3),
    ]  # the text file and the hidden file were skipped quietly
    pdf = next(s for s in report.sources if s.kind == "document")
    pages = store.media_segments(pdf.source_id)  # type: ignore[arg-type]
    assert [p.page for p in pages] == [1, 2, 3] and store.media_source(pdf.source_id).pages == 3  # type: ignore[arg-type]
    texts = [store.media_features(p.id)[0] for p in pages]
    assert [(t.extractor, t.text) for t in texts] == [("page_text", f"a {c} scene") for c in ("red", "blue", "green")]


def test_a_pdf_s_text_layer_is_stored_and_found_without_the_model(tmp_path: Path, store: Store) -> None:
    from media_support import text_pdf

    path = text_pdf(tmp_path / "budget.pdf", ["Budget 2027", "Travel 120,000 EUR"])
    report = Ingestor(store, describer()).ingest_sync([path])
    (page,) = store.media_segments(report.sources[0].source_id)  # type: ignore[arg-type]
    features = {f.extractor: f.text for f in store.media_features(page.id)}
    assert features == {"page_text": "a white scene", "pdf_text": "Budget 2027\nTravel 120,000 EUR"}
    assert report.sources[0].features == 2
    (hit,) = store.search_media("how much for travel?")
    assert hit.segment.id == page.id and hit.segment.page == 1
    assert Ingestor(store, describer()).ingest_sync([path]).sources[0].status == "unchanged"


def test_a_bad_source_is_reported_and_the_others_go_on(tmp_path: Path, video: Path, store: Store) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    report = Ingestor(store, describer()).ingest_sync([junk, tmp_path / "missing.wav", video])
    statuses = [(Path(s.uri).name, s.status) for s in report.sources]
    assert statuses == [("junk.mp4", "failed"), ("missing.wav", "failed"), ("scenes.mp4", "new")]
    for failed in report.failed:
        assert failed.error and "\n" not in failed.error and Path(failed.uri).name in failed.error
    with pytest.raises(UserError, match="nothing to ingest"):
        Ingestor(store, describer()).ingest_sync([])


def test_a_model_failure_fails_its_source_only_and_a_rerun_finishes_it(
    tmp_path: Path, video: Path, store: Store
) -> None:
    from PIL import Image

    from agent.exceptions import ModelError
    from agent.testing import FunctionModel

    picture = tmp_path / "blue.png"
    Image.new("RGB", (64, 48), (30, 40, 200)).save(picture)
    calls: list[int] = []

    def flaky(messages: Any, info: Any) -> str:
        calls.append(1)
        if any(p.kind == "audio" for p in messages[-1].parts) and len(calls) > 2:
            raise ModelError("out of memory on the GPU")
        return "a caption"

    report = Ingestor(store, FunctionModel(flaky)).ingest_sync([video, picture])
    failed, done = report.sources
    assert failed.status == "failed" and failed.error == "out of memory on the GPU" and done.status == "new"
    (source,) = [s for s in store.list_sources() if s.kind == "video"]
    kept = sum(len(store.media_features(s.id)) for s in store.media_segments(source.id))
    assert 1 <= kept < len(store.media_segments(source.id))  # what finished before the failure is kept
    again = Ingestor(store, describer()).ingest_sync([video])
    assert (
        again.sources[0].status == "resumed"
        and again.sources[0].features == len(store.media_segments(source.id)) - kept
    )


def serve(files: dict[str, bytes]) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            await asyncio.sleep(5)
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"location": "https://evil.example/x.mp4"})
        body = files.get(request.url.path)
        return httpx.Response(200, content=body) if body is not None else httpx.Response(404)

    return httpx.MockTransport(handler)


def test_urls_are_fetched_confined(tmp_path: Path, video: Path, store: Store) -> None:
    transport = serve({"/talk.mp4": video.read_bytes()})
    ingestor = Ingestor(
        store,
        describer(),
        allowed_hosts=["media.example"],
        download_dir=tmp_path / "dl",
        max_download_bytes=video.stat().st_size + 10,
        transport=transport,
    )
    urls = [
        "https://media.example/talk.mp4",
        "https://other.example/talk.mp4",
        "https://media.example/moved",
        "https://media.example/nothing.mp4",
        "file:///etc/passwd",
    ]
    report = ingestor.ingest_sync(urls)
    first, *refused = report.sources
    assert first.status == "new" and first.uri == urls[0] and first.segments > SCENES
    stored = store.media_source(first.source_id)  # type: ignore[arg-type]
    assert stored.local_path and Path(stored.local_path).parent == tmp_path / "dl"
    assert Path(stored.local_path).read_bytes() == video.read_bytes()
    reasons = [s.error or "" for s in refused]
    assert "'other.example' is not allowed" in reasons[0]
    assert "redirected" in reasons[1] and "evil.example" in reasons[1]
    assert "404" in reasons[2] and "only http and https" in reasons[3]
    small = Ingestor(store, describer(), allowed_hosts=["media.example"], download_dir=tmp_path / "dl",
                     max_download_bytes=1000, transport=transport)  # fmt: skip
    (over,) = small.ingest_sync([urls[0]]).sources
    assert over.status == "failed" and "over the cap of 1000 bytes" in (over.error or "")
    assert [p.name for p in (tmp_path / "dl").iterdir()] == [Path(stored.local_path).name]  # no partial file left
    (no_hosts,) = Ingestor(store, describer()).ingest_sync([urls[0]]).sources
    assert "needs allowed hosts" in (no_hosts.error or "")
    slow = Ingestor(store, describer(), allowed_hosts=["media.example"], download_dir=tmp_path / "dl",
                    download_timeout=0.3, transport=transport)  # fmt: skip
    started = time.monotonic()
    (late,) = slow.ingest_sync(["https://media.example/slow"]).sources
    assert "took longer than 0.3 s" in (late.error or "") and time.monotonic() - started < 3


# ---------------------------------------------------------------- search and tools


@pytest.fixture
def ingested(video: Path, tmp_path: Path, store: Store) -> Store:
    Ingestor(store, describer()).ingest_sync([video], collection="clips")
    Ingestor(store, describer()).ingest_sync([make_pdf(tmp_path / "slides.pdf")], collection="docs")
    return store


def test_search_finds_the_scene_by_its_caption_with_filters(ingested: Store) -> None:
    hit, *others = ingested.search_media("which scene is blue?", kinds=["scene"])
    assert hit.segment.index == 1 and hit.source.kind == "video" and hit.ranks == {"text": 1}
    assert len(others) == SCENES - 1  # "scene" is in every caption: the others follow
    assert {h.source.kind for h in ingested.search_media("blue")} == {"video", "document"}
    assert [h.source.collection for h in ingested.search_media("blue", collection="docs")] == ["docs"]
    later = ingested.search_media("scene", kinds=["scene"], start=CUTS[3] / FPS + 0.1, limit=10)
    assert sorted(h.segment.index for h in later) == [3, 4, 5]
    assert ingested.search_media('blue* "scene (-', kinds=["scene"]) == ingested.search_media(
        "blue scene", kinds=["scene"]
    )


def test_search_media_tool_returns_citations_and_the_keyframe(ingested: Store) -> None:
    search, _ = media_tools(ingested)

    async def go() -> Any:
        from tools import ToolContext

        arguments = search.validate({"query": "yellow", "limit": 3})
        return await search.run(arguments, ToolContext(call_id="1", tool_name="search_media"))

    result = asyncio.run(go())
    text, image = result
    assert isinstance(text, TextPart) and isinstance(image, ImagePart)
    assert "scenes.mp4 (source" in text.text and "0:03.8-0:06.4, scene 3" in text.text
    assert "a yellow scene" in text.text and colour_name(image) == "yellow"


def test_clip_cuts_audio_and_frames_of_a_stored_source_only(ingested: Store, video: Path) -> None:
    _, clip = media_tools(ingested)
    video_source = next(s for s in ingested.list_sources() if s.kind == "video")
    pdf_source = next(s for s in ingested.list_sources() if s.kind == "document")

    async def cut(**arguments: Any) -> Any:
        from tools import ToolContext

        return await clip.run(clip.validate(arguments), ToolContext(call_id="1", tool_name="clip"))

    text, audio, *frames = asyncio.run(cut(source=video_source.id, start=CUTS[2] / FPS + 0.2, end=CUTS[3] / FPS - 0.2))
    assert isinstance(audio, AudioPart) and pitch(audio) == round(TONES[2] / 100) * 100
    assert [colour_name(f) for f in frames] == ["yellow"] and "frame at" in text.text
    for arguments, message in [
        ({"source": video_source.id, "start": 0, "end": 45}, "at most 30 seconds"),
        ({"source": 999, "start": 0, "end": 1}, "no ingested source 999"),
        ({"source": pdf_source.id, "start": 0, "end": 1}, "only video and audio"),
        ({"source": video_source.id, "start": 5, "end": 2}, "start < end"),
    ]:
        with pytest.raises(Exception, match=message):
            asyncio.run(cut(**arguments))


def test_search_media_keyframes_reach_the_tiny_phi4_s_vision_tower(ingested: Store, tiny_phi4: Any) -> None:
    import torch
    from PIL import Image

    from agent.models.tiny import ScriptedOutputs
    from agent.models.transformers import TransformersModel

    model = TransformersModel(
        tiny_phi4.model,
        tiny_phi4.processor,
        adapters=(),
        logits_processors=[
            ScriptedOutputs(
                tiny_phi4.tokenizer,
                [
                    '<|tool_call|>[{"name": "search_media", "arguments": {"query": "green", "kinds": ["scene"]}}]'
                    "<|/tool_call|><|end|>",
                    "Found it.<|end|>",
                ],
            )
        ],
    )
    seen: list[torch.Tensor] = []
    embed = model.model.model.embed_tokens_extend.image_embed
    handle = embed.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["image_pixel_values"].detach().clone()), with_kwargs=True
    )
    try:
        result = Agent(model, tools=media_tools(ingested)).run_sync("Find the green scene.")
    finally:
        handle.remove()
    assert result.output == "Found it."
    content = [c for m in result.messages for p in m.parts if isinstance(p, ToolResultPart) for c in p.content]
    image = next(c for c in content if isinstance(c, ImagePart))
    assert colour_name(image) == "green"
    expected = model.processor.image_processor([Image.open(io.BytesIO(image.data)).convert("RGB")], return_tensors="pt")
    assert any(torch.equal(s, expected["image_pixel_values"].to(s.dtype)) for s in seen)


def test_the_tiny_phi4_captions_every_scene(video: Path, tmp_path: Path, tiny_phi4: Any) -> None:
    with Store(tmp_path / "m.db") as store:
        report = Ingestor(store, tiny_phi4, extractors=[SCENE_CAPTION]).ingest_sync([video])
        (item,) = report.sources
        assert item.status == "new" and report.usage.requests == SCENES
        scenes = [s for s in store.media_segments(item.source_id) if s.kind == "scene"]  # type: ignore[arg-type]
        assert len(scenes) == SCENES
        for scene in scenes:
            assert [f.extractor for f in store.media_features(scene.id)] == ["scene_caption"]
            assert isinstance(store.artifact(scene.media[0].sha256), ImagePart)


# ---------------------------------------------------------------- vectors (the tiny random CLIP), CLI


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("torch")
    from agent.embedding import TransformersEmbedder
    from agent.models.tiny import build_tiny_clip

    return TransformersEmbedder.from_pretrained(build_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_vectors_are_added_once_and_searched_with_the_text(
    video: Path, store_url: str, store: Store, tiny_clip: Any
) -> None:
    need_vectors(store_url)
    first = Ingestor(store, describer()).ingest_sync([video])
    assert first.sources[0].vectors == 0
    model = describer()
    added = Ingestor(store, model, embedder=tiny_clip).ingest_sync([video])  # vectors for what is there
    (item,) = added.sources
    segments = store.media_segments(item.source_id)  # type: ignore[arg-type]
    scenes = [s for s in segments if s.kind == "scene"]
    assert item.status == "updated" and item.features == 0 and model.requests == []
    assert item.vectors == len(segments) + len(scenes)  # a text vector per segment, an image vector per keyframe
    assert store.embedded(tiny_clip.name, item.source_id) == {(s.id, "text") for s in segments} | {  # type: ignore[arg-type]
        (s.id, "image") for s in scenes
    }
    again = Ingestor(store, describer(), embedder=tiny_clip).ingest_sync([video])
    assert again.sources[0].status == "unchanged" and again.sources[0].vectors == 0
    # The query vector of a scene's own caption finds that scene by meaning, fused with the text match.
    caption = store.media_features(scenes[4].id)[0].text
    vector = tiny_clip.embed_texts([caption])[0]
    hits = store.search_media(caption, vector=vector, embedder=tiny_clip.name, kinds=["scene"], limit=3)
    assert hits[0].segment.id == scenes[4].id and hits[0].ranks == {"text": 1, "vector": 1}
    only_vectors = store.search_media("", vector=vector, embedder=tiny_clip.name, kinds=["scene"], limit=3)
    assert only_vectors[0].segment.id == scenes[4].id and set(only_vectors[0].ranks) == {"vector"}
    search, _ = media_tools(store, embedder=tiny_clip)

    async def go() -> Any:
        from tools import ToolContext

        return await search.run(search.validate({"query": caption}), ToolContext(call_id="1", tool_name="search_media"))

    text, image, *_ = asyncio.run(go())
    assert text.text.startswith("[1] scenes.mp4") and "scene 5" in text.text.splitlines()[0]
    assert colour_name(image) == NAMES[4]


def test_the_cli_ingests_and_searches(video: Path, tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("mmagent"))
    db = str(tmp_path / "cli.db")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nothing here")
    run = subprocess.run(
        [exe, "ingest", str(video), str(junk), "--db", db, "--model", "tiny-phi4", "--collection", "clips"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr  # one source failed
    assert "new       " in run.stdout and "scenes.mp4 (source 1, video, 12.0 s)" in run.stdout
    assert f"failed {junk}" in run.stderr and "Traceback" not in run.stderr
    again = subprocess.run([exe, "ingest", str(video), "--db", db, "--model", "tiny-phi4", "-c", "clips"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and again.stdout.startswith("unchanged")
    with Store(db) as store:
        scenes = [s for s in store.media_segments(1) if s.kind == "scene"]
        captions = [f.text for s in scenes for f in store.media_features(s.id)]
        assert len(captions) == len(scenes)  # noise from random weights, but one per scene
        word = next(w for text in captions for w in terms(text))
    found = subprocess.run([exe, "search", word, "--db", db, "--json", "--kind", "scene"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert found.returncode == 0, found.stderr
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert rows and all(r["kind"] == "scene" and r["source"] == str(video) and r["keyframes"] for r in rows)
    bad = subprocess.run([exe, "search", "x", "--db", db, "--kind", "movie"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown kind(s) ['movie']" in bad.stderr
