"""Prompt formats of the transformers backend: messages -> token ids (+ media spans), completion -> parts.

* `Phi4Format`: Phi-4-multimodal's own format (`agent.models.phi4_format`), media placeholders expanded to
  the exact number of image/audio tokens, and the security invariant checked on every prompt: the ids of
  added (control, tool, media) tokens in the prompt are exactly those the renderer emitted.
* `ChatFormat`: any chat model with a chat template; tools described in the system prompt, calls as
  `<tool_call>[...]</tool_call>`, untrusted text escaped so it cannot form the tokenizer's added tokens.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.exceptions import MediaError, ModelError, UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    RetryPart,
    TextPart,
    ToolDefinition,
    ToolResultPart,
)
from agent.models import ModelSettings, ParsedCompletion
from agent.models import phi4_format as pf
from agent.models.transformers._media import AudioSettings, ImageSettings, MediaCounter, media_digest

_ZWSP = "\u200b"


@dataclass(frozen=True, slots=True)
class MediaSpan:
    """A run of image or audio tokens in a prompt: where it is, and which media it holds."""

    start: int
    length: int
    kind: Literal["image", "audio"]
    digest: bytes
    part: ImagePart | AudioPart = field(compare=False)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenized prompt. `mode` is the adapter/projection key the KV cache must match to be reused."""

    ids: list[int]
    spans: tuple[MediaSpan, ...] = ()
    mode: tuple[str | None, str | None] = (None, None)
    prefix: str = ""  # completion text forced after the prompt (tool_choice), already in `ids`
    prefix_length: int = 0  # how many of the last `ids` are that prefix


class Format:
    """How one model family renders prompts and reads completions."""

    open_tag: str = pf.TOOL_CALL
    tokenizer: Any
    stop_ids: frozenset[int] = frozenset()
    end_ids: tuple[int, ...] = ()  # the stop ids that end a turn normally (a grammar's end of output)
    banned_ids: tuple[int, ...] = ()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads at once

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        with self.tokenizer_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def build(self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings) -> Prompt:
        raise NotImplementedError

    def parse(self, raw: str, *, json_answer: bool = False) -> ParsedCompletion:
        """Read a completion (`json_answer`: the answer is JSON by request, only tagged blocks are calls)."""
        raise NotImplementedError

    def _ids_of(self, tokens: Sequence[str]) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in tokens if t in vocab]


# ---------------------------------------------------------------- Phi-4-multimodal


class Phi4Format(Format):
    """Phi-4-multimodal's chat format; `processor` None serves text only."""

    def __init__(self, tokenizer: Any, processor: Any | None, adapters: frozenset[str] = frozenset()) -> None:
        super().__init__(tokenizer)
        self.processor = processor
        self.adapters = adapters
        vocab = tokenizer.get_vocab()
        self.image_token = str(getattr(processor, "image_token", None) or "<|endoftext10|>")
        self.audio_token = str(getattr(processor, "audio_token", None) or "<|endoftext11|>")
        for token in (self.image_token, self.audio_token):
            if not token.startswith("<|"):  # the escaping guarantees only tokens starting with "<|"
                raise ModelError(f"media placeholder {token!r} does not start with '<|'; cannot guarantee escaping")
        self.image_id = vocab.get(self.image_token, -1)
        self.audio_id = vocab.get(self.audio_token, -1)
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.added_ids = frozenset(int(i) for i in decoder)
        self._added_array = sorted(self.added_ids)
        missing = [t for t in (pf.SYSTEM, pf.USER, pf.ASSISTANT, pf.END, pf.TOOL_CALL) if t not in vocab]
        if missing:
            raise ModelError(f"the tokenizer lacks Phi-4 control tokens {missing}: is this a Phi-4 tokenizer?")
        self.stop_ids = frozenset(self._ids_of([pf.END, pf.EOS, pf.USER, pf.SYSTEM, pf.ASSISTANT, pf.TOOL_RESPONSE]))
        self.end_ids = tuple(self._ids_of([pf.END, pf.EOS]))
        self.banned_ids = tuple(i for i in (self.image_id, self.audio_id) if i >= 0)
        self.tool_call_id = vocab[pf.TOOL_CALL]
        self.counter: MediaCounter | None = None
        if processor is not None:
            image_settings = ImageSettings.from_processor(processor.image_processor)
            extractor = getattr(processor, "audio_processor", None) or getattr(processor, "feature_extractor", None)
            audio_settings = AudioSettings.from_processor(extractor)
            self.counter = MediaCounter(image_settings, audio_settings)

    def build(self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings) -> Prompt:
        rendered = pf.render_prompt(messages, tools, image_token=self.image_token, audio_token=self.audio_token)
        if (rendered.images or rendered.audio) and self.counter is None:
            raise MediaError("this model was given a tokenizer, not a processor: it cannot read images or audio")
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.audio_token)})", rendered.text)
        images, audio = iter(rendered.images), iter(rendered.audio)
        chunks: list[str] = []
        order: list[tuple[Literal["image", "audio"], ImagePart | AudioPart, int, bytes]] = []
        for piece in pieces:
            if piece in (self.image_token, self.audio_token):
                part: ImagePart | AudioPart = next(images) if piece == self.image_token else next(audio)
                digest = media_digest(part)
                assert self.counter is not None
                count = self.counter.count(part, digest)
                order.append(("image" if piece == self.image_token else "audio", part, count, digest))
                chunks.append(piece * count)
            else:
                chunks.append(piece)
        prefix = _forced_prefix(settings, tools)
        ids = self.encode("".join(chunks), special=True)
        spans = self._spans(ids, order)
        self._check_controls(ids, rendered.control_tokens, sum(s.length for s in spans))
        prefix_ids = self.encode(prefix) if prefix else []
        ids.extend(prefix_ids)
        has_image, has_audio = bool(rendered.images), bool(rendered.audio)
        adapter = "vision" if has_image else "speech" if has_audio else None
        projection = ("vision" if has_image else "speech") if has_audio else None
        mode = (adapter if adapter in self.adapters else None, projection)
        return Prompt(ids=ids, spans=spans, mode=mode, prefix=prefix, prefix_length=len(prefix_ids))

    def _spans(
        self, ids: list[int], order: list[tuple[Literal["image", "audio"], ImagePart | AudioPart, int, bytes]]
    ) -> tuple[MediaSpan, ...]:
        if not order:
            return ()
        import numpy as np

        array = np.asarray(ids)
        positions = np.flatnonzero((array == self.image_id) | (array == self.audio_id)).tolist()
        spans: list[MediaSpan] = []
        k = 0
        for kind, part, count, digest in order:
            token = self.image_id if kind == "image" else self.audio_id
            start = positions[k] if k < len(positions) else -1
            if start < 0 or k + count > len(positions) or positions[k + count - 1] != start + count - 1:
                raise ModelError("media placeholder tokens are not where the renderer put them (please report)")
            if any(t != token for t in ids[start : start + count]):
                raise ModelError("image and audio placeholder tokens are interleaved (please report)")
            spans.append(MediaSpan(start, count, kind, digest, part))
            k += count
        if k != len(positions):
            raise ModelError(f"{len(positions) - k} media tokens in the prompt belong to no image or audio clip")
        return tuple(spans)

    def _check_controls(self, ids: list[int], control_tokens: int, media_tokens: int) -> None:
        """Security invariant: only the renderer emits control/tool/media token ids."""
        import numpy as np

        found = int(np.isin(np.asarray(ids), self._added_array).sum())
        if found != control_tokens + media_tokens:
            raise ModelError(
                f"refusing to run: the prompt holds {found} control/tool/media token ids but the renderer emitted "
                f"{control_tokens} control tokens and {media_tokens} media tokens; untrusted text formed a "
                "control token (please report)"
            )

    def parse(self, raw: str, *, json_answer: bool = False) -> ParsedCompletion:
        return pf.parse_completion(raw, json_answer=json_answer)


def _forced_prefix(settings: ModelSettings, tools: Sequence[ToolDefinition], tag: str = pf.TOOL_CALL) -> str:
    choice = settings.tool_choice
    if not tools or choice in ("auto", "none"):
        return ""
    if choice == "required":
        return tag
    if not any(t.name == choice for t in tools):
        raise UserError(f"tool_choice names {choice!r}, which is not among the tools: {[t.name for t in tools]}")
    return tag + '[{"name": ' + json.dumps(choice) + ', "arguments": '


# ---------------------------------------------------------------- plain chat models

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_TOOLS_PROMPT = (
    "You can call tools. The tools, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call tools, reply with only this, nothing before or after:\n"
    '<tool_call>[{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}]</tool_call>\n'
    "The results come back {results}. When you can answer without a tool, answer in plain text."
)


class ChatFormat(Format):
    """A plain chat model: its own chat template, tools in the system prompt, `<tool_call>` tags."""

    open_tag = TOOL_OPEN

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("the tokenizer has no chat template: pass a chat (instruct) model")
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        contents = sorted({str(getattr(t, "content", t)) for t in decoder.values()}, key=len, reverse=True)
        contents = [c for c in contents if len(c) > 1]
        contents += [TOOL_OPEN, TOOL_CLOSE]  # the call tags are plain text for this model: break them too
        self._added = re.compile("|".join(re.escape(c) for c in contents))
        self._tool_role = "tool" if self._accepts_role("tool") else "user"
        ids = set(eos_ids)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.stop_ids = frozenset(ids)
        self.end_ids = tuple(sorted(ids))
        self.trailers = tuple(str(t) for t in (tokenizer.eos_token,) if t)

    def _accepts_role(self, role: str) -> bool:
        """Whether the chat template renders a turn with this role (natively or generically)."""
        probe = "mmagent-role-probe"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": role, "content": probe}], tokenize=False
            )
        except Exception:  # templates raise on roles they do not know
            return False
        return probe in str(text)

    def escape(self, text: str) -> str:
        """Break every added-token string and call tag in untrusted text (a zero-width space after its first
        character), and `functools[`."""
        return pf.break_functools(self._added.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text))

    def _content(self, parts: Sequence[Any]) -> str:
        out: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                out.append(self.escape(part.text))
            elif isinstance(part, RetryPart):
                out.append(self.escape(part.message))
            elif isinstance(part, ImagePart):
                width, height = part.size
                out.append(f"[image {width}x{height} omitted: this model reads text only]")
            elif isinstance(part, AudioPart):
                out.append("[audio clip omitted: this model reads text only]")
        return "".join(out)

    def render(self, messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> str:
        """The prompt text, from the model's own chat template."""
        turns: list[dict[str, str]] = []
        system = [self.escape(m.text) for m in messages if m.role == "system"]
        if tools:
            listing = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
            results = "as tool messages" if self._tool_role == "tool" else "in <tool_response> tags"
            listing_json = self.escape(json.dumps(listing, ensure_ascii=False))
            system.append(_TOOLS_PROMPT.format(tools=listing_json, results=results))
        if system:
            turns.append({"role": "system", "content": "\n\n".join(s for s in system if s)})
        for message in messages:
            if message.role == "user":
                turns.append({"role": "user", "content": self._content(message.parts)})
            elif message.role == "assistant":
                text = self.escape(message.text)
                calls = message.tool_calls
                if calls:
                    body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False)
                    text = (text + "\n" if text else "") + TOOL_OPEN + self.escape(body) + TOOL_CLOSE
                turns.append({"role": "assistant", "content": text})
            elif message.role == "tool":
                several = len(message.parts) > 1
                for part in message.parts:
                    if isinstance(part, ToolResultPart):
                        body = (f"[{part.name}] " if several else "") + ("Error: " if part.is_error else "")
                        body += self._content(part.content)
                    elif isinstance(part, RetryPart):
                        body = (
                            (f"[{part.name}] " if several and part.name else "") + "Error: " + self.escape(part.message)
                        )
                    else:
                        continue
                    if self._tool_role != "tool":  # a user turn: mark it as a tool's answer
                        body = f"<tool_response>{body}</tool_response>"
                    turns.append({"role": self._tool_role, "content": body})
        try:
            with self.tokenizer_lock:
                text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors from the model's own template (unsupported roles, ...)
            raise ModelError(f"the model's chat template failed: {exc}") from exc
        return str(text)

    def build(self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings) -> Prompt:
        prefix = _forced_prefix(settings, tools, TOOL_OPEN)
        prefix_ids = self.encode(prefix) if prefix else []  # apart, so the grammar sees exactly these tokens
        ids = self.encode(self.render(messages, tools)) + prefix_ids
        return Prompt(ids=ids, prefix=prefix, prefix_length=len(prefix_ids))

    def parse(self, raw: str, *, json_answer: bool = False) -> ParsedCompletion:
        return pf.parse_completion(
            raw, open_tag=TOOL_OPEN, close_tag=TOOL_CLOSE, trailers=self.trailers, json_answer=json_answer
        )
