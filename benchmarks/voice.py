"""Voice loop latency: from the end of the user's speech to the first audio frame of the answer.

A scripted stream: the bundled clip (examples/data/request.wav, 4.1 s of speech) N times, each followed by
1.5 s of silence, fed through a `VoiceSession` in 20 ms chunks as fast as it is taken (each answer finishes
before the next clip starts, as a user who waits). Per turn:

- detect: stream time from the true end of speech (the clip's last sample above -40 dBFS) to the moment the
  turn detector ends the turn (its end-of-turn silence, 0.6 s by default, plus one VAD frame);
- model: wall time from that decision to the first answer text (prefill of the spoken turn, first token);
- speech: wall time from the first text to the first audio frame (the first sentence completing, then
  synthesis of its first chunk);
- first_audio = model + speech: what the user waits after the detector decided.

Models: `--model tiny-phi4` hears the turn (the real audio path, random weights); `--model smollm2` cannot hear,
so it gets the clip's words as a typed turn at the same moment (the text fallback: generation and speech
without the audio encoder). Speaker: espeak-ng when installed, else the tone double (`--speech tone`).

Usage: python benchmarks/voice.py [--model tiny-phi4|smollm2|random-full|...] [--turns 10] [--speech auto|tone]
       (random-full: the full-size random-weight Phi-4-mm on CUDA, for a lent device; --smoke: shrunk, on the CPU)
Last line: first_audio_ms=<float> detect_ms=<float>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from agent import Agent, ModelSettings  # noqa: E402
from agent.voice import (  # noqa: E402
    ResponseAudio,
    ResponseDone,
    ResponseText,
    TurnHeard,
    VoiceSession,
    choose_speaker,
)

CLIP = Path(__file__).resolve().parents[1] / "examples" / "data" / "request.wav"
WORDS = "What is the weather in Oslo? And set a timer for five minutes."
SYSTEM = "You are a voice assistant. Answer in one short sentence."


def speech_end(samples: np.ndarray[Any, Any], rate: int) -> float:
    """Seconds to the last 10 ms block louder than -40 dBFS."""
    block = rate // 100
    levels = [np.sqrt(np.mean(samples[i : i + block] ** 2) + 1e-12) for i in range(0, len(samples), block)]
    loud = [i for i, level in enumerate(levels) if 20 * np.log10(level) > -40]
    return (loud[-1] + 1) * block / rate


async def run(model: Any, speaker: Any, turns: int, hears: bool, max_tokens: int) -> list[dict[str, float]]:
    clip, rate = sf.read(CLIP, dtype="float32")
    assert rate == 16_000
    end = speech_end(clip, rate)
    agent = Agent(model, system_prompt=SYSTEM, settings=ModelSettings(max_tokens=max_tokens))
    rows: list[dict[str, float]] = []
    async with VoiceSession(agent, speaker=speaker) as session:
        events = session.events()
        for _ in range(turns):
            audio = np.concatenate([clip, np.zeros(int(1.5 * rate), np.float32)])
            decided_stream = decided_wall = None
            for start in range(0, len(audio), 320):
                if not hears and decided_wall is None:
                    # the text fallback: the detector still listens; the words go in as a typed turn
                    for event in session.detector.feed(audio[start : start + 320], rate):
                        if type(event).__name__ == "Turn":
                            decided_stream, decided_wall = (start + 320) / rate, time.perf_counter()
                            await session.say(WORDS)
                else:
                    await session.feed(audio[start : start + 320], rate)
                    if decided_wall is None and session.responding:
                        decided_stream, decided_wall = (start + 320) / rate, time.perf_counter()
                if decided_wall is not None:
                    break
            assert decided_wall is not None and decided_stream is not None, "no turn detected"
            first_text = first_audio = None
            async for event in events:
                if isinstance(event, TurnHeard) and hears:
                    decided_wall = event.decided_at
                elif isinstance(event, ResponseText) and first_text is None:
                    first_text = time.perf_counter()
                elif isinstance(event, ResponseAudio) and first_audio is None:
                    first_audio = time.perf_counter()
                elif isinstance(event, ResponseDone):
                    assert event.error is None, event.error
                    break
            if first_text is None or first_audio is None:
                print("  (a turn without text or audio: skipped)")
                continue
            rows.append(
                {
                    "detect_ms": (decided_stream - end) * 1000,
                    "model_ms": (first_text - decided_wall) * 1000,
                    "speech_ms": (first_audio - first_text) * 1000,
                    "first_audio_ms": (first_audio - decided_wall) * 1000,
                }
            )
            print("  " + "  ".join(f"{k} {v:8.1f}" for k, v in rows[-1].items()), flush=True)
            session.detector.clear()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny-phi4", help="a resolve_model spec (tiny-phi4, smollm2, ...) or random-full"
    )
    parser.add_argument("--smoke", action="store_true", help="with random-full: a shrunk model on the CPU")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--speech", default="auto", help="auto | espeak-ng | kokoro | tone")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    load_model = runpy.run_path(os.path.join(_HERE, "phi4_gpu.py"), run_name="phi4_gpu")["load_model"]

    from agent.models.resolve import reads_media

    model = load_model(args.model, smoke=args.smoke)
    hears = reads_media(model) and "audio" in model.input_modalities
    speaker, line = choose_speaker(args.speech)
    if speaker is None:
        speaker, line = choose_speaker("tone")
    how = "hears the turn" if hears else "text fallback: the clip's words as a typed turn"
    print(f"model: {model.name} ({how}); {line}")
    rows = asyncio.run(run(model, speaker, args.turns, hears, args.max_tokens))
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("median: " + "  ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    print(f"first_audio_ms={medians['first_audio_ms']:.1f} detect_ms={medians['detect_ms']:.1f}")


if __name__ == "__main__":
    main()
