"""mmagent's agent package: the loop, messages, model seam and events.

```python
from agent import Agent
from agent.testing import FunctionModel

agent = Agent(FunctionModel(lambda messages, info: "hello"), system_prompt="Be brief.")
print(agent.run_sync("hi").output)
```
"""

from agent._loop import Agent, UsageLimits
from agent.events import (
    AgentEvent,
    FinalEvent,
    ModelResponseEvent,
    PartialOutputEvent,
    RetryEvent,
    RunResult,
    TextDeltaEvent,
    ToolCallEvent,
    ToolProgressEvent,
    ToolResultEvent,
    UsageEvent,
)
from agent.exceptions import MMAgentError, ModelRetry
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolDefinition,
    ToolResultPart,
)
from agent.models import Model, ModelResponse, ModelSettings, Usage

__all__ = [
    "Agent",
    "AgentEvent",
    "AudioPart",
    "FinalEvent",
    "ImagePart",
    "MMAgentError",
    "Message",
    "Model",
    "ModelResponse",
    "ModelResponseEvent",
    "ModelRetry",
    "ModelSettings",
    "PartialOutputEvent",
    "RetryEvent",
    "RetryPart",
    "RunResult",
    "TextDeltaEvent",
    "TextPart",
    "ToolCallEvent",
    "ToolCallPart",
    "ToolDefinition",
    "ToolProgressEvent",
    "ToolResultEvent",
    "ToolResultPart",
    "Usage",
    "UsageEvent",
    "UsageLimits",
]
