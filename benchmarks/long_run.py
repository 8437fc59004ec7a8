"""A 200-step agent run whose history overflows the context many times: how much prefill does it cost?

The tiny random Phi-4-multimodal runs the real backend (KV reuse) and the real `ContextPolicy`; its outputs are
forced to scripted tool calls (`ScriptedOutputs`), and each tool result adds ~100 tokens. The budget is kept
below the 4096-token longrope switch so every cut is an eviction effect, not a rope recompute.

prefill_ratio = prefill tokens summed over all steps / tokens of the whole final conversation (what one
prefill of everything would cost with an unlimited window). Each cut re-prefills what it keeps after the
pinned head, about low_water x budget, so the ratio is roughly 1 + low_water / (1 - low_water) x
(1 - budget / total): a low water mark trades kept history for fewer re-prefills.

Usage: python benchmarks/long_run.py [--steps 200] [--budget 3000] [--low-water 0.5] [--sweep]
Last line: prefill_ratio=<float> cache_resets=<int>
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent
from agent.context import ContextPolicy
from agent.models import ModelSettings
from agent.models.tiny import ScriptedOutputs, build_tiny_phi4
from agent.models.transformers import TransformersModel

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def fetch(n: int) -> str:
    """Fetch record n."""
    return f"record {n}: " + " ".join(WORDS[(n + i) % len(WORDS)] for i in range(90))


def run_once(folder: Path, steps: int, budget: int, low_water: float) -> tuple[float, int, float]:
    loaded = TransformersModel.from_pretrained(folder, progress=False)
    scripts = [
        f'<|tool_call|>[{{"name": "fetch", "arguments": {{"n": {i}}}}}]<|/tool_call|><|end|>' for i in range(steps)
    ]
    scripts.append("All records fetched.<|end|>")
    model = TransformersModel(
        loaded.model,
        loaded.processor,
        adapters=(),
        logits_processors=[ScriptedOutputs(loaded.processor.tokenizer, scripts)],
    )
    policy = ContextPolicy(context_length=budget, reserve_output_tokens=64, low_water=low_water)
    agent = Agent(model, tools=[fetch], system_prompt="Fetch every record.", context=policy, max_steps=steps + 1,
                  settings=ModelSettings(max_tokens=48))  # fmt: skip
    t0 = time.perf_counter()
    result = asyncio.run(agent.run("Fetch the records one by one."))
    elapsed = time.perf_counter() - t0
    total = model.count_tokens(result.messages, agent.registry.definitions())
    return result.usage.prefill_tokens / total, policy.stats.prefix_resets, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--budget", type=int, default=3000)
    parser.add_argument("--low-water", type=float, default=0.5)
    parser.add_argument("--sweep", action="store_true", help="also run low water 0.75 and 0.3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_phi4(Path(tmp) / "tiny")
        marks = [0.75, 0.3, args.low_water] if args.sweep else [args.low_water]
        for mark in marks:
            ratio, resets, elapsed = run_once(folder, args.steps, args.budget, mark)
            print(f"low_water={mark:.2f} steps={args.steps} budget={args.budget} "
                  f"prefill_ratio={ratio:.3f} cache_resets={resets} wall_s={elapsed:.1f}")  # fmt: skip
    print(f"prefill_ratio={ratio:.3f} cache_resets={resets}")


if __name__ == "__main__":
    main()
