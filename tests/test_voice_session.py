"""agent.voice: the session loop (turns to the agent as audio, spoken answers, barge-in) and the Realtime
WebSocket endpoint, on the bundled speech clip (examples/data/request.wav), the tiny Phi-4 and model doubles."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import soundfile as sf

from agent import Agent, ModelSettings
from agent.exceptions import UserError
from agent.messages import AudioPart, ImagePart, Message
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("silero_vad", "torch", "av")),
    reason="the voice loop needs silero-vad, torch and PyAV (pip install 'mmagent[voice]')",
)

from agent.voice import (  # noqa: E402
    ResponseAudio,
    ResponseDone,
    ResponseText,
    ResponseTool,
    SpeechStarted,
    ToneSpeaker,
    TurnHeard,
    TurnTranscript,
    VoiceSession,
)

CLIP = Path(__file__).resolve().parents[1] / "examples" / "data" / "request.wav"


def speech() -> np.ndarray[Any, Any]:
    samples, rate = sf.read(CLIP, dtype="float32")
    assert rate == 16_000
    return samples


def silence(seconds: float) -> np.ndarray[Any, Any]:
    return np.zeros(round(seconds * 16_000), np.float32)


async def feed(session: VoiceSession, audio: np.ndarray[Any, Any], *, wait: bool = True) -> None:
    """20 ms chunks; with `wait`, each response finishes before more audio comes (a fast responder)."""
    for start in range(0, len(audio), 320):
        await session.feed(audio[start : start + 320], 16_000)
        if wait and session.responding:
            await session.wait()


async def collect(session: VoiceSession, into: list[Any]) -> None:
    async for event in session.events():
        into.append(event)


def short_answers(model: Any, tokens: int) -> Agent[str]:
    return Agent(model, settings=ModelSettings(max_tokens=tokens))


# ---------------------------------------------------------------- the tiny Phi-4


def test_two_utterances_are_two_turns_answered_aloud(tiny_phi4: Any, tmp_path: Path) -> None:
    async def go() -> tuple[list[Any], str | None]:
        with Store(tmp_path / "voice.db") as store:
            agent = Agent(tiny_phi4, settings=ModelSettings(max_tokens=6), memory=store)
            events: list[Any] = []
            async with VoiceSession(agent, speaker=ToneSpeaker()) as session:
                collector = asyncio.ensure_future(collect(session, events))
                await feed(session, np.concatenate([silence(0.5), speech(), silence(1.5), speech(), silence(1.0)]))
                await session.wait()
                await session.close()
                await collector
                messages = store.load_conversation(session.conversation_id or "")
            return events, _check_audio_turns(messages)

    events, problem = asyncio.run(go())
    assert problem is None, problem
    heard = [e for e in events if isinstance(e, TurnHeard)]
    assert [e.turn for e in heard] == [1, 2] and all(3.5 < e.seconds < 4.6 for e in heard)
    done = [e for e in events if isinstance(e, ResponseDone)]
    assert [(e.turn, e.interrupted, e.error) for e in done] == [(1, False, None), (2, False, None)]
    for turn in (1, 2):
        audio = [e for e in events if isinstance(e, ResponseAudio) and e.turn == turn]
        text = "".join(e.delta for e in events if isinstance(e, ResponseText) and e.turn == turn)
        assert text.strip() and audio and all(len(a.samples) == 320 for a in audio[:-1])  # 20 ms at 16 kHz


def _check_audio_turns(messages: Sequence[Message]) -> str | None:
    users = [m for m in messages if m.role == "user"]
    if len(users) != 2:
        return f"expected two stored user turns, got {len(users)}"
    for m in users:
        clips = [p for p in m.parts if isinstance(p, AudioPart)]
        if len(clips) != 1 or not 3.5 < len(clips[0].samples()) / 16_000 < 4.8:
            return f"a stored turn does not hold the spoken clip: {m.parts}"
    return None


def test_speech_during_an_answer_cancels_it_and_the_partial_answer_is_stored_interrupted(
    tiny_phi4: Any, tmp_path: Path
) -> None:
    async def go() -> tuple[list[Any], list[Any], list[Message], Any]:
        with Store(tmp_path / "voice.db") as store:
            agent = Agent(tiny_phi4, settings=ModelSettings(max_tokens=400), memory=store)
            events: list[Any] = []
            async with VoiceSession(agent, speaker=ToneSpeaker(delay=0.01)) as session:
                collector = asyncio.ensure_future(collect(session, events))
                await feed(session, np.concatenate([silence(0.3), speech(), silence(1.0)]), wait=False)
                for _ in range(3000):  # until it is generating
                    if any(isinstance(e, ResponseText) for e in events):
                        break
                    await asyncio.sleep(0.01)
                before = len(events)
                await feed(session, silence(0.2), wait=False)
                await feed(session, speech()[:16_000], wait=False)  # the user talks over the answer
                assert not session.responding  # cancelled inside the feed that heard the speech
                after = events[before:]
                await session.interrupt()
                await session.close()
                await collector
                runs = store.list_runs(conversation_id=session.conversation_id)
                return events, after, store.load_conversation(session.conversation_id or ""), runs

    events, after, messages, runs = asyncio.run(go())
    done = next(e for e in events if isinstance(e, ResponseDone))
    assert done.turn == 1 and done.interrupted and done.text.strip() and done.run_id is not None
    started = next(i for i, e in enumerate(events) if isinstance(e, SpeechStarted) and events.index(done) < i)
    # nothing of turn 1 after the barge-in: generation and speech stopped before the new speech was reported
    assert not any(getattr(e, "turn", None) == 1 for e in events[started:])
    assert any(isinstance(e, ResponseDone) for e in after)
    (run,) = [r for r in runs if r.id == done.run_id]
    assert run.status == "interrupted" and run.error == "interrupted by the user"
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].text == done.text


# ---------------------------------------------------------------- tools in voice turns


def test_tools_run_in_voice_turns_and_their_images_reach_the_model() -> None:
    picture = ImagePart.from_pil(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8), (1, 2, 3)))
    seen: list[list[str]] = []

    def model(messages: list[Message], info: AgentInfo) -> Any:
        seen.append([getattr(c, "kind", p.kind) for m in messages for p in m.parts for c in getattr(p, "content", [p])])
        return [call("look")] if info.request_index == 0 else "It is a dark square."

    def look() -> ImagePart:
        """Take a picture."""
        return picture

    async def go() -> list[Any]:
        events: list[Any] = []
        async with VoiceSession(Agent(FunctionModel(model), [look]), speaker=None) as session:
            collector = asyncio.ensure_future(collect(session, events))
            await feed(session, np.concatenate([speech(), silence(1.0)]))
            await session.wait()
            await session.close()
            await collector
        return events

    events = asyncio.run(go())
    assert "audio" in seen[0] and "image" in seen[1]  # the turn as audio; the tool's image as a real part
    tools = [(e.name, e.result is None) for e in events if isinstance(e, ResponseTool)]
    assert tools == [("look", True), ("look", False)]
    done = next(e for e in events if isinstance(e, ResponseDone))
    assert done.text == "It is a dark square." and not any(isinstance(e, ResponseAudio) for e in events)


class Streaming(FunctionModel):
    """Streams its answer a word every 5 ms, as a backend generating tokens does."""

    async def request_stream(self, messages: Any, tools: Any, settings: Any) -> Any:
        from agent.models import TextDelta

        response = await self.request(messages, tools, settings)
        for word in response.message.text.split(" "):
            await asyncio.sleep(0.005)
            yield TextDelta(word + " ")
        yield response


def test_speech_starts_before_the_answer_is_complete() -> None:
    answer = "The first sentence is short. " + " ".join(["And then it goes on."] * 30)

    async def go() -> list[Any]:
        events: list[Any] = []
        model = Streaming(lambda messages, info: answer)
        async with VoiceSession(Agent(model), speaker=ToneSpeaker()) as session:
            collector = asyncio.ensure_future(collect(session, events))
            await session.say("talk to me")
            await session.wait()
            await session.close()
            await collector
        return events

    events = asyncio.run(go())
    texts = [i for i, e in enumerate(events) if isinstance(e, ResponseText)]
    audio = [i for i, e in enumerate(events) if isinstance(e, ResponseAudio)]
    assert audio and audio[0] < texts[-1]  # the first sentence was spoken while the rest was still coming
    spoken = sum(len(e.samples) for e in events if isinstance(e, ResponseAudio)) / 16_000
    assert spoken == pytest.approx(0.06 * len(answer), rel=0.05)  # every sentence, once


ANSWER = "The station is north of here. Walk along the river for ten minutes. You cannot miss it."


def heard_seconds(speaker: ToneSpeaker, sentences: list[str], share: float = 0.0) -> float:
    """Playback time through `sentences`, then `share` of the next sentence of ANSWER."""
    whole = sum(speaker.duration(t) for t in sentences)
    rest = ANSWER.split(". ")[len(sentences)]
    return whole + share * speaker.duration(rest + ".")


class AllAtOnce(FunctionModel):
    """Streams its whole answer as one delta, so one delta completes several sentences."""

    async def request_stream(self, messages: Any, tools: Any, settings: Any) -> Any:
        from agent.models import TextDelta

        response = await self.request(messages, tools, settings)
        yield TextDelta(response.message.text)
        yield response


@pytest.mark.parametrize("streaming", [True, False])
def test_an_answer_talked_over_is_kept_as_far_as_it_was_heard(tmp_path: Path, streaming: bool) -> None:
    """The answer is generated in full long before it is played; the transport says how much was heard."""
    store = Store(f"sqlite:///{tmp_path / 'voice.db'}")
    speaker = ToneSpeaker()

    def answer(messages: list[Message], info: AgentInfo) -> str:
        return ANSWER if messages[-1].text == "where is the station?" else f"I heard {len(messages)} messages."

    model = Streaming(answer) if streaming else AllAtOnce(answer)  # word by word, or all sentences in one delta
    first = ["The station is north of here."]

    async def go() -> tuple[VoiceSession, list[str]]:
        async with VoiceSession(Agent(model, memory=store), speaker=speaker) as session:
            await session.say("where is the station?")
            await session.wait()
            kept = [await session.truncate(1, heard_seconds(speaker, first, 0.5))]  # "Walk along the" of 7 words
            await session.say("thanks")
            await session.wait()
            kept.append(await session.truncate(2, 60.0))  # all of it was heard: nothing changes
            assert await session.truncate(2, float("inf")) == kept[-1]
            with pytest.raises(UserError, match="turn 9 has no spoken answer"):
                await session.truncate(9, 1.0)
            for wrong in (-1.0, float("nan"), "2", True):
                with pytest.raises(UserError, match="must be a number >= 0"):
                    await session.truncate(1, wrong)  # type: ignore[arg-type]
        return session, kept

    session, kept = asyncio.run(go())
    assert kept == ["The station is north of here. Walk along the", "I heard 3 messages."]
    stored = store.load_conversation(session.conversation_id or "")
    assert [m.text for m in stored if m.role == "assistant"] == kept
    assert model.requests[-1][-2].text == kept[0]  # the next turn's request held only what was heard
    assert [h.conversation_id for h in store.search("north")] and not store.search("minutes")
    store.close()


@pytest.mark.parametrize("stored", [True, False])
def test_talking_over_an_answer_generated_in_full_but_still_being_synthesised_keeps_it_once(
    tmp_path: Path, stored: bool
) -> None:
    """The run finished (and kept its answer) while a slow synthesiser was still speaking it: the barge-in
    cancels the speech only; the answer is not stored a second time, and can still be cut to what was heard."""
    store = Store(f"sqlite:///{tmp_path / 'voice.db'}") if stored else None
    speaker = ToneSpeaker(delay=0.02)  # 5.3 s of audio, synthesised in 20 ms chunks: seconds behind the text
    model = Streaming(lambda messages, info: ANSWER)
    heard = heard_seconds(speaker, ["The station is north of here."], 0.5)

    async def go() -> tuple[VoiceSession, list[Any], str]:
        events: list[Any] = []
        async with VoiceSession(Agent(model, memory=store), speaker=speaker) as session:
            collector = asyncio.ensure_future(collect(session, events))
            await session.say("where is the station?")
            for _ in range(1000):  # until the run has ended and the first 'heard' seconds are synthesised
                audio = sum(len(e.samples) for e in events if isinstance(e, ResponseAudio)) / 16_000
                ended = sum(isinstance(e, ResponseText) for e in events) == len(ANSWER.split(" "))
                if store is not None:
                    ended = ended and bool(store.list_runs(conversation_id=session.conversation_id, status="completed"))
                if ended and audio >= heard:
                    break
                await asyncio.sleep(0.01)
            assert session.responding  # still speaking
            await session.interrupt()
            kept = await session.truncate(1, heard)
            await session.close()
            await collector
        return session, events, kept

    session, events, kept = asyncio.run(go())
    (done,) = [e for e in events if isinstance(e, ResponseDone)]
    assert done.interrupted and done.text.strip() == ANSWER
    # the second sentence was still being synthesised when cut: its length unknown, only whole sentences are kept
    assert kept == "The station is north of here."
    if store is not None:
        (run,) = store.list_runs(conversation_id=session.conversation_id)
        assert run.status == "completed" and done.run_id == run.id
        messages = store.load_conversation(session.conversation_id or "")
        store.close()
    else:
        messages = session.history
    assert [(m.role, m.text) for m in messages] == [("user", "where is the station?"), ("assistant", kept)]


def test_talking_over_an_answer_while_the_run_commits_it_stores_it_once(tmp_path: Path) -> None:
    """The barge-in lands while the run is writing its answer to the store: the answer is kept once, as the run
    wrote it, and the run counts as completed (only its speech was cut)."""

    class SlowCommits(Store):
        committing = threading.Event()

        def commit_step(self, *args: Any, **kwargs: Any) -> None:
            self.committing.set()
            time.sleep(0.3)
            super().commit_step(*args, **kwargs)

    store = SlowCommits(f"sqlite:///{tmp_path / 'voice.db'}")

    async def go() -> tuple[VoiceSession, list[Any]]:
        events: list[Any] = []
        async with VoiceSession(Agent(Streaming(lambda m, i: ANSWER), memory=store), speaker=ToneSpeaker()) as session:
            collector = asyncio.ensure_future(collect(session, events))
            await session.say("where is the station?")
            await asyncio.to_thread(store.committing.wait, 10)
            await session.interrupt()
            assert await session.truncate(1, float("inf")) == ANSWER
            await session.close()
            await collector
        return session, events

    session, events = asyncio.run(go())
    (done,) = [e for e in events if isinstance(e, ResponseDone)]
    assert done.interrupted and done.text.strip() == ANSWER
    (run,) = store.list_runs(conversation_id=session.conversation_id)
    assert run.status == "completed" and done.run_id == run.id
    assert [m.text for m in store.load_conversation(session.conversation_id or "")] == ["where is the station?", ANSWER]
    store.close()


def test_truncating_without_a_store_cuts_the_history_and_skips_text_said_before_a_tool() -> None:
    speaker = ToneSpeaker()

    def answer(messages: list[Message], info: AgentInfo) -> Any:
        if messages[-1].role == "user":
            return [call("lookup", place="station")]  # with text said before it, below
        return ANSWER

    model = Streaming(answer)
    original = model.request

    async def with_preamble(messages: Any, tools: Any, settings: Any) -> Any:
        response = await original(messages, tools, settings)
        if response.message.tool_calls:  # the model thinks aloud first; that is spoken but is not the answer
            from agent.messages import TextPart

            parts = (TextPart(text="Let me look that up for you."), *response.message.parts)
            response = dataclasses.replace(response, message=Message(role="assistant", parts=parts))
        return response

    model.request = with_preamble  # type: ignore[method-assign]

    def lookup(place: str) -> str:
        """Where a place is."""
        return "north"

    async def go() -> tuple[VoiceSession, str, str]:
        async with VoiceSession(Agent(model, tools=[lookup]), speaker=speaker) as session:
            await session.say("where is the station?")
            await session.wait()
            preamble = speaker.duration("Let me look that up for you.")
            none = await session.truncate(1, preamble * 0.9)  # stopped before the answer began
            await session.say("again?")
            await session.wait()
            some = await session.truncate(2, preamble + heard_seconds(speaker, [], 0.99))
        return session, none, some

    session, none, some = asyncio.run(go())
    assert none == "" and some == "The station is north of here."[: len("The station is north of")]
    answers = [m.text for m in session.history if m.role == "assistant" and not m.tool_calls]
    assert answers == ["", "The station is north of"]


def test_without_a_store_the_history_carries_each_turn_once() -> None:
    model = FunctionModel(lambda messages, info: f"answer {len(messages)}")

    async def go() -> VoiceSession:
        async with VoiceSession(Agent(model, system_prompt="Be brief.")) as session:
            for text in ("one", "two", "three"):
                await session.say(text)
                await session.wait()
        return session

    session = asyncio.run(go())
    roles = [[m.role for m in request] for request in model.requests]
    assert roles[-1] == ["system", "user", "assistant", "user", "assistant", "user"]  # one system prompt
    assert [m.text for m in session.history] == ["one", "answer 2", "two", "answer 4", "three", "answer 6"]


def test_turns_are_transcribed_after_their_answer_when_asked(tmp_path: Path) -> None:
    def model(messages: list[Message], info: AgentInfo) -> str:
        last = messages[-1]
        if last.text == "Transcribe the audio clip into text.":
            return "What is the weather in Oslo?"
        return "Sunny."

    async def go() -> tuple[list[Any], dict[str, Any]]:
        with Store(tmp_path / "voice.db") as store:
            events: list[Any] = []
            agent = Agent(FunctionModel(model), memory=store)
            async with VoiceSession(agent, transcribe=True) as session:
                collector = asyncio.ensure_future(collect(session, events))
                await feed(session, np.concatenate([speech(), silence(1.0)]))
                await session.wait()
                await session.close()
                await collector
                return events, store.conversation(session.conversation_id or "").metadata

    events, metadata = asyncio.run(go())
    kinds = [type(e).__name__ for e in events if not isinstance(e, ResponseText)]
    assert kinds.index("ResponseDone") < kinds.index("TurnTranscript")  # the answer first
    transcript = next(e for e in events if isinstance(e, TurnTranscript))
    assert (transcript.turn, transcript.text) == (1, "What is the weather in Oslo?")
    (stored,) = metadata["transcripts"]
    assert stored["turn"] == 1 and stored["text"] == transcript.text and stored["run_id"]


# ---------------------------------------------------------------- the Realtime WebSocket


def pcm24(samples: np.ndarray[Any, Any]) -> bytes:
    from scipy.signal import resample_poly

    up = resample_poly(samples, 3, 2)
    return (np.clip(up, -1, 1) * 32767).astype("<i2").tobytes()


def read_response(ws: Any, timeout: float) -> tuple[list[str], str, bytes, dict[str, Any], str | None]:
    """Server events up to `response.done`: their types, the transcript, the PCM, the response, the committed item."""
    kinds: list[str] = []
    transcript, pcm, item = "", b"", None
    while True:
        event = json.loads(ws.recv(timeout=timeout))
        kinds.append(event["type"])
        if event["type"] == "response.output_audio_transcript.delta":
            transcript += event["delta"]
        elif event["type"] == "response.output_audio.delta":
            pcm += base64.b64decode(event["delta"])
        elif event["type"] == "input_audio_buffer.committed":
            item = event["item_id"]
        elif event["type"] == "response.done":
            return kinds, transcript, pcm, event["response"], item


def test_the_realtime_endpoint_answers_spoken_audio_with_audio_and_a_transcript() -> None:
    import websockets.sync.client as ws_client
    from serve_support import running

    from agent.server import create_app

    agent = Agent(FunctionModel(lambda m, i: "Sunny in Oslo. Your timer is set."))
    app = create_app(agent, speaker=ToneSpeaker(), api_keys=["k1"])
    with running(app) as server:
        url = server.base_url.replace("http", "ws") + "/realtime"
        with pytest.raises(Exception, match=r"1008|403|invalid"), ws_client.connect(url) as bad:
            bad.recv(timeout=5)
        with ws_client.connect(url, additional_headers={"Authorization": "Bearer k1"}) as ws:
            first = json.loads(ws.recv(timeout=10))
            assert first["type"] == "session.created" and first["session"]["output_modalities"] == ["audio"]
            odd_bytes = base64.b64encode(b"abc").decode()
            hostile = [
                "not json",
                json.dumps({"type": "nope.nope"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": odd_bytes}),
                json.dumps([1, 2]),
                json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 1_500_000}),  # over the cap
                json.dumps({"type": "session.update", "session": {"output_modalities": ["video"]}}),
                json.dumps(
                    {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": "x"}}}}}
                ),
                json.dumps({"type": "conversation.item.create", "item": {"content": [{"type": "input_image"}]}}),
                json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "audio_end_ms": 10}),
                json.dumps({"type": "conversation.item.truncate", "item_id": ["x"], "audio_end_ms": 10}),
            ]
            for message in hostile:
                ws.send(message)
                reply = json.loads(ws.recv(timeout=10))
                assert reply["type"] == "error" and reply["error"]["message"], message[:80]
            ws.send(b"\x00\x01binary")
            assert json.loads(ws.recv(timeout=10))["type"] == "error"  # and the connection stays open
            detection = {"type": "server_vad", "silence_duration_ms": 500}
            wanted = {"turn_detection": detection, "transcription": {"model": "whisper-1"}}
            ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": wanted}}}))
            updated = json.loads(ws.recv(timeout=10))
            assert updated["type"] == "session.updated" and updated["session"]["audio"]["input"]["transcription"]
            audio = pcm24(np.concatenate([silence(0.3), speech(), silence(1.0)]))
            for start in range(0, len(audio), 4800):  # 100 ms appends
                chunk = base64.b64encode(audio[start : start + 4800]).decode()
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            kinds, transcript, pcm, done, item = read_response(ws, 30)
            heard = json.loads(ws.recv(timeout=30))  # transcribed after the answer, off its latency path
            assert heard["type"] == "conversation.item.input_audio_transcription.completed"
            assert heard["item_id"] == item and heard["transcript"] == "Sunny in Oslo. Your timer is set."
            answer = done["output"][0]["id"]
            for wrong in ({"content_index": 1, "audio_end_ms": 5}, {"audio_end_ms": -5}, {"audio_end_ms": 1.5}):
                ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": answer, **wrong}))
                assert json.loads(ws.recv(timeout=10))["type"] == "error", wrong
    order = list(dict.fromkeys(kinds))
    assert order[:4] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
    ]
    assert transcript == "Sunny in Oslo. Your timer is set."
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == transcript
    tone = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    assert len(tone) / 24_000 == pytest.approx(0.06 * len(transcript), rel=0.1)  # ToneSpeaker: 60 ms a character
    spectrum = np.abs(np.fft.rfft(tone[:24_000]))
    assert abs(np.argmax(spectrum) * 24_000 / 24_000 - ToneSpeaker().frequency) < 10  # the tone, at 24 kHz


def test_mmagent_voice_without_an_audio_device_is_one_clear_line() -> None:
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("mmagent"))
    run = subprocess.run([exe, "voice", "--model", "tiny-phi4", "--speech", "none"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert any(s in run.stderr for s in ("mmagent[voice]", "PortAudio", "no microphone"))  # brackets kept


def test_a_realtime_session_on_the_tiny_phi4_hears_the_clip_and_answers_aloud(tiny_phi4: Any) -> None:
    import websockets.sync.client as ws_client
    from serve_support import running

    from agent.server import create_app

    seen: list[Any] = []
    audio_embed = tiny_phi4.model.model.embed_tokens_extend.audio_embed
    handle = audio_embed.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["audio_input_features"].shape), with_kwargs=True
    )
    agent = Agent(tiny_phi4, settings=ModelSettings(max_tokens=12))
    try:
        with (
            running(create_app(agent, speaker=ToneSpeaker())) as server,
            ws_client.connect(server.base_url.replace("http", "ws") + "/realtime") as ws,
        ):
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
            audio = pcm24(np.concatenate([silence(0.3), speech(), silence(1.0)]))
            for start in range(0, len(audio), 9600):
                chunk = base64.b64encode(audio[start : start + 9600]).decode()
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            _, transcript, pcm, done, _ = read_response(ws, 120)
    finally:
        handle.remove()
    assert seen  # the spoken turn went through the audio encoder
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == transcript
    assert transcript.strip() and len(pcm) / 2 / 24_000 == pytest.approx(0.06 * len(transcript.strip()), rel=0.2)


def test_the_official_openai_client_talks_to_the_realtime_endpoint(tmp_path: Path) -> None:
    from openai import AsyncOpenAI
    from serve_support import running

    from agent.server import create_app

    store = Store(f"sqlite:///{tmp_path / 'voice.db'}")
    agent = Agent(FunctionModel(lambda m, i: "Sunny in Oslo today."), memory=store)
    app = create_app(agent, speaker=ToneSpeaker(), api_keys=["k1"])
    audio = pcm24(np.concatenate([silence(0.3), speech(), silence(1.0)]))

    async def talk(base: str) -> tuple[list[str], Any, Any]:
        client = AsyncOpenAI(api_key="k1", base_url=base, websocket_base_url=base.replace("http", "ws"))
        kinds: list[str] = []
        async with client.realtime.connect(model="mmagent") as connection:
            await connection.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
            for start in range(0, len(audio), 9600):
                await connection.input_audio_buffer.append(audio=base64.b64encode(audio[start : start + 9600]).decode())
            response = None
            async for event in connection:  # parsed into the SDK's own typed events
                kinds.append(event.type)
                if event.type == "response.output_audio.delta":
                    assert event.item_id
                if event.type == "response.done":
                    response = event.response
                    # the user talked over it half way through "Sunny in Oslo today." (1.2 s of tone)
                    item = response.output[0].id
                    await connection.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=600)
                if event.type == "conversation.item.truncated":
                    return kinds, response, event
        raise AssertionError("the connection closed before the response was done")

    with running(app) as server:
        kinds, response, truncated = asyncio.run(talk(server.base_url))
    assert kinds[:2] == ["session.created", "session.updated"] and "response.output_audio.delta" in kinds
    assert response.status == "completed" and response.output[0].content[0].transcript == "Sunny in Oslo today."
    assert truncated.item_id == response.output[0].id and truncated.audio_end_ms == 600
    (conversation,) = store.list_conversations()
    assert [m.text for m in store.load_conversation(conversation.id) if m.role == "assistant"] == ["Sunny in"]
    store.close()


# ---------------------------------------------------------------- the microphone transport, on a fake PortAudio


class FakeStream:
    """A sounddevice stream whose callback the test calls (PortAudio's thread, played by hand)."""

    opened: ClassVar[list[FakeStream]] = []

    def __init__(self, *, samplerate: int, channels: int, dtype: str, callback: Any, **_: Any) -> None:
        self.samplerate, self.callback, self.running = samplerate, callback, False
        FakeStream.opened.append(self)

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        pass


def test_the_microphone_transport_plays_answers_and_stops_them_when_talked_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys
    import types

    from agent.voice._device import run_microphone

    fake = types.ModuleType("sounddevice")
    fake.query_devices = lambda kind=None: {"name": f"fake {kind}"}  # type: ignore[attr-defined]
    fake.InputStream = fake.OutputStream = FakeStream  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    FakeStream.opened = []
    answer = "One two three four five six seven eight nine ten. " * 4
    printed: list[str] = []

    store = Store(f"sqlite:///{tmp_path / 'voice.db'}")

    async def go() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        agent = Agent(Streaming(lambda messages, info: answer), memory=store)
        task = asyncio.ensure_future(run_microphone(agent, ToneSpeaker(), echo=printed.append))
        for _ in range(500):
            if len(FakeStream.opened) == 2:
                break
            await asyncio.sleep(0.01)
        mic, out = FakeStream.opened
        assert mic.samplerate == 16_000 and out.samplerate == 16_000 and mic.running and out.running

        async def say(audio: np.ndarray[Any, Any]) -> None:
            for start in range(0, len(audio), 512):
                mic.callback(audio[start : start + 512, None], 512, None, None)
                await asyncio.sleep(0)

        def play(seconds: float) -> np.ndarray[Any, Any]:
            frames = int(seconds * 16_000)
            buffer = np.zeros((frames, 1), np.float32)
            out.callback(buffer, frames, None, None)
            return buffer[:, 0].copy()

        await say(np.concatenate([speech(), silence(1.0)]))
        for _ in range(500):  # until the answer is being spoken
            if "assistant: " in printed and len(printed) > 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        heard = play(0.5)
        await say(speech()[:16_000])  # talk over it
        await asyncio.sleep(0.05)
        after = play(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not mic.running and not out.running
        return heard, after

    heard, after = asyncio.run(go())
    assert np.abs(heard).max() > 0.1  # the answer was playing
    assert np.abs(after).max() == 0.0  # and stopped when the user spoke: the queued frames were dropped
    assert printed[:3] == ["listening (Ctrl-C to stop)", "you: (4.1 s of speech)", "assistant: "]
    # 0.5 s of the first 3 s sentence was played: a sixth of its ten words, so the conversation keeps one
    (conversation,) = store.list_conversations()
    assert [m.text for m in store.load_conversation(conversation.id) if m.role == "assistant"] == ["One"]
    store.close()
