"""A voice conversation: audio frames in, turns to the agent as audio, the answer spoken sentence by sentence.

```
frames in --> TurnDetector --Turn--> agent.run_stream(audio) --text--> SentenceSplitter --> Speaker --> frames out
                  |                                                                                     ^
                  +-- SpeechStarted while a response runs: barge-in, cancel generation and speech ------+
```

One response runs at a time. Speech detected while it runs (generating, calling tools or speaking) cancels it
at once: the model request is cancelled, speech stops, and `ResponseDone(interrupted=True)` follows with the
text produced so far. With a memory store that partial answer is stored in the conversation, its run marked
`interrupted` (never resumed, so no committed tool call runs twice); without one it stays in the session's
history. Playback belongs to the transport: a transport drops the frames it still holds when it sees
`ResponseDone(interrupted=True)` (or `SpeechStarted`), so speech stops within one frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.events import FinalEvent, TextDeltaEvent, ToolCallEvent, ToolResultEvent
from agent.exceptions import MMAgentError, UserError
from agent.messages import AudioPart, Message, TextPart
from agent.voice._sentences import SentenceSplitter
from agent.voice._speaker import Speaker, frames
from agent.voice._turns import SpeechStarted, SpeechStopped, Turn, TurnDetector

if TYPE_CHECKING:
    import numpy.typing as npt

    from agent._loop import Agent

INTERRUPTED = "interrupted by the user"
"""The error text of a run cut short by barge-in."""

TRANSCRIBE = "Transcribe the audio clip into text."
"""Phi-4-multimodal's own speech-recognition instruction (`VoiceSession(transcribe=True)`)."""


@dataclass(frozen=True, slots=True)
class TurnHeard:
    """A user turn ended and goes to the agent: its number (from 1), length, and when the detector decided."""

    turn: int
    seconds: float
    decided_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The agent starts answering turn `turn`."""

    turn: int


@dataclass(frozen=True, slots=True)
class ResponseText:
    """Answer text as it is generated."""

    turn: int
    delta: str


@dataclass(frozen=True, slots=True)
class ResponseAudio:
    """One frame of spoken answer (mono float32 at `rate`, `frame_seconds` long except the last of a sentence)."""

    turn: int
    samples: npt.NDArray[np.float32]
    rate: int


@dataclass(frozen=True, slots=True)
class ResponseTool:
    """The agent called a tool (`result` None) or got its result."""

    turn: int
    name: str
    call_id: str
    result: str | None = None


@dataclass(frozen=True, slots=True)
class TurnTranscript:
    """What the user said in turn `turn`, as the model transcribed it (with `VoiceSession(transcribe=True)`)."""

    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """The answer to turn `turn` is over: complete, or cut short by the user (`interrupted`) or by an error."""

    turn: int
    text: str
    interrupted: bool = False
    error: str | None = None
    run_id: str | None = None


VoiceEvent = (
    SpeechStarted
    | SpeechStopped
    | TurnHeard
    | TurnTranscript
    | ResponseStarted
    | ResponseText
    | ResponseAudio
    | ResponseTool
    | ResponseDone
)
"""What `VoiceSession.events()` yields."""


class VoiceSession:
    """A spoken conversation with an agent; feed it audio, read its events.

    ```python
    async with VoiceSession(agent, speaker=EspeakSpeaker()) as session:
        await session.feed(chunk, 48_000)          # any rate, as often as audio arrives
        async for event in session.events():     # SpeechStarted, TurnHeard, ResponseText, ResponseAudio, ...
            ...
    ```

    Args:
        agent: answers each turn; its tools run as in text turns. With a memory store, the session keeps one
            stored conversation (`conversation_id`, created when None).
        speaker: speaks the answer; None for text only.
        detector: finds turns in the audio (default: a `TurnDetector` on silero-vad).
        conversation_id: continue this stored conversation.
        frame_seconds: length of the audio frames handed out (barge-in stops speech within one).
        instructions: text sent with each audio turn (default: answer what was said).
        transcribe: after each spoken turn's answer, ask the model for a transcript of the turn (one more request,
            off the latency path; skipped when the next turn starts first): a `TurnTranscript` event, and with a
            store, `{"turn", "run_id", "text"}` appended to the conversation's metadata under "transcripts".
    """

    def __init__(
        self,
        agent: Agent[Any],
        *,
        speaker: Speaker | None = None,
        detector: TurnDetector | None = None,
        conversation_id: str | None = None,
        frame_seconds: float = 0.02,
        instructions: str = "",
        transcribe: bool = False,
    ) -> None:
        if frame_seconds <= 0:
            raise UserError(f"frame_seconds must be positive, got {frame_seconds}")
        self.agent = agent
        self.speaker = speaker
        self.detector = detector if detector is not None else TurnDetector()
        self.conversation_id = conversation_id
        self.frame_seconds = frame_seconds
        self.instructions = instructions
        self.transcribe = transcribe
        self.history: list[Message] = []
        self._transcribing: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[VoiceEvent | None] = asyncio.Queue()
        self._response: asyncio.Task[None] | None = None
        self._turns = 0
        self._closed = False

    async def __aenter__(self) -> VoiceSession:
        memory: Any = self.agent.memory  # a memory.Store (conversations, runs)
        if memory is not None and self.conversation_id is None:
            self.conversation_id = await asyncio.to_thread(memory.create_conversation, title="voice")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ input

    async def feed(self, samples: npt.ArrayLike, rate: int) -> None:
        """Audio from the user (any rate; mono or interleaved channels as (n, channels)). Events follow at once:
        speech starting while a response runs cancels it (barge-in); a finished turn starts a response."""
        self._check_open()
        for event in self.detector.feed(samples, rate):
            await self._on(event)

    async def commit(self) -> None:
        """End the user's turn now (push-to-talk, or the Realtime protocol's buffer commit)."""
        self._check_open()
        for event in self.detector.flush():
            await self._on(event)

    async def say(self, text: str) -> None:
        """A typed user turn (text instead of audio), answered like a spoken one."""
        self._check_open()
        await self.interrupt()
        self._start(Message.user(text), seconds=0.0)

    async def interrupt(self) -> None:
        """Cancel the response in progress, if any (its `ResponseDone(interrupted=True)` is sent first)."""
        task = self._response
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Cancel the response in progress and end `events()`."""
        if self._closed:
            return
        await self.interrupt()
        if self._transcribing is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._transcribing
        self._closed = True
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[VoiceEvent]:
        """Every event, in order, until `close()`."""
        while (event := await self._events.get()) is not None:
            yield event

    @property
    def responding(self) -> bool:
        """Whether a response is being generated or spoken."""
        return self._response is not None and not self._response.done()

    async def wait(self) -> None:
        """Until the response in progress (if any) is done."""
        if self._response is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._response)

    # ------------------------------------------------------------------ the loop

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("the voice session is closed")

    async def _on(self, event: SpeechStarted | SpeechStopped | Turn) -> None:
        if isinstance(event, SpeechStarted):
            if self.responding:
                await self.interrupt()  # barge-in: generation and speech stop before anything else happens
            self._events.put_nowait(event)
        elif isinstance(event, SpeechStopped):
            self._events.put_nowait(event)
        else:
            await self.interrupt()
            audio = AudioPart.from_samples(event.samples, event.rate)
            parts: list[Any] = [audio]
            if self.instructions:
                parts.append(TextPart(text=self.instructions))
            self._start(Message(role="user", parts=tuple(parts)), seconds=event.end - event.start)

    def _start(self, message: Message, *, seconds: float) -> None:
        if self._transcribing is not None:
            self._transcribing.cancel()  # the new turn's answer comes first
        self._turns += 1
        self._events.put_nowait(TurnHeard(turn=self._turns, seconds=seconds))
        self._response = asyncio.ensure_future(self._respond(self._turns, message))

    async def _respond(self, turn: int, message: Message) -> None:
        self._events.put_nowait(ResponseStarted(turn=turn))
        text: list[str] = []
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaking = asyncio.ensure_future(self._speak(turn, sentences)) if self.speaker is not None else None
        splitter = SentenceSplitter()
        memory = self.agent.memory
        try:
            result = None
            stream = self.agent.run_stream(
                message,
                history=self.history if memory is None else (),
                conversation_id=self.conversation_id if memory is not None else None,
            )
            async for event in stream:
                if isinstance(event, TextDeltaEvent):
                    text.append(event.text)
                    self._events.put_nowait(ResponseText(turn=turn, delta=event.text))
                    for sentence in splitter.feed(event.text):
                        sentences.put_nowait(sentence)
                elif isinstance(event, ToolCallEvent):
                    # text before a call was the model thinking aloud: not spoken, not the answer
                    text.clear()
                    splitter = SentenceSplitter()
                    self._events.put_nowait(ResponseTool(turn=turn, name=event.call.name, call_id=event.call.id))
                elif isinstance(event, ToolResultEvent):
                    shown = " ".join(p.text for p in event.result.content if isinstance(p, TextPart))[:200]
                    self._events.put_nowait(
                        ResponseTool(turn=turn, name=event.result.name, call_id=event.result.call_id, result=shown)
                    )
                elif isinstance(event, FinalEvent):
                    result = event.result
            for sentence in splitter.flush():
                sentences.put_nowait(sentence)
            sentences.put_nowait(None)
            if speaking is not None:
                await speaking
            assert result is not None
            if memory is None:  # the next run adds the agent's system prompt itself
                self.history = [m for m in result.messages if m.role != "system"]
            self._events.put_nowait(ResponseDone(turn=turn, text=str(result.output), run_id=result.run_id))
            self._transcribe_later(turn, message, result.run_id)
        except asyncio.CancelledError:
            if speaking is not None:
                speaking.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await speaking
            partial = "".join(text)
            run_id = await self._store_interrupted(message, partial)
            self._events.put_nowait(ResponseDone(turn=turn, text=partial, interrupted=True, run_id=run_id))
            self._transcribe_later(turn, message, run_id)
            raise
        except MMAgentError as exc:
            if speaking is not None:
                speaking.cancel()
            self._events.put_nowait(ResponseDone(turn=turn, text="".join(text), error=str(exc)))

    def _transcribe_later(self, turn: int, message: Message, run_id: str | None) -> None:
        audio = [p for p in message.parts if isinstance(p, AudioPart)]
        if self.transcribe and audio:
            self._transcribing = asyncio.ensure_future(self._transcribe(turn, audio[0], run_id))

    async def _transcribe(self, turn: int, audio: AudioPart, run_id: str | None) -> None:
        from agent.models import ModelSettings

        request = [Message(role="user", parts=(audio, TextPart(text=TRANSCRIBE)))]
        try:
            response = await self.agent.model.request(request, [], ModelSettings(max_tokens=256, tool_choice="none"))
        except MMAgentError:
            return
        text = response.message.text.strip()
        self._events.put_nowait(TurnTranscript(turn=turn, text=text))
        memory: Any = self.agent.memory
        cid = self.conversation_id
        if memory is None or cid is None:
            return

        def store() -> None:
            metadata = dict(memory.conversation(cid).metadata)
            metadata["transcripts"] = [*metadata.get("transcripts", []), {"turn": turn, "run_id": run_id, "text": text}]
            memory.update_conversation(cid, metadata=metadata)

        await asyncio.to_thread(store)

    async def _speak(self, turn: int, sentences: asyncio.Queue[str | None]) -> None:
        speaker = self.speaker
        assert speaker is not None
        while (sentence := await sentences.get()) is not None:
            async for frame in frames(speaker.speak(sentence), speaker.rate, self.frame_seconds):
                self._events.put_nowait(ResponseAudio(turn=turn, samples=frame, rate=speaker.rate))

    async def _store_interrupted(self, message: Message, partial: str) -> str | None:
        """Keep the partial answer: in the stored conversation (its run marked interrupted), or the history."""
        answer = [Message.assistant(partial)] if partial.strip() else []
        memory: Any = self.agent.memory  # a memory.Store: list_runs, append, end_run
        if memory is None:
            self.history = [*self.history, message, *answer]
            return None
        cid = self.conversation_id
        assert cid is not None

        def store() -> str | None:
            runs = memory.list_runs(conversation_id=cid, status="running", limit=1)
            if answer:
                memory.append(cid, answer)
            if not runs:
                return None
            memory.end_run(runs[0].id, "interrupted", INTERRUPTED)
            return str(runs[0].id)

        # The run's own cleanup (releasing its lease) happens as the cancellation unwinds it; then this.
        return await asyncio.shield(asyncio.to_thread(store))
