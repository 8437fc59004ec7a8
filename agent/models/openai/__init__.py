"""`OpenAIModel`: any OpenAI-compatible chat-completions server (vLLM, llama.cpp, `mmagent serve`) over httpx.

```python
from agent import Agent
from agent.models.openai import OpenAIModel

model = OpenAIModel(
    "http://gpu-box:8000/v1",
    "microsoft/Phi-4-multimodal-instruct",
    lora_models={"vision": "vision", "speech": "speech"},  # names given to vLLM's --lora-modules
)
agent = Agent(model, tools=[...])
```

Images travel as data URLs and audio as `input_audio` parts; tools as OpenAI function definitions. Requests
that fail with 408, 429, 5xx, a timeout or a connection error are retried with exponential backoff and jitter
(a server's `Retry-After` wins); every failure reaches the caller as `agent.exceptions.ModelHTTPError`.
See docs/vllm.md for serving Phi-4-multimodal with its LoRA adapters.

Layout: `_model` (the `Model` seam, retries, streaming), `_wire` (messages and tools to the request body, the
response and SSE stream back to `ModelResponse`).
"""

from __future__ import annotations

from agent.models.openai._model import OpenAIModel

__all__ = ["OpenAIModel"]
