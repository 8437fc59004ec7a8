"""OpenTelemetry tracing of agent runs, off until `enable()` is called (the `otel` extra installs the API and SDK).

```python
import agent.tracing

agent.tracing.enable()  # the global tracer provider; or enable(tracer_provider=provider)
```

Each run becomes an `invoke_agent` span, with a `chat {model}` span per model request and an
`execute_tool {tool}` span per tool call beneath it, following the OpenTelemetry GenAI semantic conventions
(`gen_ai.*` attributes, see docs/tracing.md). Prompts, tool arguments and results are recorded only with
`capture_content=True`; images and audio never are, only their sha256.

While tracing is off nothing here imports opentelemetry, and the loop pays one attribute check per run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.exceptions import UserError

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from agent._otel import Tracer

__all__ = ["disable", "enable", "is_enabled"]

_active: Tracer | None = None
"""The tracer runs start their spans with; None while tracing is off (read by the loop once per run)."""


def enable(tracer_provider: TracerProvider | None = None, *, capture_content: bool = False) -> None:
    """Trace every run started from now on (calling it again replaces the settings).

    Args:
        tracer_provider: where spans go; None uses OpenTelemetry's global provider (`trace.set_tracer_provider`),
            also one set after this call.
        capture_content: record prompts, answers, tool arguments and tool results (the conventions' opt-in
            `gen_ai.input.messages`, `gen_ai.output.messages`, `gen_ai.tool.call.arguments`, ...) and error
            messages. Media are recorded as sha256 references either way, never as bytes.

    Raises:
        UserError: opentelemetry-api is not installed (`pip install 'mmagent[otel]'`).
    """
    global _active
    try:
        from agent._otel import Tracer
    except ImportError as exc:
        raise UserError(f"tracing needs opentelemetry-api: pip install 'mmagent[otel]' ({exc})") from exc
    _active = Tracer(tracer_provider, capture_content=capture_content)


def disable() -> None:
    """Stop tracing new runs; runs already started keep their spans until they end."""
    global _active
    _active = None


def is_enabled() -> bool:
    """Whether new runs are traced."""
    return _active is not None
