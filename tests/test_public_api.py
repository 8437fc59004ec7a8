"""The public surface is small and pinned: changing it must be a deliberate edit of this test."""

from __future__ import annotations

import subprocess
import sys

import agent
import agent.exceptions
import agent.messages
import agent.models
import agent.testing
import agent.tracing
import tools


def test_public_names_are_pinned() -> None:
    assert sorted(tools.__all__) == [
        "Approver", "Deny", "ModelRetry", "Registry", "Tool", "ToolArgumentsError", "ToolContext",
        "ToolDefinitionError", "to_content", "tool",
    ]  # fmt: skip
    assert sorted(agent.testing.__all__) == ["AgentInfo", "FunctionModel", "ReplayModel", "call"]
    assert sorted(agent.tracing.__all__) == ["disable", "enable", "is_enabled"]
    assert "Agent" in agent.__all__ and "Message" in agent.__all__
    for module in (agent, agent.exceptions, agent.messages, agent.models, agent.testing, agent.tracing, tools):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name} is listed but missing"
            assert not name.startswith("_")


def test_every_exception_derives_from_the_base() -> None:
    for name in agent.exceptions.__all__:
        cls = getattr(agent.exceptions, name)
        if name != "ModelRetry":
            assert issubclass(cls, agent.exceptions.MMAgentError), name
        assert name in (agent.exceptions.__doc__ or ""), f"{name} is missing from the tree in the docstring"


def test_import_needs_no_torch_in_any_order() -> None:
    code = (
        "import sys; import tools, memory, agent, agent.testing, agent.models.phi4_format; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run([sys.executable, "-c", "import agent, tools"], check=True)
