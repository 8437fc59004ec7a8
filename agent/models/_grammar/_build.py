"""Grammar text for constrained tool calls: JSON-schema preparation and the Lark grammar llguidance compiles.

Pure functions over dicts and strings; no llguidance, no torch. `_engine` compiles what this builds.

The grammar (Phi-4 format, `tool_choice="auto"`; `<[200025]>` is the single `<|tool_call|>` token id)::

    start: TEXT | TEXT? block
    block: <[200025]> calls <[200026]>
    calls: "[" call (", " call)* "]"
    call: call_0 | call_1
    call_0: "{\\"name\\": \\"add\\", \\"arguments\\": " args_0 "}"
    args_0: %json {...the tool's schema, unchanged apart from the tightening below...}
    TEXT: /(?s:.+)/ & ~/...<|.../ & ~/...functools[.../ & ~/{"name".../

Each tool's schema stays the root of its own `%json` block, so its `$ref`s resolve unchanged. The JSON layout
matches what `phi4_format.escape_json` renders in prompts (`", "` and `": "` separators, no other
whitespace): what the model reads is what it is made to write.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.models.phi4_format import escape_json

# Separators of `json.dumps` defaults, the layout the renderer uses for earlier calls in the prompt.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Keywords whose value is a single subschema, a list of subschemas, or a name -> subschema map.
_ONE = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
_MANY = ("prefixItems", "anyOf", "allOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

# Free text may not contain `<|` (it could spell a control token), `functools[` (parsed as a call) or start
# like a bare JSON call (`{"name"` / `[{"name"`), so that `parse_completion` never reads a call in it.
_TEXT_EXCLUSIONS = (
    r"~/(?s:.*)<\|(?s:.*)/",
    r"~/(?s:.*)functools\s*\[(?s:.*)/",
    r'~/\s*(\[\s*)?\{\s*"name"(?s:.*)/',
)


def walk_schemas(schema: Any) -> Iterator[dict[str, Any]]:
    """Every (sub)schema dict inside `schema`, the root first. Values of `properties` etc. are schemas; keys never."""
    if not isinstance(schema, dict):
        return
    yield schema
    for key in _ONE:
        if key in schema:
            yield from walk_schemas(schema[key])
    for key in _MANY:
        value = schema.get(key)
        if isinstance(value, list):
            for item in value:
                yield from walk_schemas(item)
    for key in _MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            for item in value.values():
                yield from walk_schemas(item)


def prepare_schema(parameters: dict[str, Any], *, arguments: bool = True) -> tuple[dict[str, Any], list[str]]:
    """A copy of a tool's parameter schema ready for the engine, and the problems that make it uncallable.

    Tightening (generation stays a subset of what the schema accepts): objects that list `properties` but
    say nothing of extra keys get `additionalProperties: false` (skipped when the schema uses `allOf`, where
    that would reject keys the other branches declare). With `arguments` (a call's arguments, which must be
    an object), a schema without `type` gets `type: object` and any other root type is a problem; without
    it (a `response_format` schema) any root is kept.
    """
    schema = copy.deepcopy(parameters)
    problems: list[str] = []
    declared = schema.get("type")
    if not arguments:
        pass
    elif declared is None and not any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")):
        schema["type"] = "object"
    elif declared is not None and declared != "object" and not (isinstance(declared, list) and "object" in declared):
        problems.append(f"arguments must be a JSON object, but the schema's type is {declared!r}")
    nodes = list(walk_schemas(schema))
    if not any("allOf" in node for node in nodes):
        for node in nodes:
            is_object = node.get("type") == "object" or "properties" in node
            open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "$ref")
            if is_object and "properties" in node and not any(k in node for k in open_keys):
                node["additionalProperties"] = False
    for node in nodes:  # calendar-exact dates: the engine's own format regexes allow 0000-02-31
        fmt = node.get("format")
        if fmt in _DATE_PATTERNS and "pattern" not in node:
            node["pattern"] = _DATE_PATTERNS[fmt]
            del node["format"]
    schema.pop("x-guidance", None)
    return schema, problems


# Year 0001-9999 (Python and Pydantic have no year 0), days that exist in their month, 29 February in leap years.
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_MONTH_DAY = "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = f"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_DATE_PATTERNS = {"date": f"^{_DATE}$", "date-time": f"^{_DATE}T{_TIME}$"}


def strip_patterns(schema: dict[str, Any]) -> list[str]:
    """Remove `pattern` from every subschema (in place); return the patterns removed."""
    removed: list[str] = []
    for node in walk_schemas(schema):
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            removed.append(pattern)
            del node["pattern"]
    return removed


def with_options(schema: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """The schema with llguidance's layout options (and `lenient` when asked) in its `x-guidance` key."""
    options = dict(JSON_OPTIONS)
    if lenient:
        options["lenient"] = True
    return {**schema, "x-guidance": options}


def lark_literal(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Marker:
    """A call-block delimiter: one added token (by id) or literal text."""

    text: str
    token_id: int | None = None

    def lark(self) -> str:
        return f"<[{self.token_id}]>" if self.token_id is not None else lark_literal(self.text)


def call_rules(tools: list[tuple[str, dict[str, Any]]]) -> str:
    """The `call` rule: one alternative per tool, each `{"name": ..., "arguments": %json {...}}`."""
    rules: list[str] = []
    names: list[str] = []
    for index, (name, schema) in enumerate(tools):
        head = '{"name": ' + escape_json(name) + ', "arguments": '
        rules.append(f"call_{index}: {lark_literal(head)} args_{index} {lark_literal('}')}")
        rules.append(f"args_{index}: %json {json.dumps(schema, ensure_ascii=False)}")
        names.append(f"call_{index}")
    return "\n".join([f"call: {' | '.join(names)}", *rules])


def text_terminal(name: str, *, open_text: str | None, allow_empty: bool) -> str:
    """A terminal for free text that `parse_completion` reads as text only (see `_TEXT_EXCLUSIONS`)."""
    parts = [r"/(?s:.*)/" if allow_empty else r"/(?s:.+)/", *_TEXT_EXCLUSIONS]
    if open_text is not None:  # a textual open tag must not appear inside text
        parts.append("~/(?s:.*)" + _regex_escape(open_text) + "(?s:.*)/")
    return f"{name}: " + " & ".join(parts)


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/-" else c for c in text)


def lark_grammar(
    calls: str,
    *,
    mode: str,
    open_marker: Marker,
    close_marker: Marker,
    single: bool = False,
    answer: dict[str, Any] | None = None,
) -> str:
    """The whole grammar for `mode` in {"auto", "required", "none"} (a named tool is "required" over one tool).

    Args:
        calls: the `call` rules (`call_rules`).
        mode: see above.
        open_marker: what opens a call block.
        close_marker: what closes it.
        single: a block holds exactly one call (`parallel_tool_calls=False`).
        answer: a prepared JSON schema the answer must match instead of free text (`response_format`):
            `auto` is then the JSON answer or a call block, `none` the JSON answer alone.
    """
    lines = ["%llguidance {}"]
    calls_rule = 'calls: "[" call "]"' if single else f'calls: "[" call ({lark_literal(", ")} call)* "]"'
    textual_open = open_marker.token_id is None
    if mode == "required":
        lines += [f"start: {open_marker.lark()} calls {close_marker.lark()}", calls_rule, calls]
        return "\n".join(lines) + "\n"
    if answer is not None:
        answer_rule = f"answer: %json {json.dumps(answer, ensure_ascii=False)}"
        if mode == "none":
            return "\n".join([*lines, "start: answer", answer_rule]) + "\n"
        lines += [f"start: answer | {open_marker.lark()} calls {close_marker.lark()}", answer_rule, calls_rule, calls]
        return "\n".join(lines) + "\n"
    text = text_terminal("TEXT", open_text=open_marker.text if textual_open else None, allow_empty=False)
    if mode == "none":
        lines += ["start: TEXT", text]
        return "\n".join(lines) + "\n"
    if textual_open:
        # Text then a textual tag: a lazy lexeme ending at the first open tag, so the text cannot swallow it.
        head = text_terminal("HEAD_TEXT", open_text=open_marker.text, allow_empty=True)
        lines += [
            f"start: TEXT | head calls {close_marker.lark()}",
            f"head[lazy]: HEAD_TEXT {open_marker.lark()}",
            head,
        ]
    else:
        lines += ["start: TEXT | TEXT? block", f"block: {open_marker.lark()} calls {close_marker.lark()}"]
    lines += [text, calls_rule, calls]
    return "\n".join(lines) + "\n"
