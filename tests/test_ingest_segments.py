"""agent.ingest: scenes, keyframes and scene audio of videos made here with PyAV; audio windows; PDF pages.

Every input is generated in the test with a known truth: a video of six solid-colour scenes (a small square
moving inside each, so that motion is not taken for a cut) at known cut frames, with a sine tone per scene; a
signal of speech-like bursts between pauses; a PDF of three pages of different shapes.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from media_support import COLOURS, CUTS, FPS, TONES, make_video

import agent.ingest
from agent import _media
from agent.exceptions import MediaError, UserError
from agent.ingest import AudioSegment, Scene, segment_audio

needs_av = pytest.mark.skipif(
    importlib.util.find_spec("av") is None, reason="PyAV is not installed (pip install 'mmagent[ingest]')"
)
needs_scenedetect = pytest.mark.skipif(
    importlib.util.find_spec("av") is None or importlib.util.find_spec("scenedetect") is None,
    reason="PyAV or PySceneDetect is not installed (pip install 'mmagent[ingest]')",
)
needs_pdfium = pytest.mark.skipif(
    importlib.util.find_spec("pypdfium2") is None, reason="pypdfium2 is not installed (pip install 'mmagent[ingest]')"
)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV is not installed (pip install 'mmagent[ingest]')")
    return make_video(tmp_path_factory.mktemp("ingest") / "scenes.mp4")


@pytest.fixture(scope="module")
def scenes(video: Path) -> list[Scene]:
    if importlib.util.find_spec("scenedetect") is None:
        pytest.skip("PySceneDetect is not installed (pip install 'mmagent[ingest]')")
    return agent.ingest.detect_scenes(video)


def dominant_frequency(samples: np.ndarray[Any, Any], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


# ---------------------------------------------------------------- the package


def test_public_names_are_pinned() -> None:
    assert sorted(agent.ingest.__all__) == [
        "AudioSegment", "DEFAULT_EXTRACTORS", "Extractor", "IngestReport", "Ingestor", "Keyframe", "MAX_CLIP_SECONDS",
        "MAX_KEYFRAME_SIDE", "MAX_PAGES", "MAX_PAGE_PIXELS", "MAX_VIDEO_SECONDS", "MediaInfo", "PAGE_TEXT", "Page",
        "PageText", "SCENE_CAPTION", "Scene", "SceneCaption", "SourceReport", "TRANSCRIPT", "Transcript", "audio_clip",
        "citation", "detect_scenes", "keyframes", "media_tools", "page_count", "probe", "render_pages", "scene_audio",
        "segment_audio",
    ]  # fmt: skip
    for name in agent.ingest.__all__:
        assert hasattr(agent.ingest, name)


def test_import_needs_no_decoder() -> None:
    code = (
        "import sys, agent.ingest; heavy = {'av', 'cv2', 'scenedetect', 'pypdfium2', 'torch', 'rich.progress'}; "
        "heavy &= set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- video


@needs_av
def test_probe_reads_the_header(video: Path) -> None:
    info = agent.ingest.probe(video)
    assert info.fps == FPS and info.frames == CUTS[-1] and (info.width, info.height) == (160, 120)
    assert info.duration == pytest.approx(CUTS[-1] / FPS, abs=0.1)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.has_audio
    assert (info.sample_rate, info.channels) == (44_100, 2)
    with pytest.raises(AttributeError):
        info.fps = 30  # type: ignore[misc]


@needs_scenedetect
def test_cuts_are_found_within_one_frame(scenes: list[Scene]) -> None:
    assert len(scenes) == len(CUTS) - 1
    for scene, start, end in zip(scenes, CUTS, CUTS[1:], strict=False):
        assert abs(scene.start_frame - start) <= 1 and abs(scene.end_frame - end) <= 1
        assert scene.start == pytest.approx(scene.start_frame / FPS, abs=1e-6)
    assert [s.index for s in scenes] == list(range(len(scenes)))
    assert scenes[0].start == 0 and scenes[-1].end == pytest.approx(CUTS[-1] / FPS)
    assert all(a.end == b.start and a.end_frame == b.start_frame for a, b in itertools.pairwise(scenes))


@needs_scenedetect
def test_a_high_threshold_finds_no_cut(video: Path) -> None:
    (scene,) = agent.ingest.detect_scenes(video, threshold=255)
    assert (scene.start_frame, scene.end_frame) == (0, CUTS[-1])


@needs_scenedetect
@pytest.mark.parametrize("count", [1, 2, 3])
def test_keyframes_lie_inside_their_scene_and_show_its_colour(video: Path, scenes: list[Scene], count: int) -> None:
    for scene in scenes:
        frames = agent.ingest.keyframes(video, scene, count)
        assert len(frames) == count
        assert [f.time for f in frames] == sorted(f.time for f in frames)
        for frame in frames:
            assert scene.start <= frame.time < scene.end
            assert frame.image.media_type == "image/jpeg" and frame.image.size == (160, 120)
            pixels = np.asarray(frame.image.to_pil()).reshape(-1, 3)
            colour = np.median(pixels, axis=0)
            assert np.abs(colour - COLOURS[scene.index]).max() <= 12, (scene.index, colour)


@needs_scenedetect
def test_scene_audio_is_the_scene_s_tone_at_16_khz(video: Path, scenes: list[Scene]) -> None:
    for scene in scenes:
        part = agent.ingest.scene_audio(video, scene)
        assert part is not None and part.sample_rate == 16_000
        samples = part.samples()
        assert abs(len(samples) - scene.duration * 16_000) <= 16_000 / FPS
        assert dominant_frequency(samples, 16_000) == pytest.approx(TONES[scene.index], abs=10)


@needs_av
@pytest.mark.parametrize("cut", [1, 4])
def test_audio_clip_across_a_cut_holds_both_tones(video: Path, cut: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.ingest import _decode

    monkeypatch.setattr(_decode, "WRAP_SECONDS", 3.0)  # a seek far into the file is not a broken timestamp
    at = CUTS[cut] / FPS
    part = agent.ingest.audio_clip(video, at - 0.5, at + 0.5)
    assert part is not None
    samples = part.samples()
    assert len(samples) == 16_000
    assert dominant_frequency(samples[:7000], 16_000) == pytest.approx(TONES[cut - 1], abs=10)
    assert dominant_frequency(samples[9000:], 16_000) == pytest.approx(TONES[cut], abs=10)
    with pytest.raises(UserError, match="start < end"):
        agent.ingest.audio_clip(video, 2.0, 1.0)


@needs_scenedetect
def test_a_stream_with_one_keyframe_is_read_from_the_start(tmp_path: Path) -> None:
    """MPEG-TS seeks by byte position: with a single keyframe a seek finds nothing decodable, and keyframes and
    audio are then read from the start. (Its audio's first timestamp also wraps around 2**33 here.)"""
    path = make_video(tmp_path / "one_keyframe.ts", container="mpegts", x264="keyint=1000:scenecut=0")
    scenes = agent.ingest.detect_scenes(path)
    assert [s.start_frame for s in scenes] == list(CUTS[:-1])
    for scene in scenes[3:]:
        (frame,) = agent.ingest.keyframes(path, scene)
        colour = np.median(np.asarray(frame.image.to_pil()).reshape(-1, 3), axis=0)
        assert np.abs(colour - COLOURS[scene.index]).max() <= 12
        part = agent.ingest.scene_audio(path, scene)
        assert part is not None
        assert dominant_frequency(part.samples(), 16_000) == pytest.approx(TONES[scene.index], abs=10)


@needs_scenedetect
def test_a_video_without_audio_has_no_scene_audio(tmp_path: Path) -> None:
    path = make_video(tmp_path / "silent.mkv", cuts=(0, 30, 60), audio=False, container="matroska")
    assert not agent.ingest.probe(path).has_audio
    scenes = agent.ingest.detect_scenes(path)
    assert [(s.start_frame, s.end_frame) for s in scenes] == [(0, 30), (30, 60)]
    assert agent.ingest.scene_audio(path, scenes[0]) is None
    assert agent.ingest.segment_audio(path) == []


@needs_scenedetect
def test_keyframes_are_scaled_down_turned_upright_and_counted(tmp_path: Path) -> None:
    wide = make_video(tmp_path / "wide.mp4", cuts=(0, 5), size=(2000, 200), audio=False)
    (scene,) = agent.ingest.detect_scenes(wide)
    (frame,) = agent.ingest.keyframes(wide, scene)
    assert frame.image.size == (agent.ingest.MAX_KEYFRAME_SIDE, 134)
    assert agent.ingest.keyframes(wide, scene, max_side=500)[0].image.size == (500, 50)
    for count in (0, 4):
        with pytest.raises(UserError, match="1 to 3"):
            agent.ingest.keyframes(wide, scene, count)
    # A phone's portrait video: landscape frames and a display matrix turning them 90 degrees clockwise.
    data = bytearray(make_video(tmp_path / "phone.mp4", cuts=(0, 5), audio=False).read_bytes())
    at = data.find(b"tkhd")
    matrix = at + 4 + 4 + (32 if data[at + 4] else 20) + 16
    assert struct.unpack(">9i", data[matrix : matrix + 36])[::4] == (0x10000, 0x10000, 0x40000000)
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    phone = tmp_path / "portrait.mp4"
    phone.write_bytes(bytes(data))
    (frame,) = agent.ingest.keyframes(phone, agent.ingest.detect_scenes(phone)[0])
    pixels = np.asarray(frame.image.to_pil())
    assert frame.image.size == (120, 160)
    x = round(frame.time * FPS) * 3  # the square, drawn near the top left, is now near the top right
    assert pixels[x : x + 16, -26:-10].min() > 200 and pixels[10:26, x : x + 16].max() < 240


@needs_scenedetect
def test_not_media_and_corrupt_files_are_media_errors(video: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(50_000))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (garbage, truncated, empty, tmp_path / "missing.mp4", tmp_path):
        for call in (agent.ingest.probe, agent.ingest.detect_scenes, agent.ingest.segment_audio):
            with pytest.raises(MediaError) as caught:
                call(path)
            message = str(caught.value)
            assert str(path) in message and "\n" not in message and "Traceback" not in message
        with pytest.raises(MediaError, match=path.name):
            agent.ingest.scene_audio(path, Scene(index=0, start_frame=0, end_frame=1, start=0.0, end=1.0))


@needs_scenedetect
def test_a_corrupt_stream_is_a_media_error(video: Path, tmp_path: Path) -> None:
    data = bytearray(video.read_bytes())
    at = data.find(b"mdat") + 8
    data[at : at + 20_000] = np.random.default_rng(1).bytes(20_000)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(MediaError, match=r"corrupt\.mp4: cannot decode"):
        agent.ingest.detect_scenes(corrupt)


@needs_av
def test_an_audio_only_file_is_not_a_video(tmp_path: Path) -> None:
    import soundfile as sf

    path = tmp_path / "tone.wav"
    sf.write(path, np.zeros(8000, np.float32), 16_000)
    with pytest.raises(MediaError, match="has no video stream"):
        agent.ingest.probe(path)


@needs_scenedetect
def test_caps_are_checked_before_decoding(video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import av

    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded a frame of a video over a cap")

    monkeypatch.setattr(av.container.InputContainer, "decode", no_decoding)
    with pytest.raises(MediaError, match=r"12 s long, over the limit of 5 s"):
        agent.ingest.detect_scenes(video, max_seconds=5)
    with pytest.raises(MediaError, match="over the limit of 5 s"):
        agent.ingest.segment_audio(video, max_file_seconds=5)
    scene = Scene(index=0, start_frame=0, end_frame=1, start=0.0, end=0.04)
    with pytest.raises(MediaError, match="over the limit"):
        agent.ingest.keyframes(video, scene, max_seconds=5)
    monkeypatch.setattr(_media, "MAX_PIXELS", 160 * 120 - 1)
    with pytest.raises(MediaError, match=r"frames are 160x120 pixels, over the limit"):
        agent.ingest.detect_scenes(video)
    with pytest.raises(MediaError, match=r"over the media gate's limit"):
        agent.ingest.audio_clip(video, 0, _media.MAX_AUDIO_SECONDS + 1)


@needs_av
def test_a_playlist_cannot_make_ffmpeg_open_other_files(video: Path, tmp_path: Path) -> None:
    segment = make_video(tmp_path / "segment.ts", cuts=(0, 25), container="mpegts")
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{segment}\n#EXT-X-ENDLIST\n")
    with pytest.raises(MediaError, match=r"list\.m3u8"):
        agent.ingest.probe(playlist)
    with pytest.raises(MediaError, match="no such file"):  # a name, never an FFmpeg URL that FFmpeg would open
        agent.ingest.probe(f"concat:{segment}|{segment}")


# ---------------------------------------------------------------- audio windows

RATE = 8_000


def bursts(
    durations: list[float], pauses: list[float], rate: int = RATE
) -> tuple[np.ndarray[Any, Any], list[tuple[float, float]]]:
    """Speech-like bursts (noise shaped by a syllable envelope) between pauses of faint noise, starting and
    ending with a pause; the bursts' (start, end) seconds."""
    rng = np.random.default_rng(7)
    pieces, spans, now = [], [], 0.0
    for k in range(len(durations) + 1):
        pause = pauses[k % len(pauses)]
        pieces.append(0.0005 * rng.standard_normal(round(pause * rate)))
        now += pause
        if k < len(durations):
            n = round(durations[k] * rate)
            t = np.arange(n) / rate
            envelope = 0.35 + 0.65 * np.abs(np.sin(2 * np.pi * 2.5 * t))
            pieces.append(0.4 * envelope * rng.standard_normal(n))
            spans.append((now, now + durations[k]))
            now += durations[k]
    return np.concatenate(pieces).astype(np.float32), spans


def in_a_pause(at: float, spans: list[tuple[float, float]]) -> bool:
    return (
        at <= spans[0][0] + 0.011
        or at >= spans[-1][1] - 0.011
        or any(a[1] - 0.011 <= at <= b[0] + 0.011 for a, b in itertools.pairwise(spans))
    )


DURATIONS = [4.0, 7.0, 3.0, 9.0, 5.0, 6.0, 8.0, 2.0, 4.0]
PAUSES = [1.0, 0.8, 1.2, 0.7, 1.0, 0.9, 1.5, 0.6, 0.8]


@pytest.mark.parametrize("max_seconds", [30.0, 10.0])
def test_audio_is_cut_in_pauses_into_windows_that_fit(max_seconds: float) -> None:
    samples, spans = bursts(DURATIONS, PAUSES)
    segments = segment_audio(samples, RATE, max_seconds=max_seconds)
    assert len(segments) >= sum(DURATIONS) / max_seconds
    for segment in segments:
        assert segment.rate == RATE and 0 < segment.duration <= max_seconds
        assert in_a_pause(segment.start, spans)
        assert in_a_pause(segment.end, spans)
    assert all(a.end < b.start for a, b in itertools.pairwise(segments))
    for start, end in spans:  # every burst whole inside one window
        assert any(s.start <= start + 0.011 and end - 0.011 <= s.end for s in segments), (start, end)
    assert segments[0].start == pytest.approx(PAUSES[0], abs=0.011)


def test_a_long_utterance_is_split_at_a_breath() -> None:
    samples, _spans = bursts([25.0], [1.0])
    breath = round(13.0 * RATE)
    samples[breath : breath + round(0.2 * RATE)] *= 0.01  # -40 dB for 200 ms: shorter than min_silence
    segments = segment_audio(samples, RATE, max_seconds=20)
    assert len(segments) == 2
    assert 13.0 <= segments[0].end <= 13.21 and 13.0 <= segments[1].start <= 13.21
    assert segments[0].start == pytest.approx(1.0, abs=0.011) and segments[1].end == pytest.approx(26.0, abs=0.011)


def test_a_continuous_tone_falls_back_to_fixed_windows() -> None:
    t = np.arange(70 * 16_000) / 16_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    segments = segment_audio(tone, 16_000)
    assert [(s.start, s.end) for s in segments] == [(0.0, 30.0), (30.0, 60.0), (60.0, 70.0)]
    assert segments[0] == AudioSegment(start_sample=0, end_sample=480_000, rate=16_000)


def test_a_click_does_not_make_quiet_speech_silence() -> None:
    samples, spans = bursts([3.0, 4.0], [1.0])
    samples *= 0.005  # speech 46 dB under the click
    samples[100:260] = 1.0  # a 20 ms click in the first pause
    segments = segment_audio(samples, RATE)
    for start, end in spans:
        assert any(s.start <= start + 0.011 and end - 0.011 <= s.end for s in segments), (start, end)


def test_windows_never_pass_max_seconds_at_an_odd_rate() -> None:
    noise = np.random.default_rng(3).standard_normal(22_050 * 25).astype(np.float32)
    segments = segment_audio(noise, 22_050, max_seconds=7.777)
    assert all(s.end_sample - s.start_sample <= 7.777 * 22_050 for s in segments)
    assert segments[-1].end_sample == len(noise) and len(segments) == 4


def test_silence_has_no_windows_and_bad_arguments_are_user_errors() -> None:
    assert segment_audio(np.zeros(16_000, np.float32), 16_000) == []
    assert segment_audio([], 16_000) == []
    stereo = np.stack([bursts([2.0], [0.5])[0]] * 2, axis=1)
    assert len(segment_audio(stereo, RATE)) == 1
    cases: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((np.zeros(10), None), {}),
        ((np.zeros(10), 0), {}),
        ((np.zeros(10), 16_000), {"max_seconds": 0}),
        ((np.zeros(10), 16_000), {"threshold_db": 3}),
        ((np.zeros((2, 2, 2)), 16_000), {}),
        (("some.wav", 16_000), {}),
    ]
    for args, kwargs in cases:
        with pytest.raises(UserError):
            segment_audio(*args, **kwargs)


@needs_av
@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_a_file_is_segmented_like_its_samples(tmp_path: Path, suffix: str) -> None:
    import soundfile as sf

    samples, _spans = bursts(DURATIONS, PAUSES, rate=16_000)
    path = tmp_path / f"speech{suffix}"
    sf.write(path, samples, 16_000)
    from_file = segment_audio(path, max_seconds=10)
    from_samples = segment_audio(sf.read(path, dtype="float32")[0], 16_000, max_seconds=10)
    assert from_file == from_samples
    clip = agent.ingest.audio_clip(path, from_file[1].start, from_file[1].end)
    assert clip is not None
    assert len(clip.samples()) == from_file[1].end_sample - from_file[1].start_sample


@settings(max_examples=40, deadline=None)
@given(
    durations=st.lists(st.floats(0.05, 40.0), min_size=1, max_size=6),
    pauses=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=7),
    max_seconds=st.sampled_from([5.0, 12.5, 30.0]),
)
def test_windows_are_ordered_fit_and_cover_every_burst(
    durations: list[float], pauses: list[float], max_seconds: float
) -> None:
    samples, spans = bursts(durations, pauses, rate=1_000)
    segments = segment_audio(samples, 1_000, max_seconds=max_seconds)
    assert all(0 < s.duration <= max_seconds for s in segments)
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))
    covered = np.zeros(len(samples), bool)
    for s in segments:
        covered[s.start_sample : s.end_sample] = True
    for start, end in spans:  # a burst may be split, but no part of it is dropped (10 ms blocks at the edges)
        inner = covered[round(start * 1_000) + 10 : round(end * 1_000) - 10]
        assert inner.all(), (start, end)


# ---------------------------------------------------------------- documents

PAGE_SIZES = [(595.0, 842.0), (842.0, 595.0), (300.0, 300.0)]  # A4 portrait, A4 landscape, a square


@pytest.fixture
def pdf(tmp_path: Path) -> Path:
    if importlib.util.find_spec("pypdfium2") is None:
        pytest.skip("pypdfium2 is not installed (pip install 'mmagent[ingest]')")
    import pypdfium2

    document = pypdfium2.PdfDocument.new()
    for width, height in PAGE_SIZES:
        document.new_page(width, height).close()
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    path = tmp_path / "three.pdf"
    path.write_bytes(buffer.getvalue())
    return path


@needs_pdfium
def test_pages_come_in_order_with_their_shape(pdf: Path) -> None:
    pages = list(agent.ingest.render_pages(pdf, dpi=72))
    assert [p.number for p in pages] == [1, 2, 3]
    for page, (width, height) in zip(pages, PAGE_SIZES, strict=True):
        assert (page.width, page.height) == (width, height)
        assert page.image.size == (round(width), round(height))
        assert np.asarray(page.image.to_pil()).min() == 255  # blank pages render white
    assert next(agent.ingest.render_pages(pdf)).image.size == (1190, 1684)  # 144 dpi


@needs_pdfium
def test_page_caps(pdf: Path) -> None:
    with pytest.raises(MediaError, match=r"has 3 pages, over the limit of 2"):
        agent.ingest.render_pages(pdf, max_pages=2)
    for page in agent.ingest.render_pages(pdf, dpi=600, max_pixels=100_000):
        width, height = page.image.size
        assert width * height <= 100_000 and width * height > 90_000
        assert width / height == pytest.approx(page.width / page.height, rel=0.02)
    with pytest.raises(UserError):
        agent.ingest.render_pages(pdf, dpi=0)


ENCRYPTED_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\n"
    b"4 0 obj<</Filter/Standard/V 1/R 2/Length 40/P -4"
    b"/O<" + b"ab" * 32 + b">/U<" + b"cd" * 32 + b">>>endobj\n"
    b"trailer<</Root 1 0 R/Encrypt 4 0 R/ID[<0123456789abcdef0123456789abcdef><0123456789abcdef0123456789abcdef>]"
    b"/Size 5>>\n%%EOF\n"
)


@needs_pdfium
def test_corrupt_and_encrypted_pdfs_are_media_errors(pdf: Path, tmp_path: Path) -> None:
    cases = {
        "corrupt.pdf": b"%PDF-1.7\n" + np.random.default_rng(2).bytes(5000),
        "truncated.pdf": pdf.read_bytes()[:200],
        "text.pdf": b"hello, not a PDF",
        "locked.pdf": ENCRYPTED_PDF,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError) as caught:
            list(agent.ingest.render_pages(tmp_path / name))
        assert name in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(MediaError, match="encrypted"):
        agent.ingest.render_pages(tmp_path / "locked.pdf")
    with pytest.raises(MediaError, match="no such file"):
        agent.ingest.render_pages(tmp_path / "missing.pdf")
