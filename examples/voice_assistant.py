"""A voice assistant: a spoken request (WAV) -> transcript -> agent with tools -> answer, all kept in memory.

    python examples/voice_assistant.py [request.wav] [--db voice.db] [--model auto]
    python examples/voice_assistant.py --search oslo --db voice.db

The clip goes in as an `AudioPart` (any sample rate; the backend resamples to the 16 kHz Phi-4 hears). Two runs
share one stored conversation: first the model transcribes the clip, and the transcript is kept as the assistant's
text (so `Store.search` finds it) and in the conversation's metadata; then the agent carries out the request
with the tools below (weather, time, timers, units). `--search` looks through the stored transcripts afterwards,
as does `mmagent history search WORD --db voice.db`.

Only Phi-4-multimodal hears. When the chosen model cannot (SmolLM2, which `auto` picks offline when no Phi-4
weights are on this machine), the example says so and runs the tiny random-weight Phi-4 instead: decoding,
resampling, feature extraction and the audio encoder all run for real, but what it writes is noise.
`examples/data/request.wav` ("What is the weather in Oslo? And set a timer for five minutes.", eSpeak NG) is the
default clip; see `examples/data/README.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import Field

from agent import Agent, AudioPart, Model, ModelSettings
from agent.events import FinalEvent, RetryEvent, ToolCallEvent, ToolResultEvent
from agent.exceptions import MMAgentError, RunError, UserError
from agent.messages import as_audio_part
from agent.models.resolve import resolve_media_model
from memory import Store
from tools import ModelRetry, tool

SAMPLE = Path(__file__).resolve().parent / "data" / "request.wav"
TRANSCRIBE = "Transcribe the audio clip into text."  # Phi-4-multimodal's own speech-recognition instruction
SYSTEM = (
    "You are a voice assistant. The user's spoken request and its transcript are in the conversation. "
    "Use the tools for weather, local time, timers and unit conversions; never guess what a tool would say. "
    "Then answer in one or two short sentences, as they would be spoken aloud."
)
ACT = "Now carry out the spoken request you just transcribed, using the tools, and answer briefly."
NOISE = "(random weights: this text is noise)"

# ---------------------------------------------------------------- tools

_WEATHER = {"oslo": (3, "light snow"), "paris": (14, "cloudy"), "rome": (21, "sunny"), "london": (9, "rain")}
_ZONES = {
    "oslo": "Europe/Oslo",
    "paris": "Europe/Paris",
    "rome": "Europe/Rome",
    "london": "Europe/London",
    "new york": "America/New_York",
    "tokyo": "Asia/Tokyo",
}


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Current weather in a city (a fixed table stands in for a weather service).

    Args:
        city: the city name, e.g. "Oslo".
        unit: temperature unit.
    """
    found = _WEATHER.get(city.strip().lower())
    if found is None:
        return f"No weather data for {city}. Known cities: {', '.join(c.title() for c in _WEATHER)}."
    celsius, sky = found
    degrees = f"{celsius}°C" if unit == "celsius" else f"{celsius * 9 / 5 + 32:.0f}°F"
    return f"{city.strip().title()}: {degrees}, {sky}"


@tool
def current_time(city: str) -> str:
    """The local date and time in a city.

    Args:
        city: the city name, e.g. "Tokyo".
    """
    zone = _ZONES.get(city.strip().lower())
    if zone is None:
        raise ModelRetry(f"unknown city {city!r}: use one of {', '.join(c.title() for c in _ZONES)}")
    try:
        now = dt.datetime.now(ZoneInfo(zone))
    except ZoneInfoNotFoundError:  # no time zone database on this machine
        return f"The time zone of {city} is unknown here; it is {dt.datetime.now(dt.UTC):%H:%M} UTC."
    return f"It is {now:%H:%M} on {now:%A %d %B} in {city.strip().title()}."


@tool
def set_timer(minutes: Annotated[float, Field(gt=0, le=24 * 60)], label: str = "timer") -> str:
    """Start a countdown timer.

    Args:
        minutes: how long, in minutes (at most a day).
        label: what the timer is for, e.g. "tea".
    """
    rings = dt.datetime.now() + dt.timedelta(minutes=minutes)
    return f"Timer {label!r} set for {minutes:g} minutes: it rings at {rings:%H:%M}."


Unit = Literal["km", "mi", "m", "ft", "kg", "lb", "l", "gal", "celsius", "fahrenheit"]
_FACTORS: dict[str, tuple[str, float]] = {  # unit -> (dimension, size in the dimension's base unit)
    "km": ("length", 1000.0),
    "mi": ("length", 1609.344),
    "m": ("length", 1.0),
    "ft": ("length", 0.3048),
    "kg": ("mass", 1.0),
    "lb": ("mass", 0.45359237),
    "l": ("volume", 1.0),
    "gal": ("volume", 3.785411784),
}


@tool
def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> str:
    """Convert a quantity between units of length, mass, volume or temperature.

    Args:
        value: the quantity to convert.
        from_unit: its unit.
        to_unit: the unit wanted.
    """
    temperatures = {"celsius", "fahrenheit"}
    if {from_unit, to_unit} <= temperatures:
        if from_unit == to_unit:
            result = value
        else:
            result = value * 9 / 5 + 32 if from_unit == "celsius" else (value - 32) * 5 / 9
    elif from_unit in temperatures or to_unit in temperatures or _FACTORS[from_unit][0] != _FACTORS[to_unit][0]:
        raise ModelRetry(f"cannot convert {from_unit} to {to_unit}: they measure different things")
    else:
        result = value * _FACTORS[from_unit][1] / _FACTORS[to_unit][1]
    return f"{value:g} {from_unit} = {result:.4g} {to_unit}"


TOOLS: list[Callable[..., Any]] = [get_weather, current_time, set_timer, convert_units]

# ---------------------------------------------------------------- the model


def load_model(spec: str, echo: Callable[[str], None] = print) -> tuple[Model, bool]:
    """The model to run, and whether its weights are random (see `resolve_media_model`)."""
    return resolve_media_model(spec, "hear audio", echo=echo)


# ---------------------------------------------------------------- the assistant


@dataclass
class Outcome:
    """What one spoken request produced."""

    transcript: str
    answer: str
    conversation_id: str
    tool_calls: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the agent run ended without an answer, if it did


async def handle_request(
    model: Model,
    store: Store,
    clip: str | Path | AudioPart,
    *,
    source: str | None = None,
    random_weights: bool = False,
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Transcribe `clip`, store the transcript, then let the agent act on the request in the same conversation.

    With random weights (the tiny Phi-4), each model turn is cut short (noise needs no more), and the first
    agent step must call a tool: grammar-constrained decoding makes even noise a valid call, so the tools run.
    """
    audio = as_audio_part(clip)
    seconds = len(audio.samples(None)) / audio.sample_rate
    echo(f"heard      : {seconds:.1f} s at {audio.sample_rate} Hz (the model gets it at 16 kHz)")
    transcriber = Agent(model, memory=store, settings=ModelSettings(max_tokens=64 if random_weights else 120))
    heard = await transcriber.run(TRANSCRIBE, audio=[audio])
    transcript = heard.output.strip()
    cid = heard.conversation_id
    assert cid is not None
    echo(f"transcript : {_shown(transcript, random_weights)}")
    if source is None:
        source = Path(clip).name if isinstance(clip, str | Path) else "audio"
    store.update_conversation(
        cid,
        title=f"voice: {transcript[:70]}",
        metadata={"kind": "voice-request", "source": source, "transcript": transcript, "noise": random_weights},
    )
    outcome = Outcome(transcript=transcript, answer="", conversation_id=cid)
    assistant = Agent(
        model,
        tools=TOOLS,
        system_prompt=SYSTEM,
        memory=store,
        max_steps=6,
        settings=ModelSettings(max_tokens=96, tool_choice="required")
        if random_weights
        else ModelSettings(max_tokens=200),
    )
    try:
        async for event in assistant.run_stream(ACT, conversation_id=cid):
            if isinstance(event, ToolCallEvent):
                outcome.tool_calls.append(event.call.name)
                echo(f"tool call  : {event.call.name}({event.call.arguments})")
            elif isinstance(event, ToolResultEvent):
                echo(f"tool result: {event.result.text}")
            elif isinstance(event, RetryEvent):
                echo(f"retry      : {event.retry.message}")
            elif isinstance(event, FinalEvent):
                outcome.answer = event.result.output
                echo(f"answer     : {_shown(outcome.answer, random_weights)}")
    except RunError as exc:
        outcome.stopped = str(exc)
        echo(f"stopped    : {exc}")
    return outcome


def _shown(text: str, random_weights: bool) -> str:
    """Text to print: noise from random weights is cut short and labelled."""
    return f"{text[:60]!r}{'...' if len(text) > 60 else ''} {NOISE}" if random_weights else text


def search(store: Store, query: str, echo: Callable[[str], None] = print) -> int:
    """Print stored transcripts and answers matching `query`; return how many matched."""
    hits = store.search(query, kinds={"text"}, limit=20)
    for hit in hits:
        echo(f"{hit.conversation_id[:12]} #{hit.message_index} {hit.role:9} {hit.snippet}")
    if not hits:
        echo(f"nothing stored matches {query!r}")
    return len(hits)


def open_existing(db: str) -> Store:
    """Open a store that must already exist (a plain path that is missing is an error, not a new file)."""
    if "://" not in db and not Path(db).is_file():
        raise UserError(f"no store at {db!r}: run a request first, or pass --db")
    return Store(db)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer a spoken request (WAV) with tools; keep the transcript.")
    parser.add_argument("audio", nargs="?", type=Path, default=SAMPLE, help="a WAV/FLAC/OGG clip (any sample rate)")
    parser.add_argument("--db", default="voice.db", help="memory store: SQLite file (default voice.db)")
    parser.add_argument("--model", default="auto", help="auto | phi4 | smollm2 | tiny-phi4 | folder | hub id | URL")
    parser.add_argument("--search", metavar="QUERY", help="search the stored transcripts instead, then exit")
    args = parser.parse_args(argv)
    if args.search is not None:
        with open_existing(args.db) as store:
            return 0 if search(store, args.search) else 1
    audio = as_audio_part(args.audio)  # a bad path fails here, before a model loads
    model, random_weights = load_model(args.model)
    print(f"model      : {model.name}")
    with Store(args.db) as store:
        outcome = await handle_request(model, store, audio, source=args.audio.name, random_weights=random_weights)
    print(f"stored     : conversation {outcome.conversation_id} in {args.db}")
    print(f"find it    : python examples/voice_assistant.py --search WORD --db {args.db}")
    return 0 if outcome.stopped is None or random_weights else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except MMAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
