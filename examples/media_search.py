"""Media search: ingest a video with speech and a PDF, then ask the agent questions that need both.

    python examples/media_search.py [SOURCE ...] [--db media.db] [--model auto] [--embedder none|minilm|FOLDER]
        [--question "..."]

Without sources it makes its own: `talk.mp4`, three coloured scenes with a spoken request as its sound track
(`examples/data/request.wav`), and `budget.pdf`, a slide with a small budget table. Ingestion (the same as
`mmagent ingest`) cuts the video into scenes (keyframe + caption each) and speech windows (transcript each),
renders the PDF's pages (page text each), and stores all of it in the memory store. Then an agent with the
`search_media` and `clip` tools answers the question: search results come back with citations and the
matching keyframes as real images, and `clip` hands it a span's audio to listen to again. The search itself
is printed too, as `mmagent search` prints it.

Only Phi-4-multimodal sees and hears. When the chosen model cannot (SmolLM2, which `auto` picks offline when no
Phi-4 weights are on this machine), the example says so and runs the tiny random-weight Phi-4 instead: decoding,
scene detection, the image and audio towers, storage and search all run for real, but captions, transcripts
and answers are noise. Running it again finds everything already ingested and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from agent import Agent
from agent.exceptions import MMAgentError, RunError
from agent.ingest import Ingestor, citation, media_tools
from agent.models.resolve import resolve_media_model
from memory import Store

SPEECH = Path(__file__).resolve().parent / "data" / "request.wav"
QUESTION = "What did the speaker ask for in the video, and how much does the budget slide give to travel?"
SYSTEM = (
    "You answer questions about the user's ingested videos, recordings and documents. Call search_media to find "
    "the relevant segments (look at the images it returns), call clip to listen to a span again when a "
    "transcript is unclear, and cite each fact with the source and time span or page that search_media gave."
)
SCENE_COLOURS = ((40, 90, 200), (230, 200, 40), (30, 140, 60))


def make_talk(path: Path, speech: Path = SPEECH, seconds_per_scene: float = 2.0, fps: int = 25) -> Path:
    """A small H.264 video of three coloured scenes whose sound track is `speech` (a WAV file)."""
    import av
    import soundfile as sf

    samples, rate = sf.read(speech, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    frames = round(max(seconds_per_scene * len(SCENE_COLOURS), len(mono) / rate) * fps)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        sound = out.add_stream("aac", rate=rate, layout="mono")
        per_scene = frames // len(SCENE_COLOURS) + 1
        for i in range(frames):
            picture = np.empty((240, 320, 3), np.uint8)
            picture[:] = SCENE_COLOURS[min(i // per_scene, len(SCENE_COLOURS) - 1)]
            x = (i * 4) % 280
            picture[100:140, x : x + 40] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        for k in range(0, len(mono), 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(mono[None, k : k + 1024]), format="flt", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, k
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    return path


def make_budget(path: Path) -> Path:
    """A one-page PDF: a slide with a budget table."""
    page = Image.new("RGB", (1000, 700), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=40)
    small = ImageFont.load_default(size=30)
    draw.text((60, 50), "Budget 2027", fill="black", font=font)
    for row, (item, amount) in enumerate(
        (("Travel", "120,000 EUR"), ("Equipment", "85,000 EUR"), ("Total", "205,000 EUR"))
    ):
        draw.text((80, 180 + row * 80), item, fill="black", font=small)
        draw.text((560, 180 + row * 80), amount, fill="black", font=small)
    page.save(path, "PDF", resolution=100)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help="files, folders or URLs to ingest (default: made here)")
    parser.add_argument("--db", default="media.db", help="memory store (SQLite path or SQLAlchemy URL)")
    parser.add_argument("--model", default="auto", help="auto | phi4 | tiny-phi4 | folder | server URL")
    parser.add_argument("--embedder", default="none", help="none | minilm | a folder (CLIP or a text model)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--collection", default="example")
    args = parser.parse_args(argv)
    try:
        talk, budget = Path("talk.mp4"), Path("budget.pdf")  # made once: a second run finds them ingested
        sources = args.sources or [
            str(talk if talk.exists() else make_talk(talk)),
            str(budget if budget.exists() else make_budget(budget)),
        ]
        model, noise = resolve_media_model(args.model, "see images or hear audio")
        embedder = None
        if args.embedder != "none":
            from agent.embedding import TransformersEmbedder

            embedder = (
                TransformersEmbedder.minilm()
                if args.embedder == "minilm"
                else TransformersEmbedder.from_pretrained(args.embedder)
            )
        print(f"model: {model.name}; embedder: {embedder.name if embedder else 'none (full-text search)'}")
        with Store(args.db) as store:
            report = Ingestor(store, model, embedder=embedder, progress=True).ingest_sync(
                sources, collection=args.collection
            )
            for item in report.sources:
                detail = item.error or f"{item.segments} segments, {item.features} features written"
                print(f"{item.status:9s} {Path(item.uri).name}: {detail}")
            if report.failed:
                return 1
            print(f"\nsearch: {args.question}")
            vector = embedder.embed_texts([args.question])[0] if embedder else None
            hits = store.search_media(
                args.question,
                vector=vector,
                embedder=embedder.name if embedder else None,
                collection=args.collection,
                limit=3,
            )
            for hit in hits:
                print(f"  {citation(hit)}: {hit.snippet[:100]!r}")
            if not hits:
                why = " (captions written by random weights share no words with it)" if noise else ""
                print(f"  nothing matches{why}")
            agent = Agent(
                model, tools=media_tools(store, embedder=embedder, collection=args.collection), system_prompt=SYSTEM
            )
            result = agent.run_sync(args.question)
            suffix = "  (random weights: this text is noise)" if noise else ""
            answer = result.output if len(result.output) <= 300 or not noise else result.output[:300] + "..."
            print(f"\nanswer: {answer}{suffix}")
    except (MMAgentError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
