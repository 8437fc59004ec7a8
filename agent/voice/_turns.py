"""Turn detection: a voice-activity model over 32 ms frames, and the state machine that cuts a stream into turns.

`TurnDetector.feed()` takes audio at any rate in chunks of any size, resamples it once to 16 kHz with a streaming
resampler (PyAV's, which carries its filter state across chunks), and runs the VAD frame by frame. Events come out
in stream order as soon as the frame that decides them has been fed:

```
probability >= threshold for min_speech s      -> SpeechStarted(at=start of that run)
probability <  threshold - 0.15 for end_of_turn -> SpeechStopped(at=start of the silence), Turn(audio)
a turn reaching max_turn s                      -> SpeechStopped, Turn (cut there; detection goes on)
```

Times are seconds of stream time (16 kHz samples fed so far), so a SpeechStarted is reported `min_speech` after the
speech began and a SpeechStopped `end_of_turn` after it ended; both are emitted within one frame of being decided.
"""

from __future__ import annotations

import abc
import importlib.util
import math
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from agent.exceptions import ModelLoadError, UserError

if TYPE_CHECKING:
    import av.audio.resampler

__all__ = [
    "TARGET_RATE",
    "SileroVAD",
    "SpeechStarted",
    "SpeechStopped",
    "Turn",
    "TurnDetector",
    "TurnEvent",
    "VoiceActivity",
]

TARGET_RATE = 16_000
"""The rate turns are detected and delivered at (Hz)."""

_INSTALL = "pip install 'mmagent[voice]'"
_HYSTERESIS = 0.15  # speech ends below threshold - this
_TRAIL = 0.1  # seconds of silence kept after the end of a turn
_MIN_RATE, _MAX_RATE = 1_000, 1_000_000
_MAX_CHANNELS = 64


class VoiceActivity(abc.ABC):
    """A voice-activity detector: the probability of speech in each fixed-size frame of 16 kHz mono audio.

    Implementations may keep state between frames (silero's model does); `reset()` forgets it.
    """

    frame_samples: int
    """Samples per frame at 16 kHz (512 for silero: 32 ms)."""

    @abc.abstractmethod
    def probability(self, frame: npt.NDArray[np.float32]) -> float:
        """The probability (0-1) that `frame` (exactly `frame_samples` samples in [-1, 1]) holds speech."""

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless detectors need nothing
        """Forget the state carried between frames (a new stream starts)."""


class SileroVAD(VoiceActivity):
    """Silero VAD v6, the TorchScript model shipped inside the `silero-vad` package, on the CPU. Nothing is downloaded.

    The model file is read from the installed package without importing it: `import silero_vad` sets torch's
    thread count to 1 for the whole process, which would slow any model running beside it. A 512-sample frame is
    too small for torch to split across threads, so inference runs on one thread anyway (about 0.15 ms a frame).

    Raises:
        UserError: torch or silero-vad is not installed.
        ModelLoadError: the packaged model cannot be loaded.
    """

    frame_samples = 512

    def __init__(self) -> None:
        try:
            import torch
        except ImportError as e:
            raise UserError(f"SileroVAD needs torch and silero-vad: {_INSTALL}") from e
        spec = importlib.util.find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"SileroVAD needs the silero-vad package: {_INSTALL}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
        if not path.is_file():
            raise ModelLoadError(f"silero-vad is installed but its model is missing: {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                jit: Any = torch.jit  # its load() is untyped
                model = jit.load(str(path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load silero-vad's model {path}: {e}") from e
        model.eval()
        self._torch = torch
        self._model: Any = model

    def probability(self, frame: npt.NDArray[np.float32]) -> float:
        """The probability of speech in one 512-sample frame at 16 kHz."""
        if frame.shape != (self.frame_samples,):
            raise UserError(f"SileroVAD takes frames of {self.frame_samples} samples, got shape {frame.shape}")
        tensor = self._torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)).unsqueeze(0)
        with self._torch.inference_mode():
            return float(self._model(tensor, TARGET_RATE).item())

    def reset(self) -> None:
        """Forget the model's recurrent state."""
        self._model.reset_states()


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The user started speaking.

    Attributes:
        at: stream time (s) at which the speech began; the event comes `min_speech` later.
    """

    at: float


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The user stopped speaking; a `Turn` follows at once.

    Attributes:
        at: stream time (s) at which the speech ended (or was cut at `max_turn`).
    """

    at: float


@dataclass(frozen=True, slots=True, eq=False)
class Turn:
    """One user turn: 16 kHz mono audio from `pre_roll` before `start` to about 0.1 s after `end`.

    Compared by identity (its samples are an array).

    Attributes:
        samples: the audio, float32 in [-1, 1].
        rate: its sample rate (always `TARGET_RATE`).
        start: stream time (s) at which the speech began.
        end: stream time (s) at which it ended.
    """

    samples: npt.NDArray[np.float32]
    rate: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        """Seconds of audio in `samples`."""
        return len(self.samples) / self.rate


TurnEvent: TypeAlias = SpeechStarted | SpeechStopped | Turn


class _Resampler:
    """PyAV's libswresample to 16 kHz mono float, streaming: the filter state carries across chunks."""

    def __init__(self, rate: int) -> None:
        try:
            import av
        except ImportError as e:
            raise UserError(f"resampling {rate} Hz audio needs PyAV: {_INSTALL}") from e
        self._av = av
        self.rate = rate
        self._resampler: av.audio.resampler.AudioResampler = av.AudioResampler(
            format="flt", layout="mono", rate=TARGET_RATE
        )

    def push(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        frame = self._av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.rate
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> npt.NDArray[np.float32]:
        return self._collect(self._resampler.resample(None))

    @staticmethod
    def _collect(frames: list[Any]) -> npt.NDArray[np.float32]:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)


def _mono_float(samples: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Any int or float array, 1-D or (n, channels), as finite mono float32 in [-1, 1]; NaN and inf become 0."""
    try:
        array = np.asarray(samples)
    except (ValueError, TypeError) as e:  # ragged nested lists, objects numpy cannot read
        raise UserError(f"audio samples cannot be read as an array: {e}") from None
    if array.ndim == 0 or array.ndim > 2:
        raise UserError(f"audio must be 1-D or (samples, channels), got shape {array.shape}")
    if array.ndim == 2 and array.shape[1] > _MAX_CHANNELS:
        raise UserError(f"audio of shape {array.shape} has {array.shape[1]} channels: pass (samples, channels)")
    kind = array.dtype.kind
    if kind == "f":
        out = array.astype(np.float32)
    elif kind == "i":
        out = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    elif kind == "u":
        middle = float(np.iinfo(array.dtype).max + 1) / 2
        out = (array.astype(np.float32) - middle) / middle
    else:
        raise UserError(f"audio samples must be integers or floats, got dtype {array.dtype}")
    if out.ndim == 2:
        out = out.mean(axis=1, dtype=np.float32) if out.shape[1] else np.zeros(len(out), np.float32)
    out[~np.isfinite(out)] = 0.0
    return np.clip(out, -1.0, 1.0, out=out)


class TurnDetector:
    """Cuts a live audio stream into user turns.

    The five settings can also be changed between calls (`detector.end_of_turn = 0.8`); they take effect from
    the next frame.

    Args:
        vad: the voice-activity detector; `SileroVAD()` by default.
        threshold: speech probability that starts speech; speech ends below `threshold - 0.15`.
        end_of_turn: seconds of non-speech that end a turn.
        min_speech: seconds of speech needed before `SpeechStarted` (shorter blips are ignored).
        pre_roll: seconds of audio kept before the start of each turn.
        max_turn: a turn this long is cut there and delivered; detection continues.

    Raises:
        UserError: a setting is out of range, or the default VAD is not installed.
    """

    def __init__(
        self,
        vad: VoiceActivity | None = None,
        *,
        threshold: float = 0.5,
        end_of_turn: float = 0.6,
        min_speech: float = 0.2,
        pre_roll: float = 0.3,
        max_turn: float = 30.0,
    ) -> None:
        self._min_speech = 0
        self.threshold = threshold
        self.end_of_turn = end_of_turn
        self.max_turn = max_turn
        self.min_speech = min_speech
        self.pre_roll = pre_roll
        self._vad = vad if vad is not None else SileroVAD()
        self._frame = int(self._vad.frame_samples)
        if self._frame <= 0:
            raise UserError(f"the VAD's frame_samples must be > 0, got {self._frame}")
        self._trail = _samples(_TRAIL)
        self._resampler: _Resampler | None = None
        self._holding = False  # the last audio came through hold()
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples short of a frame
        self._pos = 0  # stream index (16 kHz samples) of the next frame
        self._consumed = 0.0  # seconds of input audio fed
        self._history: deque[tuple[int, npt.NDArray[np.float32]]] = deque()  # (stream index, audio)
        self._held: int | None = None  # stream index where held audio begins
        self._candidate: int | None = None  # start of a run of speech not yet min_speech long
        self._onset: int | None = None  # start of the first run of speech (a blip, or the candidate) since a pause
        self._quiet = 0  # end of the last blip
        self._speech: int | None = None  # start of the current speech
        self._silence: int | None = None  # start of the current run of non-speech inside speech

    # ---------------------------------------------------------------- settings

    @property
    def threshold(self) -> float:
        """Speech probability that starts speech (0-1); speech ends below `threshold - 0.15`."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise UserError(f"threshold must be in (0, 1], got {value}")
        self._threshold = float(value)

    @property
    def end_of_turn(self) -> float:
        """Seconds of non-speech that end a turn."""
        return self._end_of_turn / TARGET_RATE

    @end_of_turn.setter
    def end_of_turn(self, value: float) -> None:
        if not 0.0 < value <= 60.0:
            raise UserError(f"end_of_turn must be in (0, 60] seconds, got {value}")
        self._end_of_turn = _samples(value)

    @property
    def min_speech(self) -> float:
        """Seconds of speech needed before `SpeechStarted`."""
        return self._min_speech / TARGET_RATE

    @min_speech.setter
    def min_speech(self, value: float) -> None:
        if not 0.0 <= value < self.max_turn:
            raise UserError(f"min_speech must be >= 0 and below max_turn ({self.max_turn}), got {value}")
        self._min_speech = _samples(value)

    @property
    def pre_roll(self) -> float:
        """Seconds of audio kept before the start of each turn."""
        return self._pre_roll / TARGET_RATE

    @pre_roll.setter
    def pre_roll(self, value: float) -> None:
        if not 0.0 <= value <= 10.0:
            raise UserError(f"pre_roll must be in [0, 10] seconds, got {value}")
        self._pre_roll = _samples(value)

    @property
    def max_turn(self) -> float:
        """Seconds after which a turn is cut."""
        return self._max_turn / TARGET_RATE

    @max_turn.setter
    def max_turn(self, value: float) -> None:
        if not 0.0 < value <= 3600.0 or value <= self.min_speech:
            raise UserError(f"max_turn must be in (0, 3600] seconds and above min_speech, got {value}")
        self._max_turn = _samples(value)

    # ------------------------------------------------------------------- state

    @property
    def in_speech(self) -> bool:
        """Whether the user is speaking (between `SpeechStarted` and `SpeechStopped`)."""
        return self._speech is not None

    @property
    def time(self) -> float:
        """Seconds of audio fed (or held) so far."""
        return self._consumed

    # ------------------------------------------------------------------- input

    def feed(self, samples: npt.ArrayLike, rate: int) -> list[TurnEvent]:
        """Feed the next chunk of the stream; returns the events it decides, in stream order.

        Args:
            samples: int or float audio, 1-D (mono) or (samples, channels), any length (empty is fine). Channels
                are averaged; integers are scaled to [-1, 1]; NaN and infinite samples count as silence.
            rate: its sample rate in Hz; may change between calls.

        Raises:
            UserError: a rate out of [1 kHz, 1 MHz], or samples that are not audio.
        """
        audio, events = self._take(samples, rate, holding=False)
        if len(audio):
            events += self._consume(audio)
        return events

    def hold(self, samples: npt.ArrayLike, rate: int) -> None:
        """Buffer audio for a turn its caller ends (push-to-talk, turn detection off): no VAD, no events.

        `flush()` delivers the held audio as one `Turn` (with any speech in progress, which it continues);
        `clear()` drops it. Takes the same input as `feed()`. Audio fed after held audio joins the next turn.
        """
        audio, _ = self._take(samples, rate, holding=True)
        self._keep(audio, held=True)

    def flush(self) -> list[TurnEvent]:
        """End the turn now: end of stream, or a manual commit. The detector then starts afresh (times go on).

        Returns:
            SpeechStopped and Turn for speech in progress (with any held audio after it); a lone Turn for held
            audio without detected speech; nothing otherwise.
        """
        events: list[TurnEvent] = []
        if self._resampler is not None:
            events += self._drain(self._resampler)
            self._resampler = None
        self._keep(np.zeros(0, np.float32), held=False)  # the partial frame joins the history
        if self._speech is not None:
            end_of_speech = self._silence if self._silence is not None and self._held is None else self._pos
            events += self._finish(end_of_speech, self._pos)
        elif self._held is not None:
            audio = self._audio(self._held, self._pos)
            events.append(Turn(audio, TARGET_RATE, start=self._held / TARGET_RATE, end=self._pos / TARGET_RATE))
        self._reset()
        return events

    def clear(self) -> None:
        """Drop the audio not yet delivered in a turn (held audio, speech in progress) without any event."""
        self._reset()

    # ---------------------------------------------------------------- internal

    def _take(
        self, samples: npt.ArrayLike, rate: int, *, holding: bool
    ) -> tuple[npt.NDArray[np.float32], list[TurnEvent]]:
        """Check and convert input, resample it to 16 kHz; events from audio the resampler held back."""
        if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or not _MIN_RATE <= rate <= _MAX_RATE:
            raise UserError(f"rate must be an integer from {_MIN_RATE} to {_MAX_RATE} Hz, got {rate!r}")
        rate = int(rate)
        audio = _mono_float(samples)
        events: list[TurnEvent] = []
        if self._resampler is not None and self._resampler.rate != rate:
            events += self._drain(self._resampler)
            self._resampler = None
        if rate != TARGET_RATE and self._resampler is None:
            self._resampler = _Resampler(rate)
        self._holding = holding
        self._consumed += len(audio) / rate
        if len(audio) and self._resampler is not None:
            audio = self._resampler.push(audio)
        return audio, events

    def _drain(self, resampler: _Resampler) -> list[TurnEvent]:
        """Take the audio a resampler still holds, the way its input came (fed or held)."""
        rest = resampler.flush()
        if self._holding:
            self._keep(rest, held=True)
            return []
        return self._consume(rest)

    def _keep(self, audio: npt.NDArray[np.float32], *, held: bool) -> None:
        """Append audio to the history without running the VAD (held audio, or the last partial frame)."""
        if len(self._pending):
            audio = np.concatenate([self._pending, audio])
            self._pending = np.zeros(0, np.float32)
        if len(audio):
            if held and self._held is None:
                self._held = self._pos
            self._history.append((self._pos, audio))
            self._pos += len(audio)

    def _consume(self, audio: npt.NDArray[np.float32]) -> list[TurnEvent]:
        if len(self._pending):
            audio = np.concatenate([self._pending, audio])
        whole = len(audio) - len(audio) % self._frame
        events: list[TurnEvent] = []
        for offset in range(0, whole, self._frame):
            events += self._step(audio[offset : offset + self._frame].copy())
        self._pending = audio[whole:].copy()
        return events

    def _step(self, frame: npt.NDArray[np.float32]) -> list[TurnEvent]:
        start = self._pos
        end = start + self._frame
        self._pos = end
        self._history.append((start, frame))
        p = self._vad.probability(frame)
        p = float(p) if math.isfinite(p) else 0.0
        events: list[TurnEvent] = []
        if self._speech is None:
            # A blip too short to count (a run under min_speech) followed within end_of_turn by speech belongs to
            # it: the speech starts at the blip (a first word is often cut off from the rest this way).
            if self._candidate is None and self._onset is not None and start - self._quiet >= self._end_of_turn:
                self._onset = None
            if self._candidate is None:
                if p >= self._threshold:
                    self._candidate = start
                    self._onset = start if self._onset is None else self._onset
            elif p < self._threshold - _HYSTERESIS:
                self._candidate, self._quiet = None, start
            if self._candidate is not None and end - self._candidate >= self._min_speech:
                self._speech = self._onset if self._onset is not None else self._candidate
                self._candidate = self._onset = self._silence = None
                events.append(SpeechStarted(at=self._speech / TARGET_RATE))
        else:
            if p >= self._threshold - _HYSTERESIS:
                self._silence = None
            elif self._silence is None:
                self._silence = start
            if self._silence is not None and end - self._silence >= self._end_of_turn:
                events += self._finish(self._silence, end)
            elif end - self._speech >= self._max_turn:
                events += self._finish(self._silence if self._silence is not None else end, end)
        self._trim()
        return events

    def _finish(self, stop: int, now: int) -> list[TurnEvent]:
        """Close the current speech at stream index `stop`; `now` is the end of the audio seen."""
        assert self._speech is not None
        begin = max(self._speech - self._pre_roll, 0)
        if self._held is not None:
            begin = min(begin, self._held)
        samples = self._audio(begin, min(stop + self._trail, now))
        turn = Turn(samples=samples, rate=TARGET_RATE, start=self._speech / TARGET_RATE, end=stop / TARGET_RATE)
        self._speech = self._silence = self._candidate = self._onset = self._held = None
        return [SpeechStopped(at=stop / TARGET_RATE), turn]

    def _audio(self, begin: int, until: int) -> npt.NDArray[np.float32]:
        """The history's samples from stream index `begin` to `until`."""
        parts = [
            audio[max(begin - at, 0) : until - at]
            for at, audio in self._history
            if at < until and at + len(audio) > begin
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _trim(self) -> None:
        """Drop audio no future turn can need."""
        anchor = self._speech if self._speech is not None else self._onset
        keep_from = (anchor if anchor is not None else self._pos) - self._pre_roll
        if self._held is not None:
            keep_from = min(keep_from, self._held)
        while self._history and self._history[0][0] + len(self._history[0][1]) <= keep_from:
            self._history.popleft()

    def _reset(self) -> None:
        """Forget all audio and detection state; the stream position and the resampler's state stay."""
        self._pos += len(self._pending)
        self._pending = np.zeros(0, np.float32)
        self._history.clear()
        self._held = self._candidate = self._onset = self._speech = self._silence = None
        self._vad.reset()


def _samples(seconds: float) -> int:
    return round(seconds * TARGET_RATE)
