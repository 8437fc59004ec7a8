"""A live voice loop, offline: a recording streamed in as if from a microphone, answers spoken into a WAV file.

    python examples/voice_live.py [CLIP.wav] [--db voice.db] [--model auto] [--speech auto] [--out answer.wav]
        [--barge-in | --talk-over SECONDS]

The clip (default `examples/data/request.wav`, "What is the weather in Oslo? And set a timer for five minutes.")
is fed to a `VoiceSession` in 20 ms chunks, twice, with silence after each: the turn detector (silero-vad) ends
each turn, the agent hears it as audio and answers with the voice assistant's tools (weather, time, timers,
units), and the answer is spoken sentence by sentence (Kokoro, else espeak-ng, else a tone stands in) into
`--out`. With `--barge-in` the second clip starts while the first answer is still being generated, as a user
who talks over the assistant: the first answer is cut short and stored as interrupted. With `--talk-over 1.5`
the first answer is generated whole, but the user is taken to talk over its playback 1.5 s in: the transport
says so (`session.truncate`), and the conversation keeps only the words spoken by then. With a real microphone
and speaker, `mmagent voice` runs the same loop.

Only Phi-4-multimodal hears. When the chosen model cannot (SmolLM2, which `auto` picks offline when no Phi-4
weights are on this machine), the example says so and runs the tiny random-weight Phi-4 instead: the VAD, the
audio encoder, the tools, speech synthesis and barge-in all run for real, but what it says is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile as sf

from agent import Agent, ModelSettings
from agent.exceptions import MMAgentError
from agent.models.resolve import resolve_media_model
from agent.voice import (
    ResponseAudio,
    ResponseDone,
    ResponseText,
    ResponseTool,
    TurnHeard,
    VoiceSession,
    choose_speaker,
)
from memory import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from voice_assistant import SAMPLE, SYSTEM, TOOLS  # the same tools and prompt


async def converse(
    session: VoiceSession, clip: np.ndarray[Any, Any], rate: int, barge_in: bool, talk_over: float | None = None
) -> list[Any]:
    events: list[Any] = []

    async def collect() -> None:
        async for event in session.events():
            events.append(event)
            if isinstance(event, TurnHeard):
                print(f"you        : ({event.seconds:.1f} s of speech)")
            elif isinstance(event, ResponseTool) and event.result is None:
                print(f"tool       : {event.name}")
            elif isinstance(event, ResponseDone):
                state = "interrupted" if event.interrupted else event.error or "done"
                print(f"assistant  : {event.text[:160]!r} ({state})")

    collector = asyncio.ensure_future(collect())
    chunk = rate // 50
    pause = np.zeros(int(1.2 * rate), dtype=clip.dtype)
    for number in (1, 2):
        stream = np.concatenate([clip, pause])
        for start in range(0, len(stream), chunk):
            await session.feed(stream[start : start + chunk], rate)
            if session.responding and not barge_in:
                await session.wait()  # a patient user: the answer ends before they speak again
        if talk_over is not None and number == 1:  # playback was cut talk_over seconds into the answer
            await session.wait()
            answer = next((e.text for e in events if isinstance(e, ResponseDone)), "")
            kept = await session.truncate(1, talk_over)
            print(f"heard      : {kept[:160]!r} of {len(answer)} characters (played for {talk_over:g} s)")
        if barge_in and number == 1:  # talk over the answer as soon as it starts
            for _ in range(1000):
                if not session.responding or any(isinstance(e, ResponseText) for e in events):
                    break
                await asyncio.sleep(0.01)
    await session.wait()
    await session.close()
    await collector
    return events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", nargs="?", default=str(SAMPLE), help="a WAV (or FLAC/OGG) file of speech")
    parser.add_argument("--db", default="voice.db", help="memory store (SQLite path or SQLAlchemy URL)")
    parser.add_argument("--model", default="auto", help="auto | phi4 | tiny-phi4 | folder | server URL")
    parser.add_argument("--speech", default="auto", help="auto | kokoro | espeak-ng | tone | none")
    parser.add_argument("--out", default="answer.wav", help="where the spoken answers go")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--barge-in", action="store_true", help="talk over the first answer while it is generated")
    talk.add_argument("--talk-over", type=float, default=None, metavar="SECONDS",
                      help="talk over the first answer's playback this far in")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        clip, rate = sf.read(args.clip, dtype="float32")
    except (OSError, RuntimeError) as exc:
        print(f"error: cannot read audio file {args.clip!r}: {exc}", file=sys.stderr)
        return 1
    try:
        speaker, line = choose_speaker(args.speech)
        if speaker is None and args.speech == "auto":
            speaker, line = choose_speaker("tone")
            line += "; a tone stands in"
        model, noise = resolve_media_model(args.model, "hear audio")
        print(f"model      : {model.name}; {line}")
        with Store(args.db) as store:
            agent = Agent(model, TOOLS, system_prompt=SYSTEM, memory=store,
                          settings=ModelSettings(max_tokens=args.max_tokens))  # fmt: skip
            session = VoiceSession(agent, speaker=speaker)
            asyncio.run(_run(session, clip, rate, args.barge_in, args.out, args.talk_over))
            runs = store.list_runs(conversation_id=session.conversation_id)
            print(f"stored     : {len(runs)} runs in {args.db} ({', '.join(r.status for r in reversed(runs))})")
        if noise:
            print("(random weights: what the assistant said is noise)")
    except MMAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run(
    session: VoiceSession, clip: np.ndarray[Any, Any], rate: int, barge_in: bool, out: str, talk_over: float | None
) -> None:
    async with session:
        events = await converse(session, clip, rate, barge_in, talk_over)
    frames = [e for e in events if isinstance(e, ResponseAudio)]
    if frames:
        sf.write(out, np.concatenate([f.samples for f in frames]), frames[0].rate)
        seconds = sum(len(f.samples) for f in frames) / frames[0].rate
        print(f"spoken     : {seconds:.1f} s of answer in {out}")


if __name__ == "__main__":
    sys.exit(main())
