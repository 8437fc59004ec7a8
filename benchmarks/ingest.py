"""Media ingestion: scene-cut accuracy, ingest speed, and search latency over a large store.

1. Generate a 10-minute H.264 video (160x120, 25 fps) of 61 solid-colour scenes at 60 random cut frames (at
   least 2 s apart; each scene's colour far from the last, a moving square so motion is not a cut), with a tone
   per scene on an AAC track. `detect_scenes` -> precision, recall and F1 of the cuts (a cut found within one
   frame of a true one counts).
2. Ingest it with the full pipeline (`Ingestor`: cuts, a keyframe per scene, scene captions with the scene's
   audio, speech windows with transcripts, all stored) on a model (default: the tiny random-weight Phi-4,
   built offline) into a fresh SQLite store: real-time factor = media seconds / wall seconds.
3. Fill a store with 100,000 segments (1,000 sources of 100, each with a caption of 8-16 words from a
   Zipf-distributed vocabulary and, with `--vectors`, a 384-dimension unit vector) and time `search_media`
   through the agent tool (citations and keyframes fetched; the query "embedded" by a random stand-in, so the
   embedding model's own cost is left out): 100 queries of one or two words, median. Full text alone, then
   hybrid (full text + vector, fused) when vectors are stored; the last line takes the slower.

Usage: python benchmarks/ingest.py [--model tiny-phi4|random-full] [--segments 100000] [--vectors/--no-vectors]
       [--skip-ingest]    (random-full: the full-size random-weight Phi-4-mm on CUDA, for a lent device)
Last line: scene_f1=<float> ingest_rtf=<float> query_ms=<float>
"""

from __future__ import annotations

import argparse
import asyncio
import colorsys
import itertools
import os
import random
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would hide the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

from agent.messages import ImagePart  # noqa: E402
from memory import NewSegment, Store  # noqa: E402

FPS = 25
SIZE = (160, 120)
_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sha", "vel", "qui", "dor", "ne", "pa", "zu", "bri", "ost", "el", "an"]


# ---------------------------------------------------------------- 1. the video and its cuts


def plan_cuts(rng: random.Random, seconds: float, cuts: int, min_gap: float = 2.0) -> list[int]:
    """`cuts` frame numbers inside the video, at least `min_gap` seconds apart and from the ends."""
    frames, gap = round(seconds * FPS), round(min_gap * FPS)
    while True:
        chosen = sorted(rng.sample(range(gap, frames - gap), cuts))
        if all(b - a >= gap for a, b in itertools.pairwise(chosen)):
            return chosen


def colours(rng: random.Random, count: int) -> list[tuple[int, int, int]]:
    """Saturated colours, each at least 0.2 of the hue circle (or much lighter/darker) away from the last."""
    out: list[tuple[int, int, int]] = []
    hue = rng.random()
    for _ in range(count):
        hue = (hue + rng.uniform(0.2, 0.8)) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 0.95))
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def make_video(path: Path, cuts: list[int], seconds: float, rng: random.Random) -> None:
    import av

    width, height = SIZE
    frames = round(seconds * FPS)
    bounds = [0, *cuts, frames]
    palette = colours(rng, len(bounds) - 1)
    rate = 16_000
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=rate, layout="mono")
        scene = 0
        for i in range(frames):
            while i >= bounds[scene + 1]:
                scene += 1
            image = np.empty((height, width, 3), np.uint8)
            image[:] = palette[scene]
            x = (i * 3) % (width - 16)
            image[10:26, x : x + 16] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        for scene in range(len(bounds) - 1):
            t = np.arange(round(bounds[scene] / FPS * rate), round(bounds[scene + 1] / FPS * rate)) / rate
            tone = (0.2 * np.sin(2 * np.pi * (200 + 40 * (scene % 20)) * t)).astype(np.float32)
            start = round(bounds[scene] / FPS * rate)
            for k in range(0, len(tone), 1024):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(tone[None, k : k + 1024]), format="flt", layout="mono"
                )
                frame.sample_rate, frame.pts = rate, start + k
                for packet in sound.encode(frame):
                    out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)


def f1(found: list[int], truth: list[int], tolerance: int = 1) -> tuple[float, float, float]:
    """Precision, recall, F1 with each true cut matched at most once within `tolerance` frames."""
    unmatched = list(truth)
    hits = 0
    for cut in found:
        near = [t for t in unmatched if abs(t - cut) <= tolerance]
        if near:
            unmatched.remove(min(near, key=lambda t: abs(t - cut)))
            hits += 1
    precision = hits / len(found) if found else 0.0
    recall = hits / len(truth) if truth else 1.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


# ---------------------------------------------------------------- 3. a large store


def vocabulary(size: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def fill(store: Store, segments: int, rng: random.Random, *, vectors: bool, dim: int = 384) -> list[str]:
    """`segments` scene segments with captions (and vectors) in sources of 100; returns the vocabulary."""
    words = vocabulary(5_000, rng)
    weights = [1 / (rank + 1) for rank in range(len(words))]
    frame = ImagePart.from_pil(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 48), (90, 120, 200)))
    per_source = 100
    started = time.perf_counter()
    for s in range(0, segments, per_source):
        source, _ = store.add_source(
            f"bench-{s // 10_000}",
            f"/media/video-{s // per_source:05d}.mp4",
            sha256=f"{s:064x}",
            kind="video",
            media_type="video/mp4",
            size=1,
            duration=per_source * 6.0,
        )
        new = [
            NewSegment("scene", i, start=i * 6.0, end=i * 6.0 + 6.0, media=(("keyframe", i * 6.0 + 3.0, frame),))
            for i in range(min(per_source, segments - s))
        ]
        stored = store.add_segments(source.id, new)
        for seg in stored:
            store.put_feature(seg.id, "scene_caption", "1", " ".join(rng.choices(words, weights, k=rng.randint(8, 16))))
        if vectors:
            matrix = np.asarray([[rng.gauss(0, 1) for _ in range(dim)] for _ in stored], dtype=np.float32)
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
            store.put_embeddings(
                "bench-random-384", dim, [(seg.id, "text", row) for seg, row in zip(stored, matrix, strict=True)]
            )
        store.complete_source(source.id)
        if (s // per_source) % 100 == 99:
            print(f"  filled {s + per_source:,} segments in {time.perf_counter() - started:.0f} s", flush=True)
    return words


class RandomEmbedder:
    """Stands in for the embedder at query time: a random unit vector per query (embedding is the model's cost,
    not the store's), under the name the stored vectors have."""

    name = "bench-random-384"
    dim = 384
    modalities = frozenset({"text"})

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        matrix = np.asarray([[self.rng.gauss(0, 1) for _ in range(self.dim)] for _ in texts], dtype=np.float32)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def query_latency(store: Store, words: list[str], rng: random.Random, *, vectors: bool, queries: int = 100) -> float:
    """Median ms of `search_media` through the agent tool: the store's search, citations, keyframes fetched."""
    from agent.ingest import media_tools
    from tools import ToolContext

    embedder = RandomEmbedder(rng) if vectors else None
    search, _ = media_tools(store, embedder=embedder, limit=5)  # type: ignore[arg-type]
    ctx = ToolContext(call_id="bench", tool_name="search_media")

    async def one(query: str) -> float:
        started = time.perf_counter()
        await search.run(search.validate({"query": query}), ctx)
        return (time.perf_counter() - started) * 1000

    async def run_all() -> list[float]:
        return [await one(" ".join(rng.choices(words[:500], k=rng.randint(1, 2)))) for _ in range(queries)]

    return statistics.median(asyncio.run(run_all()))


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-phi4", help="a resolve_model spec, or random-full (GPU)")
    parser.add_argument("--smoke", action="store_true", help="with random-full: a shrunk model on the CPU")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--cuts", type=int, default=60)
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--vectors", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip-ingest", action="store_true", help="only cuts and search (no model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    from agent.ingest import Ingestor, detect_scenes

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ten-minutes.mp4"
        truth = plan_cuts(rng, args.seconds, args.cuts)
        started = time.perf_counter()
        make_video(path, truth, args.seconds, rng)
        print(f"video: {args.seconds:.0f} s, {args.cuts} cuts, made in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        scenes = detect_scenes(path)
        detect_s = time.perf_counter() - started
        found = [s.start_frame for s in scenes[1:]]
        precision, recall, score = f1(found, truth)
        print(f"cuts: {len(found)} found, precision {precision:.3f}, recall {recall:.3f}, F1 {score:.3f} "
              f"(detection {detect_s:.1f} s, {args.seconds / detect_s:.1f}x real time)")  # fmt: skip

        rtf = float("nan")
        if not args.skip_ingest:
            load_model = runpy.run_path(os.path.join(_HERE, "phi4_gpu.py"), run_name="phi4_gpu")["load_model"]

            model = load_model(args.model, smoke=args.smoke)
            with Store(Path(tmp) / "ingest.db") as store:
                started = time.perf_counter()
                report = Ingestor(store, model, progress=True).ingest_sync([path])
                wall = time.perf_counter() - started
                (item,) = report.sources
                assert item.status == "new", item
                rtf = args.seconds / wall
                print(f"ingest ({model.name}): {item.segments} segments, {report.usage.requests} model requests, "
                      f"{wall:.1f} s wall -> {rtf:.2f} media s per s")  # fmt: skip

        with Store(Path(tmp) / "search.db", durable=False) as store:
            started = time.perf_counter()
            words = fill(store, args.segments, rng, vectors=args.vectors)
            print(f"store: {args.segments:,} segments filled in {time.perf_counter() - started:.0f} s")
            text_ms = query_latency(store, words, rng, vectors=False)
            print(f"search_media (full-text, through the tool): median {text_ms:.2f} ms over 100 queries")
            query_ms = text_ms
            if args.vectors:
                hybrid_ms = query_latency(store, words, rng, vectors=True)
                print(f"search_media (full-text + vector, fused): median {hybrid_ms:.2f} ms over 100 queries")
                query_ms = max(text_ms, hybrid_ms)
    print(f"scene_f1={score:.4f} ingest_rtf={rtf:.3f} query_ms={query_ms:.3f}")


if __name__ == "__main__":
    main()
