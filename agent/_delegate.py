"""`Agent.as_tool`: an agent that another agent calls as a tool (delegation).

The child runs with its own tools, system prompt, context policy and limits; the parent sees one tool whose
argument is the task. What comes back: the child's final answer (its text, or its `output_type` as JSON) and the
images and audio its tools produced during the run (once each, the last `MAX_MEDIA`), as real parts the
parent's model reads. The child's usage is added to
the parent run's (`ToolContext.add_usage`), and with memory its run is stored (in its own store, or the
parent's when it has none) and linked to the parent's run (`Store.list_runs(parent_run_id=...)`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from agent.messages import AudioPart, ImagePart, Part, TextPart, ToolResultPart
from tools._context import ToolContext
from tools._registry import Tool

if TYPE_CHECKING:
    from agent._loop import Agent

MAX_MEDIA = 8
"""At most this many images and audio clips of a delegated run come back (the latest ones)."""

MAX_DEPTH = 8
"""Delegated runs nest at most this deep (an agent that is its own tool would recurse forever)."""

_depth: ContextVar[int] = ContextVar("mmagent_delegation_depth", default=0)


class DelegationDepthError(RuntimeError):
    """Raised inside the tool when delegation nests deeper than `MAX_DEPTH`; the calling model sees it."""


def delegate_tool(agent: Agent[Any], name: str | None, description: str | None, timeout: float | None) -> Tool:
    tool_name = name or agent.name or "delegate"
    output = TypeAdapter(agent.output_type) if agent.output_type is not None else None

    async def delegate(ctx: ToolContext, task: str) -> list[Part]:
        """Hand a task to another agent and return its answer.

        Args:
            task: what to do, with everything needed to do it: the agent sees nothing else of this conversation.
        """
        depth = _depth.get()
        if depth >= MAX_DEPTH:
            raise DelegationDepthError(f"delegation nested deeper than {MAX_DEPTH} agents")
        child = agent
        if agent.memory is None and ctx.memory is not None:  # stored beside the parent's run
            child = copy.copy(agent)
            child.memory = ctx.memory
        token = _depth.set(depth + 1)
        try:
            result = await child.run(task, deps=ctx.deps, parent_run_id=ctx.run_id if child.memory else None)
        finally:
            _depth.reset(token)
        if ctx.add_usage is not None:
            ctx.add_usage(result.usage)
        final = result.new_messages[-1]
        media: dict[str, Part] = {}
        for message in result.new_messages:
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    for item in part.content:
                        if isinstance(item, ImagePart | AudioPart):
                            key = hashlib.sha256(item.data).hexdigest()
                            media.pop(key, None)  # latest last
                            media[key] = item
        if output is not None:
            answer = json.loads(output.dump_json(result.output))
            text = json.dumps(answer, ensure_ascii=False)
        else:
            text = final.text
        return [TextPart(text=text or "(the agent answered with no text)"), *list(media.values())[-MAX_MEDIA:]]

    return Tool.from_function(
        delegate,
        name=tool_name,
        description=description or f"Hand a task to the {tool_name} agent and get its answer.",
        timeout=math.inf if timeout is None else timeout,
    )
