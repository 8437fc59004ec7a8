"""The step loop of the transformers backend: KV reuse across requests, prefill, sampling, streaming.

One `Engine` per model keeps the KV cache of the previous request with the token ids (and media hashes)
it holds. A new prompt is compared with them: only the tokens after the longest common prefix are
prefilled, after cropping the cache where the prompt diverges. A media run is reused only whole and
only when its hash matches, and the cache is dropped when the adapter/projection mode changes.

Longrope: the rotary frequencies depend on whether the sequence is longer than
`original_max_position_embeddings` (4096 for Phi-4). Keys cached under one regime are wrong under the
other (transformers 5.23 silently continues with them), so the engine remembers the regime its cache was
built in and recomputes the whole sequence once when a prompt, or a decode step, crosses the switch.

Decode modes (`_static`): `eager` runs the model's forward per token on a growing `DynamicCache`; `static`
and `compiled` keep a preallocated cache sized in buckets and run each decode token through one step function
(compiled, with CUDA graphs on CUDA, in `compiled`). All three share the rest: reuse, crop, the rope switch,
media, grammar masks, forced tokens, stop strings and streaming; greedy outputs are token-identical.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.messages import ToolCallPart
from agent.models import ModelSettings, ToolCallDelta
from agent.models import phi4_format as pf
from agent.models.transformers._media import process_media
from agent.models.transformers._prompt import Format, MediaSpan, Prompt
from agent.models.transformers._static import PREFILL_CHUNK, DecodeMode, DecodeStep, RopeRegime, StaticKV

if TYPE_CHECKING:
    import torch

    from agent.models._grammar import ToolCallMatcher, ToolConstraint

LogitsProcessor = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""`(input_ids [1, n], scores [1, vocab]) -> scores`, the interface of transformers' logits processors."""


@dataclass
class CacheState:
    """What the KV cache holds: the ids fed so far, their media, and the mode/regime they were computed in."""

    cache: Any = None
    ids: list[int] = field(default_factory=list)
    spans: tuple[MediaSpan, ...] = ()
    mode: tuple[str | None, str | None] = (None, None)
    long_rope: bool = False

    def reset(self) -> None:
        self.cache, self.ids, self.spans, self.long_rope = None, [], (), False


@dataclass(frozen=True, slots=True)
class Completion:
    """One generation: raw text (forced prefix included), token counts, why it stopped."""

    text: str
    input_tokens: int
    output_tokens: int
    prefill_tokens: int
    finish_reason: str
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    forward_passes: int = 0  # decode steps that ran the model (forced tokens share one)
    constraint_error: str | None = None  # why the grammar stopped constraining this generation, if it did
    steered_tokens: int | None = None  # tokens the grammar chose rather than the model (None: unconstrained)
    logprobs: tuple[Logprob, ...] | None = None  # per token of the text, when asked for


Logprob = tuple[int, float, tuple[tuple[int, float], ...]]
"""(token id, its log probability, (id, log probability) of the most likely tokens at its position)."""


def common_prefix(state: CacheState, prompt: Prompt) -> int:
    """How many leading tokens of `prompt` the cache can keep (media compared by hash, whole runs only)."""
    if state.cache is None or not state.ids or state.mode != prompt.mode:
        return 0
    old, new = state.ids, prompt.ids
    limit = min(len(old), len(new))
    p = 0
    step = 4096
    while p < limit:  # compare in slices: list equality runs in C
        end = min(p + step, limit)
        if old[p:end] == new[p:end]:
            p = end
            continue
        while p < end and old[p] == new[p]:
            p += 1
        break
    cached = {s.start: s for s in state.spans}
    for span in prompt.spans:
        if span.start >= p:
            break
        before = cached.get(span.start)
        if before is None or before != span or span.start + span.length > p:
            p = span.start
            break
    return p


class Engine:
    """Runs prompts on a causal LM with KV reuse. Not thread-safe: the backend calls it under a lock."""

    def __init__(
        self,
        model: Any,
        fmt: Format,
        processor: Any | None,
        *,
        kv_reuse: bool = True,
        logits_processors: Sequence[LogitsProcessor] = (),
        rope_switch: int | None = None,
        adapters: frozenset[str] = frozenset(),
        decode: DecodeMode = "eager",
    ) -> None:
        self.model = model
        self.fmt = fmt
        self.processor = processor
        self.kv_reuse = kv_reuse
        self.logits_processors = list(logits_processors)
        self.rope_switch = rope_switch
        self.adapters = adapters
        self.state = CacheState()
        self._rejected = False  # the last sample-first step was rejected by the grammar
        self._steered = 0  # tokens of this generation the grammar chose rather than the model
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ()
        # Sliding-window layers keep only the last `window` tokens, so a cut back is exact only while the
        # cache never held more than that. Phi-4-mm's config declares sliding_window=262144, beyond its
        # 131072 positions: treating it as uncroppable made every step rebuild the cache (seen on an H100).
        window = getattr(config, "sliding_window", None)
        sliding = window is not None or any("sliding" in str(t) for t in layer_types)
        self.crop_limit: int | None = (window if isinstance(window, int) else 0) if sliding else None
        self.decode = decode
        self.prefill_chunk = PREFILL_CHUNK  # tokens per prefill forward on a static cache
        self._kv: StaticKV | None = None
        self._step: DecodeStep | None = None
        self._rope = RopeRegime(model) if rope_switch is not None else None
        if decode != "eager":
            StaticKV.check(config)
            limit = getattr(config, "max_position_embeddings", None)
            self._kv = StaticKV(config, limit if isinstance(limit, int) else None)
            self._step = DecodeStep(model, compiled=decode == "compiled")

    def _can_crop(self, cached: int) -> bool:
        # A static cache is never full (it grows first), so a cut back is exact whatever the layers' window.
        return self._kv is not None or self.crop_limit is None or cached <= self.crop_limit

    def _cached_length(self) -> int:
        if self._kv is not None:
            return self._kv.length
        return int(self.state.cache.get_seq_length())

    def reset(self) -> None:
        """Forget what the cache holds (a static cache keeps its allocation, and its compiled step)."""
        self.state.reset()
        if self._kv is not None:
            self._kv.length = -1  # unknown: the next prefill rewrites the layers' lengths

    # ------------------------------------------------------------------ forward passes

    @property
    def device(self) -> torch.device:
        import torch

        device = getattr(self.model, "device", None)
        return device if isinstance(device, torch.device) else next(self.model.parameters()).device

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _route(self, mode: tuple[str | None, str | None]) -> None:
        if not self.adapters:
            return
        adapter = mode[0]  # applied every time: other backends may share these weights
        if adapter is None:
            self.model.disable_adapters()
        else:
            self.model.set_adapter(adapter)
            self.model.enable_adapters()

    def _forward(
        self, ids: list[int], start: int, spans: Sequence[MediaSpan], mode: tuple[str | None, str | None]
    ) -> Any:
        """Feed `ids[start:]` after a cache holding `ids[:start]`; return the logits of the last position."""
        if self._kv is None:
            return self._forward_slice(ids, start, len(ids), spans, mode)
        if len(ids) - start == 1 and not any(s.start >= start for s in spans):
            assert self._step is not None
            return self._step(ids[-1], start, self._kv)
        # Prefill in chunks (a chunk never splits a media run), every chunk in the regime of the whole sequence.
        long_rope = self.state.long_rope
        if self._rope is not None and self.rope_switch is not None and len(ids) - start > self.prefill_chunk:
            self._rope.pin(long_rope, self.rope_switch)
        try:
            while True:
                end = min(start + self.prefill_chunk, len(ids))
                for span in spans:
                    if span.start < end < span.start + span.length:
                        end = span.start + span.length
                logits = self._forward_slice(ids, start, end, spans, mode)
                self._kv.advanced(end - start)
                if end >= len(ids):
                    return logits
                start = end
        finally:
            if self._rope is not None:
                self._rope.unpin()

    def _forward_slice(
        self, ids: list[int], start: int, end: int, spans: Sequence[MediaSpan], mode: tuple[str | None, str | None]
    ) -> Any:
        import torch

        device = self.device
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor([ids[start:end]], dtype=torch.long, device=device),
            "past_key_values": self.state.cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if self._kv is not None:  # the static cache's length is ours: positions say where the slice goes
            inputs["position_ids"] = torch.arange(start, end, dtype=torch.long, device=device)[None]
        new_media = [s for s in spans if start <= s.start < end]
        if new_media:
            images = [s for s in new_media if s.kind == "image"]
            audio = [s for s in new_media if s.kind == "audio"]
            tensors = process_media(
                self.processor,
                [s.part for s in images],  # type: ignore[misc]
                [s.part for s in audio],  # type: ignore[misc]
                [s.length for s in images],
                [s.length for s in audio],
            )
            dtype = self.model.dtype
            for key, value in tensors.items():
                floating = value.is_floating_point() and key != "audio_attention_mask"
                inputs[key] = value.to(device=device, dtype=dtype if floating else value.dtype)
        if mode[1] == "vision" and "image_pixel_values" not in inputs and "audio_input_features" in inputs:
            # audio in a prompt that holds images uses the vision-speech projection; the model decides that
            # from the presence of pixel values, so flag it (no image tokens in this slice: nothing else runs)
            crop = int(self.model.config.vision_config.crop_size)
            inputs["image_pixel_values"] = torch.zeros((1, 1, 3, crop, crop), dtype=self.model.dtype, device=device)
        out = self.model(**inputs)
        return out.logits[0, -1]

    def _prefill(self, prompt: Prompt, room: int = 0) -> tuple[Any, int]:
        """Bring the cache to `prompt.ids`, computing only what it lacks, with `room` more tokens to decode into;
        return (last logits, tokens computed)."""
        state = self.state
        total = len(prompt.ids)
        long_rope = self.rope_switch is not None and total > self.rope_switch
        p = common_prefix(state, prompt) if self.kv_reuse else 0
        if p and long_rope != state.long_rope:
            p = 0  # the cache was built under the other rope regime
        if p >= total:
            p = total - 1  # recompute the last token to get its logits
            for span in prompt.spans:
                if span.start <= p < span.start + span.length:
                    p = span.start
        if p and (
            self._cached_length() != len(state.ids) or (p < len(state.ids) and not self._can_crop(len(state.ids)))
        ):
            p = 0  # the cache is not what we think it is, or it cannot be cut back (sliding window layers)
        if self._kv is not None:  # grows (copying what it keeps) or crops to p
            self._kv.reserve(total + room, keep=p if state.cache is not None else 0)
            if p == 0:
                state.reset()
            state.cache = self._kv.cache
        elif p == 0 or state.cache is None:
            state.reset()
            state.cache = self._new_cache()
            p = 0
        elif p < len(state.ids):
            state.cache.crop(p - len(state.ids))  # transformers 5.23: a negative count of tokens to remove
        state.ids = list(prompt.ids[:p])
        self._route(prompt.mode)
        state.mode = prompt.mode
        state.long_rope = long_rope
        logits = self._forward(prompt.ids, p, prompt.spans, prompt.mode)
        state.ids = list(prompt.ids)
        state.spans = prompt.spans
        return logits, total - p

    def _recompute(self, ids: list[int], spans: Sequence[MediaSpan], mode: tuple[str | None, str | None]) -> Any:
        state = self.state
        state.reset()
        if self._kv is not None:
            self._kv.reserve(max(self._kv.capacity, len(ids) + 1), keep=0)
            state.cache = self._kv.cache
        else:
            state.cache = self._new_cache()
        state.long_rope = self.rope_switch is not None and len(ids) > self.rope_switch
        logits = self._forward(ids, 0, spans, mode)
        state.ids, state.spans, state.mode = list(ids), tuple(spans), mode
        return logits

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: Prompt,
        settings: ModelSettings,
        max_new_tokens: int,
        *,
        streamer: Streamer | None = None,
        cancel: threading.Event | None = None,
        constraint: ToolConstraint | None = None,
    ) -> Completion:
        """Prefill what the cache lacks, then sample until a stop token, a stop string or the token budget.

        With `constraint`, every sampled token is one its grammar allows (tool calls parse and validate).
        """
        import torch

        try:
            with torch.inference_mode():
                return self._generate(prompt, settings, max_new_tokens, streamer, cancel, constraint)
        except BaseException:
            self.reset()  # a failed forward leaves the cache half-written
            raise

    def _generate(
        self,
        prompt: Prompt,
        settings: ModelSettings,
        max_new_tokens: int,
        streamer: Streamer | None,
        cancel: threading.Event | None,
        constraint: ToolConstraint | None,
    ) -> Completion:
        import torch

        started = time.perf_counter()
        logits, prefill = self._prefill(prompt, max_new_tokens + 1)
        fmt = self.fmt
        ids = list(prompt.ids)
        generated: list[int] = []
        stops = tuple(s for s in settings.stop if s)
        banned = list(fmt.banned_ids)
        matcher: ToolCallMatcher | None = None
        if constraint is not None and constraint.constrained:
            forced = prompt.ids[len(prompt.ids) - prompt.prefix_length :] if prompt.prefix_length else []
            matcher = constraint.start(max_new_tokens, prefix=forced)
        elif settings.tool_choice == "none" and fmt.open_tag == pf.TOOL_CALL and hasattr(fmt, "tool_call_id"):
            banned.append(fmt.tool_call_id)
        # Tokens the grammar forces (`"arguments": {"` after a name, the closing of a call) go through the model
        # in one forward pass; not with logits processors, which expect to see every step.
        fast_forward = matcher is not None and not self.logits_processors
        self._rejected = False
        self._steered = 0
        record: list[Logprob] | None = [] if settings.logprobs is not None else None
        generator = None
        if settings.temperature > 0 and settings.seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(settings.seed)
        finish = "length"
        text = ""
        if logits.device.type == "cuda":  # the prefill is queued, not done: time it to its end
            torch.cuda.synchronize(logits.device)
        decode_started = time.perf_counter()
        forwards = 0
        while len(generated) < max_new_tokens:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            step = [self._sample(logits, ids, banned, settings, generator, matcher, record)]
            if matcher is not None:
                matcher.advance(step[0])
                if fast_forward and matcher.in_call and step[0] not in fmt.stop_ids:
                    for token in matcher.forced_tokens()[: max_new_tokens - len(generated) - 1]:
                        matcher.advance(token)
                        step.append(token)
                        self._steered += 1  # the model never scored it
                        if record is not None:  # the only token allowed: probability 1
                            record.append((token, 0.0, ((token, 0.0),) if settings.logprobs else ()))
            for token in step:
                generated.append(token)
                if token in fmt.stop_ids:
                    finish = "stop"
                    break
            if finish == "stop":
                break
            if stops or streamer is not None:
                text = prompt.prefix + fmt.decode(generated)
                if stops and any(s in text for s in stops):
                    finish = "stop"
                    break
                if streamer is not None:
                    streamer.update(text)
            if matcher is not None and matcher.done and not self.logits_processors:
                # The grammar allows nothing but the end of the turn: write it without another forward pass
                # (with logits processors, they see that step too, so the loop samples it).
                generated.append(fmt.end_ids[0])
                self._steered += 1
                finish = "stop"
                break
            if len(generated) >= max_new_tokens:
                break
            start = len(ids)
            ids.extend(step)
            forwards += 1
            if self.rope_switch is not None and not self.state.long_rope and len(ids) > self.rope_switch:
                logits = self._recompute(ids, prompt.spans, prompt.mode)  # crossing the longrope switch
                prefill += len(ids)
            else:
                logits = self._forward(ids, start, (), prompt.mode)
                self.state.ids.extend(step)
        body = generated[:-1] if finish == "stop" and generated and generated[-1] in fmt.stop_ids else generated
        text = prompt.prefix + fmt.decode(body)
        if stops:
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            text = text if cut < 0 else text[:cut]
        ended = time.perf_counter()
        return Completion(
            text=text,
            input_tokens=len(prompt.ids),
            output_tokens=len(generated),
            prefill_tokens=prefill,
            finish_reason=finish,
            prefill_seconds=decode_started - started,
            decode_seconds=ended - decode_started,
            forward_passes=forwards,
            constraint_error=matcher.error if matcher is not None else None,
            steered_tokens=self._steered if matcher is not None else None,
            logprobs=tuple(record[: len(body)]) if record is not None else None,
        )

    def _sample(
        self,
        logits: torch.Tensor,
        ids: list[int],
        banned: list[int],
        settings: ModelSettings,
        generator: torch.Generator | None,
        matcher: ToolCallMatcher | None = None,
        record: list[Logprob] | None = None,
    ) -> int:
        import torch

        scores = logits.float().unsqueeze(0)
        if banned:
            scores[0, banned] = float("-inf")
        if self.logits_processors:
            input_ids = torch.tensor([ids], dtype=torch.long, device=scores.device)
            for processor in self.logits_processors:
                scores = processor(input_ids, scores)
        if matcher is None or not matcher.active:
            return (
                _pick(scores[0], settings, generator)
                if record is None
                else _pick_recorded(scores[0], settings, generator, matcher, record)
            )
        # `steered_tokens`: at temperature 0, whether the grammar's pick differs from the model's own (exact);
        # when sampling, every step the grammar masked counts (the free draw it replaced is unknown).
        free = int(scores[0].argmax()) if settings.temperature <= 0 else None  # before a mask edits `scores`
        token, masked = self._constrained_pick(scores, settings, generator, matcher, record)
        self._steered += token != free if free is not None else masked
        return token

    def _constrained_pick(
        self,
        scores: torch.Tensor,
        settings: ModelSettings,
        generator: torch.Generator | None,
        matcher: ToolCallMatcher,
        record: list[Logprob] | None,
    ) -> tuple[int, bool]:
        """The grammar-allowed pick, and whether the grammar masked the scores for it (rather than accept the
        model's own draw)."""
        import torch

        if record is not None:
            return _pick_recorded(scores[0], settings, generator, matcher, record), True
        if settings.top_p >= 1.0 and not matcher.closing and not self._rejected:
            # Sample first and mask only on a rejection: the same distribution (rejection sampling), and most
            # tokens of a trained model are accepted, so most steps skip the mask. After a rejection the next
            # step masks first (an untrained model's every sample is rejected).
            token = _pick(scores[0], settings, generator)
            if matcher.accepts(token):
                return token, False
            self._rejected = True
        else:
            self._rejected = False
        allowed = matcher.allowed_ids() if scores.device.type == "cpu" else None
        if allowed is not None:  # sample among the allowed logits only: the masked distribution, cheaper
            subset = scores[0].index_select(0, allowed)
            if not bool(torch.isinf(subset).all()):
                return int(allowed[_pick(subset, settings, generator)]), True
        else:
            masked = matcher.mask_logits(scores[0].clone() if self.logits_processors else scores[0])
            if not bool(torch.isinf(masked).all()):
                return _pick(masked, settings, generator), True
        # A logits processor forced a token the grammar forbids (a scripted test, say): the processor wins, and
        # the matcher, fed a token it rejects, warns and stops constraining. The pick is the model's own.
        return _pick(scores[0], settings, generator), False


def _pick_recorded(
    scores: torch.Tensor,
    settings: ModelSettings,
    generator: torch.Generator | None,
    matcher: ToolCallMatcher | None,
    record: list[Logprob],
) -> int:
    """Pick from the grammar-masked scores (always masked: the fast path would not see the distribution) and
    record the token's log probability under that distribution, before temperature and top-p, with the
    `settings.logprobs` most likely alternatives."""
    import torch

    if matcher is not None and matcher.active:
        masked = matcher.mask_logits(scores.clone())
        if bool(torch.isinf(masked).all()):  # a logits processor forced a token the grammar forbids
            masked = scores
    else:
        masked = scores
    token = _pick(masked, settings, generator)
    logp = torch.log_softmax(masked, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    k = min(settings.logprobs or 0, int(torch.isfinite(logp).sum()))
    if k:
        values, indices = torch.topk(logp, k)
        top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    record.append((token, float(logp[token]), top))
    return token


def _pick(scores: torch.Tensor, settings: ModelSettings, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a sample with temperature and top-p, from one row of scores."""
    import torch

    if settings.temperature <= 0:
        return int(scores.argmax())
    probs = torch.softmax(scores / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > settings.top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Streamer:
    """Turns the growing completion text into deltas, holding back what may be a tool call or a stop.

    With `emit_call`, the calls of a call block are streamed too (`ToolCallDelta`: the name once it is
    complete, then pieces of the arguments' JSON text), but only while `calls_live` is set (decoding is
    grammar-constrained, so the block is in the layout `scan_call_block` reads and will parse); otherwise,
    and for whatever was not streamed, `finish` sends each call whole from the parsed result.
    """

    def __init__(
        self,
        open_tag: str,
        stops: Sequence[str],
        emit: Callable[[str], None],
        emit_call: Callable[[ToolCallDelta], None] | None = None,
        *,
        json_answer: bool = False,
    ) -> None:
        self.open_tag, self.stops, self.emit = open_tag, tuple(s for s in stops if s), emit
        self.emit_call = emit_call
        self.json_answer = json_answer
        self.calls_live = False
        self.closed_calls = False
        self.sent = ""
        self.closed = False
        self._calls: list[tuple[str, str]] = []  # (name, arguments text) streamed per call
        self._calls_off = False  # the block left the expected layout: the rest comes from the parsed calls

    def update(self, text: str) -> None:
        if not self.closed:
            safe = pf.stream_safe_length(text, open_tag=self.open_tag, stops=self.stops, json_answer=self.json_answer)
            start = len(text) - len(text.lstrip())
            piece = text[start:safe]
            if len(piece) > len(self.sent) and piece.startswith(self.sent):
                self.emit(piece[len(self.sent) :])
                self.sent = piece
            if self.open_tag in text or any(s in text for s in self.stops):
                self.closed = True
        if self.emit_call is not None and self.calls_live and not self._calls_off:
            at = text.find(self.open_tag)
            if at >= 0:
                self._stream_calls(text[at + len(self.open_tag) :])

    def _stream_calls(self, body: str) -> None:
        assert self.emit_call is not None
        found = pf.scan_call_block(body)
        if found is None:
            self._calls_off = True
            return
        for index, call in enumerate(found):
            if index == len(self._calls):
                self._calls.append((call.name, ""))
                self.emit_call(ToolCallDelta(index, call.name, ""))
            name, sent = self._calls[index]
            text = call.arguments if self.closed_calls else call.arguments.rstrip("\ufffd")  # may still change
            if len(text) > len(sent) and text.startswith(sent):
                self.emit_call(ToolCallDelta(index, None, text[len(sent) :]))
                self._calls[index] = (name, text)

    def finish(self, final_text: str, raw: str = "", calls: Sequence[ToolCallPart] = ()) -> None:
        """Send what the final parsed text adds to the streamed prefix, and the calls not yet streamed whole."""
        if final_text.startswith(self.sent) and len(final_text) > len(self.sent):
            self.emit(final_text[len(self.sent) :])
        self.sent = final_text
        if self.emit_call is None:
            return
        self.closed = self.closed_calls = True  # the text is final: a trailing U+FFFD stays
        self.update(raw)  # the last tokens, which the decode loop did not show the streamer
        for index, call in enumerate(calls):
            if index >= len(self._calls):
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                self.emit_call(ToolCallDelta(index, call.name, ""))
                self.emit_call(ToolCallDelta(index, None, arguments))
                self._calls.append((call.name, arguments))
