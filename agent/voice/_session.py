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

Only the transport knows how much of an answer was heard: the answer may be generated in full long before it is
played. A transport that stops playback early says so with `truncate(turn, heard_seconds)`, and the stored answer
is cut to the words spoken by then, so the agent does not go on as if the user had heard the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
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


@dataclass(slots=True)
class _Spoken:
    """What was said aloud of one turn's answer, to map heard audio back to text (`VoiceSession.truncate`).

    `marks` holds, for each sentence spoken, where its source ends in `text` (the answer as streamed) and where
    its audio ends, in samples at `rate` counted from `begin` (audio before `begin` said text the model wrote before
    a tool call, which is not the answer). `stored` and `where` say where the answer was kept: its text, and its
    position in the stored conversation (or index in the session's history).
    """

    text: str = ""
    marks: list[tuple[int, int]] = field(default_factory=list)
    rate: int = 0
    samples: int = 0
    begin: int = 0
    stored: str = ""
    where: int | None = None

    def heard(self, samples: int) -> int:
        """How much of `text` had been spoken after `samples` samples of the answer's audio: whole sentences,
        then the share of the cut sentence's words that its played share of audio stands for."""
        text_from, audio_from = 0, 0
        for text_end, audio_end in self.marks:
            if samples < audio_end:
                words = [w.end() for w in _WORD.finditer(self.text, text_from, text_end)]
                share = (samples - audio_from) / max(1, audio_end - audio_from)
                count = math.floor(share * len(words))
                return words[count - 1] if count else text_from
            text_from, audio_from = text_end, audio_end
        return text_from


def _queue(queue: asyncio.Queue[tuple[str, int] | None], sentences: list[str], splitter: SentenceSplitter) -> None:
    """Queue new sentences for speech, each with where it ends in the answer's text."""
    for sentence, end in zip(sentences, splitter.ends[len(splitter.ends) - len(sentences) :], strict=True):
        queue.put_nowait((sentence, end))


_WORD = re.compile(r"\S+")
_SPOKEN_TURNS = 16  # answers remembered for `truncate`


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
        self._spoken: dict[int, _Spoken] = {}  # turn -> its answer as spoken (the last few)

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

    async def truncate(self, turn: int, heard_seconds: float) -> str:
        """The user heard only the first `heard_seconds` of turn `turn`'s spoken answer (the transport stopped
        playing it: the user talked over it). The answer, stored or in the history, is cut to what was said by
        then: whole sentences, and of the sentence cut off, the share of its words that was played (a sentence
        cut while it was still being synthesised has no known length: it is dropped). A response still running
        for that turn is cancelled first. Returns the text kept.

        Raises:
            UserError: `turn` had no spoken answer (or is one of the older turns no longer remembered), or
                `heard_seconds` is not a number >= 0.
        """
        self._check_open()
        if isinstance(heard_seconds, bool) or not isinstance(heard_seconds, int | float) or not heard_seconds >= 0:
            raise UserError(f"heard_seconds must be a number >= 0, got {heard_seconds!r}")
        spoken = self._spoken.get(turn)
        if spoken is None:
            raise UserError(f"turn {turn} has no spoken answer to truncate")
        if turn == self._turns:
            await self.interrupt()
        if spoken.where is None:  # nothing was kept (the answer was empty, or failed)
            return ""
        played = round(min(heard_seconds * spoken.rate, spoken.samples))  # inf: all of it
        heard = spoken.heard(max(0, played - spoken.begin))
        said = spoken.text[:heard]
        lead = len(said) - len(said.lstrip())
        keep = next((k.rstrip() for k in (said, said[lead:]) if spoken.stored.startswith(k)), spoken.stored)
        if keep == spoken.stored:
            return keep
        memory: Any = self.agent.memory
        if memory is not None:
            cid = self.conversation_id
            await asyncio.to_thread(memory.truncate_message, cid, spoken.where, keep)
        else:
            self.history[spoken.where] = Message.assistant(keep)
        spoken.stored = keep
        return keep

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
        sentences: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
        spoken: _Spoken | None = None
        speaking = None
        if self.speaker is not None:
            spoken = self._spoken[turn] = _Spoken(rate=self.speaker.rate)
            for old in [t for t in self._spoken if t <= turn - _SPOKEN_TURNS]:
                del self._spoken[old]
            speaking = asyncio.ensure_future(self._speak(turn, sentences, spoken))
        splitter = SentenceSplitter()
        memory = self.agent.memory
        result = None
        try:
            stream = self.agent.run_stream(
                message,
                history=self.history if memory is None else (),
                conversation_id=self.conversation_id if memory is not None else None,
            )
            async for event in stream:
                if isinstance(event, TextDeltaEvent):
                    text.append(event.text)
                    self._events.put_nowait(ResponseText(turn=turn, delta=event.text))
                    _queue(sentences, splitter.feed(event.text), splitter)
                elif isinstance(event, ToolCallEvent):
                    # text before a call was the model thinking aloud: not the answer
                    text.clear()
                    splitter = SentenceSplitter()
                    sentences.put_nowait(("", -1))  # the answer's text starts again
                    self._events.put_nowait(ResponseTool(turn=turn, name=event.call.name, call_id=event.call.id))
                elif isinstance(event, ToolResultEvent):
                    shown = " ".join(p.text for p in event.result.content if isinstance(p, TextPart))[:200]
                    self._events.put_nowait(
                        ResponseTool(turn=turn, name=event.result.name, call_id=event.result.call_id, result=shown)
                    )
                elif isinstance(event, FinalEvent):
                    result = event.result
            _queue(sentences, splitter.flush(), splitter)
            sentences.put_nowait(None)
            if speaking is not None:
                await speaking
            assert result is not None
            if memory is None:  # the next run adds the agent's system prompt itself
                self.history = [m for m in result.messages if m.role != "system"]
            if spoken is not None:
                spoken.text = "".join(text)
                await self._kept(spoken, result.messages[-1] if result.messages else None)
            self._events.put_nowait(ResponseDone(turn=turn, text=str(result.output), run_id=result.run_id))
            self._transcribe_later(turn, message, result.run_id)
        except asyncio.CancelledError:
            if speaking is not None:
                speaking.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await speaking
            partial = "".join(text)
            if result is not None:  # the run had finished and kept its answer; only its speech was cut short
                run_id = result.run_id
                if memory is None:
                    self.history = [m for m in result.messages if m.role != "system"]
                kept = result.messages[-1] if result.messages else None
            else:
                run_id = await self._store_interrupted(message, partial)
                kept = Message.assistant(partial)
            if spoken is not None and partial.strip() and kept is not None:
                spoken.text = partial
                await asyncio.shield(self._kept(spoken, kept))
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

    async def _kept(self, spoken: _Spoken, answer: Message | None) -> None:
        """Note where the turn's answer was kept (the last message of the conversation or history)."""
        if answer is None or answer.role != "assistant":
            return
        spoken.stored = answer.text
        memory: Any = self.agent.memory
        if memory is None:
            spoken.where = len(self.history) - 1
        else:
            try:
                info = await asyncio.to_thread(memory.conversation, self.conversation_id)
            except MMAgentError:  # the store failed: the answer stays as it is, and the turn goes on
                return
            spoken.where = info.message_count - 1

    async def _speak(self, turn: int, sentences: asyncio.Queue[tuple[str, int] | None], spoken: _Spoken) -> None:
        speaker = self.speaker
        assert speaker is not None
        while (item := await sentences.get()) is not None:
            sentence, end = item
            if end < 0:  # the text so far was not the answer: its audio comes before the answer's
                spoken.begin, spoken.marks = spoken.samples, []
                continue
            async for frame in frames(speaker.speak(sentence), speaker.rate, self.frame_seconds):
                spoken.samples += len(frame)
                self._events.put_nowait(ResponseAudio(turn=turn, samples=frame, rate=speaker.rate))
            spoken.marks.append((end, spoken.samples - spoken.begin))

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
            runs = memory.list_runs(conversation_id=cid, limit=1)  # this turn's, if it began (the answer says so)
            run = runs[0] if runs and (answer or runs[0].status == "running") else None
            if run is not None and run.status == "completed":
                return str(run.id)  # cancelled as it ended: its answer is stored
            if run is not None:
                stored = memory.load_run(run.id)
                last = stored.messages[-1] if stored.new_message_count > 1 else None
                if last is not None and last.role == "assistant" and not last.tool_calls:
                    memory.end_run(run.id, "completed")  # cancelled after it committed its answer, before it ended
                    return str(run.id)
            if answer:
                memory.append(cid, answer)
            if run is None:
                return None
            memory.end_run(run.id, "interrupted", INTERRUPTED)
            return str(run.id)

        # The run's own cleanup (releasing its lease) happens as the cancellation unwinds it; then this.
        return await asyncio.shield(asyncio.to_thread(store))
