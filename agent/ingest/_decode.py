"""Opening media with PyAV: safely, with every failure as a one-line `MediaError` naming the file.

A file is opened through a Python file object, never by its name, and with FFmpeg's protocol whitelist
matching no protocol: a path such as "http://..." or "concat:a|b" is only ever a file name, and a playlist
or manifest (HLS, DASH) that names other files or URLs cannot make FFmpeg open them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from agent.exceptions import MediaError, UserError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from av.audio.frame import AudioFrame
    from av.audio.stream import AudioStream
    from av.container import InputContainer
    from av.video.stream import VideoStream

    from agent.ingest._segments import MediaInfo

MAX_VIDEO_SECONDS = 4 * 3600
"""The default cap on a file's duration: longer files are refused from their header, before decoding."""

_OPTIONS = {"protocol_whitelist": "none"}  # a nested open (playlist, manifest) matches no protocol

WRAP_SECONDS = 3600.0
"""A frame whose timestamp is this far from where the previous one ended (or, for the first, from the origin)
has a broken timestamp, such as an MPEG-TS wrap (33 bits at 90 kHz), not a gap: it is placed right after."""


def require_av() -> None:
    """Raise UserError when PyAV is missing."""
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise UserError(f"media ingestion needs PyAV: pip install 'mmagent[ingest]' ({exc})") from exc


def describe(exc: BaseException) -> str:
    """A one-line reason for `exc`, without the file name FFmpeg's messages repeat."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


@contextlib.contextmanager
def media_errors(path: str | os.PathLike[str], doing: str) -> Iterator[None]:
    """Any failure of FFmpeg's, numpy's or the file system's inside the block as a one-line MediaError."""
    try:
        yield
    except (MediaError, UserError):
        raise
    except FileNotFoundError as exc:
        raise MediaError(f"{os.fspath(path)}: no such file") from exc
    except IsADirectoryError as exc:
        raise MediaError(f"{os.fspath(path)}: is a directory") from exc
    except MemoryError as exc:
        raise MediaError(f"{os.fspath(path)}: out of memory while {doing}") from exc
    except Exception as exc:
        raise MediaError(f"{os.fspath(path)}: cannot {doing}: {describe(exc)}") from exc


@contextlib.contextmanager
def open_media(path: str | os.PathLike[str]) -> Iterator[InputContainer]:
    """The file opened for demuxing (see the module docstring); MediaError when it is not media FFmpeg reads."""
    require_av()
    import av

    with media_errors(path, "read it as media"), open(path, "rb") as file:
        container = av.open(file, mode="r", options=_OPTIONS)
        try:
            yield container
        finally:
            container.close()


def video_stream(container: InputContainer, path: str | os.PathLike[str]) -> VideoStream:
    """The first video stream, decoding with threads; MediaError when there is none."""
    if not container.streams.video:
        raise MediaError(f"{os.fspath(path)}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def audio_stream(container: InputContainer) -> AudioStream | None:
    """The first audio stream, or None."""
    return container.streams.audio[0] if container.streams.audio else None


def origin(container: InputContainer) -> float:
    """The time (seconds) that ingestion calls 0: the video stream's start, else the first audio stream's.

    Scene times and audio clips are both measured from it, so they stay in sync when the audio starts a little
    before or after the picture (MPEG-TS, encoder priming).
    """
    streams = [*container.streams.video[:1], *container.streams.audio[:1]]
    for stream in streams:
        if stream.start_time is not None and stream.time_base is not None:
            return float(stream.start_time * stream.time_base)
    return 0.0


def info(container: InputContainer, path: str | os.PathLike[str]) -> MediaInfo:
    """The header's description of a video (no frame decoded)."""
    from agent.ingest._segments import MediaInfo

    video = video_stream(container, path)
    rate = video.average_rate or video.guessed_rate or video.base_rate or Fraction(25)
    fps = float(rate)
    duration = declared_duration(container, video)
    frames: int | None = video.frames or None
    if frames is None and duration is not None:
        frames = round(duration * fps)
    audio = audio_stream(container)
    return MediaInfo(
        duration=duration,
        fps=fps,
        frames=frames,
        width=video.codec_context.width,
        height=video.codec_context.height,
        video_codec=video.codec_context.name,
        has_audio=audio is not None,
        audio_codec=audio.codec_context.name if audio is not None else None,
        sample_rate=audio.codec_context.sample_rate if audio is not None else None,
        channels=audio.codec_context.channels if audio is not None else None,
        container=container.format.name,
    )


def declared_duration(container: InputContainer, stream: VideoStream | AudioStream) -> float | None:
    """Seconds, from the stream's header, else the container's (the longest stream); None when neither says.

    The stream's own comes first: a container's duration spans all its streams, and in an MPEG-TS whose
    timestamps wrap (33 bits at 90 kHz) it can claim 95,000 s for a clip of seconds.
    """
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def check_duration(duration: float | None, max_seconds: float, path: str | os.PathLike[str]) -> None:
    """MediaError when `duration` (from a header, or reached while decoding) is over `max_seconds`."""
    if duration is not None and duration > max_seconds:
        raise MediaError(
            f"{os.fspath(path)}: is {duration:.0f} s long, over the limit of {max_seconds:g} s (max_seconds)"
        )


def seek(container: InputContainer, stream: VideoStream | AudioStream, seconds: float) -> None:
    """Seek `stream` to the last keyframe at or before `seconds` (absolute stream time); flushes decoders."""
    if stream.time_base is None:
        container.seek(int(seconds * 1_000_000))
        return
    container.seek(int(seconds / stream.time_base), stream=stream, backward=True)


def mono(frame: AudioFrame) -> npt.NDArray[np.float32]:
    """A decoded audio frame as mono float32 in [-1, 1]: the mean of its channels (as `AudioPart` decodes)."""
    import numpy as np

    array: npt.NDArray[Any] = frame.to_ndarray()
    channels = max(1, len(frame.layout.channels))
    if not frame.format.is_planar:
        array = array.reshape(-1, channels).T  # packed: (1, n x channels) interleaved
    kind = array.dtype
    samples = array.astype(np.float32)
    if kind == np.int16:
        samples /= 32768.0
    elif kind == np.int32:
        samples /= 2147483648.0
    elif kind == np.int64:
        samples /= 9223372036854775808.0
    elif kind == np.uint8:
        samples = (samples - 128.0) / 128.0
    out = samples.mean(axis=0) if samples.shape[0] > 1 else samples[0]
    return np.ascontiguousarray(out, dtype=np.float32)
