"""Phi-4 chat format: rendering a history into the prompt text, parsing completions back into parts.

Pure functions, no torch. The prompt has no newlines between turns:

```
<|system|>{system}<|tool|>[tool definitions as JSON]<|/tool|><|end|><|user|>{media}{text}<|end|>
<|assistant|>{text}<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|><|end|>
<|tool_response|>{result}<|end|><|assistant|>
```

For tool-free histories the text equals the model's official chat template byte for byte (provided the
text holds no `<|`; see below).

Security: every piece of text that does not come from this renderer (system prompt, user text, tool
results, earlier assistant text, JSON values) is escaped so that it can never tokenize into one of
Phi-4's control or tool tokens: `<|` becomes `<` + U+200B + `|` in plain text, and `<\\u007c` inside JSON
strings (the same JSON value). All added tokens start with `<|`, so no untrusted run can contain one.
`functools[` in plain text gets a U+200B after `functools` too, so a model quoting a page that holds it
does not copy a call prefix.

Parsing accepts the three formats seen in the wild: `<|tool_call|>{json}<|/tool_call|>` (one object or a
list, closing tag optional, anywhere in the completion), and, only at the very start of the completion
(where a model's own format puts them), `functools[...]` and a bare JSON list or object of calls: text that
merely quotes one later on stays text. Text around calls is kept. Malformed calls become errors for a retry
request; `parse_completion` never raises.
"""

from __future__ import annotations

from agent.models.phi4_format._parse import PartialCall as PartialCall
from agent.models.phi4_format._parse import parse_completion, stream_safe_length
from agent.models.phi4_format._parse import scan_call_block as scan_call_block
from agent.models.phi4_format._render import (
    ASSISTANT,
    AUDIO_PLACEHOLDER,
    END,
    IMAGE_PLACEHOLDER,
    RenderedPrompt,
    escape_json,
    escape_text,
    render_prompt,
    render_tools,
)
from agent.models.phi4_format._render import (
    EOS as EOS,
)
from agent.models.phi4_format._render import (
    SYSTEM as SYSTEM,
)
from agent.models.phi4_format._render import (
    TOOL as TOOL,
)
from agent.models.phi4_format._render import (
    TOOL_CALL as TOOL_CALL,
)
from agent.models.phi4_format._render import (
    TOOL_CALL_END as TOOL_CALL_END,
)
from agent.models.phi4_format._render import (
    TOOL_END as TOOL_END,
)
from agent.models.phi4_format._render import (
    TOOL_RESPONSE as TOOL_RESPONSE,
)
from agent.models.phi4_format._render import (
    USER as USER,
)
from agent.models.phi4_format._render import (
    break_functools as break_functools,
)

__all__ = [
    "ASSISTANT",
    "AUDIO_PLACEHOLDER",
    "END",
    "IMAGE_PLACEHOLDER",
    "RenderedPrompt",
    "escape_json",
    "escape_text",
    "parse_completion",
    "render_prompt",
    "render_tools",
    "stream_safe_length",
]
