"""A subset of the OpenAI Realtime protocol over a WebSocket, served by `mmagent serve` at `/v1/realtime`.

Each connection is one `VoiceSession` with the server's agent. Events follow the Realtime API's GA names; what
is implemented (anything else is answered with an `error` event naming it, and the connection stays open):

Client events:

- `session.update`: `session.instructions`, `session.output_modalities` (`["audio"]` or `["text"]`),
  `session.audio.input.turn_detection` (`{"type": "server_vad", "silence_duration_ms", "threshold"}`, or null
  for push-to-talk) and `session.audio.input.transcription` (any object: the agent's own model transcribes each
  turn after answering it, sent as `conversation.item.input_audio_transcription.completed`; null: off);
  answered with `session.updated`.
- `input_audio_buffer.append` (`audio`: base64 16-bit little-endian mono PCM at 24 kHz): feeds the turn
  detector, which sends `input_audio_buffer.speech_started` / `speech_stopped`, then
  `input_audio_buffer.committed` and a response when a turn ends. Speech while a response runs cancels it.
- `input_audio_buffer.commit`: ends the turn now (push-to-talk; the only way with turn detection off).
- `input_audio_buffer.clear`: drops audio not yet in a turn; answered with `input_audio_buffer.cleared`.
- `conversation.item.create` with an `input_text` content part: a typed turn, answered like a spoken one.
- `response.create`: accepted (responses start by themselves when a turn ends).
- `response.cancel`: cancels the response in progress.
- `conversation.item.truncate` (`item_id` of an answer, `content_index` 0, `audio_end_ms`): the client stopped
  playing that answer there (the user talked over it); the stored answer is cut to the words spoken by then
  (`VoiceSession.truncate`), answered with `conversation.item.truncated`. A time past the answer's end keeps
  it whole.

Server events of a response: `response.created`, `response.output_audio.delta` (base64 PCM16 at 24 kHz, 20 ms
frames), `response.output_audio_transcript.delta` (the text being spoken; `response.output_text.delta` when
the output is text only), and `response.done` with `status` `completed`, `cancelled` or `failed` and the full
transcript. Each response's answer is one assistant item: its id is in every delta (`item_id`) and in
`response.done`'s output. The connection opens with `session.created`. With API keys set, the client authenticates with
`Authorization: Bearer KEY`, or the `openai-insecure-api-key.KEY` subprotocol as browsers must.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.exceptions import MMAgentError, UserError
from agent.voice._session import (
    ResponseAudio,
    ResponseDone,
    ResponseStarted,
    ResponseText,
    TurnHeard,
    TurnTranscript,
    VoiceEvent,
    VoiceSession,
)
from agent.voice._turns import SpeechStarted, SpeechStopped, TurnDetector

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from agent._loop import Agent
    from agent.voice._speaker import Speaker

RATE = 24_000
"""The protocol's PCM rate, both ways."""

MAX_APPEND_BYTES = 1 << 20
"""The largest decoded audio one `input_audio_buffer.append` may carry (about 22 s at 24 kHz)."""


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class _Pcm24:
    """Float audio at any rate -> 16-bit PCM at 24 kHz, resampled as one stream (no seams between frames)."""

    def __init__(self, rate: int) -> None:
        import av

        self.rate = rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE) if rate != RATE else None
        self._pts = 0

    def convert(self, samples: np.ndarray[Any, Any]) -> bytes:
        clipped = np.clip(np.nan_to_num(samples.astype(np.float32)), -1.0, 1.0)
        if self._resampler is None:
            return bytes((clipped * 32767).astype("<i2").tobytes())
        import av

        frame = av.AudioFrame.from_ndarray(clipped[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self._pts
        self._pts += len(clipped)
        return b"".join(bytes(out.planes[0])[: out.samples * 2] for out in self._resampler.resample(frame))  # type: ignore[no-any-return]


class RealtimeConnection:
    """One WebSocket client: protocol events in, `VoiceSession` events out."""

    def __init__(self, websocket: WebSocket, agent: Agent[Any], speaker: Speaker | None) -> None:
        self.ws = websocket
        self.session = VoiceSession(agent, speaker=speaker)
        self.speaker = speaker
        self.modalities: list[str] = ["audio"] if speaker is not None else ["text"]
        self.instructions = ""
        self.vad = True
        self.response_id: str | None = None
        self.item_id = _id("item")
        self.items: dict[int, str] = {}  # turn -> the item id its audio was committed as
        self.answer_id: str | None = None  # the item of the response in progress
        self.answers: dict[str, int] = {}  # answer item id -> its turn (the last few)
        self._pcm: _Pcm24 | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, kind: str, **fields: Any) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps({"type": kind, "event_id": _id("event"), **fields}))

    async def error(self, message: str, code: str = "invalid_request_error", event_id: str | None = None) -> None:
        await self.send("error", error={"type": code, "code": code, "message": message, "event_id": event_id})

    def _session_body(self) -> dict[str, Any]:
        detection = {"type": "server_vad", "silence_duration_ms": round(self.session.detector.end_of_turn * 1000)}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "model": self.session.agent.model.name,
            "instructions": self.instructions,
            "output_modalities": self.modalities,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "turn_detection": detection if self.vad else None,
                    "transcription": {"model": self.session.agent.model.name} if self.session.transcribe else None,
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "voice": self.speaker.name if self.speaker else None,
                },
            },
        }

    # ------------------------------------------------------------------ the connection

    async def run(self) -> None:
        async with self.session:
            pump = asyncio.ensure_future(self._pump())
            try:
                await self.send("session.created", session=self._session_body())
                while True:
                    try:
                        raw = await self.ws.receive_text()
                    except (KeyError, RuntimeError):  # a binary frame, or the socket went away
                        from starlette.websockets import WebSocketState

                        if self.ws.client_state != WebSocketState.CONNECTED:
                            return
                        await self.error("send JSON text frames")
                        continue
                    await self._handle(raw)
            finally:
                await self.session.close()
                with contextlib.suppress(Exception):
                    await pump

    async def _handle(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            await self.error("the message is not JSON")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error('an event is a JSON object with a string "type"')
            return
        kind, event_id = event["type"], event.get("event_id")
        handler = _HANDLERS.get(kind)
        if handler is None:
            await self.error(f"event type {kind[:80]!r} is not supported by this server", event_id=event_id)
            return
        try:
            await handler(self, event)
        except (UserError, ValueError, TypeError) as exc:
            await self.error(f"{kind}: {exc}", event_id=event_id)

    # ------------------------------------------------------------------ client events

    async def _session_update(self, event: dict[str, Any]) -> None:
        body = event.get("session")
        if not isinstance(body, dict):
            raise UserError('"session" must be an object')
        if "instructions" in body:
            if not isinstance(body["instructions"], str):
                raise UserError('"instructions" must be a string')
            self.instructions = self.session.instructions = body["instructions"]
        if "output_modalities" in body:
            wanted = body["output_modalities"]
            if wanted not in (["audio"], ["text"]):
                raise UserError('"output_modalities" must be ["audio"] or ["text"]')
            if wanted == ["audio"] and self.speaker is None:
                raise UserError('this server has no speech output (start it with a speaker): use ["text"]')
            self.modalities = list(wanted)
        audio = body.get("audio", {})
        turn = audio.get("input", {}).get("turn_detection", "keep") if isinstance(audio, dict) else "keep"
        if isinstance(audio, dict) and "transcription" in audio.get("input", {}):
            wanted = audio["input"]["transcription"]
            if wanted is not None and not isinstance(wanted, dict):
                raise UserError('"transcription" must be an object or null')
            self.session.transcribe = wanted is not None  # the session's own model transcribes
        if turn is None:
            self.vad = False
        elif isinstance(turn, dict):
            if turn.get("type", "server_vad") != "server_vad":
                raise UserError('only "server_vad" turn detection is supported')
            self.vad = True
            detector = self.session.detector
            if "silence_duration_ms" in turn:
                detector.end_of_turn = _number(turn["silence_duration_ms"], "silence_duration_ms", 100, 10_000) / 1000
            if "threshold" in turn:
                detector.threshold = _number(turn["threshold"], "threshold", 0.05, 0.95)
        await self.send("session.updated", session=self._session_body())

    async def _append(self, event: dict[str, Any]) -> None:
        data = event.get("audio")
        if not isinstance(data, str):
            raise UserError('"audio" must be base64 text')
        if len(data) > MAX_APPEND_BYTES * 4 // 3 + 4:
            raise UserError(f"at most {MAX_APPEND_BYTES} bytes of audio per append")
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise UserError('"audio" is not valid base64') from None
        if len(pcm) % 2:
            raise UserError("16-bit PCM has an even number of bytes")
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if self.vad:
            await self.session.feed(samples, RATE)
        else:
            self.session.detector.hold(samples, RATE)

    async def _commit(self, event: dict[str, Any]) -> None:
        await self.session.commit()

    async def _clear(self, event: dict[str, Any]) -> None:
        self.session.detector.clear()
        await self.send("input_audio_buffer.cleared")

    async def _item(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        content = item.get("content") if isinstance(item, dict) else None
        texts = [c.get("text") for c in content or [] if isinstance(c, dict) and c.get("type") == "input_text"]
        said = [t for t in texts if isinstance(t, str)]
        if not said or len(said) != len(texts):
            raise UserError("only user message items with input_text content are supported")
        await self.session.say("\n".join(said))

    async def _create(self, event: dict[str, Any]) -> None:
        return None

    async def _cancel(self, event: dict[str, Any]) -> None:
        await self.session.interrupt()

    async def _truncate(self, event: dict[str, Any]) -> None:
        item_id, index, end = event.get("item_id"), event.get("content_index", 0), event.get("audio_end_ms")
        if not isinstance(item_id, str) or item_id not in self.answers:
            raise UserError(f'"item_id" must name an answer of this session, got {str(item_id)[:80]!r}')
        if index != 0:
            raise UserError('an answer has one content part: "content_index" must be 0')
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            raise UserError('"audio_end_ms" must be a whole number >= 0')
        await self.session.truncate(self.answers[item_id], end / 1000)
        await self.send("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end)

    # ------------------------------------------------------------------ session events -> protocol

    async def _pump(self) -> None:
        async for event in self.session.events():
            try:
                await self._emit(event)
            except Exception:  # the socket closed: keep draining so the session can finish
                continue

    async def _emit(self, event: VoiceEvent) -> None:
        if isinstance(event, SpeechStarted):
            await self.send(
                "input_audio_buffer.speech_started", audio_start_ms=round(event.at * 1000), item_id=self.item_id
            )
        elif isinstance(event, SpeechStopped):
            await self.send(
                "input_audio_buffer.speech_stopped", audio_end_ms=round(event.at * 1000), item_id=self.item_id
            )
        elif isinstance(event, TurnHeard):
            await self.send("input_audio_buffer.committed", item_id=self.item_id, previous_item_id=None)
            self.items[event.turn] = self.item_id
            self.item_id = _id("item")
        elif isinstance(event, TurnTranscript):
            await self.send("conversation.item.input_audio_transcription.completed",
                            item_id=self.items.get(event.turn), content_index=0, transcript=event.text)  # fmt: skip
        elif isinstance(event, ResponseStarted):
            self.response_id, self.answer_id = _id("resp"), _id("item")
            self.answers[self.answer_id] = event.turn
            for old in list(self.answers)[:-16]:  # as many as the session remembers
                del self.answers[old]
            self._pcm = _Pcm24(self.speaker.rate) if self.speaker is not None else None
            await self.send("response.created", response={"id": self.response_id, "object": "realtime.response",
                                                          "status": "in_progress", "output": []})  # fmt: skip
        elif isinstance(event, ResponseText):
            kind = (
                "response.output_audio_transcript.delta"
                if self.modalities == ["audio"]
                else "response.output_text.delta"
            )
            await self.send(kind, **self._where(), delta=event.delta)
        elif isinstance(event, ResponseAudio):
            if self.modalities == ["audio"] and self._pcm is not None:
                pcm = self._pcm.convert(event.samples)
                if pcm:
                    delta = base64.b64encode(pcm).decode()
                    await self.send("response.output_audio.delta", **self._where(), delta=delta)
        elif isinstance(event, ResponseDone):
            status = "cancelled" if event.interrupted else "failed" if event.error else "completed"
            part = {"type": "output_audio" if self.modalities == ["audio"] else "output_text"}
            part["transcript" if self.modalities == ["audio"] else "text"] = event.text
            body: dict[str, Any] = {
                "id": self.response_id,
                "object": "realtime.response",
                "status": status,
                "output": [{"id": self.answer_id, "type": "message", "role": "assistant", "content": [part]}],
            }
            if event.error:
                body["status_details"] = {"type": "failed", "error": {"message": event.error}}
            await self.send("response.done", response=body)

    def _where(self) -> dict[str, Any]:
        """Where a delta belongs: the response, and its answer item's one content part."""
        return {"response_id": self.response_id, "item_id": self.answer_id, "output_index": 0, "content_index": 0}


_HANDLERS: dict[str, Callable[[RealtimeConnection, dict[str, Any]], Awaitable[None]]] = {
    "session.update": RealtimeConnection._session_update,
    "input_audio_buffer.append": RealtimeConnection._append,
    "input_audio_buffer.commit": RealtimeConnection._commit,
    "input_audio_buffer.clear": RealtimeConnection._clear,
    "conversation.item.create": RealtimeConnection._item,
    "response.create": RealtimeConnection._create,
    "response.cancel": RealtimeConnection._cancel,
    "conversation.item.truncate": RealtimeConnection._truncate,
}


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise UserError(f'"{name}" must be a number from {low:g} to {high:g}')
    return float(value)


def authorized(websocket: WebSocket, keys: Sequence[bytes]) -> tuple[bool, str | None]:
    """Whether the client gave one of `keys` (bearer header, or the browser subprotocol), and the subprotocol to
    accept with."""
    protocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    chosen = "realtime" if "realtime" in protocols else None
    if not keys:
        return True, chosen
    given: list[bytes] = []
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        given.append(token.strip().encode())
    for p in protocols:
        if p.startswith("openai-insecure-api-key."):
            given.append(p.removeprefix("openai-insecure-api-key.").encode())
    ok = any(hmac.compare_digest(g, k) for g in given for k in keys)
    return ok, chosen


async def serve_realtime(
    websocket: WebSocket,
    agent_for: Callable[[], Awaitable[Agent[Any]]],
    keys: Sequence[bytes],
    speaker: Speaker | None,
    detector_for: Callable[[], TurnDetector] | None = None,
) -> None:
    """Serve one WebSocket connection (see the module docstring)."""
    ok, subprotocol = authorized(websocket, keys)
    if not ok:
        await websocket.close(code=1008, reason="invalid or missing API key")
        return
    try:
        agent = await agent_for()
    except MMAgentError as exc:
        await websocket.close(code=1011, reason=str(exc)[:120])
        return
    await websocket.accept(subprotocol=subprotocol)
    connection = RealtimeConnection(websocket, agent, speaker)
    if detector_for is not None:
        connection.session.detector = detector_for()
    await connection.run()
