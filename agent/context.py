"""Fit a conversation into the model's context window, exactly, without breaking it.

`ContextPolicy` runs before every model request (`Agent(..., context=ContextPolicy())`):

* Budget: the model's context length minus the tokens reserved for the answer. Counts come from the
  backend's exact `Model.count_tokens` (text, images, audio, tool definitions, template tokens): the system
  turn with the tools is counted as a whole, every later message once and cached (each message after the
  system turn renders independently in the Phi-4 format, so their counts add up).
* Oversized single items are shrunk deterministically: a tool result's text over `max_tool_result_tokens` is
  cut with a visible note; an image over `max_image_tokens` is downscaled (fewer HD crops); an audio clip over
  `max_audio_tokens` is refused with a clear error.
* Eviction, oldest first: within each old turn, images and audio first (replaced by a stub naming the
  artifact's sha256, which the memory store's `recall` tool can bring back), then the turn itself. A tool call
  and its results go or stay together. The system prompt, the tool definitions, the latest user turn and the
  latest step always stay; if they alone do not fit, `ContextOverflowError`.
* KV-cache friendly: nothing moves while the prompt fits. When it overflows, eviction goes down to
  `low_water` x budget in one cut, so the cached prefix survives many steps between cuts. `stats.prefix_resets`
  counts the cuts.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.exceptions import ContextOverflowError, UserError
from agent.messages import AudioPart, ImagePart, Message, Part, RetryPart, TextPart, ToolDefinition, ToolResultPart
from agent.models import Model

__all__ = ["ContextPolicy", "ContextStats"]

Summarizer = Callable[[Sequence[Message]], str]
_EMPTY_USER = Message(role="user", parts=())


@dataclass(slots=True)
class ContextStats:
    """What the policy did, summed over its life."""

    requests: int = 0
    prefix_resets: int = 0  # cuts that changed the prompt's prefix (the KV cache is lost once each)
    truncated_results: int = 0
    downscaled_images: int = 0
    last_prompt_tokens: int = 0


@dataclass(slots=True)
class _Cut:
    anchor: Message  # first message after the system prompt: identifies the conversation
    position: int  # 2*i: units < i dropped; 2*i + 1: also unit i's media stubbed


class ContextPolicy:
    """Keeps every request within the model's context window.

    Args:
        context_length: the window in tokens (default: the model's `context_length`).
        reserve_output_tokens: tokens kept free for the answer.
        low_water: after an overflow, evict down to this fraction of the budget (hysteresis for KV reuse).
        max_tool_result_tokens: cap on one tool result's text; longer text is cut with a note.
        max_image_tokens: cap on one image; larger images are downscaled.
        max_audio_tokens: cap on one audio clip; longer clips raise `ContextOverflowError`.
        summarizer: optional function writing a summary of evicted messages (e.g. a model call).
        summary_tokens: tokens kept for that summary (it is cut to fit).
    """

    def __init__(
        self,
        *,
        context_length: int | None = None,
        reserve_output_tokens: int = 1024,
        low_water: float = 0.5,
        max_tool_result_tokens: int | None = 8_000,
        max_image_tokens: int | None = None,
        max_audio_tokens: int | None = None,
        summarizer: Summarizer | None = None,
        summary_tokens: int = 512,
    ) -> None:
        if not 0 < low_water <= 1:
            raise UserError(f"low_water must be in (0, 1], got {low_water}")
        if reserve_output_tokens < 0:
            raise UserError("reserve_output_tokens cannot be negative")
        self.context_length = context_length
        self.reserve_output_tokens = reserve_output_tokens
        self.low_water = low_water
        self.max_tool_result_tokens = max_tool_result_tokens
        self.max_image_tokens = max_image_tokens
        self.max_audio_tokens = max_audio_tokens
        self.summarizer = summarizer
        self.summary_tokens = summary_tokens
        self.stats = ContextStats()
        self._costs: dict[int, tuple[Message, int]] = {}
        self._shrunk: dict[int, tuple[Message, Message]] = {}
        self._cuts: dict[int, _Cut] = {}
        self._summaries: dict[tuple[int, int], Message] = {}

    # ------------------------------------------------------------------ public

    def budget(self, model: Model) -> int | None:
        """Prompt tokens allowed for `model`, or None when its context length is unknown."""
        length = self.context_length or model.context_length
        return None if length is None else length - self.reserve_output_tokens

    def fit(self, messages: Sequence[Message], tools: Sequence[ToolDefinition], model: Model) -> list[Message]:
        """The messages to send: within budget, pairs intact, system prompt and latest turn kept."""
        self.stats.requests += 1
        msgs = [self._shrink(m, model) for m in messages]
        budget = self.budget(model)
        if budget is None:
            return msgs
        head, units, pinned, pin_at = _partition(msgs)
        base = model.count_tokens(head, tools)  # system turn, tool definitions, generation prompt
        fixed = base + sum(self._cost(m, model) for m in pinned)
        if self.summarizer is not None:
            fixed += self.summary_tokens
        if fixed > budget:
            raise ContextOverflowError(
                f"the system prompt, tools and latest turn need {fixed} tokens; the budget is {budget} "
                f"({self.context_length or model.context_length} context - {self.reserve_output_tokens} reserved)"
            )
        anchor = msgs[len(head)] if len(msgs) > len(head) else None
        cut = self._cuts.get(id(anchor)) if anchor is not None else None
        position = cut.position if cut is not None and cut.anchor is anchor else 0
        costs = [self._unit_costs(u, model) for u in units]
        total = fixed + _kept(costs, position)
        if total > budget:
            target = int(budget * self.low_water)
            while total > target and position < 2 * len(units):
                position += 1
                total = fixed + _kept(costs, position)
            if total > budget:  # low water unreachable is fine; over budget is not
                raise ContextOverflowError(f"cannot fit the conversation in {budget} tokens")
            self.stats.prefix_resets += 1
            if anchor is not None:
                if len(self._cuts) > 1000:
                    self._cuts.clear()
                self._cuts[id(anchor)] = _Cut(anchor, position)
        out = self._assemble(head, units, pinned, pin_at, position, model)
        self.stats.last_prompt_tokens = base + sum(self._cost(m, model) for m in out[len(head) :])
        return out

    # ------------------------------------------------------------------ counting

    def _cost(self, message: Message, model: Model) -> int:
        hit = self._costs.get(id(message))
        if hit is not None and hit[0] is message:
            return hit[1]
        cost = model.count_tokens([message], ()) - model.count_tokens([], ())
        if len(self._costs) > 200_000:
            self._costs.clear()
        self._costs[id(message)] = (message, cost)
        return cost

    def _unit_costs(self, unit: list[Message], model: Model) -> tuple[int, int]:
        """(tokens as is, tokens with media replaced by stubs)."""
        full = sum(self._cost(m, model) for m in unit)
        stubbed = sum(self._cost(_stub_media(m), model) for m in unit)
        return full, stubbed

    def _part_tokens(self, part: Part, model: Model) -> int:
        return model.count_tokens([Message(role="user", parts=(part,))], ()) - model.count_tokens([_EMPTY_USER], ())

    # ------------------------------------------------------------------ oversized items

    def _shrink(self, message: Message, model: Model) -> Message:
        if self.max_tool_result_tokens is None and self.max_image_tokens is None and self.max_audio_tokens is None:
            return message
        hit = self._shrunk.get(id(message))
        if hit is not None and hit[0] is message:
            return hit[1]
        parts = tuple(self._shrink_part(p, model) for p in message.parts)
        out = message if parts == message.parts else Message(role=message.role, parts=parts)
        self._shrunk[id(message)] = (message, out)
        return out

    def _shrink_part(self, part: Part, model: Model) -> Part:
        if isinstance(part, ToolResultPart):
            content = tuple(self._shrink_part(p, model) for p in part.content)
            text_cap = self.max_tool_result_tokens
            if text_cap is not None:
                content = self._truncate_text(content, text_cap, model)
            return part if content == part.content else part.model_copy(update={"content": content})  # type: ignore[arg-type]
        if isinstance(part, ImagePart) and self.max_image_tokens is not None:
            return self._downscale(part, self.max_image_tokens, model)
        if isinstance(part, AudioPart) and self.max_audio_tokens is not None:
            tokens = self._part_tokens(part, model)
            if tokens > self.max_audio_tokens:
                raise ContextOverflowError(
                    f"an audio clip needs {tokens} tokens, over the cap of {self.max_audio_tokens}: "
                    "split it into shorter clips (Phi-4 uses 12.5 tokens per second)"
                )
        return part

    def _truncate_text(self, content: tuple[Part, ...], cap: int, model: Model) -> tuple[Part, ...]:
        text = "".join(p.text for p in content if isinstance(p, TextPart))
        tokens = self._part_tokens(TextPart(text=text), model) if text else 0
        if tokens <= cap:
            return content
        keep = len(text) * cap // tokens
        while keep > 0:
            note = f"\n[... truncated: {tokens} tokens, over the {cap}-token cap for one tool result]"
            if self._part_tokens(TextPart(text=text[:keep] + note), model) <= cap:
                break
            keep = keep * 9 // 10
        self.stats.truncated_results += 1
        media = tuple(p for p in content if not isinstance(p, TextPart))
        return (TextPart(text=text[:keep] + note), *media)

    def _downscale(self, part: ImagePart, cap: int, model: Model) -> ImagePart:
        tokens = self._part_tokens(part, model)
        if tokens <= cap:
            return part
        image = part.to_pil()
        scale = math.sqrt(cap / tokens)
        for _ in range(12):
            w, h = max(1, int(image.width * scale)), max(1, int(image.height * scale))
            buf = io.BytesIO()
            image.resize((w, h)).save(buf, format="PNG")
            candidate = ImagePart(data=buf.getvalue(), media_type="image/png")
            if self._part_tokens(candidate, model) <= cap:
                self.stats.downscaled_images += 1
                return candidate
            scale *= 0.85
        raise ContextOverflowError(f"an image needs {tokens} tokens and cannot be shrunk under the cap of {cap}")

    # ------------------------------------------------------------------ assembly

    def _assemble(
        self,
        head: list[Message],
        units: list[list[Message]],
        pinned: list[Message],
        pin_at: int,
        position: int,
        model: Model,
    ) -> list[Message]:
        dropped, stub_one = divmod(position, 2)
        out = list(head)
        if dropped and self.summarizer is not None:
            out.append(self._summary(units[:dropped], model))
        for i, unit in enumerate(units):
            if i == pin_at:
                out.extend(pinned[:1])  # the latest user message sits between old turns and this run's steps
            if i < dropped:
                continue
            out.extend(_stub_media(m) for m in unit) if (i == dropped and stub_one) else out.extend(unit)
        if pin_at >= len(units):
            out.extend(pinned[:1])
        out.extend(pinned[1:])
        return out

    def _summary(self, evicted: list[list[Message]], model: Model) -> Message:
        first = evicted[0][0]
        key = (id(first), len(evicted))
        hit = self._summaries.get(key)
        if hit is None:
            assert self.summarizer is not None
            text = "[Summary of earlier conversation] " + self.summarizer([m for unit in evicted for m in unit])
            parts = self._truncate_text((TextPart(text=text),), self.summary_tokens - 8, model)
            hit = self._summaries[key] = Message(role="user", parts=parts)
        return hit


def _kept(costs: list[tuple[int, int]], position: int) -> int:
    dropped, stub_one = divmod(position, 2)
    total = 0
    for i, (full, stubbed) in enumerate(costs):
        if i < dropped:
            continue
        total += stubbed if (i == dropped and stub_one) else full
    return total


def _is_prompt(message: Message) -> bool:
    return message.role == "user" and any(not isinstance(p, RetryPart) for p in message.parts)


def _partition(msgs: list[Message]) -> tuple[list[Message], list[list[Message]], list[Message], int]:
    """(system head, evictable units, pinned messages, index in units where the latest prompt sits).

    A unit is a message plus the tool results and retry requests that answer it, so pairs move together.
    Pinned: the latest user prompt and the last unit after it (the step the model is answering).
    """
    start = 0
    while start < len(msgs) and msgs[start].role == "system":
        start += 1
    head = msgs[:start]
    last_prompt = max((i for i in range(start, len(msgs)) if _is_prompt(msgs[i])), default=None)
    units: list[list[Message]] = []
    prompt_unit = -1
    for i in range(start, len(msgs)):
        m = msgs[i]
        if i == last_prompt:
            prompt_unit = len(units)
            continue
        answers = m.role == "tool" or (m.role == "user" and not _is_prompt(m))
        if answers and units and i - 1 != last_prompt:
            units[-1].append(m)
        else:
            units.append([m])
    pinned: list[Message] = [msgs[last_prompt]] if last_prompt is not None else []
    pin_at = prompt_unit if prompt_unit >= 0 else len(units)
    if units and len(units) > pin_at:  # the latest step stays
        pinned.extend(units.pop())
    return head, units, pinned, pin_at


def _stub_media(message: Message) -> Message:
    if not any(isinstance(p, ImagePart | AudioPart | ToolResultPart) for p in message.parts):
        return message
    parts = tuple(_stub_part(p) for p in message.parts)
    return message if parts == message.parts else Message(role=message.role, parts=parts)


def _stub_part(part: Part) -> Part:
    if isinstance(part, ImagePart | AudioPart):
        kind = "image" if isinstance(part, ImagePart) else "audio clip"
        digest = hashlib.sha256(part.data).hexdigest()
        return TextPart(text=f"[{kind} sha256:{digest} removed from context; the recall tool can bring it back]")
    if isinstance(part, ToolResultPart) and any(isinstance(p, ImagePart | AudioPart) for p in part.content):
        return part.model_copy(update={"content": tuple(_stub_part(p) for p in part.content)})
    return part
