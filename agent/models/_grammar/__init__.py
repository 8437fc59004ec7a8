"""Grammar-constrained decoding of tool calls: a model can only write text or calls that parse and validate.

The engine is llguidance (chosen over xgrammar, outlines-core and lm-format-enforcer by measurement: every
schema feature Pydantic emits enforced, added tokens kept out of JSON strings, ~0.04 ms median per token mask on
Phi-4's 200K vocabulary, ~1 ms compile per tool). It is an optional dependency: without it every constraint
is unconstrained and says so in a `ConstraintWarning`.

How a backend uses it (the backend owns the decode loop; only generated tokens go to the matcher, so a
reused KV cache or a streamed response needs nothing special)::

    engine = GrammarEngine.from_tokenizer(tokenizer, eos_token_ids=[200020, 199999], vocab_size=V)  # once
    constraint = engine.constraint(tools, settings.tool_choice, PHI4_FORMAT)   # per request (cached)
    matcher = constraint.start(max_tokens=settings.max_tokens)
    for step in range(settings.max_tokens):
        logits = forward(...)[-1]                  # (vocab,) or (1, vocab), any device
        matcher.mask_logits(logits)                # disallowed tokens -> -inf, in place
        token = sample(logits)
        matcher.advance(token)
        if matcher.done or token in eos: break
    parsed = parse_completion(text)   # for TAGGED_FORMAT: open_tag="<tool_call>", close_tag="</tool_call>"

or, with `model.generate`: `logits_processor=LogitsProcessorList([constraint.logits_processor(max_tokens=N)])`.

Grammar by `tool_choice` (see `_build` for the text):
- `auto`: free text, or free text followed by one call block; `none`: free text only;
- `required`: one call block right away; a tool name: a call block whose calls all name that tool.
A call block is the format's open marker, a JSON list of one or more `{"name": ..., "arguments": {...}}`
(arguments valid against that tool's schema), the close marker, then end of turn. Free text never contains
`<|`, `functools[`, or a leading `{"name"`, so `parse_completion` never finds a call in it.

Budget: given `max_tokens`, the matcher plans how to finish the output and, when the budget gets tight,
emits that plan (closing strings, arrays and objects within what the grammar allows), so `max_tokens`
never cuts a call in half (see `_closing`). Free text is not cut short: once a call would no longer
fit, the open marker is banned and the text may run to the budget.

Sampling without top-p can skip most masks (exactly the same distribution): sample from the raw logits,
and only when `matcher.accepts(token)` is False, `mask_logits` and sample again.

Layout: `_engine` (engine, constraints, matchers, logits processor), `_build` (the grammar text by
`tool_choice` and format), `_closing` (closing an open call or JSON answer within the token budget), `_vocab`
(token tables and bitmask helpers), `_schemas` (random Pydantic tool schemas for tests and benchmarks).
"""

from __future__ import annotations

from agent.models._grammar._engine import (
    ANSWER,
    PHI4_FORMAT,
    TAGGED_FORMAT,
    CallFormat,
    ConstraintWarning,
    GrammarEngine,
    SchemaSupport,
    ToolCallLogitsProcessor,
    ToolCallMatcher,
    ToolConstraint,
    check_answer_schema,
    check_tool_schema,
    check_tools,
)

__all__ = [
    "ANSWER",
    "PHI4_FORMAT",
    "TAGGED_FORMAT",
    "CallFormat",
    "ConstraintWarning",
    "GrammarEngine",
    "SchemaSupport",
    "ToolCallLogitsProcessor",
    "ToolCallMatcher",
    "ToolConstraint",
    "check_answer_schema",
    "check_tool_schema",
    "check_tools",
]
