"""The engine: `GrammarEngine`, per-request `ToolConstraint`s and their matchers."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.exceptions import UserError
from agent.messages import ToolDefinition
from agent.models import ToolChoice
from agent.models._grammar._build import (
    Marker,
    call_rules,
    lark_grammar,
    prepare_schema,
    strip_patterns,
    with_options,
)
from agent.models._grammar._closing import (
    PLAN_LIMIT,
    MaskBuffers,
    OutputState,
    grammar_mask,
    growth_bound,
    plan_closing,
)
from agent.models._grammar._vocab import Bits, Bools, TokenTables, count, has_bit, set_ids, unpack, words_for
from agent.models.phi4_format import TOOL_CALL, TOOL_CALL_END, escape_json

if TYPE_CHECKING:
    import torch


class ConstraintWarning(UserWarning):
    """Decoding is less constrained than asked: a schema the engine cannot express, or no engine at all."""


@dataclass(frozen=True, slots=True)
class CallFormat:
    """How a model marks a block of tool calls.

    Attributes:
        open: the text before the JSON list of calls.
        close: the text after it.
        special_markers: True when `open` and `close` are each one added token (Phi-4's `<|tool_call|>`),
            False when they are ordinary text spelled by several tokens (`<tool_call>`).
    """

    open: str
    close: str
    special_markers: bool


PHI4_FORMAT = CallFormat(open=TOOL_CALL, close=TOOL_CALL_END, special_markers=True)
"""`<|tool_call|>[...]<|/tool_call|>` with the two added tokens (ids 200025/200026 in Phi-4's vocabulary)."""

TAGGED_FORMAT = CallFormat(open="<tool_call>", close="</tool_call>", special_markers=False)
"""`<tool_call>[...]</tool_call>` as plain text, for chat models without tool tokens."""


# ------------------------------------------------------------------ schema support


@dataclass(frozen=True, slots=True)
class SchemaSupport:
    """How completely a tool's argument schema is enforced during decoding.

    Attributes:
        level: `exact` (every keyword enforced), `approximate` (constrained, but the keywords named in
            `problems` are only checked after decoding) or `unconstrained` (arguments are any JSON object,
            checked after decoding).
        problems: what the engine could not express, for the warning and for `check_tools`.
    """

    level: Literal["exact", "approximate", "unconstrained"]
    problems: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """True when decoding enforces the whole schema."""
        return self.level == "exact"


ANSWER = "(answer)"
"""The key of the JSON answer's entry in `ToolConstraint.support` (no tool can have this name)."""

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_ANY_JSON: dict[str, Any] = {}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        return None
    return llguidance


def _validate(llg: Any, schema: dict[str, Any], *, lenient: bool) -> tuple[bool, list[str]]:
    """(ok, messages) for one schema; `ok` is False on any error, or on a warning in strict mode."""
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(with_options(schema, lenient=lenient))
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as exc:  # malformed schema: the engine's own words
        return False, [_first_line(str(exc))]
    messages = [_first_line(m) for m in messages]
    return (not is_error and (lenient or not messages)), messages


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return line if len(line) <= 200 else line[:197] + "..."


def _compile_schema(
    llg: Any, parameters: dict[str, Any], *, arguments: bool = True
) -> tuple[dict[str, Any], SchemaSupport]:
    """The schema to embed for one tool's arguments (or, with `arguments=False`, for a JSON answer), and how
    well it is enforced. Never raises."""
    fallback = _ANY_OBJECT if arguments else _ANY_JSON
    if not isinstance(parameters, dict):
        return fallback, SchemaSupport("unconstrained", ("the schema is not a JSON object",))
    schema, problems = prepare_schema(parameters, arguments=arguments)
    if problems:
        return fallback, SchemaSupport("unconstrained", tuple(problems))
    ok, messages = _validate(llg, schema, lenient=False)
    if ok:
        return with_options(schema), SchemaSupport("exact")
    ok, lenient_messages = _validate(llg, schema, lenient=True)
    if ok:
        return with_options(schema, lenient=True), SchemaSupport("approximate", tuple(messages or lenient_messages))
    removed = strip_patterns(schema)
    if removed:
        ok, _ = _validate(llg, schema, lenient=True)
        if ok:
            found = tuple(messages) + tuple(f"pattern {p!r} not enforced" for p in removed)
            return with_options(schema, lenient=True), SchemaSupport("approximate", found)
    return fallback, SchemaSupport("unconstrained", tuple(messages or lenient_messages))


def check_tool_schema(parameters: dict[str, Any]) -> SchemaSupport:
    """How completely constrained decoding can enforce one tool's parameter schema (no tokenizer needed).

    Call it at registration to report schemas the engine cannot express; such tools still work, their
    arguments are validated after decoding.
    """
    llg = _llguidance()
    if llg is None:
        return SchemaSupport("unconstrained", ("llguidance is not installed (pip install llguidance)",))
    return _compile_schema(llg, parameters)[1]


def check_tools(tools: Sequence[ToolDefinition]) -> dict[str, SchemaSupport]:
    """`check_tool_schema` for each tool, by name."""
    return {tool.name: check_tool_schema(tool.parameters) for tool in tools}


def check_answer_schema(schema: dict[str, Any]) -> SchemaSupport:
    """How completely constrained decoding can enforce a `response_format` JSON schema (any root type)."""
    llg = _llguidance()
    if llg is None:
        return SchemaSupport("unconstrained", ("llguidance is not installed (pip install llguidance)",))
    return _compile_schema(llg, schema, arguments=False)[1]


# ------------------------------------------------------------------ engine


class GrammarEngine:
    """Per-tokenizer state (llguidance's tokenizer, token tables) and a cache of built constraints.

    Build it once per loaded model with `from_tokenizer` (3-5 s for Phi-4's 200K vocabulary).
    """

    def __init__(
        self,
        llg: Any,
        ll_tokenizer: Any,
        tables: TokenTables | None,
        token_ids: dict[str, int],
        eos_token_ids: Sequence[int],
        disabled_reason: str | None = None,
    ) -> None:
        self._llg = llg
        self._ll_tokenizer = ll_tokenizer
        self.tables = tables
        self._token_ids = token_ids
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.disabled_reason = disabled_reason
        self._schemas: dict[tuple[str, bool], tuple[dict[str, Any], SchemaSupport]] = {}
        self._constraints: OrderedDict[tuple[str, str, CallFormat, bool, str], ToolConstraint] = OrderedDict()

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, eos_token_ids: Sequence[int] | None = None, vocab_size: int | None = None
    ) -> GrammarEngine:
        """An engine for a Hugging Face fast tokenizer.

        Args:
            tokenizer: the model's `PreTrainedTokenizerFast` (or a processor holding one as `.tokenizer`).
            eos_token_ids: ids that end the turn (allowed once the grammar is complete). Defaults to the
                tokenizer's EOS plus `<|end|>` when the vocabulary has it.
            vocab_size: the model's output size when it differs from the tokenizer's (padded embeddings).

        Without llguidance, or with a tokenizer it cannot read, returns a disabled engine whose constraints
        are all unconstrained (with a `ConstraintWarning`) rather than raising.
        """
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        vocab = dict(tokenizer.get_vocab())
        eos = list(eos_token_ids) if eos_token_ids is not None else _default_eos(tokenizer, vocab)
        llg = _llguidance()
        if llg is None:
            return cls(None, None, None, vocab, eos, "llguidance is not installed (pip install llguidance)")
        try:
            import llguidance.hf

            n_vocab = max(vocab_size or 0, len(tokenizer))
            ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
            size = int(ll_tokenizer.vocab_size)
            token_bytes = [ll_tokenizer.decode_bytes([i]) for i in range(size)]
            special = [ll_tokenizer.is_special_token(i) for i in range(size)]
        except Exception as exc:
            reason = f"llguidance cannot read this tokenizer: {_first_line(str(exc))}"
            return cls(None, None, None, vocab, eos, reason)
        tables = TokenTables.build(token_bytes, special)
        for in_string in (False, True):
            tables.closing_classes(in_string=in_string)  # built now rather than during a first decode
        return cls(llg, ll_tokenizer, tables, vocab, eos)

    @property
    def vocab_size(self) -> int | None:
        """Size of the masks this engine produces (None when disabled)."""
        return self.tables.vocab_size if self.tables is not None else None

    def schema_support(
        self, parameters: dict[str, Any], *, arguments: bool = True
    ) -> tuple[dict[str, Any], SchemaSupport]:
        """The (cached) embedded schema and support level for one parameter (or, `arguments=False`, answer) schema."""
        key = (json.dumps(parameters, sort_keys=True, default=str), arguments)
        found = self._schemas.get(key)
        if found is None:
            found = _compile_schema(self._llg, parameters, arguments=arguments)
            self._schemas[key] = found
        return found

    def constraint(
        self,
        tools: Sequence[ToolDefinition],
        tool_choice: ToolChoice = "auto",
        fmt: CallFormat = PHI4_FORMAT,
        *,
        parallel: bool = True,
        answer: dict[str, Any] | None = None,
    ) -> ToolConstraint:
        """The constraint for one request; cached on its arguments, so calling it per step is cheap.

        Args:
            tools: the tools the model may call.
            tool_choice: `auto`, `required`, `none` or a tool name.
            fmt: how the model marks a call block.
            parallel: a block may hold several calls (False: exactly one, OpenAI's `parallel_tool_calls=False`).
            answer: a JSON schema the answer must match instead of free text (OpenAI's `response_format`;
                `{"type": "object"}` for `json_object`). With tools and `auto`, the output is that JSON or a
                call block.

        Raises:
            UserError: `tool_choice` names a tool that is not in `tools`, or is `required` with no tools.
        """
        key = (
            json.dumps([[t.name, t.parameters] for t in tools], sort_keys=True, default=str),
            tool_choice,
            fmt,
            parallel,
            json.dumps(answer, sort_keys=True, default=str),
        )
        found = self._constraints.get(key)
        if found is not None:
            self._constraints.move_to_end(key)
            return found
        built = self._build(tools, tool_choice, fmt, parallel, answer)
        self._constraints[key] = built
        while len(self._constraints) > 64:
            self._constraints.popitem(last=False)
        return built

    def _build(
        self,
        tools: Sequence[ToolDefinition],
        tool_choice: ToolChoice,
        fmt: CallFormat,
        parallel: bool,
        answer: dict[str, Any] | None,
    ) -> ToolConstraint:
        unique: dict[str, ToolDefinition] = {}
        for tool in tools:
            unique.setdefault(tool.name, tool)
        mode: str = tool_choice if tool_choice in ("auto", "required", "none") else "named"
        chosen = list(unique.values())
        if mode == "named":
            if tool_choice not in unique:
                known = ", ".join(sorted(unique)) or "none"
                raise UserError(f"tool_choice {tool_choice!r} is not one of the tools given (known: {known})")
            chosen = [unique[tool_choice]]
            mode = "required"
        if mode == "required" and not chosen:
            raise UserError("tool_choice='required' needs at least one tool")
        if mode == "auto" and not chosen:
            mode = "none"
        if self._llg is None or self.tables is None:
            reason = self.disabled_reason or "no grammar engine"
            _warn(f"{'tool calls are' if answer is None else 'the JSON answer is'} not constrained: {reason}")
            return ToolConstraint(self, None, None, fmt, tool_choice, {}, (reason,))

        support: dict[str, SchemaSupport] = {}
        embedded: list[tuple[str, dict[str, Any]]] = []
        notes: list[str] = []
        if mode != "none":
            for tool in chosen:
                schema, level = self.schema_support(tool.parameters)
                support[tool.name] = level
                embedded.append((tool.name, schema))
                if not level.exact:
                    what = "loosely" if level.level == "approximate" else "only as a JSON object"
                    notes.append(
                        f"tool {tool.name!r}: arguments constrained {what} ({'; '.join(level.problems)}); "
                        "they are validated after decoding"
                    )
        answer_schema: dict[str, Any] | None = None
        if answer is not None:
            answer_schema, level = self.schema_support(answer, arguments=False)
            support[ANSWER] = level
            if not level.exact:
                what = "loosely" if level.level == "approximate" else "only as JSON"
                notes.append(f"the JSON answer is constrained {what} ({'; '.join(level.problems)})")
        open_marker, close_marker, marker_note = self._markers(fmt)
        if marker_note:
            notes.append(marker_note)
        calls = call_rules(embedded) if embedded else ""
        options: dict[str, Any] = {"open_marker": open_marker, "close_marker": close_marker}
        grammar = lark_grammar(calls, mode=mode, single=not parallel, answer=answer_schema, **options)
        template = self._matcher_for(grammar)
        text_only = None
        if mode == "auto" and answer is None and open_marker.token_id is None and not isinstance(template, str):
            # A textual open tag cannot be banned as one token: when a call no longer fits the budget, the
            # matcher switches to this text-only grammar instead (see `ToolCallMatcher._update_budget`).
            fallback = self._matcher_for(lark_grammar("", mode="none", **options))
            text_only = None if isinstance(fallback, str) else fallback
        if isinstance(template, str):
            notes.append(f"tool calls are not constrained: the grammar does not compile ({template})")
            for note in notes:
                _warn(note)
            return ToolConstraint(self, None, None, fmt, tool_choice, support, tuple(notes))
        for note in notes:
            _warn(note)
        close_ids = (close_marker.token_id,) if close_marker.token_id is not None else ()
        open_id = open_marker.token_id
        prefixes = tuple(self._call_prefix(open_marker, name) for name, _ in embedded)
        if answer is not None:
            prefixes += ((),)  # a fresh answer: the planner's bound covers it too
        return ToolConstraint(
            self,
            grammar,
            template,
            fmt,
            tool_choice,
            support,
            tuple(notes),
            open_id,
            close_ids,
            prefixes,
            answer=answer is not None,
            _text_only=text_only,
        )

    def _call_prefix(self, open_marker: Marker, name: str) -> tuple[int, ...]:
        """Tokens from the open marker to a call's arguments, for the budget planner."""
        head = '[{"name": ' + escape_json(name) + ', "arguments": '
        if open_marker.token_id is not None:
            return (open_marker.token_id, *self._ll_tokenizer.tokenize_str(head))
        return tuple(self._ll_tokenizer.tokenize_str(open_marker.text + head))

    def _markers(self, fmt: CallFormat) -> tuple[Marker, Marker, str | None]:
        if not fmt.special_markers:
            return Marker(fmt.open), Marker(fmt.close), None
        ids = [self._token_ids.get(fmt.open), self._token_ids.get(fmt.close)]
        assert self._ll_tokenizer is not None
        if all(i is not None and self._ll_tokenizer.is_special_token(i) for i in ids):
            return Marker(fmt.open, ids[0]), Marker(fmt.close, ids[1]), None
        note = f"the tokenizer has no single tokens {fmt.open!r}/{fmt.close!r}: the markers are matched as text"
        return Marker(fmt.open), Marker(fmt.close), note

    def _matcher_for(self, grammar: str) -> Any:
        """A fresh llguidance matcher for `grammar`, or the engine's error message."""
        llg = self._llg
        try:
            compiled = llg.LLMatcher.grammar_from_lark(grammar)
            error = llg.LLMatcher.validate_grammar(compiled, self._ll_tokenizer)
            if error and not llg.LLMatcher.is_validate_warning(error):
                return _first_line(error)
            matcher = llg.LLMatcher(self._ll_tokenizer, compiled, log_level=0)
        except Exception as exc:
            return _first_line(str(exc))
        if matcher.is_error():
            return _first_line(matcher.get_error())
        return matcher


def _default_eos(tokenizer: Any, vocab: dict[str, int]) -> list[int]:
    eos: list[int] = []
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        eos.append(tokenizer.eos_token_id)
    end = vocab.get("<|end|>")
    if end is not None and end not in eos:
        eos.append(end)
    return eos


def _warn(message: str) -> None:
    warnings.warn(message, ConstraintWarning, stacklevel=4)


# ------------------------------------------------------------------ constraint and matcher


@dataclass(frozen=True, eq=False)
class ToolConstraint:
    """A compiled grammar for one set of tools and one `tool_choice`. Start one matcher per generation.

    Attributes:
        grammar: the llguidance (Lark) grammar, or None when decoding is unconstrained.
        support: how well each tool's arguments are enforced (and the JSON answer's, under `ANSWER`).
        notes: the warnings raised while building (empty when everything is enforced).
        answer: the output is a JSON answer (or a call block), not free text.
    """

    engine: GrammarEngine
    grammar: str | None
    _template: Any
    fmt: CallFormat
    tool_choice: ToolChoice
    support: dict[str, SchemaSupport] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    open_token_id: int | None = None
    close_token_ids: tuple[int, ...] = ()
    call_prefixes: tuple[tuple[int, ...], ...] = ()
    answer: bool = False
    _text_only: Any = None
    _cache: dict[str, int] = field(default_factory=dict)

    @property
    def constrained(self) -> bool:
        """False when the grammar could not be built: decoding is free and calls are validated afterwards."""
        return self._template is not None

    def start(self, max_tokens: int | None = None, *, prefix: Sequence[int] = ()) -> ToolCallMatcher:
        """A matcher for one generation, fed only the generated tokens (never the prompt).

        Args:
            max_tokens: the generation budget. With it, the output is steered to end within the budget
                (closing open strings, arrays and objects), so a call is never cut in half.
            prefix: completion tokens the backend already placed after the prompt (a forced
                `<|tool_call|>[{"name": ...`); they are matched but not counted against `max_tokens`.
        """
        inner = self._template.deep_copy() if self._template is not None else None
        matcher = ToolCallMatcher(self, inner, max_tokens)
        for token in prefix:
            matcher.advance(token)
        matcher.generated = 0
        matcher._spent = 0
        return matcher

    def observe_growth(self, growth: int) -> None:
        """Raise the growth bound when a generation saw more (an optional parameter holding a big object)."""
        if growth > self.growth_bound():
            self._cache["growth"] = growth

    def growth_bound(self) -> int:
        """The most one token can add to the tokens needed to finish (a fresh call, or more once observed)."""
        found = self._cache.get("growth")
        if found is None:
            tables = self.engine.tables
            if self._template is None or tables is None:
                return 0
            found = growth_bound(
                self._template,
                self.call_prefixes,
                tables,
                list(self.engine.eos_token_ids),
                self.close_token_ids,
                open_token_id=self.open_token_id,
                opener=self.fmt.open.encode(),
                answer=self.answer,
            )
            self._cache["growth"] = found
        return found

    def logits_processor(
        self, *, max_tokens: int | None = None, prefix: Sequence[int] = (), lazy: bool = False
    ) -> ToolCallLogitsProcessor:
        """A `transformers` logits processor for `model.generate` (see `ToolCallLogitsProcessor`)."""
        return ToolCallLogitsProcessor(self, max_tokens=max_tokens, prefix=prefix, lazy=lazy)


class ToolCallMatcher:
    """The grammar state of one generation: which tokens may come next.

    Per step: `mask_logits(logits)` (or `allowed()` / `accepts(token)`), sample, then `advance(token)`.
    A token the grammar rejects does not raise: the matcher warns once and stops constraining.
    With `max_tokens`, the budget planner (`_closing`) makes the output end within it.
    """

    def __init__(self, constraint: ToolConstraint, inner: Any, max_tokens: int | None) -> None:
        self.constraint = constraint
        self._inner = inner
        self._max_tokens = max_tokens
        engine = constraint.engine
        self._tables = engine.tables
        self._eos = engine.eos_token_ids  # the first is the one plans end with
        self._opener = constraint.fmt.open.encode()
        self.generated = 0
        self.error: str | None = None
        self._finished = False
        self._state = OutputState(answer=constraint.answer)
        self._tokens: list[int] = []  # generated so far (for a switch to the text-only grammar)
        self._bits: Bits | None = None
        self._buffers = MaskBuffers.for_words(words_for(self._tables.vocab_size if self._tables else 0))
        self._device_cache: dict[str, Any] = {}
        self._last_bits = b""
        self._last_ids: tuple[Any, bool] = (None, True)
        self._plan: list[int] | None = None  # forced mode: the tokens that finish the output
        self._ban_open = False  # a call would no longer fit in the budget
        self._last_plan: tuple[int, int] | None = None  # (plan length, tokens generated) at the last plan
        self._openers = 0  # tokens since the last plan that may have opened something
        self._slack = 0  # budget slack at the last plan (see `_closing`)
        self._spent = 0  # worst-case slack used since

    # -------------------------------------------------------------- state

    @property
    def active(self) -> bool:
        """True while decoding is constrained."""
        return self._inner is not None and self._tables is not None

    @property
    def done(self) -> bool:
        """True once an end-of-turn token was accepted, or the grammar allows nothing but ending the turn."""
        if self._finished:
            return True
        return self.active and bool(self._inner.is_stopped())

    @property
    def in_call(self) -> bool:
        """True once the call block has started (stop streaming text from here)."""
        return self._state.in_call

    @property
    def closing(self) -> bool:
        """True when the budget is nearly spent and the output is being closed (see `_closing`)."""
        return self._plan is not None

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from here (e.g. `[{"name": "` after the open marker): a backend may feed
        them in one forward pass, calling `advance` for each."""
        if not self.active:
            return []
        if self._plan is not None:
            return list(self._plan)
        return list(self._inner.compute_ff_tokens())

    # -------------------------------------------------------------- masks

    def allowed_bits(self) -> Bits | None:
        """The allowed tokens as a packed bitmask (see `_vocab`), or None when unconstrained."""
        if not self.active:
            return None
        if self._bits is not None:
            return self._bits
        tables = self._tables
        assert tables is not None
        self._update_budget()
        if self._plan:  # the plan was simulated from this very state: its next token needs no mask
            bits = self._buffers.work
            bits[:] = 0
            planned = self._plan[0]
            bits[planned >> 5] = np.array([1 << (planned & 31)], dtype=np.uint32).view(np.int32)[0]
            self._bits = bits
            return bits
        bits = grammar_mask(self._inner, tables, self._state, self._buffers)
        if self._inner.is_error():
            self._give_up(self._inner.get_error())
            return None
        opener = self.constraint.open_token_id
        if self._ban_open and opener is not None and has_bit(bits, opener):
            word = bits[opener >> 5]
            bits[opener >> 5] = word & ~np.array([1 << (opener & 31)], dtype=np.uint32).view(np.int32)[0]
            if not bits.any():
                bits[opener >> 5] = word
        self._bits = bits
        return bits

    def _budget_tight(self) -> bool:
        """True when the next mask needs a fresh plan (or follows one)."""
        if self._max_tokens is None:
            return False
        return self._plan is not None or self._spent * 2 >= self._slack

    def _update_budget(self) -> None:
        if self._max_tokens is None or self._plan is not None or self._tables is None:
            return
        if self._spent * 2 < self._slack:
            return
        plan = plan_closing(
            self._inner,
            self._tables,
            self._state,
            self._eos,
            self.constraint.close_token_ids,
            self._buffers,
            open_token_id=self.constraint.open_token_id,
            opener=self._opener,
        )
        if len(plan) >= PLAN_LIMIT:  # no way to finish found: stop planning for this generation
            self._max_tokens = None
            return
        if self._last_plan is not None:  # learn when one token added more than the bound assumed
            needed, at = self._last_plan
            growth = len(plan) - (needed - (self.generated - at))
            self.constraint.observe_growth(-(-growth // max(1, self._openers)))  # per opening token
        self._last_plan = (len(plan), self.generated)
        self._openers = 0
        remaining = self._max_tokens - self.generated
        self._slack = remaining - len(plan) - self.constraint.growth_bound() - 4
        self._spent = 0
        if self._slack > 0:
            return
        opener = self.constraint.open_token_id
        free_text = not self._state.in_call and not self.constraint.answer
        if free_text and opener is not None and plan[0] != opener:
            # Free text can run to the budget and still be valid: rather than ending it early, forbid
            # starting a call that would not fit, and stop planning.
            self._ban_open = True
            self._max_tokens = None
        elif free_text and opener is None and self._switch_to_text_only():
            self._max_tokens = None  # a textual tag: the same, by continuing under the text-only grammar
        else:
            self._plan = plan

    def _switch_to_text_only(self) -> bool:
        """Continue under the constraint's text-only grammar (no call can start); False when it cannot take
        the text so far (it ends with part of the open tag, say)."""
        template = self.constraint._text_only
        if template is None:
            return False
        inner = template.deep_copy()
        if not inner.consume_tokens(self._tokens) or inner.is_error():
            return False
        self._inner = inner
        self._bits = None
        return True

    def allowed(self) -> Bools | None:
        """The allowed tokens as a bool array over the vocabulary, or None when unconstrained."""
        bits = self.allowed_bits()
        if bits is None or self._tables is None:
            return None
        return unpack(bits, self._tables.vocab_size)

    def accepts(self, token_id: int) -> bool:
        """Whether `token_id` may come next; cheap (no full mask) while the budget is not tight.

        Sampling first and masking only when the sample is rejected gives exactly the masked distribution
        (greedy or not): `if not m.accepts(t): m.mask_logits(logits); t = sample(logits)`.
        """
        if not self.active:
            return True
        tables = self._tables
        assert tables is not None
        if not 0 <= token_id < tables.vocab_size:
            return False
        if self._inner.is_stopped():  # the grammar is complete: only the end of turn may follow
            return token_id in self._eos
        tight = self._budget_tight() or (self._ban_open and token_id == self.constraint.open_token_id)
        overlay_hit = not has_bit(tables.no_lt_pipe, token_id) or (
            self._state.after_lt and not has_bit(tables.no_pipe_start, token_id)
        )
        if tight or overlay_hit or self._bits is not None:
            bits = self.allowed_bits()
            return bits is None or has_bit(bits, token_id)
        return bool(self._inner.validate_tokens([token_id]) == 1)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed tokens to -inf in place (last dimension = vocabulary; any device); return `logits`.

        Logit positions past the tokenizer's vocabulary (padded embeddings) are disallowed too.
        """
        bits = self.allowed_bits()
        if bits is None or self._tables is None:
            return logits
        size = self._tables.vocab_size
        if logits.device.type != "cpu":
            return self._mask_on_device(logits, bits, size)
        return self._mask_cpu(logits, bits, size)

    def allowed_ids(self) -> torch.Tensor | None:
        """The allowed token ids (a CPU int64 tensor) when they are at most half the vocabulary, else None.

        Sampling among these ids' logits gives exactly the masked distribution, at a cost that grows with the
        allowed set rather than the vocabulary (inside JSON it is usually small).
        """
        bits = self.allowed_bits()
        if bits is None or self._tables is None:
            return None
        ids, keeps = self._ids_for(bits, self._tables.vocab_size)
        return ids if keeps else None

    def _ids_for(self, bits: Bits, limit: int) -> tuple[Any, bool]:
        """(ids, True) for the allowed ids when they are the smaller side of the mask, else (disallowed ids, False)."""
        import torch

        if self._plan:
            return torch.tensor([self._plan[0]]), True
        signature = bits.tobytes()
        if signature == self._last_bits and self._last_ids[0] is not None:
            return self._last_ids  # the same mask as the last step (inside a long string, say)
        assert self._tables is not None
        keeps = count(bits) * 2 <= self._tables.vocab_size
        ids = torch.from_numpy(set_ids(bits if keeps else np.invert(bits), limit))
        self._last_bits = signature
        self._last_ids = (ids, keeps)
        return ids, keeps

    def _mask_cpu(self, logits: torch.Tensor, bits: Bits, size: int) -> torch.Tensor:
        """Mask on CPU by index: cheaper than a full `masked_fill` when either side of the mask is small."""
        n = logits.shape[-1]
        keep, keeps = self._ids_for(bits, min(n, size))
        if keeps:
            values = logits.index_select(-1, keep)
            logits.fill_(float("-inf"))
            logits.index_copy_(-1, keep, values)
            return logits
        logits.index_fill_(-1, keep, float("-inf"))
        if n > size:
            logits[..., size:] = float("-inf")
        return logits

    def _mask_on_device(self, logits: torch.Tensor, bits: Bits, size: int) -> torch.Tensor:
        import torch

        key = str(logits.device)
        shifts = self._device_cache.get(key)
        if shifts is None:
            shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
            self._device_cache[key] = shifts
        packed = torch.from_numpy(bits.copy()).to(logits.device, non_blocking=True)
        allowed = ((packed.unsqueeze(-1) >> shifts) & 1).view(-1).bool()
        n = logits.shape[-1]
        if n <= size:
            logits.masked_fill_(~allowed[:n], float("-inf"))
        else:
            logits[..., :size].masked_fill_(~allowed[:size], float("-inf"))
            logits[..., size:] = float("-inf")
        return logits

    # -------------------------------------------------------------- advance

    def advance(self, token_id: int) -> None:
        """Record the token the model produced. Tokens after the end of turn are ignored (batch padding)."""
        if self._finished:
            return
        self.generated += 1
        self._bits = None
        token_id = int(token_id)
        self._tokens.append(token_id)
        if self._plan is not None:
            if self._plan and self._plan[0] == token_id:
                self._plan.pop(0)
            else:  # the backend chose otherwise: plan again
                self._plan = None
                self._slack = self._spent = 0
        if token_id in self._eos and (
            not self.active or self._inner.is_stopped() or self._inner.validate_tokens([token_id]) == 1
        ):
            self._finished = True  # the end of turn; nothing after it is matched
            return
        tables = self._tables
        if tables is not None and 0 <= token_id < tables.vocab_size:
            data = tables.token_bytes[token_id]
            opened = self._state.feed(token_id, data, open_token_id=self.constraint.open_token_id, opener=self._opener)
            if self._max_tokens is not None and self._plan is None:
                self._spent += 1 + (self.constraint.growth_bound() if opened else 0)
                self._openers += opened
        if self.active and not self._inner.consume_token(token_id):
            self._give_up(self._inner.get_error())

    def _give_up(self, error: str) -> None:
        self.error = _first_line(error)
        self._inner = None
        self._bits = None
        self._plan = None
        warnings.warn(
            f"constrained decoding stopped ({self.error}); the rest is unconstrained and validated after decoding",
            ConstraintWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------ transformers adapter


class ToolCallLogitsProcessor:
    """A `transformers` logits processor (pass it in `logits_processor=` to `model.generate`).

    The first call fixes the prompt length; after that, the tokens past it in `input_ids` are fed to one
    matcher per batch row. Beam search is not supported (rows would be reordered).

    Args:
        constraint: what to enforce.
        max_tokens: the `max_new_tokens` of the call (the output is made to end within it).
        prefix: completion tokens already placed at the end of the prompt (see `ToolConstraint.start`).
        lazy: skip the mask when the row's argmax is allowed; exact for greedy decoding only.
    """

    def __init__(
        self,
        constraint: ToolConstraint,
        *,
        max_tokens: int | None = None,
        prefix: Sequence[int] = (),
        lazy: bool = False,
    ) -> None:
        self.constraint = constraint
        self.max_tokens = max_tokens
        self.prefix = tuple(prefix)
        self.lazy = lazy
        self.matchers: list[ToolCallMatcher] = []
        self._fed: list[int] = []
        self._prompt_length = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.matchers:
            self._prompt_length = int(input_ids.shape[1])
            rows = int(input_ids.shape[0])
            self.matchers = [self.constraint.start(self.max_tokens, prefix=self.prefix) for _ in range(rows)]
            self._fed = [0] * len(self.matchers)
        for row, matcher in enumerate(self.matchers):
            new = input_ids[row, self._prompt_length + self._fed[row] :].tolist()
            for token in new:
                matcher.advance(token)
            self._fed[row] += len(new)
            if self.lazy and matcher.accepts(int(scores[row].argmax())):
                continue
            matcher.mask_logits(scores[row])
        return scores
