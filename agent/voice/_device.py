"""The machine's microphone and speaker as a `VoiceSession` transport (`mmagent voice`), through sounddevice.

Capture runs in PortAudio's thread and hands 32 ms blocks to the event loop; playback pulls 20 ms frames from a
queue in PortAudio's output callback. When the user starts speaking over the answer (barge-in), the queue is
emptied at once, so playback stops within one frame while generation is cancelled, and the session is told how
much of the answer was played (`VoiceSession.truncate`), so the conversation keeps only what was heard.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.exceptions import UserError
from agent.voice._session import (
    ResponseAudio,
    ResponseDone,
    ResponseStarted,
    ResponseText,
    ResponseTool,
    TurnHeard,
    VoiceSession,
)
from agent.voice._turns import SpeechStarted

if TYPE_CHECKING:
    from agent._loop import Agent
    from agent.voice._speaker import Speaker

CAPTURE_RATE = 16_000
CAPTURE_BLOCK = 512  # 32 ms: one VAD frame


def open_sounddevice(need_output: bool) -> Any:
    """The sounddevice module, once a default input (and output) device is known to exist.

    Raises:
        UserError: sounddevice or PortAudio is missing, or the machine has no microphone (or speaker).
    """
    try:
        import sounddevice
    except ImportError:
        raise UserError("mmagent voice needs sounddevice: pip install 'mmagent[voice]'") from None
    except OSError as exc:  # sounddevice imports, but PortAudio itself is missing
        raise UserError(
            f"mmagent voice needs the PortAudio library ({exc}); on Debian: apt install libportaudio2"
        ) from None
    try:
        sounddevice.query_devices(kind="input")
    except Exception:
        raise UserError("no microphone found: mmagent voice needs an audio input device") from None
    if need_output:
        try:
            sounddevice.query_devices(kind="output")
        except Exception:
            raise UserError("no audio output device found: use --speech none to read the answers instead") from None
    return sounddevice


class _Playback:
    """Frames waiting to be played; the output callback takes them, `clear()` drops them (barge-in).

    It counts the samples played of the answer it holds (`turn`), so a barge-in can say how much was heard.
    """

    def __init__(self, frame: int) -> None:
        self.frame = frame
        self._queue: collections.deque[np.ndarray[Any, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._rest = np.zeros(0, np.float32)
        self.turn = 0
        self.played = 0

    def put(self, turn: int, samples: np.ndarray[Any, Any]) -> None:
        with self._lock:
            if turn != self.turn:
                self.turn, self.played = turn, 0
            self._queue.append(samples.astype(np.float32))

    def clear(self) -> tuple[int, int] | None:
        """Drop what is left; returns (turn, samples played of it) when an answer was cut short, else None."""
        with self._lock:
            cut = bool(self._queue) or len(self._rest) > 0
            self._queue.clear()
            self._rest = np.zeros(0, np.float32)
            return (self.turn, self.played) if cut else None

    def take(self, count: int) -> np.ndarray[Any, Any]:
        with self._lock:
            out = self._rest
            while len(out) < count and self._queue:
                out = np.concatenate([out, self._queue.popleft()])
            self._rest = out[count:]
            out = out[:count]
            self.played += len(out)
        return np.pad(out, (0, count - len(out)))


async def run_microphone(
    agent: Agent[Any], speaker: Speaker | None, *, echo: Callable[[str], None] = print, device: Any = None
) -> None:
    """Talk with `agent` through the default microphone and speaker until cancelled (Ctrl-C)."""
    sd = open_sounddevice(need_output=speaker is not None)
    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue[np.ndarray[Any, Any]] = asyncio.Queue()

    def captured(indata: np.ndarray[Any, Any], frames: int, when: Any, status: Any) -> None:
        loop.call_soon_threadsafe(blocks.put_nowait, indata[:, 0].copy())

    playback = _Playback(frame=int(speaker.rate * 0.02)) if speaker is not None else None

    def play(outdata: np.ndarray[Any, Any], frames: int, when: Any, status: Any) -> None:
        assert playback is not None
        outdata[:, 0] = playback.take(frames)

    session = VoiceSession(agent, speaker=speaker)
    async with session:
        streams = [sd.InputStream(samplerate=CAPTURE_RATE, blocksize=CAPTURE_BLOCK, channels=1, dtype="float32",
                                  callback=captured, device=device)]  # fmt: skip
        if speaker is not None:
            streams.append(sd.OutputStream(samplerate=speaker.rate, channels=1, dtype="float32", callback=play))
        for stream in streams:
            stream.start()
        echo("listening (Ctrl-C to stop)")

        async def stop_playback() -> None:
            assert playback is not None and speaker is not None
            cut = playback.clear()
            if cut is not None:  # the user talked over the answer: keep what they heard of it
                with contextlib.suppress(UserError):
                    await session.truncate(cut[0], cut[1] / speaker.rate)

        async def show() -> None:
            async for event in session.events():
                if isinstance(event, SpeechStarted) and playback is not None:
                    await stop_playback()
                elif isinstance(event, TurnHeard):
                    echo(f"you: ({event.seconds:.1f} s of speech)")
                elif isinstance(event, ResponseStarted):
                    echo("assistant: ")
                elif isinstance(event, ResponseText):
                    echo(event.delta)
                elif isinstance(event, ResponseTool) and event.result is None:
                    echo(f"[{event.name}]")
                elif isinstance(event, ResponseAudio) and playback is not None:
                    playback.put(event.turn, event.samples)
                elif isinstance(event, ResponseDone):
                    if event.interrupted and playback is not None:
                        await stop_playback()
                    echo(" (interrupted)\n" if event.interrupted else f" ({event.error})\n" if event.error else "\n")

        shown = asyncio.ensure_future(show())
        try:
            while True:
                await session.feed(await blocks.get(), CAPTURE_RATE)
        finally:
            for stream in streams:
                stream.stop()
                stream.close()
            await session.close()
            await shown
