"""The values segmentation produces: frozen, typed, and free of storage ids and model outputs."""

from __future__ import annotations

from dataclasses import dataclass

from agent.messages import ImagePart


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What a video's header says, read without decoding a frame (`probe`).

    Attributes:
        duration: seconds, from the video stream's header or else the container's; None when neither says
            (a raw elementary stream).
        fps: the video stream's average frame rate (its guessed rate, or 25, when the header has none).
        frames: the video stream's frame count from the header, else estimated as duration x fps; None when
            the duration is unknown too.
        width: coded width of the video in pixels.
        height: coded height of the video in pixels.
        video_codec: the video decoder's name ("h264", "vp9", ...).
        has_audio: whether the file has an audio stream.
        audio_codec: the audio decoder's name ("aac", "opus", ...), None without audio.
        sample_rate: the audio stream's sample rate in Hz, None without audio.
        channels: the audio stream's channel count, None without audio.
        container: the demuxer's name ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", ...).
    """

    duration: float | None
    fps: float
    frames: int | None
    width: int
    height: int
    video_codec: str
    has_audio: bool
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None
    container: str


@dataclass(frozen=True, slots=True)
class Scene:
    """A shot between two cuts: frames `start_frame` (inclusive) to `end_frame` (exclusive).

    Frame indices count decoded frames in presentation order from 0. Times are seconds from the start of the
    video stream: `start` is the first frame's timestamp, `end` the next scene's first frame's (or, for the
    last scene, the last frame's timestamp plus its duration), so consecutive scenes tile the video.
    """

    index: int
    start_frame: int
    end_frame: int
    start: float
    end: float

    @property
    def frames(self) -> int:
        """Number of frames in the scene."""
        return self.end_frame - self.start_frame

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Keyframe:
    """One frame of a scene as an image for the model, and where it was taken (seconds from the start)."""

    time: float
    image: ImagePart


@dataclass(frozen=True, slots=True)
class AudioSegment:
    """A window of audio: samples `start_sample` (inclusive) to `end_sample` (exclusive) at `rate` Hz.

    For samples passed to `segment_audio`, `rate` is theirs, so `samples[seg.start_sample:seg.end_sample]` is the
    window; for a file, `rate` is 16 kHz (what `audio_clip` returns).
    """

    start_sample: int
    end_sample: int
    rate: int

    @property
    def start(self) -> float:
        """Start in seconds."""
        return self.start_sample / self.rate

    @property
    def end(self) -> float:
        """End in seconds."""
        return self.end_sample / self.rate

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return (self.end_sample - self.start_sample) / self.rate


@dataclass(frozen=True, slots=True)
class Page:
    """One rendered page of a document.

    Attributes:
        number: the page number, from 1.
        image: the page rendered as PNG.
        width: the page's width in points (1/72 inch).
        height: the page's height in points.
        text: the page's embedded text layer in reading order ("" for a scan, or a page of pictures).
    """

    number: int
    image: ImagePart
    width: float
    height: float
    text: str = ""
