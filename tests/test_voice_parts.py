"""The parts of the voice loop: turn detection, sentence splitting, speakers.

Real speech comes from examples/data/request.wav (synthetic, 4.06 s at 16 kHz); streams around it are built here.
The state machine is tested with a scripted energy VAD (exact, no model); silero-vad and espeak-ng tests skip
with a reason where those are not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from scipy.signal import resample_poly

import agent.voice
from agent.exceptions import ModelError, UserError
from agent.voice import (
    TARGET_RATE,
    EspeakSpeaker,
    KokoroSpeaker,
    SentenceSplitter,
    SpeechStarted,
    SpeechStopped,
    ToneSpeaker,
    Turn,
    TurnDetector,
    TurnEvent,
    VoiceActivity,
    choose_speaker,
    frames,
)
from agent.voice._speaker import _kokoro_folder
from agent.voice._turns import _Resampler

CLIP = Path(__file__).resolve().parents[1] / "examples" / "data" / "request.wav"
FRAME = 512 / TARGET_RATE

needs_silero = pytest.mark.skipif(
    importlib.util.find_spec("silero_vad") is None or importlib.util.find_spec("torch") is None,
    reason="silero-vad and torch are not installed (pip install 'mmagent[voice]')",
)
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV is not installed")


# ----------------------------------------------------------------------------------------------- helpers


class EnergyVAD(VoiceActivity):
    """A deterministic VAD for the state machine: speech wherever the frame's RMS is above 0.01."""

    frame_samples = 512

    def __init__(self) -> None:
        self.frames = 0
        self.resets = 0

    def probability(self, frame: npt.NDArray[np.float32]) -> float:
        assert frame.shape == (512,) and np.isfinite(frame).all()
        self.frames += 1
        return 1.0 if float(np.sqrt(np.mean(frame**2))) > 0.01 else 0.0

    def reset(self) -> None:
        self.resets += 1


def tone(seconds: float, rate: int = TARGET_RATE, hz: float = 300.0) -> npt.NDArray[np.float32]:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def quiet(seconds: float, rate: int = TARGET_RATE) -> npt.NDArray[np.float32]:
    return np.zeros(round(seconds * rate), np.float32)


def turns(events: list[TurnEvent]) -> list[Turn]:
    return [e for e in events if isinstance(e, Turn)]


def kinds(events: list[TurnEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def feed_in_chunks(detector: TurnDetector, audio: npt.ArrayLike, rate: int, seconds: float) -> list[TurnEvent]:
    samples = np.asarray(audio)
    step = max(1, round(seconds * rate))
    events: list[TurnEvent] = []
    for begin in range(0, len(samples), step):
        events += detector.feed(samples[begin : begin + step], rate)
    return [*events, *detector.flush()]


@pytest.fixture(scope="module")
def speech() -> tuple[npt.NDArray[np.float32], float, float]:
    """The clip, and where its speech starts and ends (s) by its energy."""
    clip, rate = sf.read(CLIP, dtype="float32")
    assert rate == TARGET_RATE
    loud = np.flatnonzero(np.abs(clip) > 0.02)
    return clip, loud[0] / rate, (loud[-1] + 1) / rate


@pytest.fixture(scope="module")
def two_turns(speech: tuple[npt.NDArray[np.float32], float, float]) -> tuple[npt.NDArray[np.float32], list[Any]]:
    """1 s silence, the clip, 1.5 s silence, the clip, 1 s silence at 16 kHz; and the true (start, end) of each."""
    clip, first, last = speech
    stream = np.concatenate([quiet(1.0), clip, quiet(1.5), clip, quiet(1.0)])
    second = 1.0 + len(clip) / TARGET_RATE + 1.5
    return stream, [(1.0 + first, 1.0 + last), (second + first, second + last)]


@pytest.fixture(scope="module")
def silero() -> Any:
    from agent.voice import SileroVAD

    return SileroVAD()


# ------------------------------------------------------------------------------------- turns, real speech


@needs_silero
@needs_av
def test_two_turns_from_44k_int16_in_odd_chunks(two_turns: tuple[Any, list[Any]], silero: Any) -> None:
    stream, truth = two_turns
    up = resample_poly(stream, 441, 160)
    pcm = np.clip(np.round(up * 32767), -32768, 32767).astype(np.int16)
    detector = TurnDetector(silero)
    events = feed_in_chunks(detector, pcm, 44_100, 0.037)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Turn"] * 2
    found = turns(events)
    for turn, (start, end) in zip(found, truth, strict=True):
        assert abs(turn.start - start) < 0.25 and abs(turn.end - end) < 0.25, (turn.start, turn.end, start, end)
        assert turn.rate == TARGET_RATE and turn.samples.dtype == np.float32
        # pre-roll before the start, about 0.1 s of silence after the end
        assert turn.duration == pytest.approx(turn.end - turn.start + 0.3 + 0.1, abs=0.05)
    started = [e for e in events if isinstance(e, SpeechStarted)]
    stopped = [e for e in events if isinstance(e, SpeechStopped)]
    assert [s.at for s in started] == [t.start for t in found] and [s.at for s in stopped] == [t.end for t in found]
    assert detector.time == pytest.approx(len(stream) / TARGET_RATE, abs=1e-3)
    assert not detector.in_speech


@needs_silero
@needs_av
def test_one_call_at_16k_float_gives_the_same_turns(two_turns: tuple[Any, list[Any]], silero: Any) -> None:
    stream, _ = two_turns
    pcm = np.clip(np.round(resample_poly(stream, 441, 160) * 32767), -32768, 32767).astype(np.int16)
    chunked = turns(feed_in_chunks(TurnDetector(silero), pcm, 44_100, 0.037))
    detector = TurnDetector(silero)
    whole = turns(detector.feed(stream, TARGET_RATE) + detector.flush())
    assert len(whole) == len(chunked) == 2
    for a, b in zip(whole, chunked, strict=True):
        assert abs(a.start - b.start) <= FRAME + 1e-9 and abs(a.end - b.end) <= FRAME + 1e-9


@needs_silero
def test_a_short_pause_inside_speech_does_not_split_the_turn(speech: tuple[Any, float, float], silero: Any) -> None:
    clip = speech[0]
    detector = TurnDetector(silero, end_of_turn=0.6)
    events = detector.feed(np.concatenate([quiet(0.5), clip, quiet(0.4), clip, quiet(1.0)]), TARGET_RATE)
    assert kinds(events + detector.flush()) == ["SpeechStarted", "SpeechStopped", "Turn"]
    events = detector.feed(np.concatenate([quiet(0.5), clip, quiet(1.0), clip, quiet(1.0)]), TARGET_RATE)
    assert len(turns(events + detector.flush())) == 2


@needs_silero
def test_speech_started_comes_out_with_the_frame_that_decides_it(speech: tuple[Any, float, float], silero: Any) -> None:
    stream = np.concatenate([quiet(1.0), speech[0]])
    detector = TurnDetector(silero)
    for k in range(len(stream) // 512):  # a frame at a time, as a barge-in would arrive
        if detector.feed(stream[k * 512 : (k + 1) * 512], TARGET_RATE):
            break
    else:
        pytest.fail("no speech detected")
    assert detector.in_speech
    # the same audio in one piece decides at the same frame: nothing is held back between calls
    assert kinds(TurnDetector(silero).feed(stream[: (k + 1) * 512], TARGET_RATE)) == ["SpeechStarted"]
    assert TurnDetector(silero).feed(stream[: k * 512], TARGET_RATE) == []


def test_speech_started_is_emitted_by_the_deciding_frame() -> None:
    detector = TurnDetector(EnergyVAD(), min_speech=0.2)
    stream = np.concatenate([quiet(1.024), tone(1.0)])
    decided = []
    for k in range(len(stream) // 512):
        for event in detector.feed(stream[k * 512 : (k + 1) * 512], TARGET_RATE):
            decided.append((event, detector.time))
    ((event, when),) = decided
    assert event == SpeechStarted(at=1.024)
    assert when == pytest.approx(1.024 + 7 * FRAME)  # the 7th frame of tone makes 0.224 s >= min_speech


@needs_silero
def test_flush_ends_a_turn_in_progress(speech: tuple[Any, float, float], silero: Any) -> None:
    detector = TurnDetector(silero)
    assert kinds(detector.feed(np.concatenate([quiet(0.5), speech[0]]), TARGET_RATE)) == ["SpeechStarted"]
    assert detector.in_speech
    events = detector.flush()
    assert kinds(events) == ["SpeechStopped", "Turn"] and not detector.in_speech
    assert turns(events)[0].end == pytest.approx(0.5 + speech[2], abs=0.15)
    assert detector.flush() == []  # nothing left


@needs_silero
def test_silero_on_nan_and_noise_never_crashes(silero: Any) -> None:
    detector = TurnDetector(silero)
    junk = np.full(16_000, np.nan, np.float32)
    junk[::3] = np.inf
    junk[1::7] = -np.inf
    assert detector.feed(junk, TARGET_RATE) == []
    assert detector.feed(np.random.default_rng(0).standard_normal((8000, 2)) * 1e30, 48_000) is not None
    detector.flush()


def test_silero_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "silero_vad" else real(name, *a))
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    from agent.voice import SileroVAD

    with pytest.raises(UserError, match=r"pip install 'mmagent\[voice\]'"):
        SileroVAD()


# ---------------------------------------------------------------------------- turns, the state machine


def test_events_in_stream_order_with_exact_times() -> None:
    detector = TurnDetector(EnergyVAD(), min_speech=0.2, end_of_turn=0.6, pre_roll=0.3)
    stream = np.concatenate([quiet(1.024), tone(1.024), quiet(1.024), tone(0.512), quiet(2.0)])
    events = feed_in_chunks(detector, stream, TARGET_RATE, 0.013)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Turn"] * 2
    first, second = turns(events)
    assert (first.start, first.end) == (1.024, 2.048)
    assert (second.start, second.end) == (3.072, 3.584)
    assert len(first.samples) == round((0.3 + 1.024 + 0.1) * TARGET_RATE)
    # the pre-roll is the silence before the tone, the tone is intact
    np.testing.assert_array_equal(first.samples[: round(0.3 * TARGET_RATE)], 0)
    np.testing.assert_allclose(first.samples[4800 : 4800 + 16384], tone(1.024), atol=1e-7)


def test_blips_shorter_than_min_speech_are_ignored_but_start_the_speech_they_precede() -> None:
    detector = TurnDetector(EnergyVAD(), min_speech=0.2, end_of_turn=0.6)
    lone = detector.feed(np.concatenate([quiet(0.512), tone(0.128), quiet(2.0)]), TARGET_RATE)
    assert lone == [] and not detector.in_speech
    before = detector.time
    events = detector.feed(np.concatenate([tone(0.128), quiet(0.256), tone(0.512), quiet(1.0)]), TARGET_RATE)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Turn"]
    assert isinstance(events[0], SpeechStarted)
    assert events[0].at == pytest.approx(before, abs=FRAME)  # the blip 0.256 s before the speech opens the turn


def test_hysteresis_keeps_speech_through_a_dip() -> None:
    probabilities = iter([0.0] * 5 + [0.9] * 10 + [0.4] * 40 + [0.9] * 10 + [0.0] * 40)

    class Scripted(VoiceActivity):
        frame_samples = 512

        def probability(self, frame: npt.NDArray[np.float32]) -> float:
            return next(probabilities)

    detector = TurnDetector(Scripted(), threshold=0.5, end_of_turn=0.6)
    events = detector.feed(quiet(105 * FRAME), TARGET_RATE)
    (turn,) = turns(events)  # 0.4 is above 0.5 - 0.15: the dip is still speech
    assert turn.start == pytest.approx(5 * FRAME) and turn.end == pytest.approx(65 * FRAME)


def test_max_turn_cuts_and_detection_continues() -> None:
    detector = TurnDetector(EnergyVAD(), max_turn=2.0, min_speech=0.1)
    events = detector.feed(np.concatenate([quiet(0.5), tone(5.0), quiet(1.0)]), TARGET_RATE)
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Turn"] * 3
    cut = turns(events)
    assert cut[0].end - cut[0].start == pytest.approx(2.0, abs=FRAME)
    assert cut[1].start == pytest.approx(cut[0].end, abs=FRAME)
    assert cut[-1].end == pytest.approx(5.5, abs=FRAME)
    assert all(t.end - t.start <= 2.0 + FRAME for t in cut)


def test_flush_at_the_end_of_speech_keeps_the_partial_frame() -> None:
    detector = TurnDetector(EnergyVAD())
    detector.feed(np.concatenate([quiet(0.5), tone(1.0 + 100 / TARGET_RATE)]), TARGET_RATE)
    events = detector.flush()
    (turn,) = turns(events)
    assert turn.end == pytest.approx(detector.time)
    assert turn.duration == pytest.approx(0.3 + turn.end - turn.start)


def test_hostile_input() -> None:
    detector = TurnDetector(EnergyVAD())
    assert detector.feed(np.zeros(0, np.float32), TARGET_RATE) == []
    assert detector.feed([], 44_100) == []
    assert detector.feed(np.zeros((0, 2), np.int16), 48_000) == []
    nan_speech = np.concatenate([quiet(0.5), np.full(16_000, np.nan, np.float32), np.full(8000, np.inf), quiet(1.0)])
    assert detector.feed(nan_speech, TARGET_RATE) == []  # NaN and inf are silence
    assert detector.feed(np.full(100, 1e30), TARGET_RATE) == []  # clipped, not overflowing
    for rate in (0, -16_000, 16_000.0, True, 10**9, 999):
        with pytest.raises(UserError, match="rate"):
            detector.feed(np.zeros(10), rate)  # type: ignore[arg-type]
    for bad in (np.zeros((2, 48_000)), np.zeros((1, 1, 1)), np.float32(0.0), np.array(["a", "b"]), [[1], [1, 2]]):
        with pytest.raises(UserError):
            detector.feed(bad, TARGET_RATE)
    many = detector.feed(np.concatenate([tone(0.5), quiet(1.0)] * 200), TARGET_RATE)  # 5 minutes at once
    assert len(turns(many)) == 200
    one = [e for s in np.concatenate([tone(0.5), quiet(1.0)]) for e in detector.feed([s], TARGET_RATE)]
    assert kinds(one) == ["SpeechStarted", "SpeechStopped", "Turn"]  # one sample at a time


def test_int16_stereo_at_8k_is_averaged_and_resampled() -> None:
    pytest.importorskip("av", reason="PyAV is not installed")
    mono = tone(1.0, 8000)
    stereo = np.stack([mono, mono], axis=1)
    pcm = (np.concatenate([np.zeros((4000, 2)), stereo, np.zeros((12000, 2))]) * 32767).astype(np.int16)
    events = TurnDetector(EnergyVAD()).feed(pcm, 8000)
    (turn,) = turns(events)
    assert turn.start == pytest.approx(0.5, abs=FRAME) and turn.end == pytest.approx(1.5, abs=FRAME)


def test_the_rate_may_change_mid_stream() -> None:
    pytest.importorskip("av", reason="PyAV is not installed")
    detector = TurnDetector(EnergyVAD())
    events = detector.feed(quiet(0.5, 48_000), 48_000) + detector.feed(tone(1.0, 22_050), 22_050)
    events += detector.feed(quiet(1.0), TARGET_RATE) + detector.flush()
    (turn,) = turns(events)
    assert turn.start == pytest.approx(0.5, abs=FRAME) and turn.end == pytest.approx(1.5, abs=FRAME)
    assert detector.time == pytest.approx(2.5)


@needs_av
def test_the_resampler_carries_its_state_across_chunks() -> None:
    t = np.arange(48_000) / 48_000
    signal = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    chunked = _Resampler(48_000)
    pieces = [chunked.push(signal[i : i + 480]) for i in range(0, len(signal), 480)]
    streamed = np.concatenate([*pieces, chunked.flush()])
    whole = _Resampler(48_000)
    once = np.concatenate([whole.push(signal), whole.flush()])
    assert len(streamed) == len(once) == 16_000
    np.testing.assert_allclose(streamed, once, atol=1e-5)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    np.testing.assert_allclose(streamed[64:-64], expected[64:-64], atol=1e-3)  # aligned: no delay, no artefacts


def test_hold_and_flush_make_one_turn_and_clear_drops_it() -> None:
    vad = EnergyVAD()
    detector = TurnDetector(vad)
    detector.hold(tone(0.3), TARGET_RATE)
    detector.hold(quiet(0.2), TARGET_RATE)
    assert vad.frames == 0 and not detector.in_speech
    (turn,) = detector.flush()
    assert isinstance(turn, Turn) and (turn.start, turn.end) == (0.0, 0.5) and len(turn.samples) == 8000
    detector.hold(tone(0.3), TARGET_RATE)
    detector.clear()
    assert detector.flush() == []
    assert detector.time == pytest.approx(0.8)


def test_settings_can_change_and_are_checked() -> None:
    detector = TurnDetector(EnergyVAD())
    detector.end_of_turn = 1.2
    detector.threshold = 0.7
    assert (detector.end_of_turn, detector.threshold) == (1.2, 0.7)
    bad: list[dict[str, float]] = [
        {"threshold": 0.0}, {"threshold": 1.5}, {"end_of_turn": 0.0}, {"end_of_turn": float("nan")},
        {"min_speech": -1.0}, {"pre_roll": -0.1}, {"max_turn": 0.0}, {"max_turn": 0.1, "min_speech": 0.2},
    ]  # fmt: skip
    for settings in bad:
        with pytest.raises(UserError):
            TurnDetector(EnergyVAD(), **settings)
    with pytest.raises(UserError):
        detector.end_of_turn = -1.0


# ------------------------------------------------------------------------------------------ sentences


def split(text: str, splitter: SentenceSplitter | None = None) -> list[str]:
    splitter = splitter or SentenceSplitter()
    return splitter.feed(text) + splitter.flush()


def split_by_character(text: str) -> list[str]:
    splitter = SentenceSplitter()
    out = [s for c in text for s in splitter.feed(c)]
    return out + splitter.flush()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pi is about 3.14 here. Next one!", ["Pi is about 3.14 here.", "Next one!"]),
        ("It costs $3.50. Buy it? Yes…  Done", ["It costs $3.50.", "Buy it?", "Yes…", "Done"]),
        (
            "Dr. Smith moved to the U.S. last year, e.g. to Boston. Fine.",
            ["Dr. Smith moved to the U.S. last year, e.g. to Boston.", "Fine."],
        ),
        ("J. R. R. Tolkien wrote it. So did I. Then", ["J. R. R. Tolkien wrote it.", "So did I.", "Then"]),
        ('Wait... what?! "Really." Yes.', ["Wait...", "what?!", '"Really."', "Yes."]),
        ("line one\nline two\n\nline three", ["line one", "line two", "line three"]),
        ("Version 2. It works.", ["Version 2.", "It works."]),
        ("1. Buy milk\n2. Call Bob", ["1. Buy milk", "2. Call Bob"]),
        ("see example.com/a.b?x=1 now. ok", ["see example.com/a.b?x=1 now.", "ok"]),
        ("", []),
        ("   \n\n  ", []),
    ],
)
def test_sentences(text: str, expected: list[str]) -> None:
    assert split(text) == expected
    assert split_by_character(text) == expected


def test_markup_is_not_read() -> None:
    text = (
        "## Weather today\n**Oslo** is `cold`: see https://www.yr.no/en/forecast/daily-table. "
        "Details [here](https://example.com/x).\n- first item\n* second item\n```python\nx = 1\n```\n---\n"
        "| a | b |\n|---|---|\nThat is _all_."
    )
    assert split(text) == [
        "Weather today",
        "Oslo is cold: see yr.no.",
        "Details here.",
        "first item",
        "second item",
        "x = 1",
        "a b",
        "That is all.",
    ]
    assert split_by_character(text) == split(text)


def test_streaming_one_character_at_a_time_matches_one_feed() -> None:
    text = (
        'Hello there! The value is 3.14159, i.e. roughly pi. Mr. Jones said: "ok." '
        "Visit https://docs.python.org/3/library/asyncio.html for more.\nNew line here… and then? "
        + "a very long run without any full stop at all, just commas, and more words " * 8
        + "**bold end**."
    )
    whole = split(text)
    assert split_by_character(text) == whole
    rng = np.random.default_rng(1)
    splitter = SentenceSplitter()
    pieces: list[str] = []
    at = 0
    while at < len(text):
        step = int(rng.integers(1, 12))
        pieces += splitter.feed(text[at : at + step])
        at += step
    assert pieces + splitter.flush() == whole


def test_a_long_run_is_cut_so_speech_can_start() -> None:
    text = "word, " * 100 + "and " * 100
    splitter = SentenceSplitter()
    first = splitter.feed(text)
    assert first, "no sentence before the end of a 1000-character run"
    assert all(len(s) <= 320 for s in first)
    assert first[0].endswith(",")  # cut after a comma when there is one
    rest = splitter.flush()
    assert " ".join(first + rest).split() == text.split()
    assert all(len(s) <= 620 for s in split("x" * 2000))


def test_the_splitter_is_reusable_and_its_docstring_example_holds() -> None:
    splitter = SentenceSplitter()
    deltas = ["The answer is 3.", "14. See **https://example.com/docs", "**!\nDone"]
    assert [splitter.feed(d) for d in deltas] == [[], ["The answer is 3.14."], ["See example.com!"]]
    assert splitter.flush() == ["Done"]
    assert splitter.flush() == []
    assert split("Again. Yes", splitter) == ["Again.", "Yes"]


def test_the_splitter_says_where_each_sentence_ends_in_the_text_fed() -> None:
    text = "## Plan\n**First** see [the docs](https://x.org/a). Then 3.14 it!\n\n--- \nDone now"
    whole, streamed = SentenceSplitter(), SentenceSplitter()
    sentences = [*whole.feed(text), *whole.flush()]
    assert [*[x for c in text for x in streamed.feed(c)], *streamed.flush()] == sentences
    assert whole.ends == streamed.ends  # the same however the text arrives
    assert sentences == ["Plan", "First see the docs.", "Then 3.14 it!", "Done now"]
    assert [text[:end].rsplit(None, 1)[-1] for end in whole.ends] == ["Plan", "docs](https://x.org/a).", "it!", "now"]
    assert whole.ends[-1] == len(text) and len(whole.ends) == len(sentences)


# -------------------------------------------------------------------------------------------- speakers


async def collect(chunks: AsyncIterable[npt.NDArray[np.float32]]) -> list[npt.NDArray[np.float32]]:
    return [c async for c in chunks]


async def test_tone_speaker() -> None:
    speaker = ToneSpeaker()
    chunks = await collect(speaker.speak("hello"))  # 5 characters: 0.3 s
    assert speaker.rate == 16_000 and speaker.name == "tone"
    assert [len(c) for c in chunks] == [320] * 15 and all(c.dtype == np.float32 for c in chunks)
    assert float(np.abs(np.concatenate(chunks)).max()) == pytest.approx(0.2, abs=0.01)
    assert sum(len(c) for c in await collect(speaker.speak("hi"))) == 3200  # at least 0.2 s
    assert await collect(speaker.speak("  ")) == []
    assert speaker.spoken == ["hello", "hi", "  "]


async def test_tone_speaker_delay_and_cancel() -> None:
    speaker = ToneSpeaker(delay=0.01)
    got: list[int] = []

    async def consume() -> None:
        async for chunk in speaker.speak("a long sentence to say"):
            got.append(len(chunk))

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0 < len(got) < 66


async def test_frames_rechunks_into_fixed_frames() -> None:
    async def chunks() -> AsyncIterator[npt.NDArray[np.float32]]:
        for size in (100, 700, 3, 0, 500):
            yield np.ones(size, np.float32)

    out = await collect(frames(chunks(), 16_000))
    assert [len(f) for f in out] == [320, 320, 320, 320, 23]  # 1303 samples; the last frame is what is left
    sync = await collect(frames([np.zeros(441), np.zeros(441)], 44_100, 0.01))
    assert [len(f) for f in sync] == [441, 441]
    with pytest.raises(UserError):
        await collect(frames([], 0))


async def test_frames_closes_its_source_when_stopped_early() -> None:
    closed = []

    async def endless() -> AsyncIterator[npt.NDArray[np.float32]]:
        try:
            while True:
                yield np.zeros(1000, np.float32)
        finally:
            closed.append(True)

    stream = frames(endless(), 16_000)
    async for _ in stream:
        break
    await stream.aclose()
    assert closed == [True]


def espeak_children() -> list[int]:
    """PIDs of this process's espeak-ng children, zombies included (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == os.getpid() and name.startswith("espeak"):
                found.append(int(entry.name))
    return found


@needs_espeak
async def test_espeak_speaks_a_sentence(tmp_path: Path) -> None:
    speaker = EspeakSpeaker()
    chunks = await collect(speaker.speak("What is the weather in Oslo?"))
    audio = np.concatenate(chunks)
    assert speaker.rate == 22_050 and audio.dtype == np.float32
    assert 0.8 < len(audio) / speaker.rate < 4.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.01
    assert await collect(speaker.speak(" \n")) == []
    # text that looks like options is read, never parsed: it arrives on stdin
    dashes = np.concatenate(await collect(speaker.speak(f"--version -w {tmp_path / 'x.wav'}")))
    assert len(dashes) / speaker.rate > 0.5
    assert not (tmp_path / "x.wav").exists()
    with pytest.raises(ModelError, match="voice does not exist"):
        await collect(EspeakSpeaker("zz-nonexistent").speak("hello"))


@needs_espeak
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts child processes through /proc")
async def test_a_cancelled_espeak_leaves_no_process() -> None:
    speaker = EspeakSpeaker()
    started = asyncio.Event()

    async def consume() -> None:
        text = "This sentence is long enough to keep espeak busy for a while. " * 60
        async with contextlib.aclosing(speaker.speak(text)) as chunks:
            async for _ in chunks:
                started.set()
                await asyncio.sleep(10)  # a slow listener: espeak fills the pipe and waits

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), 10)
    assert espeak_children(), "espeak-ng should still be running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert espeak_children() == []
    # cancelled while waiting inside speak() (a fast listener): speak() itself stops the process
    fast = asyncio.ensure_future(collect(speaker.speak("A third long sentence to say. " * 300)))
    await asyncio.sleep(0.01)
    assert not fast.done() and espeak_children()
    fast.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fast
    assert espeak_children() == []
    # stopping early through frames() closes the speech at once, too
    stream = frames(speaker.speak("Another long sentence for espeak to say. " * 60), speaker.rate)
    async for _ in stream:
        break
    await stream.aclose()
    assert espeak_children() == []


def test_espeak_arguments_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("espeak-ng") is not None:
        for voice in ("-v", "--stdout", "en us", "../../etc", ""):
            with pytest.raises(UserError, match="voice"):
                EspeakSpeaker(voice)
        with pytest.raises(UserError, match="speed"):
            EspeakSpeaker(speed=5)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(UserError, match="not installed"):
        EspeakSpeaker()
    assert EspeakSpeaker.available() == (False, "espeak-ng not installed")


@pytest.fixture
def no_kokoro(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Kokoro weights anywhere: an empty HF cache and no MMAGENT_KOKORO_PATH."""
    monkeypatch.delenv("MMAGENT_KOKORO_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_choose_speaker(no_kokoro: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_speaker("none") == (None, "speech: none, text only")
    tone_speaker, line = choose_speaker("tone")
    assert isinstance(tone_speaker, ToneSpeaker) and line == "speech: tone (a test double)"
    with pytest.raises(UserError, match="Kokoro speech is not available"):
        choose_speaker("kokoro")
    with pytest.raises(UserError, match="unknown speech"):
        choose_speaker("festival")
    kokoro_reason = KokoroSpeaker.available()[1]
    assert kokoro_reason in ("Kokoro not installed", "Kokoro weights not found")
    if shutil.which("espeak-ng") is not None:
        speaker, line = choose_speaker()
        assert isinstance(speaker, EspeakSpeaker)
        assert line.startswith("speech: espeak-ng 1.") and line.endswith(f"({kokoro_reason})")
        assert isinstance(choose_speaker("espeak-ng")[0], EspeakSpeaker)
    monkeypatch.setenv("PATH", str(no_kokoro))
    assert choose_speaker() == (None, "speech: none, text only (install espeak-ng or Kokoro)")
    with pytest.raises(UserError, match="espeak-ng speech is not available"):
        choose_speaker("espeak-ng")


def write_kokoro_files(folder: Path, voice: str = "af_heart") -> Path:
    (folder / "voices").mkdir(parents=True)
    for name in ("config.json", "kokoro-v1_0.pth", f"voices/{voice}.pt"):
        (folder / name).write_bytes(b"{}")
    return folder


def test_kokoro_weights_are_found_offline(no_kokoro: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _kokoro_folder("af_heart") is None
    snapshot = write_kokoro_files(no_kokoro / "hub" / "models--hexgrad--Kokoro-82M" / "snapshots" / "abc123")
    (no_kokoro / "hub" / "models--hexgrad--Kokoro-82M" / "refs").mkdir()
    (no_kokoro / "hub" / "models--hexgrad--Kokoro-82M" / "refs" / "main").write_text("abc123")
    assert _kokoro_folder("af_heart") == snapshot
    assert _kokoro_folder("bf_emma") is None  # that voice's file is not there
    explicit = write_kokoro_files(no_kokoro / "mine")
    monkeypatch.setenv("MMAGENT_KOKORO_PATH", str(explicit))
    assert _kokoro_folder("af_heart") == explicit
    if importlib.util.find_spec("kokoro") is None:
        assert KokoroSpeaker.available() == (False, "Kokoro not installed")
        with pytest.raises(UserError, match="Kokoro not installed"):
            KokoroSpeaker()


async def test_kokoro_glue_against_a_stand_in_of_its_api(no_kokoro: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the real Kokoro (no weights here): a stand-in with kokoro 0.9.4's KModel/KPipeline signatures."""
    torch = pytest.importorskip("torch")
    folder = write_kokoro_files(no_kokoro / "weights")
    monkeypatch.setenv("MMAGENT_KOKORO_PATH", str(folder))
    calls: dict[str, Any] = {}

    class KModel:
        def __init__(self, repo_id: str, config: str, model: str) -> None:
            calls["model"] = (repo_id, config, model)

        def to(self, device: str) -> KModel:
            calls["device"] = device
            return self

        def eval(self) -> KModel:
            return self

    class KPipeline:
        def __init__(self, lang_code: str, repo_id: str, model: KModel) -> None:
            calls["pipeline"] = (lang_code, repo_id)

        def __call__(self, text: str, voice: str, speed: float) -> Iterator[Any]:
            calls["call"] = (text, voice, speed)
            for _ in text.split(". "):
                yield types.SimpleNamespace(audio=torch.full((2400,), 0.1))

    fake = types.ModuleType("kokoro")
    fake.__spec__ = importlib.machinery.ModuleSpec("kokoro", None)
    fake.KModel, fake.KPipeline = KModel, KPipeline  # type: ignore[attr-defined]
    spacy_model = types.ModuleType("en_core_web_sm")
    spacy_model.__spec__ = importlib.machinery.ModuleSpec("en_core_web_sm", None)
    monkeypatch.setitem(sys.modules, "kokoro", fake)
    monkeypatch.setitem(sys.modules, "en_core_web_sm", spacy_model)
    ok, line = KokoroSpeaker.available()
    assert ok and line == f"Kokoro-82M ({folder})"
    speaker, line = choose_speaker()
    assert isinstance(speaker, KokoroSpeaker) and line == f"speech: Kokoro-82M ({folder})"
    chunks = await collect(speaker.speak("One. Two"))
    assert [len(c) for c in chunks] == [2400, 2400] and chunks[0].dtype == np.float32
    assert calls["model"] == ("hexgrad/Kokoro-82M", str(folder / "config.json"), str(folder / "kokoro-v1_0.pth"))
    assert calls["pipeline"] == ("a", "hexgrad/Kokoro-82M") and calls["device"] == "cpu"
    assert calls["call"] == ("One. Two", str(folder / "voices" / "af_heart.pt"), 1.0)  # a local file: no download
    monkeypatch.delitem(sys.modules, "en_core_web_sm")
    if importlib.util.find_spec("en_core_web_sm") is None:
        assert KokoroSpeaker.available()[1].startswith("spaCy's en_core_web_sm not installed")


# ------------------------------------------------------------------------------------------ public names


def test_public_names() -> None:
    assert sorted(agent.voice.__all__) == [
        "EspeakSpeaker", "INTERRUPTED", "KokoroSpeaker", "ResponseAudio", "ResponseDone", "ResponseStarted",
        "ResponseText", "ResponseTool", "SentenceSplitter", "SileroVAD", "Speaker", "SpeechStarted",
        "SpeechStopped", "TARGET_RATE", "ToneSpeaker", "Turn", "TurnDetector", "TurnEvent", "TurnHeard",
        "TurnTranscript", "VoiceActivity", "VoiceEvent", "VoiceSession", "choose_speaker", "frames",
    ]  # fmt: skip
    for name in agent.voice.__all__:
        assert hasattr(agent.voice, name), name


def test_import_needs_no_torch_av_or_kokoro() -> None:
    code = (
        "import sys, agent.voice; heavy = {'torch', 'av', 'kokoro', 'silero_vad'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
