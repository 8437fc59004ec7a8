"""Media ingestion, first layer: cut videos, audio and documents into segments the model can take in.

Pure functions from a file (or samples) to frozen values; nothing is stored and no model is called here:

| function | gives |
|---|---|
| `probe(path)` | `MediaInfo`: duration, fps, frames, size, codecs, whether there is audio (header only) |
| `detect_scenes(path)` | `Scene`s between cuts (PySceneDetect's content detector on frames PyAV decodes) |
| `keyframes(path, scene, count)` | 1-3 `Keyframe`s (time + JPEG `ImagePart`, longer side <= 1344 px) inside a scene |
| `scene_audio(path, scene)`, `audio_clip(path, start, end)` | a 16 kHz mono `AudioPart`, or None without audio |
| `segment_audio(samples or path, rate)` | `AudioSegment` windows <= 30 s cut in pauses, for speech recognition |
| `render_pages(path)` | `Page`s of a PDF (number, PNG `ImagePart`, size in points), one at a time |

Every failure to read a file (missing, not media, corrupt, encrypted, over a cap) is a one-line `MediaError`
naming the file. The decoders (PyAV, PySceneDetect, pypdfium2) come with `pip install 'mmagent[ingest]'`
and are imported on first use: `import agent.ingest` needs none of them.
"""

from __future__ import annotations

from agent.ingest._audio import audio_clip, segment_audio
from agent.ingest._decode import MAX_VIDEO_SECONDS
from agent.ingest._extract import (
    DEFAULT_EXTRACTORS,
    PAGE_TEXT,
    SCENE_CAPTION,
    TRANSCRIPT,
    Extractor,
    PageText,
    SceneCaption,
    Transcript,
)
from agent.ingest._pdf import MAX_PAGE_PIXELS, MAX_PAGES, page_count, render_pages
from agent.ingest._pipeline import Ingestor, IngestReport, SourceReport
from agent.ingest._segments import AudioSegment, Keyframe, MediaInfo, Page, Scene
from agent.ingest._tools import MAX_CLIP_SECONDS, citation, media_tools
from agent.ingest._video import MAX_KEYFRAME_SIDE, detect_scenes, keyframes, probe, scene_audio

__all__ = [
    "DEFAULT_EXTRACTORS",
    "MAX_CLIP_SECONDS",
    "MAX_KEYFRAME_SIDE",
    "MAX_PAGES",
    "MAX_PAGE_PIXELS",
    "MAX_VIDEO_SECONDS",
    "PAGE_TEXT",
    "SCENE_CAPTION",
    "TRANSCRIPT",
    "AudioSegment",
    "Extractor",
    "IngestReport",
    "Ingestor",
    "Keyframe",
    "MediaInfo",
    "Page",
    "PageText",
    "Scene",
    "SceneCaption",
    "SourceReport",
    "Transcript",
    "audio_clip",
    "citation",
    "detect_scenes",
    "keyframes",
    "media_tools",
    "page_count",
    "probe",
    "render_pages",
    "scene_audio",
    "segment_audio",
]
