"""Framework overhead per agent step, without memory.

A 200-step tool-calling run on `FunctionModel`: each step the model asks for one call of a sync tool (run in a
worker thread, as in production). An async-tool run is printed first for comparison
(no thread hand-off). Time spent inside the model function and the tool is measured and
subtracted, so what remains is mmagent's own work: rendering events, validating arguments (jsonschema +
Pydantic), dispatching the call, building result messages, bookkeeping.

Usage: python benchmarks/overhead.py [--steps 200] [--repeat 5]
Last line: overhead_us_per_step=<float>   (median over steps of the fastest repeat)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Annotated

from pydantic import BaseModel, Field

from agent import Agent, Message, ModelResponseEvent, UsageLimits
from agent.testing import AgentInfo, FunctionModel, call
from tools import Tool


class Item(BaseModel):
    sku: str
    quantity: Annotated[int, Field(ge=1)]


def _measure(steps: int, async_tool: bool = False) -> list[float]:
    inside: list[float] = []

    def add_to_cart(item: Item, note: str | None = None) -> dict[str, object]:
        """Add an item to the cart."""
        t0 = time.perf_counter()
        out = {"ok": True, "sku": item.sku}
        inside.append(time.perf_counter() - t0)
        return out

    async def add_to_cart_async(item: Item, note: str | None = None) -> dict[str, object]:
        """Add an item to the cart."""
        return add_to_cart(item, note)

    tool = Tool.from_function(add_to_cart_async if async_tool else add_to_cart, name="add_to_cart")

    def model(messages: list[Message], info: AgentInfo) -> object:
        t0 = time.perf_counter()
        if info.request_index >= steps:
            out: object = "done"
        else:
            out = [call("add_to_cart", item={"sku": f"A{info.request_index}", "quantity": 2}, note="x")]
        inside.append(time.perf_counter() - t0)
        return out

    agent = Agent(FunctionModel(model), tools=[tool], max_steps=steps + 1, usage_limits=UsageLimits(max_requests=None))
    marks: list[float] = []
    inside_at: list[float] = []

    async def go() -> None:
        async for event in agent.run_stream("fill the cart"):
            if isinstance(event, ModelResponseEvent):
                marks.append(time.perf_counter())
                inside_at.append(sum(inside))

    asyncio.run(go())
    per_step = []
    for i in range(1, len(marks)):
        wall = marks[i] - marks[i - 1]
        work = inside_at[i] - inside_at[i - 1]
        per_step.append((wall - work) * 1e6)
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    _measure(20)  # warm-up: imports, schema compilation, thread pool start
    async_runs = [_measure(args.steps, async_tool=True) for _ in range(args.repeat)]
    print(f"async tool (no worker thread): median_us={min(statistics.median(r) for r in async_runs):.1f}")
    runs = [_measure(args.steps) for _ in range(args.repeat)]
    medians = [statistics.median(r) for r in runs]
    best = min(range(len(runs)), key=lambda i: medians[i])
    p90 = statistics.quantiles(runs[best], n=10)[-1]
    print(f"steps={args.steps} repeats={args.repeat} medians_us={[round(m, 1) for m in medians]} p90_us={p90:.1f}")
    print(f"overhead_us_per_step={medians[best]:.1f}")


if __name__ == "__main__":
    main()
