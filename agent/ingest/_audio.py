"""Audio: clips of a file's audio track for the model, and windows cut on silence.

`segment_audio` plans windows for speech recognition. Phi-4 hears at most 30 s at a time, and a recogniser
does best with whole utterances and as much context as fits, so the plan packs utterances into windows of at
most `max_seconds`, cutting only in pauses:

1. The signal is measured in 10 ms blocks (RMS, in dB). A block is silent when it is more than
   `-threshold_db` dB below the recording's loud parts (its 50th loudest block, so that a click or a clap
   does not set the scale), or digitally silent (under -120 dBFS). Relative to the recording, so a quiet
   recording is not taken for silence.
2. Silent runs of at least `min_silence` seconds separate utterances; shorter pauses stay inside them.
   Leading, trailing and separating silence is left out of the windows; an all-silent signal has none.
3. Utterances are packed greedily into windows of at most `max_seconds`: a window ends where the next
   utterance would not fit, so every cut falls in a pause.
4. An utterance longer than `max_seconds` is split in its last half-window: at the middle of its longest
   short pause there, else at its quietest 10 ms when that is at least 6 dB under the half-window's median
   (a breath), else at exactly `max_seconds` (a fixed window: music, a tone).
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from agent import _media
from agent.exceptions import MediaError, UserError
from agent.ingest import _decode
from agent.ingest._segments import AudioSegment

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from av.audio.stream import AudioStream
    from av.container import InputContainer

    from agent.messages import AudioPart

_BLOCKS_PER_SECOND = 100  # 10 ms blocks
_DIP_DB = 6.0
_SILENT_DB = -120.0  # a block this quiet is digital silence whatever the peak
_LOUD_BLOCKS = 50  # the reference level is the recording's loudest half second


# ---------------------------------------------------------------- decoding


def _frames(
    container: InputContainer, stream: AudioStream, zero: float, clock: float = 0.0
) -> Iterator[tuple[float, npt.NDArray[np.float32], int]]:
    """(start seconds from `zero`, mono samples, rate) per decoded frame, from where the stream is (`clock`
    seconds: 0, or where it was sought to); where a timestamp is missing or broken (`_decode.WRAP_SECONDS`),
    the frame follows the previous one."""
    for frame in container.decode(stream):
        if frame.samples == 0:
            continue
        start = frame.time - zero if frame.time is not None else clock
        if abs(start - clock) > _decode.WRAP_SECONDS:
            start = clock
        clock = start + frame.samples / frame.sample_rate
        yield start, _decode.mono(frame), frame.sample_rate


def audio_clip(path: str | os.PathLike[str], start: float, end: float) -> AudioPart | None:
    """The audio of `path` from `start` to `end` seconds as a 16 kHz mono `AudioPart`.

    Seconds count from the start of the video stream (or of the audio, in a file without video), as scene
    times do. Where the audio starts after `start`, the clip begins with silence, so it stays aligned.

    Returns:
        The clip, or None when the file has no audio stream or no audio in that span.

    Raises:
        MediaError: the file cannot be decoded, or the span is longer than the media gate admits
            (`agent._media.MAX_AUDIO_SECONDS`).
        UserError: `end` is not after `start`, or PyAV is missing.
    """
    from agent.messages import AudioPart

    samples = _read(path, start, end)
    if samples is None:
        return None
    return AudioPart.from_samples(samples, _media.TARGET_SAMPLE_RATE)


def _read(path: str | os.PathLike[str], start: float, end: float) -> npt.NDArray[np.float32] | None:
    import numpy as np

    if not end > start >= 0:
        raise UserError(f"an audio span needs 0 <= start < end, got {start}..{end}")
    if end - start > _media.MAX_AUDIO_SECONDS:
        raise MediaError(
            f"{os.fspath(path)}: a {end - start:.0f} s audio clip is over the media gate's limit of "
            f"{_media.MAX_AUDIO_SECONDS} s; cut it with segment_audio"
        )
    with _decode.open_media(path) as container, _decode.media_errors(path, "decode its audio"):
        stream = _decode.audio_stream(container)
        if stream is None:
            return None
        zero = _decode.origin(container)
        found = _span(container, stream, zero, start, end, seek=start > 1.0)
        if found is None:  # the seek landed after `start`, or on nothing: read from the beginning instead
            _decode.seek(container, stream, zero)
            found = _span(container, stream, zero, start, end, seek=False)
    if found is None:
        return None
    pieces, first, rate = found
    if not pieces:
        return None
    samples = np.concatenate(pieces)
    lead = round((first - start) * rate)
    if lead > 0:
        samples = np.concatenate([np.zeros(lead, np.float32), samples])
    return _media.resample(samples, rate, _media.TARGET_SAMPLE_RATE)


def _span(
    container: InputContainer, stream: AudioStream, zero: float, start: float, end: float, *, seek: bool
) -> tuple[list[npt.NDArray[np.float32]], float, int] | None:
    """The samples overlapping [start, end), the time of the first one, and the rate; None after a bad seek."""
    if seek:
        _decode.seek(container, stream, zero + start - 1.0)
    pieces: list[npt.NDArray[np.float32]] = []
    first: float | None = None
    rate = 0
    for t, samples, frame_rate in _frames(container, stream, zero, start - 1.0 if seek else 0.0):
        if seek and first is None and t > start + 1e-3:
            return None
        if first is None:
            first = t
        if rate and frame_rate != rate:
            raise ValueError(f"the sample rate changes mid-stream ({rate} Hz to {frame_rate} Hz)")
        rate = frame_rate
        if t + len(samples) / rate <= start:
            continue
        if t >= end:
            break
        lo = max(0, round((start - t) * rate))
        hi = min(len(samples), round((end - t) * rate))
        if not pieces:
            first = t + lo / rate
        if hi > lo:
            pieces.append(samples[lo:hi])
    if seek and first is None:
        return None
    return pieces, start if first is None else first, rate


# ---------------------------------------------------------------- segmentation


def segment_audio(
    source: str | os.PathLike[str] | npt.NDArray[Any] | Sequence[float],
    rate: int | None = None,
    *,
    max_seconds: float = 30.0,
    min_silence: float = 0.5,
    threshold_db: float = -40.0,
    max_file_seconds: float = _decode.MAX_VIDEO_SECONDS,
) -> list[AudioSegment]:
    """Windows of speech (or any sound) of at most `max_seconds`, cut in pauses (see the module docstring).

    Args:
        source: mono samples (or (frames, channels), mixed down) with their `rate`, or the path of an audio or
            video file, whose first audio track is read in one streaming pass.
        rate: the samples' rate in Hz; must be None for a path (windows of a file are at 16 kHz).
        max_seconds: the longest window (Phi-4's speech window is 30 s).
        min_silence: the shortest pause, in seconds, that separates two utterances.
        threshold_db: how far under the loudest 10 ms a block must be to count as silence (negative dB).
        max_file_seconds: a file longer than this is refused (from its header, or while decoding).

    Returns:
        The windows in order, not overlapping; empty for silence or a file without audio.

    Raises:
        MediaError: the file cannot be decoded or is too long.
        UserError: bad arguments, or PyAV is missing (a path).
    """
    if max_seconds <= 0 or min_silence < 0 or threshold_db >= 0:
        raise UserError(
            f"segment_audio needs max_seconds > 0, min_silence >= 0 and threshold_db < 0, got {max_seconds}, "
            f"{min_silence}, {threshold_db}"
        )
    if isinstance(source, str | os.PathLike):
        if rate is not None:
            raise UserError("segment_audio reads a file's own sample rate: pass rate only with samples")
        levels, total = _file_levels(source, max_file_seconds)
        out_rate = _media.TARGET_SAMPLE_RATE
        total = math.floor(total * out_rate)
    else:
        if rate is None or rate <= 0:
            raise UserError(f"segment_audio needs the samples' rate in Hz, got {rate}")
        samples = _as_mono(source)
        levels, total, out_rate = _levels([samples], rate), len(samples), rate
    plan = _plan(
        levels,
        max_blocks=max(1, math.floor(max_seconds * _BLOCKS_PER_SECOND)),
        min_silence_blocks=max(1, math.ceil(min_silence * _BLOCKS_PER_SECOND)),
        threshold_db=threshold_db,
    )
    longest = math.floor(max_seconds * out_rate)  # block edges fall between samples at rates like 22.05 kHz
    segments = []
    for a, b in plan:
        lo = _boundary(a, out_rate)
        hi = min(total, _boundary(b, out_rate), lo + longest)
        if hi > lo:
            segments.append(AudioSegment(start_sample=lo, end_sample=hi, rate=out_rate))
    return segments


def _boundary(block: int, rate: int) -> int:
    """The first sample of 10 ms block `block` at `rate` Hz."""
    return -((-block * rate) // _BLOCKS_PER_SECOND)


def _as_mono(source: npt.NDArray[Any] | Sequence[float]) -> npt.NDArray[np.float32]:
    import numpy as np

    array_ = np.asarray(source, dtype=np.float32)
    if array_.ndim == 2:
        array_ = array_.mean(axis=1)
    if array_.ndim != 1:
        raise UserError(f"segment_audio needs samples of shape (n,) or (n, channels), got {array_.shape}")
    return np.nan_to_num(array_, nan=0.0, posinf=0.0, neginf=0.0)


class _Meter:
    """Mean square per 10 ms block, fed chunk by chunk (block k holds the samples in [k/100, (k+1)/100) s)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.seen = 0
        self.sums: array[float] = array("d")
        self.counts: array[float] = array("d")

    def feed(self, samples: npt.NDArray[np.float32]) -> None:
        import numpy as np

        if not len(samples):
            return
        index = np.arange(self.seen, self.seen + len(samples), dtype=np.int64) * _BLOCKS_PER_SECOND // self.rate
        first = int(index[0])
        squares = samples.astype(np.float64) ** 2
        sums = np.bincount(index - first, weights=squares)
        counts = np.bincount(index - first).astype(np.float64)
        if first < len(self.sums):  # the first block continues the last one
            self.sums[first] += float(sums[0])
            self.counts[first] += float(counts[0])
            sums, counts = sums[1:], counts[1:]
        self.sums.extend(sums.tolist())
        self.counts.extend(counts.tolist())
        self.seen += len(samples)

    def silence(self, samples: int) -> None:
        """Feed `samples` zeros, a block at a time."""
        import numpy as np

        while samples > 0:
            n = min(samples, 1 << 20)
            self.feed(np.zeros(n, np.float32))
            samples -= n

    def levels(self) -> npt.NDArray[np.float64]:
        import numpy as np

        sums = np.frombuffer(self.sums, dtype=np.float64)
        counts = np.maximum(np.frombuffer(self.counts, dtype=np.float64), 1.0)
        return np.asarray(10.0 * np.log10(sums / counts + 1e-20), dtype=np.float64)


def _levels(chunks: Sequence[npt.NDArray[np.float32]], rate: int) -> npt.NDArray[np.float64]:
    meter = _Meter(rate)
    for chunk in chunks:
        meter.feed(chunk)
    return meter.levels()


def _file_levels(path: str | os.PathLike[str], max_seconds: float) -> tuple[npt.NDArray[np.float64], float]:
    """Block levels of a file's first audio track, aligned so that block 0 starts at the ingestion origin
    (`_decode.origin`: samples before it are dropped, a late start is padded with silence), and its length."""
    import numpy as np

    with _decode.open_media(path) as container, _decode.media_errors(path, "decode its audio"):
        stream = _decode.audio_stream(container)
        if stream is None:
            return np.zeros(0), 0.0
        _decode.check_duration(_decode.declared_duration(container, stream), max_seconds, path)
        meter: _Meter | None = None
        skip = 0
        for t, samples, rate in _frames(container, stream, _decode.origin(container)):
            if meter is None:
                meter = _Meter(rate)
                _decode.check_duration(t, max_seconds, path)
                meter.silence(round(t * rate))
                skip = max(0, round(-t * rate))
            elif rate != meter.rate:
                raise ValueError(f"the sample rate changes mid-stream ({meter.rate} Hz to {rate} Hz)")
            if skip:
                samples, skip = samples[skip:], max(0, skip - len(samples))
            meter.feed(samples)
            _decode.check_duration(meter.seen / rate, max_seconds, path)
    if meter is None:
        return np.zeros(0), 0.0
    return meter.levels(), meter.seen / meter.rate


def _plan(
    levels: npt.NDArray[np.float64], *, max_blocks: int, min_silence_blocks: int, threshold_db: float
) -> list[tuple[int, int]]:
    """Windows as (first block, end block) over `levels` (dB per 10 ms block): steps 2-4 of the module docstring."""
    import numpy as np

    if not len(levels) or float(levels.max()) <= _SILENT_DB:
        return []
    rank = min(len(levels), _LOUD_BLOCKS)
    loud = float(np.partition(levels, -rank)[-rank])
    silent = levels < max(loud + threshold_db, _SILENT_DB)
    utterances = _utterances(silent, min_silence_blocks)
    windows: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for a, b in utterances:
        if current is not None and b - current[0] <= max_blocks:
            current = (current[0], b)
            continue
        if current is not None:
            windows.append(current)
        while b - a > max_blocks:
            end, a_next = _cut(levels, silent, a, a + max_blocks)
            windows.append((a, end))
            a = a_next
        current = (a, b)
    if current is not None:
        windows.append(current)
    return windows


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(start, end) of each run of True in `mask`."""
    import numpy as np

    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _utterances(silent: npt.NDArray[np.bool_], min_silence_blocks: int) -> list[tuple[int, int]]:
    """Sounding stretches: silent runs shorter than `min_silence_blocks` inside the signal are bridged."""
    gaps = silent.copy()
    for a, b in _runs(silent):
        if b - a < min_silence_blocks and a > 0 and b < len(silent):
            gaps[a:b] = False
    return _runs(~gaps)


def _cut(levels: npt.NDArray[np.float64], silent: npt.NDArray[np.bool_], a: int, limit: int) -> tuple[int, int]:
    """Where to split an utterance that starts at block `a` and runs past `limit` (step 4): the end of the
    window and the start of the next (apart when the cut falls in a pause, which neither window keeps)."""
    import numpy as np

    lo = a + max(1, (limit - a) // 2)  # > a: every window holds at least one block
    if lo >= limit:
        return limit, limit
    pauses = [(b - s, s, b) for s, b in _runs(silent[lo:limit])]
    if pauses:
        _, s, b = max(pauses)  # the longest, the latest of equals
        return lo + s, lo + b
    window = levels[lo:limit]
    quietest = lo + int(np.flatnonzero(window == window.min())[-1])
    if levels[quietest] <= float(np.median(window)) - _DIP_DB:
        return quietest, quietest
    return limit, limit
