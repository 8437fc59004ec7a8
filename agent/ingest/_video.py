"""Video: probe a file, find its scenes, take keyframes and the audio of a scene.

Frames are decoded with PyAV (FFmpeg), never with OpenCV's video I/O. Cuts come from PySceneDetect's
`AdaptiveDetector`: the change in hue, saturation and brightness between consecutive frames (the content
value), counted as a cut where it stands out against the frames around it (a ratio over their average) and is
at least `threshold`, with a minimum scene length. Its frames are scaled to 256 pixels wide in BGR (bilinear),
what its own pipeline feeds it: several times faster than full frames, no less accurate. A fixed threshold on
the content value alone (`ContentDetector`) missed cuts between scenes that differ mostly in hue (the mean of
the three channels' changes stays under 27: 5 of 60 cuts in `benchmarks/ingest.py`, all found adaptively); the
ratio is also PySceneDetect's answer to fast camera motion, which a fixed threshold takes for cuts. It finds
hard cuts; a slow dissolve or fade can pass unnoticed, and a one-frame flash counts as a cut.

Caps, checked from the header before a frame is decoded: a video longer than `max_seconds` (4 hours by
default) or with frames over the media gate's `MAX_PIXELS` is refused. Both are checked again while decoding,
against headers that lie. A file cut short in a streaming container (MKV, MPEG-TS) gives the scenes of what
can be decoded; a cut-short MP4 has no index and is refused.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from array import array
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING

from agent import _media
from agent.exceptions import MediaError, UserError
from agent.ingest import _decode
from agent.ingest._audio import audio_clip
from agent.ingest._segments import Keyframe, MediaInfo, Scene

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream
    from PIL import Image

    from agent.messages import AudioPart, ImagePart

MAX_KEYFRAME_SIDE = 1344
"""Keyframes are scaled down so that their longer side is at most this: Phi-4's image processor works on a
grid of 448-pixel crops, and 1344 is three of them."""

_DETECT_WIDTH = 256  # PySceneDetect's own default downscale target
_DECODE_ON_SECONDS = 2.0  # a keyframe this close after the last is reached by decoding on, not by seeking


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """What the header of the video at `path` says, without decoding a frame.

    Raises:
        MediaError: the file is not media FFmpeg reads, or has no video stream.
        UserError: PyAV is missing.
    """
    with _decode.open_media(path) as container:
        return _decode.info(container, path)


def detect_scenes(
    path: str | os.PathLike[str],
    *,
    threshold: float = 15.0,
    adaptive_threshold: float = 3.0,
    min_scene_seconds: float = 0.6,
    max_seconds: float = _decode.MAX_VIDEO_SECONDS,
) -> list[Scene]:
    """The scenes of the video at `path`, in order, tiling it from its first frame to its last.

    Args:
        path: the video file.
        threshold: the least content value a cut needs (0-255 scale of the mean HSV change between two
            frames; PySceneDetect's `min_content_val`); lower finds more cuts.
        adaptive_threshold: how many times the average content value of the frames around it a cut's must be.
        min_scene_seconds: the shortest scene: a cut this soon after the last is merged with it (a burst of
            fast cuts or flicker gives one cut, but a single flash still gives one).
        max_seconds: a longer video is refused.

    Raises:
        MediaError: the file is not a readable video, is corrupt, or is over a cap.
        UserError: PyAV or PySceneDetect is missing.
    """
    detector_cls, timecode = _require_scenedetect()
    _decode.require_av()
    from av.video.reformatter import VideoReformatter

    with _decode.open_media(path) as container, _decode.media_errors(path, "decode its video"):
        stream, info, zero = _open_video(container, path, max_seconds)
        rate = Fraction(info.fps).limit_denominator(1001 * 1000)
        detector = detector_cls(
            adaptive_threshold=adaptive_threshold, min_content_val=threshold, min_scene_len=float(min_scene_seconds)
        )
        width, height = _detection_size(info.width, info.height)
        scaler = VideoReformatter()  # one scaler for all frames: a new one per frame costs more than decoding
        times: array[float] = array("d")
        cuts: set[int] = set()
        last_length = 1 / info.fps
        for frame in container.decode(stream):
            index = len(times)
            time = _frame_time(frame, zero, times, info.fps)
            _decode.check_duration(time, max_seconds, path)
            _check_frame(frame, path)
            times.append(time)
            if frame.duration and frame.time_base is not None:
                last_length = float(frame.duration * frame.time_base)
            small = scaler.reformat(
                frame, width=width, height=height, format="bgr24", interpolation="FAST_BILINEAR", threads=1
            )
            image = small.to_ndarray()
            cuts.update(tc.frame_num for tc in detector.process_frame(timecode(index, rate), image))
        if not times:
            raise MediaError(f"{os.fspath(path)}: has no decodable video frame")
        cuts.update(tc.frame_num for tc in detector.post_process(timecode(len(times) - 1, rate)))
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(times)), len(times)]
    end_time = times[-1] + last_length
    return [
        Scene(
            index=i,
            start_frame=a,
            end_frame=b,
            start=times[a],
            end=times[b] if b < len(times) else end_time,
        )
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def keyframes(
    path: str | os.PathLike[str],
    scene: Scene,
    count: int = 1,
    *,
    max_side: int = MAX_KEYFRAME_SIDE,
    max_seconds: float = _decode.MAX_VIDEO_SECONDS,
) -> list[Keyframe]:
    """`count` (1 to 3) frames from inside `scene`, evenly spaced (one: the middle), as JPEG images.

    Each is the first frame at or after its target time, turned as the file's display matrix says (phone
    videos), with non-square pixels made square, and scaled down so that its longer side is at most
    `max_side`.

    Raises:
        MediaError: the file is not a readable video, or is over a cap.
        UserError: `count` is not 1 to 3, or PyAV is missing.
    """
    if not 1 <= count <= 3:
        raise UserError(f"keyframes takes 1 to 3 frames per scene, got count={count}")
    out: list[Keyframe] = []
    with _decode.open_media(path) as container, _decode.media_errors(path, "decode its video"):
        stream, info, zero = _open_video(container, path, max_seconds)
        reader = _Reader(container, stream, zero)
        half = 0.5 / info.fps
        for k in range(count):
            target = scene.start + (k + 1) / (count + 1) * scene.duration
            frame = reader.at(max(scene.start, target - half))
            if frame is None:
                raise MediaError(f"{os.fspath(path)}: has no frame at {target:.3f} s (scene {scene.index})")
            _check_frame(frame, path)
            time = frame.time - zero if frame.time is not None else target
            out.append(Keyframe(time=time, image=_jpeg(_picture(frame, stream, max_side))))
    return out


def scene_audio(path: str | os.PathLike[str], scene: Scene) -> AudioPart | None:
    """The audio of `scene` as a 16 kHz mono `AudioPart` (`audio_clip` over the scene's times).

    Returns:
        The clip, or None when the video has no audio stream (or no audio during the scene).

    Raises:
        MediaError: the file cannot be decoded, or the scene is longer than the media gate admits
            (`agent._media.MAX_AUDIO_SECONDS`; cut long scenes' audio with `segment_audio`).
    """
    return audio_clip(path, scene.start, scene.end)


# ---------------------------------------------------------------- helpers


def _require_scenedetect() -> tuple[type, type]:
    try:
        from scenedetect.common import FrameTimecode
        from scenedetect.detectors import AdaptiveDetector
    except ImportError as exc:
        raise UserError(f"scene detection needs PySceneDetect: pip install 'mmagent[ingest]' ({exc})") from exc
    return AdaptiveDetector, FrameTimecode


def _open_video(
    container: InputContainer, path: str | os.PathLike[str], max_seconds: float
) -> tuple[VideoStream, MediaInfo, float]:
    """The video stream, its header, and the time origin, after the caps (module docstring) are checked."""
    info = _decode.info(container, path)
    _decode.check_duration(info.duration, max_seconds, path)
    _check_pixels(info.width, info.height, path)
    return _decode.video_stream(container, path), info, _decode.origin(container)


def _check_pixels(width: int, height: int, path: str | os.PathLike[str]) -> None:
    if width * height > _media.MAX_PIXELS:
        raise MediaError(
            f"{os.fspath(path)}: frames are {width}x{height} pixels, over the limit of "
            f"{_media.MAX_PIXELS / 1e6:g} megapixels"
        )


def _check_frame(frame: VideoFrame, path: str | os.PathLike[str]) -> None:
    _check_pixels(frame.width, frame.height, path)


def _frame_time(frame: VideoFrame, zero: float, times: array[float], fps: float) -> float:
    """The frame's time from `zero`; where its timestamp is missing or broken (`_decode.WRAP_SECONDS`), a frame
    after the previous one."""
    expected = times[-1] + 1 / fps if times else 0.0
    if frame.time is None or abs(frame.time - zero - expected) > _decode.WRAP_SECONDS:
        return expected
    return frame.time - zero


def _detection_size(width: int, height: int) -> tuple[int, int]:
    """About `_DETECT_WIDTH` wide (never wider than the video), keeping the aspect, both even."""
    if width <= _DETECT_WIDTH:
        return width, height
    scaled = max(2, round(height * _DETECT_WIDTH / width / 2) * 2)
    return _DETECT_WIDTH, scaled


class _Reader:
    """Frames at ascending times: decoding on from the last one taken when the next is near it, else seeking to
    the keyframe before it; from the start when the target is near it or the seek found nothing before it
    (MPEG-TS seeks by byte position: it may land past the target, or where nothing decodes until the next
    keyframe)."""

    def __init__(self, container: InputContainer, stream: VideoStream, zero: float) -> None:
        self.container, self.stream, self.zero = container, stream, zero
        self.frames: Iterator[VideoFrame] | None = None
        self.time = -math.inf  # of the last frame taken

    def at(self, target: float) -> VideoFrame | None:
        if self.frames is not None and self.time <= target <= self.time + _DECODE_ON_SECONDS:
            frame = self._to(target)[0]
            if frame is not None:
                return frame
        if target > 1.0:
            self._seek(target)
            frame, overshot = self._to(target)
            if frame is not None and not overshot:
                return frame
        self._seek(0.0)
        return self._to(target)[0]

    def _seek(self, target: float) -> None:
        _decode.seek(self.container, self.stream, self.zero + target)
        self.frames = iter(self.container.decode(self.stream))
        self.time = -math.inf

    def _to(self, target: float) -> tuple[VideoFrame | None, bool]:
        """The first frame at or after `target`, and whether the first frame decoded was already past it."""
        first = True
        for frame in self.frames or ():
            time = frame.time - self.zero if frame.time is not None else None
            if time is None or time >= target - 1e-6:
                self.time = time if time is not None else target
                return frame, first and time is not None and time > target + 1e-6
            first = False
        self.frames = None
        return None, False


def _jpeg(image: Image.Image) -> ImagePart:
    """JPEG at quality 90: a frame of lossy video gains nothing from PNG, which is 10 times larger and slower
    to encode (0.2-0.6 s for a 720p frame), and the bytes pass the media gate like any other image."""
    from agent.messages import ImagePart

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return ImagePart(data=data, media_type=_media.check_image(data))


def _picture(frame: VideoFrame, stream: VideoStream, max_side: int) -> Image.Image:
    """The frame as an RGB image the way a player shows it, no side over `max_side`."""
    from PIL import Image

    width, height = frame.width, frame.height
    aspect = stream.codec_context.sample_aspect_ratio
    if aspect is not None and aspect > 0 and aspect != 1:
        width = max(1, round(width * aspect))
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
    image = Image.fromarray(rgb.to_ndarray())
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    rotation = round((frame.rotation or 0) / 90) * 90 % 360  # counterclockwise, as PIL turns
    return image.transpose(turn[rotation]) if rotation in turn else image
