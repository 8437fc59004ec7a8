"""Rendering a history into Phi-4's prompt text, with every untrusted piece escaped."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    Part,
    RetryPart,
    TextPart,
    ToolDefinition,
    ToolResultPart,
)

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
TOOL, TOOL_END = "<|tool|>", "<|/tool|>"
TOOL_CALL, TOOL_CALL_END = "<|tool_call|>", "<|/tool_call|>"
TOOL_RESPONSE = "<|tool_response|>"
EOS = "<|endoftext|>"
IMAGE_PLACEHOLDER = "<|image|>"
AUDIO_PLACEHOLDER = "<|audio|>"

_ZWSP = "\u200b"
_FUNCTOOLS_IN_TEXT = re.compile(r"functools(?=\s*\[)")


def escape_text(text: str) -> str:
    """Make untrusted text unable to form any `<|...|>` token or spell a `functools[` call prefix."""
    return break_functools(text.replace("<|", "<" + _ZWSP + "|"))


def break_functools(text: str) -> str:
    """Put U+200B after every `functools` that a `[` follows (vLLM's Phi-4 call prefix)."""
    return _FUNCTOOLS_IN_TEXT.sub("functools" + _ZWSP, text) if "functools" in text else text


def escape_json(value: Any) -> str:
    """JSON for the prompt: compact, non-ASCII kept, `<|` written as `<\\u007c` (same value when decoded)."""
    return json.dumps(value, ensure_ascii=False).replace("<|", "<\\u007c")


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """Prompt text with one placeholder per image/audio clip, and the media in placeholder order."""

    text: str
    images: tuple[ImagePart, ...]
    audio: tuple[AudioPart, ...]
    control_tokens: int  # how many control/tool tokens the renderer itself emitted (for the injection check)


def render_tools(tools: Sequence[ToolDefinition]) -> str:
    """The JSON list placed between `<|tool|>` and `<|/tool|>`."""
    return escape_json([{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools])


class _Out:
    def __init__(self, image_token: str, audio_token: str) -> None:
        self.chunks: list[str] = []
        self.images: list[ImagePart] = []
        self.audio: list[AudioPart] = []
        self.controls = 0
        self.image_token, self.audio_token = image_token, audio_token

    def control(self, token: str) -> None:
        self.chunks.append(token)
        self.controls += 1

    def text(self, text: str) -> None:
        self.chunks.append(escape_text(text))

    def media(self, part: ImagePart | AudioPart) -> None:
        if isinstance(part, ImagePart):
            self.images.append(part)
            self.chunks.append(self.image_token)
        else:
            self.audio.append(part)
            self.chunks.append(self.audio_token)

    def content(self, parts: Sequence[Part]) -> None:
        """Text parts (adjacent ones joined before escaping) and media placeholders, in order."""
        pending: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                pending.append(part.text)
            elif isinstance(part, RetryPart):
                pending.append(part.message)
            elif isinstance(part, ImagePart | AudioPart):
                if pending:
                    self.text("".join(pending))
                    pending = []
                self.media(part)
        if pending:
            self.text("".join(pending))


def render_prompt(
    messages: Sequence[Message],
    tools: Sequence[ToolDefinition] = (),
    *,
    add_generation_prompt: bool = True,
    image_token: str = IMAGE_PLACEHOLDER,
    audio_token: str = AUDIO_PLACEHOLDER,
) -> RenderedPrompt:
    """Render a history in Phi-4's chat format.

    Tool definitions go into the (first) system turn; when there is no system message but there are
    tools, an empty system turn carries them.
    """
    out = _Out(image_token, audio_token)
    tools_pending = bool(tools)
    if tools_pending and (not messages or messages[0].role != "system"):
        _system(out, "", tools)
        tools_pending = False
    for message in messages:
        if message.role == "system":
            _system(out, message.text, tools if tools_pending else ())
            tools_pending = False
        elif message.role == "user":
            out.control(USER)
            out.content(message.parts)
            out.control(END)
        elif message.role == "assistant":
            out.control(ASSISTANT)
            text = message.text
            if text:
                out.text(text)
            calls = message.tool_calls
            if calls:
                out.control(TOOL_CALL)
                out.chunks.append(escape_json([{"name": c.name, "arguments": c.arguments} for c in calls]))
                out.control(TOOL_CALL_END)
            out.control(END)
        else:
            several = len(message.parts) > 1
            for part in message.parts:
                out.control(TOOL_RESPONSE)
                if isinstance(part, ToolResultPart):
                    prefix = f"[{part.name}] " if several else ""
                    prefix += "Error: " if part.is_error else ""
                    out.content([TextPart(text=prefix), *part.content] if prefix else part.content)
                elif isinstance(part, RetryPart):
                    name = f"[{part.name}] " if several and part.name else ""
                    out.text(f"{name}Error: {part.message}")
                out.control(END)
    if add_generation_prompt:
        out.control(ASSISTANT)
    return RenderedPrompt("".join(out.chunks), tuple(out.images), tuple(out.audio), out.controls)


def _system(out: _Out, text: str, tools: Sequence[ToolDefinition]) -> None:
    out.control(SYSTEM)
    out.text(text)
    if tools:
        out.control(TOOL)
        out.chunks.append(render_tools(tools))
        out.control(TOOL_END)
    out.control(END)
