"""The ingestion pipeline: sources -> segments -> extractors -> features (and vectors) in the memory store.

Per source, in order, each step committed as it completes so a killed ingest resumes where it stopped:

1. resolve: a path, a folder's files, or a URL (downloaded, confined) -> a hashed local file and its kind;
2. `Store.add_source`: an unchanged source (same sha256) whose work is all done writes nothing; a changed one
   starts over;
3. segment: video -> scenes (cuts) with keyframes, plus speech windows of its audio; audio -> speech windows;
   image -> one segment; PDF -> one segment per page, its embedded text layer (when it has one) stored at once as
   the `pdf_text` feature. Stored segments are reused (a complete source is never decoded again);
4. extract: every extractor whose kinds match runs on each segment that lacks its current version; a new
   version re-runs only that extractor;
5. embed (with an `Embedder`): a text vector per segment from its features, an image vector from its first
   keyframe when the embedder sees images.

A source that fails (not media, corrupt, refused URL) is reported and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.exceptions import MediaError, MMAgentError, UserError
from agent.ingest import _sources
from agent.ingest._audio import audio_clip, segment_audio
from agent.ingest._extract import DEFAULT_EXTRACTORS, Extractor, main_text
from agent.ingest._pdf import render_pages
from agent.ingest._video import detect_scenes, keyframes, probe
from agent.messages import AudioPart, ImagePart, as_image_part
from agent.models import Model, Usage

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from agent.embedding import Embedder
    from memory import MediaSegment, MediaSource, NewSegment, Store

Modality = Literal["text", "image"]
Status = Literal["new", "changed", "resumed", "updated", "unchanged", "failed"]

MAX_SCENE_AUDIO_SECONDS = 30.0
"""A scene caption hears at most this much of the scene's audio (Phi-4's speech window); speech windows
(`transcript`) cover all of it."""

PDF_TEXT = "pdf_text"
"""The feature holding a PDF page's embedded text layer, stored as pages are segmented (no model involved)."""
PDF_TEXT_VERSION = "1"

MIN_AUDIO_SECONDS = 0.1
"""Audio shorter than this (the tail of a sound track that ends inside a scene) is left out of a request."""

_PAGE_BATCH = 16  # pages rendered and stored per transaction
_EMBED_BATCH = 64


@dataclass(frozen=True, slots=True)
class SourceReport:
    """What ingesting one source did.

    Attributes:
        uri: the path or URL as stored.
        status: `new`; `changed` (its bytes changed: started over); `resumed` (an interrupted ingest finished);
            `updated` (new extractor versions or vectors); `unchanged` (nothing written); `failed`.
        kind: video, audio, image or document (None when it failed before that was known).
        source_id: the store's id of the source.
        segments: segments it has.
        features: features written now.
        vectors: vectors written now.
        media_seconds: its duration (video, audio).
        error: why it failed.
    """

    uri: str
    status: Status
    kind: str | None = None
    source_id: int | None = None
    segments: int = 0
    features: int = 0
    vectors: int = 0
    media_seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What `Ingestor.ingest` did: one report per source, the model's usage and the wall time."""

    sources: tuple[SourceReport, ...]
    usage: Usage
    seconds: float

    @property
    def failed(self) -> list[SourceReport]:
        """The sources that failed."""
        return [s for s in self.sources if s.status == "failed"]


@dataclass
class _Work:
    """Counters for one source while it runs."""

    features: int = 0
    vectors: int = 0
    touched: set[int] = field(default_factory=set)  # segments whose features changed now


class Ingestor:
    """Ingests media into a `Store` with a model (and optionally an embedder).

    ```python
    ingestor = Ingestor(store, model, embedder=TransformersEmbedder.minilm())
    report = ingestor.ingest_sync(["talk.mp4", "slides.pdf"], collection="talks")
    ```

    Args:
        store: where sources, segments, features, keyframes and vectors go.
        model: the model that runs the extractors (Phi-4-multimodal sees images and hears audio).
        embedder: vectors for hybrid search; None for full-text only.
        extractors: the steps to run (default: scene_caption, transcript, page_text).
        allowed_hosts: hosts URLs may be fetched from (none: URLs are refused).
        download_dir: where fetched files are kept (default `~/.cache/mmagent/media`).
        max_download_bytes: a larger download is refused.
        download_timeout: seconds one download may take in all.
        keyframes_per_scene: 1 to 3 frames per scene go to the model and the store.
        scene_threshold: the least content change a cut needs (`detect_scenes`' threshold; lower finds more).
        min_scene_seconds: a cut this soon after the last is merged.
        speech_window_seconds: the longest speech window for `transcript`.
        concurrency: extractor requests in flight at once (raise it for a server that batches, such as vLLM
            behind `OpenAIModel`; an in-process model answers one at a time anyway).
        progress: show a progress bar (sources and segments, with an ETA) on stderr.
        transport: an httpx transport for downloads (tests).
    """

    def __init__(
        self,
        store: Store,
        model: Model,
        *,
        embedder: Embedder | None = None,
        extractors: Sequence[Extractor] = DEFAULT_EXTRACTORS,
        allowed_hosts: Sequence[str] = (),
        download_dir: str | os.PathLike[str] | None = None,
        max_download_bytes: int = 2 << 30,
        download_timeout: float = 600.0,
        keyframes_per_scene: int = 1,
        scene_threshold: float = 15.0,
        min_scene_seconds: float = 0.6,
        speech_window_seconds: float = 30.0,
        concurrency: int = 1,
        progress: bool = False,
        transport: Any = None,
    ) -> None:
        if not 1 <= keyframes_per_scene <= 3:
            raise UserError(f"keyframes_per_scene must be 1 to 3, got {keyframes_per_scene}")
        if concurrency < 1:
            raise UserError(f"concurrency must be at least 1, got {concurrency}")
        names = [e.name for e in extractors]
        if len(set(names)) != len(names):
            raise UserError(f"extractor names must be unique, got {names}")
        self.store = store
        self.model = model
        self.embedder = embedder
        self.extractors = tuple(extractors)
        self.allowed_hosts = tuple(allowed_hosts)
        self.download_dir = Path(download_dir or Path.home() / ".cache" / "mmagent" / "media").expanduser()
        self.max_download_bytes = max_download_bytes
        self.download_timeout = download_timeout
        self.keyframes_per_scene = keyframes_per_scene
        self.scene_threshold = scene_threshold
        self.min_scene_seconds = min_scene_seconds
        self.speech_window_seconds = speech_window_seconds
        self.concurrency = concurrency
        self.progress = progress
        self.transport = transport
        self._usage = Usage()
        self._bar: Progress | None = None
        self._segments_task: TaskID | None = None

    # ------------------------------------------------------------------ public

    def ingest_sync(self, sources: Sequence[str | os.PathLike[str]], *, collection: str = "default") -> IngestReport:
        """`ingest` from synchronous code."""
        return asyncio.run(self.ingest(sources, collection=collection))

    async def ingest(self, sources: Sequence[str | os.PathLike[str]], *, collection: str = "default") -> IngestReport:
        """Ingest files, folders (recursively) and URLs into `collection`; see the module docstring.

        Raises:
            UserError: no sources, or a bad collection name. Failures of single sources are in the report.
        """
        if not sources:
            raise UserError("nothing to ingest: give files, folders or URLs")
        if not collection.strip():
            raise UserError("the collection name cannot be empty")
        started = time.perf_counter()
        self._usage = Usage()
        items = list(_sources.expand(sources))
        reports: list[SourceReport] = []
        with self._progress(len(items)) as advance:
            for uri, path, named in items:
                report = await self._one(collection, uri, path, named)
                if report is not None:
                    reports.append(report)
                advance()
        return IngestReport(sources=tuple(reports), usage=self._usage, seconds=time.perf_counter() - started)

    # ------------------------------------------------------------------ one source

    async def _one(self, collection: str, uri: str, path: Path | None, named: bool) -> SourceReport | None:
        try:
            if path is None:
                found = await _sources.download(
                    uri,
                    self.download_dir,
                    allowed_hosts=self.allowed_hosts,
                    max_bytes=self.max_download_bytes,
                    time_limit=self.download_timeout,
                    transport=self.transport,
                )
            else:
                found = await asyncio.to_thread(_sources.local, uri, path)
        except (MediaError, UserError, OSError) as exc:
            if not named:  # a file in a folder that is not media
                return None
            return SourceReport(uri=uri, status="failed", error=_reason(exc))
        try:
            return await self._ingest(collection, found)
        except (MMAgentError, OSError) as exc:  # a bad file, or the model failed on it (too long, out of memory)
            return SourceReport(uri=uri, status="failed", kind=found.kind, error=_reason(exc))

    async def _ingest(self, collection: str, found: _sources.LocalSource) -> SourceReport:
        duration, pages = await asyncio.to_thread(_measure, found)
        source, written = self.store.add_source(
            collection,
            found.uri,
            sha256=found.sha256,
            kind=found.kind,
            media_type=found.media_type,
            size=found.size,
            duration=duration,
            pages=pages,
            local_path=str(found.path),
        )
        was_complete = source.complete
        segments = self.store.media_segments(source.id) if was_complete else []
        work = _Work()
        if not segments:
            segments = await self._segment(source, found, work)
        await self._extract(source, found, segments, work)
        if self.embedder is not None:
            await self._embed(source, segments, work)
        if not was_complete:
            self.store.complete_source(source.id)
        if written:
            status: Status = "new" if source.created_at == source.updated_at else "changed"
        elif not was_complete:
            status = "resumed"
        else:
            status = "updated" if work.features or work.vectors else "unchanged"
        return SourceReport(
            uri=found.uri,
            status=status,
            kind=found.kind,
            source_id=source.id,
            segments=len(segments),
            features=work.features,
            vectors=work.vectors,
            media_seconds=duration,
        )

    async def _segment(self, source: MediaSource, found: _sources.LocalSource, work: _Work) -> list[MediaSegment]:
        from memory import NewSegment

        path = found.path
        if found.kind == "image":
            image = as_image_part(path.read_bytes())
            return self.store.add_segments(source.id, [NewSegment("image", 0, media=(("keyframe", None, image),))])
        if found.kind == "document":
            stored: list[MediaSegment] = []
            pages = render_pages(path)
            while batch := await asyncio.to_thread(_take, pages, _PAGE_BATCH):
                new = [
                    NewSegment("page", p.number - 1, page=p.number, media=(("keyframe", None, p.image),)) for p in batch
                ]
                kept = self.store.add_segments(source.id, new)
                stored.extend(kept)
                for segment, page in zip(kept, batch, strict=True):
                    # A digital PDF's own text, exact and free: searchable whatever the model reads from the image.
                    if page.text and self.store.put_feature(segment.id, PDF_TEXT, PDF_TEXT_VERSION, page.text):
                        work.features += 1
                        work.touched.add(segment.id)
            return stored
        planned: list[NewSegment] = []
        if found.kind == "video":
            planned.extend(await asyncio.to_thread(self._scenes, path))
        windows = await asyncio.to_thread(segment_audio, path, max_seconds=self.speech_window_seconds)
        planned.extend(NewSegment("audio", i, start=w.start, end=w.end) for i, w in enumerate(windows))
        return self.store.add_segments(source.id, planned)

    def _scenes(self, path: Path) -> list[NewSegment]:
        from memory import NewSegment

        scenes = detect_scenes(path, threshold=self.scene_threshold, min_scene_seconds=self.min_scene_seconds)
        out = []
        for scene in scenes:
            frames = keyframes(path, scene, self.keyframes_per_scene)
            media = tuple(_keyframe(k.time, k.image) for k in frames)
            out.append(NewSegment("scene", scene.index, start=scene.start, end=scene.end, media=media))
        return out

    async def _extract(
        self, source: MediaSource, found: _sources.LocalSource, segments: Sequence[MediaSegment], work: _Work
    ) -> None:
        done = self.store.feature_versions(source.id)
        todo = [
            (segment, extractor)
            for segment in segments
            for extractor in self.extractors
            if segment.kind in extractor.kinds and done.get((segment.id, extractor.name)) != extractor.version
        ]
        self._add_total(len(todo))
        gate = asyncio.Semaphore(self.concurrency)

        async def run(segment: MediaSegment, extractor: Extractor) -> None:
            async with gate:
                images = [self.store.artifact(ref.sha256) for ref in segment.media if ref.role == "keyframe"]
                audio = await asyncio.to_thread(self._audio_for, found, segment, extractor)
                value, usage = await extractor.run(self.model, [i for i in images if isinstance(i, ImagePart)], audio)
                self._usage = self._usage + usage
                if self.store.put_feature(
                    segment.id, extractor.name, extractor.version, main_text(value), value.model_dump(mode="json")
                ):
                    work.features += 1
                    work.touched.add(segment.id)
                self._advance()

        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the source's other requests
                for segment, extractor in todo:
                    group.create_task(run(segment, extractor))
        except ExceptionGroup as failed:
            first: BaseException = failed
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    def _audio_for(self, found: _sources.LocalSource, segment: MediaSegment, extractor: Extractor) -> AudioPart | None:
        if segment.start is None or segment.end is None:
            return None
        if segment.kind == "audio":
            clip = audio_clip(found.path, segment.start, segment.end)
        elif segment.kind == "scene" and extractor.audio:
            clip = audio_clip(found.path, segment.start, min(segment.end, segment.start + MAX_SCENE_AUDIO_SECONDS))
        else:
            return None
        # A scene past the end of the sound track has a sliver of audio or none: too little to hear.
        if clip is None or len(clip.samples()) < MIN_AUDIO_SECONDS * 16_000:
            return None
        return clip

    async def _embed(self, source: MediaSource, segments: Sequence[MediaSegment], work: _Work) -> None:
        embedder = self.embedder
        assert embedder is not None
        done = self.store.embedded(embedder.name, source.id)
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, ImagePart]] = []
        for segment in segments:
            if (segment.id, "text") not in done or segment.id in work.touched:
                text = "\n".join(f.text for f in self.store.media_features(segment.id) if f.text.strip())
                if text:
                    texts.append((segment.id, text))
            frames = [ref for ref in segment.media if ref.role == "keyframe"]
            if "image" in embedder.modalities and frames and (segment.id, "image") not in done:
                part = self.store.artifact(frames[0].sha256)
                if isinstance(part, ImagePart):
                    images.append((segment.id, part))
        for start in range(0, len(texts), _EMBED_BATCH):
            batch = texts[start : start + _EMBED_BATCH]
            vectors = await asyncio.to_thread(embedder.embed_texts, [t for _, t in batch])
            rows: list[tuple[int, Modality, Any]] = [
                (sid, "text", vec) for (sid, _), vec in zip(batch, vectors, strict=True)
            ]
            work.vectors += self.store.put_embeddings(embedder.name, embedder.dim, rows)
        for start in range(0, len(images), _EMBED_BATCH):
            picture_batch = images[start : start + _EMBED_BATCH]
            vectors = await asyncio.to_thread(embedder.embed_images, [p for _, p in picture_batch])
            rows = [(sid, "image", vec) for (sid, _), vec in zip(picture_batch, vectors, strict=True)]
            work.vectors += self.store.put_embeddings(embedder.name, embedder.dim, rows)

    # ------------------------------------------------------------------ progress

    @contextlib.contextmanager
    def _progress(self, sources: int) -> Iterator[Any]:
        if not self.progress:
            yield lambda: None
            return
        from rich.console import Console

        from agent._progress import progress_bar

        bar = progress_bar(Console(stderr=True), width=9)
        with bar:
            task = bar.add_task("sources", total=sources)
            self._bar, self._segments_task = bar, bar.add_task("segments", total=0)
            try:
                yield lambda: bar.advance(task)
            finally:
                self._bar = self._segments_task = None

    def _add_total(self, count: int) -> None:
        if self._bar is not None and self._segments_task is not None:
            task = self._bar.tasks[self._segments_task]
            self._bar.update(self._segments_task, total=(task.total or 0) + count)

    def _advance(self) -> None:
        if self._bar is not None and self._segments_task is not None:
            self._bar.advance(self._segments_task)


def _measure(found: _sources.LocalSource) -> tuple[float | None, int | None]:
    """(duration in seconds, page count) of a source, from its header."""
    if found.kind == "video":
        return probe(found.path).duration, None
    if found.kind == "audio":
        from agent.ingest import _decode

        with _decode.open_media(found.path) as container:
            stream = _decode.audio_stream(container)
            return (_decode.declared_duration(container, stream) if stream is not None else None), None
    if found.kind == "document":
        from agent.ingest._pdf import page_count

        return None, page_count(found.path)
    return None, None


def _keyframe(time: float | None, image: ImagePart) -> tuple[Literal["keyframe"], float | None, ImagePart]:
    return ("keyframe", time, image)


def _take(pages: Iterator[Any], n: int) -> list[Any]:
    out = []
    for page in pages:
        out.append(page)
        if len(out) == n:
            break
    return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, MediaError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc)
