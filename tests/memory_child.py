"""Child processes for the memory crash-safety and concurrency tests.

`agent_child` runs a real agent (FunctionModel + a tool) against a store and reports, on a file descriptor,
each step right after its commit returned: `RUN <run> <conversation>`, then `STEP <run> <step> <phase>
<call ids>`. The parent SIGKILLs it at a random moment (its store's lease is short, so the parent can resume
at once). `append_worker` appends messages to a shared conversation for the concurrency test; `turn_worker`
runs one agent turn on a shared conversation for the lease test (`test_memory_lease.py`).

Run by hand: `python tests/memory_child.py agent <db path or URL> <log file> <tag>` prints the same lines.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from agent import Agent
from agent.messages import ImagePart, Message, Part, ToolCallPart, ToolResultPart
from agent.models import Usage
from agent.protocols import Phase, StartedRun
from agent.testing import AgentInfo, FunctionModel
from memory import Store
from tools import Tool, ToolContext

STEPS = 8  # tool-calling steps per run before the final answer
CALLS = 3  # tool calls per step
# The same small "image" every call returns: stored once however many results carry it.
IMAGE = ImagePart(data=b"\x89PNG\r\n\x1a\n" + random.Random(7).randbytes(3000), media_type="image/png")


def script(messages: list[Message], info: AgentInfo) -> str | list[Part]:
    """Deterministic turns from the history alone, so a resumed run asks for exactly the same calls."""
    start = max(i for i, m in enumerate(messages) if m.role == "user" and m.text.startswith("task "))
    tag = messages[start].text.split()[1]
    k = sum(1 for m in messages[start + 1 :] if m.role == "assistant")
    if k < STEPS:
        return [ToolCallPart(id=f"{tag}-{k}-{j}", name="work", arguments={"n": j}) for j in range(CALLS)]
    return f"done {tag}"


def work_tool(log_path: str) -> Tool:
    """A tool that appends its call id to `log_path` (one atomic write) and returns text and an image."""

    def work(ctx: ToolContext, n: int) -> list[Any]:
        time.sleep(random.uniform(0.002, 0.02))
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{ctx.call_id}\n".encode())
        finally:
            os.close(fd)
        return [f"result {ctx.call_id} n={n}", IMAGE]

    return Tool.from_function(work)


def build_agent(store: Store, log_path: str) -> Agent:
    """The agent the child runs and the parent resumes with."""
    return Agent(FunctionModel(script), tools=[work_tool(log_path)], memory=store, max_steps=STEPS + 5)


# The killed child's lease blocks its conversation until it expires: short, so the parent resumes at once.
CHILD_LEASE_TTL = 0.25


class ReportingStore(Store):
    """A store that reports each run and committed step on a file descriptor after the commit returned."""

    def __init__(self, url: str, fd: int) -> None:
        super().__init__(url, lease_ttl=CHILD_LEASE_TTL)
        self._fd = fd

    def _say(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())

    def begin_run(
        self,
        *,
        conversation_id: str | None,
        new_messages: Sequence[Message],
        model_name: str,
        system_prompt: str | None,
    ) -> StartedRun:
        started = super().begin_run(
            conversation_id=conversation_id,
            new_messages=new_messages,
            model_name=model_name,
            system_prompt=system_prompt,
        )
        self._say(f"RUN {started.run_id} {started.conversation_id}")
        return started

    def commit_step(self, run_id: str, step: int, phase: Phase, messages: Sequence[Message], usage: Usage) -> None:
        super().commit_step(run_id, step, phase, messages, usage)
        ids = [p.call_id for m in messages for p in m.parts if isinstance(p, ToolResultPart)]
        self._say(" ".join(["STEP", run_id, str(step), phase, *ids]))


def agent_child(url: str, log_path: str, tag: str, conversation_id: str | None, fd: int) -> None:
    """Run one agent run to completion (unless killed first), reporting on `fd`."""
    store = ReportingStore(url, fd)
    result = asyncio.run(build_agent(store, log_path).run(f"task {tag}", conversation_id=conversation_id))
    os.write(fd, f"DONE {result.output}\n".encode())
    store.close()


def append_worker(url: str, worker: int, count: int, barrier: Any, shared: str) -> None:
    """Open the (fresh) store with the others, then append `count` messages to `shared` and to an own
    conversation, plus a small run every fifth message. Exits 1 on any error."""
    try:
        store = Store(url)
        barrier.wait()  # everyone has opened (and maybe migrated) the database
        barrier.wait()  # the parent has created the shared conversation
        own = store.create_conversation(title=f"worker {worker}")
        for i in range(count):
            text = f"worker{worker} item{i} token{worker}x{i}"
            media = [IMAGE] if i % 4 == 0 else []
            store.append(shared, [Message.user(text, images=media)])
            store.append(own, [Message.user(text)])
            if i % 5 == 0:
                run = store.begin_run(
                    conversation_id=own, new_messages=[Message.user(f"run {i}")], model_name="m", system_prompt=None
                )
                store.commit_step(run.run_id, 0, "model", [Message.assistant(f"answer {i}")], Usage(requests=1))
                store.end_run(run.run_id, "completed")
        store.close()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


TURN_PAUSE = 0.05  # seconds the `pause` tool sleeps: long enough for concurrent turns to overlap


def turn_script(messages: list[Message], info: AgentInfo) -> str | list[Part]:
    """One tool call, then a final answer; the turn's tag is in its (last) user message `turn <tag>`."""
    tag = next(m.text.split()[1] for m in reversed(messages) if m.role == "user" and m.text.startswith("turn "))
    if messages[-1].role == "user":
        return [ToolCallPart(id=f"{tag}-call", name="pause", arguments={})]
    return f"done {tag}"


def pause() -> str:
    """Sleep a little, as a slow tool would."""
    time.sleep(TURN_PAUSE)
    return "paused"


def turn_worker(url: str, tag: str, conversation_id: str, barrier: Any, options: dict[str, Any]) -> None:
    """Open a store, wait for the others, then run one agent turn (a tool call, then text) on the shared
    conversation. Exits 1 on any error."""
    try:
        store = Store(url, **options)
        barrier.wait()
        agent = Agent(FunctionModel(turn_script), tools=[Tool.from_function(pause)], memory=store)
        result = asyncio.run(agent.run(f"turn {tag}", conversation_id=conversation_id))
        assert result.output == f"done {tag}", result.output
        store.close()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "agent":
        sys.exit("usage: python tests/memory_child.py agent <db path or URL> <log file> <tag>")
    agent_child(sys.argv[2], sys.argv[3], sys.argv[4], None, sys.stdout.fileno())
