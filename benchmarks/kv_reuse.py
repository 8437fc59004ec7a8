"""KV reuse across agent steps: how many prompt tokens the backend really prefills in a tool-calling run.

Runs a scripted N-step tool-calling conversation (user turn with an image and audio; some tool results are
images) through `Agent` + `TransformersModel` on the tiny random Phi-4-multimodal, once with KV reuse and
once without, and prints per-step prefill counts and timings. The last line is `prefill_ratio=<float>`:
prefilled tokens summed over the run divided by the final context length (1.0 would be "each token once").
The default run stays below Phi-4's longrope switch (4096 tokens): a run crossing it recomputes the whole
context once, at the crossing, because every cached key changes there.

    python benchmarks/kv_reuse.py [--steps 10] [--folder /path/to/tiny-or-real-checkpoint]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from agent import Agent, Message
from agent.events import ModelResponseEvent
from agent.models.tiny import ScriptedOutputs, build_tiny_phi4
from agent.models.transformers import TransformersModel


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _scripts(steps: int) -> list[str]:
    calls = [
        f'Step {i}.<|tool_call|>[{{"name": "lookup", "arguments": {{"key": "k{i}", "page": {i}}}}}]'
        "<|/tool_call|><|end|>"
        for i in range(steps - 1)
    ]
    return [*calls, "All done.<|end|>"]


def lookup(key: str, page: int) -> Any:
    """Look a key up in the archive."""
    if page % 3 == 1:
        return [f"page {page} of {key}", _image(200 + 20 * page, 150, seed=page)]
    return f"{key}, page {page}: " + "archived record text " * (3 + 2 * page)


async def _run(base: TransformersModel, steps: int, kv_reuse: bool) -> list[tuple[int, int, float]]:
    model = TransformersModel(
        base.model,
        base.processor,
        kv_reuse=kv_reuse,
        logits_processors=[ScriptedOutputs(base.tokenizer, _scripts(steps))],
    )
    agent = Agent(model, tools=[lookup], max_steps=steps + 1, system_prompt="Use the tools, then answer.")
    clip = ((np.random.default_rng(1).standard_normal(24000) * 0.1).astype(np.float32), 16000)
    user = Message.user("Look up the keys, then summarise.", images=[_image(448, 448, seed=0)], audio=[clip])
    rows: list[tuple[int, int, float]] = []
    start = time.perf_counter()
    async for event in agent.run_stream(user):
        if isinstance(event, ModelResponseEvent):
            now = time.perf_counter()
            usage = event.response.usage
            rows.append((usage.input_tokens, usage.prefill_tokens, now - start))
            start = now
    return rows


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark and return the prefill ratio (also printed as the last line)."""
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--folder", type=Path, default=None, help="checkpoint folder (default: build the tiny one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or build_tiny_phi4(Path(scratch) / "tiny-phi4")
        base = TransformersModel.from_pretrained(folder, progress=False)
        results = {reuse: asyncio.run(_run(base, args.steps, reuse)) for reuse in (True, False)}
    print(f"model: {base.name}, {args.steps} steps")
    print(f"{'step':>4} {'context':>8} {'prefill (reuse)':>16} {'ms':>7} {'prefill (no reuse)':>19} {'ms':>7}")
    for i, (with_reuse, without) in enumerate(zip(results[True], results[False], strict=True)):
        print(
            f"{i:>4} {with_reuse[0]:>8} {with_reuse[1]:>16} {with_reuse[2] * 1e3:>7.0f} {without[1]:>19} "
            f"{without[2] * 1e3:>7.0f}"
        )
    final_context = results[True][-1][0]
    reused = sum(row[1] for row in results[True])
    recomputed = sum(row[1] for row in results[False])
    print(f"prefilled with reuse {reused}, without {recomputed}, final context {final_context}")
    ratio = reused / final_context
    print(f"prefill_ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
