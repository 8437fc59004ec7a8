"""Tools the model may call: the `@tool` decorator, `Tool`, and the validating `Registry`.

```python
from tools import tool

@tool(timeout=5)
def add(a: int, b: int) -> int:
    # The docstring's summary becomes the description; its Google-style "Args:" describe parameters.
    return a + b
```
"""

from agent.exceptions import ModelRetry, ToolArgumentsError, ToolDefinitionError
from tools._context import ToolContext
from tools._registry import Approver, Deny, Registry, Tool, to_content, tool

__all__ = [
    "Approver",
    "Deny",
    "ModelRetry",
    "Registry",
    "Tool",
    "ToolArgumentsError",
    "ToolContext",
    "ToolDefinitionError",
    "to_content",
    "tool",
]
