"""Framework overhead per agent step, without memory and with a SQLite store.

A 200-step tool-calling run on `FunctionModel`: each step the model asks for one call of a sync tool (run in a
worker thread, as in production). An async-tool run is printed first for comparison
(no thread hand-off). Time spent inside the model function and the tool is measured and
subtracted, so what remains is mmagent's own work: rendering events, validating arguments (jsonschema +
Pydantic), dispatching the call, building result messages, bookkeeping. The same run is then repeated with
a `memory.Store` on a temporary SQLite file: every step's two phases committed as they complete. First with
`Store(path)` as it comes, durable commits (`synchronous=FULL`: an fsync per commit, survives power loss),
which is the figure on the last line; then with `durable=False` (`synchronous=NORMAL`: survives any process
crash, kill -9 included, not power loss), and the default store with its per-step statements sent through
SQLAlchemy Core instead of straight to the sqlite3 driver (`memory._fast`), printed for comparison.

Usage: python benchmarks/overhead.py [--steps 200] [--repeat 5]
Last line: overhead_us_per_step=<float> overhead_us_per_step_sqlite=<float>
(each the median over steps of the fastest repeat; the SQLite figure for the default, durable store)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

# Run as a script, this folder comes first on sys.path, where benchmarks/memory.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel, Field  # noqa: E402

from agent import Agent, Message, ModelResponseEvent, UsageLimits  # noqa: E402
from agent.testing import AgentInfo, FunctionModel, call  # noqa: E402
from memory import Store  # noqa: E402
from tools import Tool  # noqa: E402


class Item(BaseModel):
    sku: str
    quantity: Annotated[int, Field(ge=1)]


def _measure(steps: int, async_tool: bool = False, store: Store | None = None) -> list[float]:
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

    agent = Agent(
        FunctionModel(model),
        tools=[tool],
        max_steps=steps + 1,
        usage_limits=UsageLimits(max_requests=None),
        memory=store,
    )
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
    plain = _best(args, [_measure(args.steps) for _ in range(args.repeat)], "no memory")
    with tempfile.TemporaryDirectory() as folder:
        durable, normal, core = [], [], []
        for i in range(args.repeat):  # the settings alternate, so all see the same machine
            with Store(Path(folder) / f"durable{i}.db") as store:  # the default: durable=True
                durable.append(_measure(args.steps, store=store))
            with Store(Path(folder) / f"normal{i}.db", durable=False) as store:
                normal.append(_measure(args.steps, store=store))
            with Store(Path(folder) / f"core{i}.db") as store:
                store._fast_sqlite = False  # commit_step through SQLAlchemy Core, as before memory._fast
                core.append(_measure(args.steps, store=store))
        sqlite = _best(args, durable, "SQLite store, default (durable=True, synchronous=FULL)")
        _best(args, normal, "SQLite store, durable=False (synchronous=NORMAL)")
        _best(args, core, "SQLite store, default, commit_step through SQLAlchemy Core (the fast path off)")
    print(f"overhead_us_per_step={plain:.1f} overhead_us_per_step_sqlite={sqlite:.1f}")


def _best(args: argparse.Namespace, runs: list[list[float]], label: str) -> float:
    medians = [statistics.median(r) for r in runs]
    best = min(range(len(runs)), key=lambda i: medians[i])
    p90 = statistics.quantiles(runs[best], n=10)[-1]
    shown = [round(m, 1) for m in medians]
    print(f"{label}: steps={args.steps} repeats={args.repeat} medians_us={shown} p90_us={p90:.1f}")
    return medians[best]


if __name__ == "__main__":
    main()
