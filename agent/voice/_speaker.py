"""The speaker seam: text in, audio chunks out, as they are made, cancellable at any await.

| speaker | what it runs | rate |
|---|---|---|
| `KokoroSpeaker` | Kokoro-82M through the `kokoro` package's `KPipeline`, from weights on this machine | 24 kHz |
| `EspeakSpeaker` | the system's `espeak-ng` in a subprocess (killed when the speech is cancelled) | 22,050 Hz |
| `ToneSpeaker` | a test double: a sine tone as long as the text | 16 kHz |

`choose_speaker()` picks the best one available and says which in one line; `frames()` re-chunks any speaker's
audio into fixed 20 ms frames, so playback can stop within one frame of a barge-in.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.util
import math
import os
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.exceptions import ModelError, ModelLoadError, UserError

__all__ = ["EspeakSpeaker", "KokoroSpeaker", "Speaker", "ToneSpeaker", "choose_speaker", "frames"]

_Audio = npt.NDArray[np.float32]


class Speaker(abc.ABC):
    """Turns text into audio.

    Attributes:
        name: what speaks ("kokoro", "espeak-ng", "tone", ...).
        rate: the sample rate of the audio `speak()` yields (Hz).
    """

    name: str
    rate: int

    @abc.abstractmethod
    def speak(self, text: str) -> AsyncGenerator[_Audio, None]:
        """Yield the audio of `text` (mono float32 in [-1, 1] at `rate`) in chunks, as soon as each is made.

        Implemented as an async generator; blank text yields nothing. The speaker stops its work (a subprocess
        is killed) when cancelled inside `speak()` or closed: a caller that may stop early iterates through
        `frames()` or `contextlib.aclosing()`, since an abandoned async generator is only closed when asyncio
        finalises it.
        """


class ToneSpeaker(Speaker):
    """A test double: "says" text as a sine tone, 0.06 s per character (at least 0.2 s), in 20 ms chunks.

    Args:
        delay: seconds to wait before each chunk (to act like a slow synthesiser); 0 still yields to the loop.
        frequency: the tone's pitch (Hz).
        amplitude: its peak (0-1).

    Attributes:
        spoken: every text `speak()` was called with, in order (including speech later cancelled).
    """

    name = "tone"
    rate = 16_000
    chunk_seconds = 0.02

    def __init__(self, *, delay: float = 0.0, frequency: float = 440.0, amplitude: float = 0.2) -> None:
        if not delay >= 0.0 or not math.isfinite(delay):
            raise UserError(f"delay must be >= 0 seconds, got {delay}")
        self.delay = delay
        self.frequency = frequency
        self.amplitude = amplitude
        self.spoken: list[str] = []

    def duration(self, text: str) -> float:
        """Seconds of tone `speak(text)` yields."""
        return max(0.2, 0.06 * len(text)) if text.strip() else 0.0

    async def speak(self, text: str) -> AsyncGenerator[_Audio, None]:
        """Yield the tone for `text` in 20 ms chunks."""
        self.spoken.append(text)
        total = round(self.duration(text) * self.rate)
        step = round(self.chunk_seconds * self.rate)
        for begin in range(0, total, step):
            await asyncio.sleep(self.delay)
            t = np.arange(begin, min(begin + step, total)) / self.rate
            yield (self.amplitude * np.sin(2 * np.pi * self.frequency * t)).astype(np.float32)


class EspeakSpeaker(Speaker):
    """The system's eSpeak NG (`apt-get install espeak-ng`), run as a subprocess for each text.

    The text goes in on stdin, never on the command line; the WAV on stdout is streamed back in 0.1 s chunks.
    Cancelling (or closing) `speak()` kills the process.

    Args:
        voice: an espeak-ng voice (`espeak-ng --voices`), e.g. "en-us", "en-gb", "de".
        speed: words per minute, 80-450.

    Raises:
        UserError: espeak-ng is not installed, or a bad voice or speed.
    """

    name = "espeak-ng"
    rate = 22_050
    _VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-/.]{0,63}")

    def __init__(self, voice: str = "en-us", *, speed: int = 165) -> None:
        executable = shutil.which("espeak-ng")
        if executable is None:
            raise UserError("espeak-ng is not installed (apt-get install espeak-ng, or brew install espeak-ng)")
        if not self._VOICE.fullmatch(voice) or ".." in voice:
            raise UserError(f"not an espeak-ng voice name: {voice!r}")
        if isinstance(speed, bool) or not isinstance(speed, int) or not 80 <= speed <= 450:
            raise UserError(f"speed must be 80-450 words per minute, got {speed!r}")
        self.executable = executable
        self.voice = voice
        self.speed = speed

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "espeak-ng 1.51") when espeak-ng runs here, else (False, why not)."""
        executable = shutil.which("espeak-ng")
        if executable is None:
            return False, "espeak-ng not installed"
        try:
            result = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"espeak-ng does not run: {e}"
        found = re.search(r"(\d+\.\d+(?:\.\d+)?)", result.stdout)
        if result.returncode != 0 or found is None:
            return False, "espeak-ng does not run"
        return True, f"espeak-ng {found.group(1)}"

    async def speak(self, text: str) -> AsyncGenerator[_Audio, None]:
        """Yield the speech of `text` as espeak-ng makes it.

        Raises:
            ModelError: espeak-ng failed or wrote something other than 16-bit mono WAV at 22,050 Hz.
        """
        if not text.strip():
            return
        process = await asyncio.create_subprocess_exec(
            self.executable,
            "--stdout",
            "--stdin",
            "-b",
            "1",  # the input is UTF-8
            "-v",
            self.voice,
            "-s",
            str(self.speed),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        writer = asyncio.create_task(_write_and_close(process.stdin, text.encode("utf-8")))
        try:
            try:
                await _read_wav_header(process.stdout, self.rate)
            except (asyncio.IncompleteReadError, ValueError) as e:
                await process.wait()
                raise ModelError(f"espeak-ng failed: {await _last_line(process.stderr) or e}") from e
            chunk_bytes = 2 * self.rate // 10
            carry = b""
            while data := await process.stdout.read(chunk_bytes):
                data = carry + data
                whole = len(data) - len(data) % 2
                carry = data[whole:]
                if whole:
                    yield (np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)
            code = await process.wait()
            if code != 0:
                raise ModelError(f"espeak-ng exited with {code}: {await _last_line(process.stderr)}")
        finally:
            writer.cancel()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def _write_and_close(stream: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.write(data)
        await stream.drain()
        stream.close()


async def _read_wav_header(stream: asyncio.StreamReader, rate: int) -> None:
    """Read a RIFF/WAVE header up to the start of its data; check it is 16-bit mono PCM at `rate`."""
    riff = await stream.readexactly(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise ValueError("not a WAV stream")
    while True:
        kind, size = struct.unpack("<4sI", await stream.readexactly(8))
        if kind == b"data":
            return
        body = await stream.readexactly(size + size % 2)
        if kind == b"fmt ":
            audio_format, channels, found_rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if (audio_format, channels, found_rate, bits) != (1, 1, rate, 16):
                raise ValueError(f"unexpected audio: format {audio_format}, {channels} channels, {found_rate} Hz")


async def _last_line(stream: asyncio.StreamReader) -> str:
    try:
        text = (await asyncio.wait_for(stream.read(65536), timeout=1.0)).decode("utf-8", "replace").strip()
    except TimeoutError:
        return ""
    return text.splitlines()[-1] if text else ""


class KokoroSpeaker(Speaker):
    """Kokoro-82M (hexgrad/Kokoro-82M) through the `kokoro` package's `KPipeline`, from local files only.

    The weights are looked for in `$MMAGENT_KOKORO_PATH` (a folder holding `config.json`, `kokoro-v1_0.pth` and
    `voices/<voice>.pt`) and then in the Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or
    `~/.cache/huggingface/hub`); nothing is downloaded. For English, Kokoro's G2P (misaki) needs the spaCy model
    `en_core_web_sm`, which it would otherwise download: it must be installed too. Synthesis runs in a worker
    thread one segment at a time; a cancelled `speak()` stops after the segment in progress.

    Not exercised by mmagent's tests (no weights on the test machines): written against kokoro 0.9.4's API.

    Args:
        voice: a voice file stem under `voices/` (e.g. "af_heart"); its first letter is the language code.
        speed: speaking rate, 1.0 normal.
        device: torch device ("cpu" by default).

    Raises:
        UserError: the package, the weights, the voice or spaCy's model are missing (the message says which).
    """

    name = "kokoro"
    rate = 24_000
    repo_id = "hexgrad/Kokoro-82M"
    _MODEL_FILE = "kokoro-v1_0.pth"
    _VOICE = re.compile(r"[a-z]{2}_[a-z0-9_]{1,40}")

    def __init__(self, voice: str = "af_heart", *, speed: float = 1.0, device: str = "cpu") -> None:
        if not self._VOICE.fullmatch(voice):
            raise UserError(f"not a Kokoro voice name: {voice!r} (e.g. 'af_heart')")
        if not 0.5 <= speed <= 2.0:
            raise UserError(f"speed must be 0.5-2.0, got {speed}")
        ok, reason = self.available(voice)
        if not ok:
            raise UserError(f"Kokoro speech is not available: {reason}")
        folder = _kokoro_folder(voice)
        assert folder is not None
        self.voice = voice
        self.speed = speed
        self.device = device
        self._folder = folder
        self._pipeline: Any = None
        self._lock = threading.Lock()  # one synthesis step at a time: the model is shared

    @classmethod
    def available(cls, voice: str = "af_heart") -> tuple[bool, str]:
        """(True, "Kokoro-82M (<folder>)") when Kokoro can speak with `voice` offline, else (False, why not)."""
        if importlib.util.find_spec("kokoro") is None:
            return False, "Kokoro not installed"
        folder = _kokoro_folder(voice)
        if folder is None:
            return False, "Kokoro weights not found"
        if voice[:1] in "ab" and importlib.util.find_spec("en_core_web_sm") is None:
            return False, "spaCy's en_core_web_sm not installed (Kokoro's English G2P would download it)"
        return True, f"Kokoro-82M ({folder})"

    def _load(self) -> Any:
        """Build the model and pipeline (blocking; runs in a worker thread)."""
        if self._pipeline is None:
            try:
                kokoro: Any = importlib.import_module("kokoro")  # untyped, and optional
                model = kokoro.KModel(
                    repo_id=self.repo_id,
                    config=str(self._folder / "config.json"),
                    model=str(self._folder / self._MODEL_FILE),
                )
                model = model.to(self.device).eval()
                self._pipeline = kokoro.KPipeline(lang_code=self.voice[0], repo_id=self.repo_id, model=model)
            except ImportError as e:
                raise UserError(f"Kokoro could not be imported ({e}): pip install 'mmagent[voice]' kokoro") from e
            except (RuntimeError, OSError, KeyError, ValueError, AssertionError) as e:
                raise ModelLoadError(f"cannot load Kokoro from {self._folder}: {e}") from e
        return self._pipeline

    async def speak(self, text: str) -> AsyncGenerator[_Audio, None]:
        """Yield the speech of `text`, one Kokoro segment (about a sentence) at a time."""
        if not text.strip():
            return
        voice_file = str(self._folder / "voices" / f"{self.voice}.pt")
        results = await asyncio.to_thread(self._start, text, voice_file)
        while True:
            try:
                result = await asyncio.to_thread(self._next, results)
            except (RuntimeError, ValueError) as e:
                raise ModelError(f"Kokoro failed: {e}") from e
            if result is None:
                return
            audio = result.audio
            if audio is not None:
                yield np.asarray(audio.detach().cpu().numpy(), dtype=np.float32).reshape(-1)

    def _start(self, text: str, voice_file: str) -> Iterator[Any]:
        with self._lock:
            return iter(self._load()(text, voice=voice_file, speed=self.speed))

    def _next(self, results: Iterator[Any]) -> Any:
        with self._lock:
            return next(results, None)


def _kokoro_folder(voice: str) -> Path | None:
    """The first folder holding Kokoro-82M's config, weights and `voice`, or None."""
    candidates: list[Path] = []
    if explicit := os.environ.get("MMAGENT_KOKORO_PATH"):
        candidates.append(Path(explicit).expanduser())
    if hub := os.environ.get("HF_HUB_CACHE"):
        cache = Path(hub).expanduser()
    elif home := os.environ.get("HF_HOME"):
        cache = Path(home).expanduser() / "hub"
    else:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    repo = cache / "models--hexgrad--Kokoro-82M"
    with contextlib.suppress(OSError):
        ref = (repo / "refs" / "main").read_text().strip()
        candidates.append(repo / "snapshots" / ref)
    with contextlib.suppress(OSError):
        candidates.extend(sorted((repo / "snapshots").iterdir(), reverse=True))
    for folder in candidates:
        needed = (folder / "config.json", folder / KokoroSpeaker._MODEL_FILE, folder / "voices" / f"{voice}.pt")
        if all(path.is_file() for path in needed):
            return folder
    return None


def choose_speaker(preference: str = "auto") -> tuple[Speaker | None, str]:
    """The speaker to use, and one line saying what speaks, for the CLI.

    Args:
        preference: "auto" (Kokoro if its weights are here, else espeak-ng if installed, else none: text only),
            or "kokoro", "espeak-ng", "tone" (the test double) or "none" to force one.

    Returns:
        The speaker (None for text only) and a line such as "speech: espeak-ng 1.51 (Kokoro weights not found)".

    Raises:
        UserError: a forced speaker is not available (the message says why), or an unknown preference.
    """
    if preference == "none":
        return None, "speech: none, text only"
    if preference == "tone":
        return ToneSpeaker(), "speech: tone (a test double)"
    if preference not in ("auto", "kokoro", "espeak-ng"):
        raise UserError(f"unknown speech {preference!r}: choose auto, kokoro, espeak-ng, tone or none")
    kokoro_ok, kokoro = KokoroSpeaker.available()
    if preference == "kokoro" or (preference == "auto" and kokoro_ok):
        if not kokoro_ok:
            raise UserError(f"Kokoro speech is not available: {kokoro}")
        return KokoroSpeaker(), f"speech: {kokoro}"
    espeak_ok, espeak = EspeakSpeaker.available()
    if espeak_ok:
        return EspeakSpeaker(), f"speech: {espeak} ({kokoro})"
    if preference == "espeak-ng":
        raise UserError(f"espeak-ng speech is not available: {espeak} (apt-get install espeak-ng)")
    return None, "speech: none, text only (install espeak-ng or Kokoro)"


async def frames(
    chunks: AsyncIterable[npt.ArrayLike] | Iterable[npt.ArrayLike], rate: int, frame_seconds: float = 0.02
) -> AsyncGenerator[_Audio, None]:
    """Re-chunk audio into frames of exactly `frame_seconds` (the last one may be shorter).

    Args:
        chunks: audio chunks (1-D) from a speaker's `speak()`, or any iterable of arrays.
        rate: their sample rate (Hz).
        frame_seconds: the frame length.

    Yields:
        float32 frames of `round(rate * frame_seconds)` samples. When the caller stops early, `chunks` is closed
        (a speaker's process is stopped at once, not when the generator is garbage-collected).
    """
    size = round(rate * frame_seconds)
    if isinstance(rate, bool) or rate <= 0 or size <= 0:
        raise UserError(f"frames need a positive rate and frame length, got {rate} Hz x {frame_seconds} s")
    buffer = np.zeros(0, np.float32)
    source = chunks if isinstance(chunks, AsyncIterable) else _aiter(chunks)
    try:
        async for chunk in source:
            audio = np.asarray(chunk, dtype=np.float32).reshape(-1)
            if len(buffer):
                audio = np.concatenate([buffer, audio])
            whole = len(audio) - len(audio) % size
            for begin in range(0, whole, size):
                yield audio[begin : begin + size].copy()
            buffer = audio[whole:].copy()
        if len(buffer):
            yield buffer
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()


async def _aiter(items: Iterable[npt.ArrayLike]) -> AsyncIterator[npt.ArrayLike]:
    for item in items:
        yield item
