"""A tool that needs a person's approval and leaves a trace of every execution (for the approval tests)."""

from __future__ import annotations

import os
from pathlib import Path

from tools import tool


@tool(requires_approval=True)
def pay(amount: int) -> str:
    """Pay an amount of euros.

    Args:
        amount: euros to pay.
    """
    with Path(os.environ["PAY_LOG"]).open("a") as log:
        log.write(f"{amount}\n")
    return f"paid {amount} EUR"


TOOLS = [pay]
