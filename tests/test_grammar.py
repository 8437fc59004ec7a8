"""Grammar-constrained tool calls on the real Phi-4 tokenizer: random logits / a random tiny LM can only write
text or calls that `parse_completion` reads and the tool's JSON schema accepts."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("llguidance")
torch = pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

from agent.exceptions import UserError  # noqa: E402
from agent.messages import ToolCallPart, ToolDefinition  # noqa: E402
from agent.models._grammar import (  # noqa: E402
    PHI4_FORMAT,
    TAGGED_FORMAT,
    CallFormat,
    ConstraintWarning,
    GrammarEngine,
    ToolConstraint,
    _engine,
    check_tool_schema,
    check_tools,
)
from agent.models._grammar._schemas import random_tools  # noqa: E402
from agent.models.phi4_format import parse_completion  # noqa: E402

TOOL_CALL, TOOL_CALL_END, END = 200025, 200026, 200020
VOCAB = 200064
FORMATS = jsonschema.FormatChecker()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Single-threaded torch: the per-step ops here are tiny, and threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(phi4_tokenizer: Any) -> GrammarEngine:
    return GrammarEngine.from_tokenizer(phi4_tokenizer, eos_token_ids=[END])


@pytest.fixture(scope="module")
def logit_pool() -> Any:
    """Random logit rows; a random row per step behaves like an untrained model's noise."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(64, VOCAB, generator=generator)


def weather() -> ToolDefinition:
    return ToolDefinition(
        name="get_weather",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    )


def run(
    matcher: Any,
    pool: Any,
    rng: random.Random,
    max_tokens: int,
    *,
    boost: dict[int, tuple[int, float]] | None = None,
) -> list[int]:
    """Decode with random logits through `mask_logits`; `boost` maps token -> (step, bonus) to steer a step."""
    out: list[int] = []
    for step in range(max_tokens):
        logits = pool[rng.randrange(len(pool))].clone()
        for token, (at, bonus) in (boost or {}).items():
            if step == at:
                logits[token] += bonus
        matcher.mask_logits(logits)
        token = int(torch.argmax(logits))
        matcher.advance(token)
        out.append(token)
        if matcher.done:
            break
    return out


def parsed_calls(tokenizer: Any, ids: Sequence[int], fmt: CallFormat = PHI4_FORMAT) -> tuple[list[ToolCallPart], Any]:
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    parsed = parse_completion(text, open_tag=fmt.open, close_tag=fmt.close)
    return [p for p in parsed.parts if isinstance(p, ToolCallPart)], parsed


def assert_valid(calls: list[ToolCallPart], tools: Sequence[ToolDefinition]) -> None:
    by_name = {t.name: t for t in tools}
    for call in calls:
        assert call.name in by_name, call.name
        jsonschema.validate(call.arguments, by_name[call.name].parameters, format_checker=FORMATS)


# ------------------------------------------------------------------ the acceptance runs (random logits)


@pytest.mark.slow  # the same acceptance runs through the backend in test_constrained_backend.py
def test_required_200_random_schemas_all_parse_and_validate(
    engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any
) -> None:
    rng = random.Random(6)
    max_tokens = 96
    for i in range(200):
        tools = random_tools(rng)
        matcher = engine.constraint(tools, "required").start(max_tokens=max_tokens)
        ids = run(matcher, logit_pool, rng, max_tokens)
        calls, parsed = parsed_calls(phi4_tokenizer, ids)
        assert not parsed.errors, (i, parsed.errors, phi4_tokenizer.decode(ids))
        assert calls, (i, phi4_tokenizer.decode(ids))
        assert ids[0] == TOOL_CALL and TOOL_CALL_END in ids[-2:]  # `done` may come before the end token
        assert len(ids) <= max_tokens
        assert_valid(calls, tools)


@pytest.mark.slow
def test_required_1000_random_schemas(engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any) -> None:
    rng = random.Random(7)
    for _ in range(1000):
        tools = random_tools(rng, max_tools=5, max_params=6)
        matcher = engine.constraint(tools, "required").start(max_tokens=160)
        calls, parsed = parsed_calls(phi4_tokenizer, run(matcher, logit_pool, rng, 160))
        assert calls and not parsed.errors
        assert_valid(calls, tools)


def test_auto_outputs_are_text_or_valid_calls(engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any) -> None:
    rng = random.Random(8)
    kinds = {"text": 0, "calls": 0}
    for i in range(40):
        tools = random_tools(rng)
        matcher = engine.constraint(tools, "auto").start(max_tokens=96)
        boost = {TOOL_CALL: (rng.randrange(0, 12), 1e4)} if i % 2 else None  # make half of them call
        ids = run(matcher, logit_pool, rng, 96, boost=boost)
        calls, parsed = parsed_calls(phi4_tokenizer, ids)
        assert not parsed.errors, phi4_tokenizer.decode(ids)
        assert_valid(calls, tools)
        kinds["calls" if calls else "text"] += 1
        assert len(ids) <= 96
        if calls:
            assert TOOL_CALL_END in ids[-2:]
        else:  # text may run to the budget: a call that would not fit can no longer start
            assert TOOL_CALL not in ids
    assert kinds["text"] and kinds["calls"]


def test_none_never_calls(engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any) -> None:
    rng = random.Random(9)
    for _ in range(20):
        matcher = engine.constraint(random_tools(rng), "none").start(max_tokens=64)
        functools = phi4_tokenizer.encode("functools")[0]
        boost = {TOOL_CALL: (3, 1e4), functools: (5, 1e4)}  # the tool token and "functools" pushed hard
        ids = run(matcher, logit_pool, rng, 64, boost=boost)
        calls, parsed = parsed_calls(phi4_tokenizer, ids)
        assert not calls and not parsed.errors
        assert TOOL_CALL not in ids


def test_named_tool_is_always_that_tool(engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any) -> None:
    rng = random.Random(10)
    for _ in range(12):
        tools = random_tools(rng, max_tools=4)
        chosen = rng.choice(tools).name
        matcher = engine.constraint(tools, chosen).start(max_tokens=96)
        calls, parsed = parsed_calls(phi4_tokenizer, run(matcher, logit_pool, rng, 96))
        assert calls and not parsed.errors
        assert {c.name for c in calls} == {chosen}
        assert_valid(calls, tools)


@pytest.mark.parametrize("choice", ["required", "auto", "none"])
def test_tagged_format_for_plain_chat_models(
    engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any, choice: str
) -> None:
    rng = random.Random(11)
    for _ in range(6):
        tools = random_tools(rng)
        matcher = engine.constraint(tools, choice, TAGGED_FORMAT).start(max_tokens=96)
        ids = run(matcher, logit_pool, rng, 96)
        calls, parsed = parsed_calls(phi4_tokenizer, ids, TAGGED_FORMAT)
        text = phi4_tokenizer.decode(ids)
        assert not parsed.errors, text
        assert bool(calls) == (choice == "required"), text
        assert TOOL_CALL not in ids
        assert_valid(calls, tools)
        if choice == "required":
            assert text.startswith("<tool_call>[")


# ------------------------------------------------------------------ grammar details


def test_markers_are_single_added_tokens_and_never_inside_strings(engine: GrammarEngine, phi4_tokenizer: Any) -> None:
    matcher = engine.constraint([weather()], "required").start()
    allowed = matcher.allowed()
    assert allowed is not None and allowed.nonzero()[0].tolist() == [TOOL_CALL]  # not "<", "|", ... pieces
    matcher.advance(TOOL_CALL)
    forced = matcher.forced_tokens()
    assert phi4_tokenizer.decode(forced) == '[{"name": "get_weather", "arguments": {"city":'
    for token in [*forced, *phi4_tokenizer.encode(' "Os')]:
        matcher.advance(token)
    allowed = matcher.allowed()
    assert allowed is not None
    assert not allowed[[TOOL_CALL, TOOL_CALL_END, END, 199999]].any()  # no added token inside a string
    lt = phi4_tokenizer.convert_tokens_to_ids("<")
    assert allowed[lt]
    matcher.advance(lt)
    pipes = [i for i in range(199998) if phi4_tokenizer.decode([i]).startswith("|")]
    allowed = matcher.allowed()
    assert allowed is not None and pipes and not allowed[pipes].any()  # "<" then "|..." would spell "<|"


@pytest.mark.parametrize(
    "text", ['functools[{"name": "x"}]', "functools  [", '{"name": "get_weather"}', ' [ {"name"', "a <|tool_call|>"]
)
def test_free_text_can_never_parse_as_a_call(engine: GrammarEngine, phi4_tokenizer: Any, text: str) -> None:
    matcher = engine.constraint([weather()], "none").start()
    rejected = False
    for token in phi4_tokenizer.encode(text):
        if not matcher.accepts(token):
            rejected = True
            break
        matcher.advance(token)
    assert rejected, text


def test_accepts_agrees_with_the_mask(engine: GrammarEngine, phi4_tokenizer: Any) -> None:
    rng = random.Random(3)
    matcher = engine.constraint([weather()], "auto").start()
    for token in phi4_tokenizer.encode("Sure <"):
        matcher.advance(token)
    probe = [rng.randrange(VOCAB) for _ in range(300)] + [TOOL_CALL, END, 199999, 91]
    accepted = [matcher.accepts(t) for t in probe]
    allowed = matcher.allowed()
    assert allowed is not None
    assert accepted == [bool(allowed[t]) for t in probe]


def test_mask_logits_handles_padded_vocab_and_batch_dims(engine: GrammarEngine) -> None:
    matcher = engine.constraint([weather()], "required").start()
    logits = torch.zeros(1, VOCAB + 64)
    matcher.mask_logits(logits)
    finite = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert finite == [TOOL_CALL]


def test_prefix_in_prompt_is_matched_not_budgeted(engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any) -> None:
    prefix = [TOOL_CALL, *phi4_tokenizer.encode('[{"name": "get_weather", "arguments": ')]
    matcher = engine.constraint([weather()], "required").start(max_tokens=40, prefix=prefix)
    assert matcher.generated == 0 and matcher.in_call
    ids = run(matcher, logit_pool, random.Random(1), 40)
    assert len(ids) <= 40
    calls, parsed = parsed_calls(phi4_tokenizer, prefix + ids)
    assert not parsed.errors and calls and {c.name for c in calls} == {"get_weather"}


def test_rejected_token_warns_and_stops_constraining(engine: GrammarEngine) -> None:
    matcher = engine.constraint([weather()], "required").start()
    with pytest.warns(ConstraintWarning, match="constrained decoding stopped"):
        matcher.advance(1000)  # not <|tool_call|>
    assert not matcher.active and matcher.error
    logits = torch.zeros(VOCAB)
    assert torch.isfinite(matcher.mask_logits(logits)).all()


# ------------------------------------------------------------------ tool_choice and fallbacks


def test_tool_choice_errors_and_no_tools(engine: GrammarEngine, phi4_tokenizer: Any) -> None:
    with pytest.raises(UserError, match="not one of the tools"):
        engine.constraint([weather()], "get_time")
    with pytest.raises(UserError, match="at least one tool"):
        engine.constraint([], "required")
    matcher = engine.constraint([], "auto").start()  # no tools: text only
    assert not matcher.accepts(TOOL_CALL)


def test_constraints_are_cached(engine: GrammarEngine) -> None:
    first = engine.constraint([weather()], "auto")
    assert engine.constraint([weather()], "auto") is first
    assert engine.constraint([weather()], "required") is not first


def test_pydantic_registrations_are_enforced_exactly() -> None:
    rng = random.Random(4)
    tools = [t for _ in range(20) for t in random_tools(rng)]
    assert {name: s.level for name, s in check_tools(tools).items()} == {t.name: "exact" for t in tools}


@pytest.mark.parametrize(
    ("schema", "level", "problem"),
    [
        ({"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}, "approximate", "unique"),
        ({"type": "object", "properties": {"s": {"type": "string", "format": "binary"}}}, "approximate", "binary"),
        ({"type": "object", "properties": {"s": {"type": "string", "pattern": "(?<=a)b"}}}, "approximate", "pattern"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "unconstrained", "missing"),
        ({"type": "string"}, "unconstrained", "must be a JSON object"),
    ],
)
def test_schemas_the_engine_cannot_express(schema: dict[str, Any], level: str, problem: str) -> None:
    support = check_tool_schema(schema)
    assert support.level == level
    assert problem in " ".join(support.problems)


def test_fallback_tool_still_gets_a_well_formed_call(
    engine: GrammarEngine, phi4_tokenizer: Any, logit_pool: Any
) -> None:
    odd = ToolDefinition(name="odd", parameters={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    with pytest.warns(ConstraintWarning, match="odd"):
        constraint = engine.constraint([odd, weather()], "odd")
    assert constraint.constrained and constraint.support["odd"].level == "unconstrained"
    calls, parsed = parsed_calls(phi4_tokenizer, run(constraint.start(max_tokens=64), logit_pool, random.Random(2), 64))
    assert not parsed.errors and [c.name for c in calls] == ["odd"]


def test_grammar_that_fails_to_compile_means_unconstrained(
    engine: GrammarEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "_matcher_for", lambda grammar: "boom")
    with pytest.warns(ConstraintWarning, match="boom"):
        constraint = engine.constraint([weather()], "none", CallFormat("<x>", "</x>", special_markers=False))
    assert not constraint.constrained
    matcher = constraint.start(max_tokens=8)
    logits = torch.zeros(VOCAB)
    assert torch.isfinite(matcher.mask_logits(logits)).all() and matcher.accepts(TOOL_CALL)


def test_without_llguidance_everything_degrades_with_a_warning(
    phi4_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_engine, "_llguidance", lambda: None)
    assert check_tool_schema(weather().parameters).level == "unconstrained"
    disabled = GrammarEngine.from_tokenizer(phi4_tokenizer)
    assert disabled.disabled_reason and END in disabled.eos_token_ids
    with pytest.warns(ConstraintWarning, match="llguidance"):
        constraint = disabled.constraint([weather()], "required")
    matcher = constraint.start(max_tokens=4)
    assert matcher.allowed() is None and matcher.accepts(5)
    matcher.advance(5)
    assert not matcher.done


# ------------------------------------------------------------------ with a real (random, tiny) causal LM


@pytest.fixture(scope="module")
def tiny_lm() -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=199999,
        eos_token_id=END,
        pad_token_id=199999,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_generate_with_logits_processor(engine: GrammarEngine, phi4_tokenizer: Any, tiny_lm: Any) -> None:
    from transformers import LogitsProcessorList

    tools = random_tools(random.Random(12))
    constraint = engine.constraint(tools, "required")
    prompt = torch.tensor([phi4_tokenizer.encode("<|user|>What now?<|end|><|assistant|>")])
    for sample in (True, False):
        processor = constraint.logits_processor(max_tokens=48, lazy=not sample)
        with torch.inference_mode():
            out = tiny_lm.generate(
                prompt,
                max_new_tokens=48,
                do_sample=sample,
                top_k=0,
                logits_processor=LogitsProcessorList([processor]),
                eos_token_id=END,
                pad_token_id=199999,
            )
        ids = out[0, prompt.shape[1] :].tolist()
        calls, parsed = parsed_calls(phi4_tokenizer, ids)
        assert calls and not parsed.errors and ids[-1] == END, phi4_tokenizer.decode(ids)  # generate runs to EOS
        assert_valid(calls, tools)


def test_kv_cached_prompt_and_streaming(engine: GrammarEngine, phi4_tokenizer: Any, tiny_lm: Any) -> None:
    """The backend's own loop: the prompt is already in the KV cache, text streams until the call starts."""
    from transformers import DynamicCache

    tools = [weather()]
    history = phi4_tokenizer.encode("<|user|>Weather in Oslo?<|end|><|assistant|>")
    cache = DynamicCache()
    with torch.inference_mode():
        tiny_lm(torch.tensor([history[:-3]]), past_key_values=cache, use_cache=True)  # an earlier step's cache
        logits = tiny_lm(torch.tensor([history[-3:]]), past_key_values=cache, use_cache=True).logits[0, -1]
        matcher = engine.constraint(tools, "auto").start(max_tokens=60)
        streamed, ids = "", []
        for step in range(60):
            logits = logits.clone()
            if step == 4:
                logits[TOOL_CALL] += 1e4  # the model "decides" to call after some text
            matcher.mask_logits(logits)
            token = int(torch.argmax(logits))
            matcher.advance(token)
            ids.append(token)
            if not matcher.in_call:
                streamed = phi4_tokenizer.decode(ids)
            if matcher.done:
                break
            logits = tiny_lm(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
    calls, parsed = parsed_calls(phi4_tokenizer, ids)
    assert not parsed.errors and [c.name for c in calls] == ["get_weather"]
    assert_valid(calls, tools)
    assert parsed.parts[0].text == streamed.strip()  # type: ignore[union-attr]


def test_constraint_type_is_reusable_across_requests(engine: GrammarEngine) -> None:
    constraint = engine.constraint([weather()], "required")
    assert isinstance(constraint, ToolConstraint)
    first, second = constraint.start(), constraint.start()
    first.advance(TOOL_CALL)
    assert not second.in_call and second.accepts(TOOL_CALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.advance(TOOL_CALL)
