"""One side of the cross-process approval test: `start DB` pauses a run, `decide DB RUN_ID CALL_ID yes|no`
continues it in another process (the same agent definition: a scripted model and the `pay` tool)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pay_tools import pay

from agent import Agent, Message
from agent.exceptions import ApprovalRequired
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store
from tools import Deny


def model(messages: list[Message], info: AgentInfo) -> Any:
    last = messages[-1]
    if last.role == "user":
        return [call("pay", amount=5)]
    return f"done: {last.parts[0].content[0].text}"  # type: ignore[union-attr]


def main() -> None:
    command, db = sys.argv[1], sys.argv[2]
    with Store(db) as store:
        agent = Agent(FunctionModel(model), tools=[pay], memory=store)
        if command == "start":
            try:
                agent.run_sync("Pay the invoice")
            except ApprovalRequired as exc:
                print(json.dumps({"run_id": exc.run_id, "calls": [c.id for c in exc.calls]}))
                return
            raise SystemExit("the run did not pause")
        run_id, call_id, decision = sys.argv[3:6]
        approvals = {call_id: True if decision == "yes" else Deny("over budget")}
        import asyncio

        result = asyncio.run(agent.resume(run_id, approvals=approvals))
        print(json.dumps({"output": result.output}))


if __name__ == "__main__":
    main()
