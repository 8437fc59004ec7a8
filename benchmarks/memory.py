"""Memory store throughput: appends, loading a long conversation, full-text search.

1. Append 10,000 messages one transaction each, as the agent commits them: user turns, assistant turns with
   tool calls, tool results; every 10th message carries an image (48 KB, drawn from 40 distinct ones, so
   artifacts are also deduplicated). Ten conversations of 1,000 messages.
2. Load one 1,000-message conversation (media bytes included): median of 20 loads.
3. Bulk-store more conversations until the store holds 100,000 searchable text parts, then run 40 queries of
   one or two words drawn from a Zipf-distributed vocabulary (limit 10): median.

Usage: python benchmarks/memory.py [--url sqlite-path-or-URL] [--messages 10000] [--parts 100000]
Last line: load_ms=<float> query_ms=<float>
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

# Run as a script, this file's directory comes first on sys.path and its name would hide the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from agent.messages import ImagePart, Message, TextPart, ToolCallPart, ToolResultPart  # noqa: E402
from memory import Store  # noqa: E402

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sha", "vel", "qui", "dor", "ne", "pa", "zu", "bri", "ost", "el", "an"]


def vocabulary(size: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


class Sentences:
    """Random sentences with Zipf-distributed words (rank r drawn with weight 1/r)."""

    def __init__(self, rng: random.Random, size: int = 20_000) -> None:
        self.rng = rng
        self.words = vocabulary(size, rng)
        rng.shuffle(self.words)
        self.cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(size)))

    def __call__(self, n: int) -> str:
        return " ".join(self.rng.choices(self.words, cum_weights=self.cumulative, k=n))


def message(i: int, say: Callable[[int], str], images: list[ImagePart]) -> Message:
    media = [images[(i // 10) % len(images)]] if i % 10 == 0 else []
    kind = i % 4
    if kind == 0:
        return Message.user(say(25), images=media)
    if kind == 1:
        return Message.assistant(say(10), [ToolCallPart(id=f"c{i}", name="search", arguments={"q": say(3)})])
    if kind == 2:
        content: tuple[TextPart | ImagePart, ...] = (TextPart(text=say(40)), *media)
        return Message(role="tool", parts=(ToolResultPart(call_id=f"c{i - 1}", name="search", content=content),))
    return Message.assistant(say(30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database path or SQLAlchemy URL (default: a temporary SQLite file)")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--parts", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(0)
    say = Sentences(rng)
    images = [ImagePart(data=b"\x89PNG\r\n\x1a\n" + rng.randbytes(48_000)) for _ in range(40)]
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or os.path.join(tmp, "bench.db")
        with Store(url) as store:
            conversations = [store.create_conversation(title=f"bench {c}") for c in range(10)]
            per = args.messages // len(conversations)
            start = time.perf_counter()
            for i in range(args.messages):
                store.append(conversations[i // per % len(conversations)], [message(i, say, images)])
            append_s = time.perf_counter() - start
            print(f"append: {args.messages} messages in {append_s:.1f} s ({args.messages / append_s:,.0f}/s)")

            target = conversations[0]
            loaded = store.load_conversation(target)
            assert len(loaded) == per, len(loaded)
            loads, cpu = [], []
            for _ in range(20):
                t0, c0 = time.perf_counter(), time.process_time()
                store.load_conversation(target)
                loads.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            load_ms = statistics.median(loads) * 1000
            media = sum(1 for m in loaded for p in m.parts if isinstance(p, ImagePart))
            print(
                f"load: {per} messages ({media} images) median {load_ms:.2f} ms, best {min(loads) * 1000:.2f} ms, "
                f"CPU time median {statistics.median(cpu) * 1000:.2f} ms"
            )

            # Searchable text parts so far: one per message plus tool-result text.
            parts = args.messages + args.messages // 4
            start = time.perf_counter()
            while parts < args.parts:
                batch = [Message.user(say(20)) for _ in range(min(2_000, args.parts - parts))]
                store.create_conversation(batch)
                parts += len(batch)
            print(f"bulk: stored up to {parts:,} text parts in {time.perf_counter() - start:.1f} s")

            queries = [" ".join(rng.choices(say.words[:3_000], k=rng.randint(1, 2))) for _ in range(40)]
            store.search(queries[0])
            times, found = [], []
            for query in queries:
                t0 = time.perf_counter()
                hits = store.search(query, limit=10)
                times.append(time.perf_counter() - t0)
                found.append(len(hits))
            query_ms = statistics.median(times) * 1000
            print(
                f"query: {len(queries)} queries over {parts:,} parts, median {query_ms:.2f} ms, "
                f"p90 {statistics.quantiles(times, n=10)[-1] * 1000:.2f} ms, {statistics.mean(found):.1f} hits avg"
            )
    print(f"load_ms={load_ms:.3f} query_ms={query_ms:.3f}")


if __name__ == "__main__":
    main()
