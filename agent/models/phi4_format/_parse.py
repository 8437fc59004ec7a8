"""Parsing Phi-4 completions back into parts, and the streaming view of a call block being written."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.messages import Part, TextPart, ToolCallPart
from agent.models import ParsedCompletion
from agent.models.phi4_format._render import END, EOS, TOOL_CALL, TOOL_CALL_END

_DECODER = json.JSONDecoder()
_TRAILERS = (END, EOS)
_FUNCTOOLS = re.compile(r"functools\s*(?=\[)")
_CALL_START = re.compile(r"\[\s*\{\s*\"name\"|\{\s*\"name\"")


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


def _to_calls(value: Any) -> tuple[list[ToolCallPart], list[str]]:
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCallPart] = []
    errors: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            errors.append(f"a tool call must be a JSON object with 'name' and 'arguments', got {_clip(item)}")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name:
            errors.append(f"a tool call needs a string 'name', got {_clip(item)}")
            continue
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # OpenAI-style arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                errors.append(f"arguments of {name!r} are not valid JSON: {exc.msg}")
                continue
        if args is None:
            args = {}
        if not isinstance(args, dict):
            errors.append(f"arguments of {name!r} must be a JSON object, got {_clip(args)}")
            continue
        call_id = item.get("id")
        calls.append(
            ToolCallPart(id=call_id if isinstance(call_id, str) and call_id else _new_id(), name=name, arguments=args)
        )
    return calls, errors


def _clip(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _decode_at(text: str, pos: int) -> tuple[Any, int] | str:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        return f"invalid JSON in tool call: {exc.msg} at character {exc.pos - pos}"
    except RecursionError:
        return "invalid JSON in tool call: nested too deeply"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def parse_completion(
    raw: str,
    *,
    open_tag: str = TOOL_CALL,
    close_tag: str = TOOL_CALL_END,
    trailers: Sequence[str] = _TRAILERS,
    json_answer: bool = False,
) -> ParsedCompletion:
    """Read a completion into text and tool-call parts. Never raises.

    Args:
        raw: the decoded completion (special tokens kept).
        open_tag: the tag opening a block of calls; Phi-4's `<|tool_call|>` by default. Plain chat models
            served by the transformers backend use `<tool_call>`.
        close_tag: the tag closing the block (optional in the output).
        trailers: end-of-turn markers stripped from the end of the text.
        json_answer: the answer is JSON by request (`response_format`): only tagged blocks are calls, so a
            JSON answer holding a `"name"` key is not read as a bare call.
    """
    try:
        return _parse(raw, open_tag, close_tag, tuple(trailers), json_answer)
    except Exception as exc:  # defensive: a parser bug must not stop the loop
        return ParsedCompletion(parts=(TextPart(text=raw),) if raw else (), errors=(f"unreadable output: {exc}",))


def _strip_trailers(text: str, trailers: tuple[str, ...]) -> str:
    changed = True
    while changed:  # strip end-of-turn tokens and trailing whitespace
        changed = False
        stripped = text.rstrip()
        for trailer in trailers:
            if trailer and stripped.endswith(trailer):
                stripped = stripped[: -len(trailer)]
                changed = True
        text = stripped if changed else text
    return text


def _parse(raw: str, open_tag: str, close_tag: str, trailers: tuple[str, ...], json_answer: bool) -> ParsedCompletion:
    text = _strip_trailers(raw, trailers)
    texts: list[str] = []
    calls: list[ToolCallPart] = []
    errors: list[str] = []

    if open_tag in text:
        pos = 0
        while True:
            start = text.find(open_tag, pos)
            if start < 0:
                texts.append(text[pos:])
                break
            texts.append(text[pos:start])
            body_start = start + len(open_tag)
            # The JSON is read first, so a close tag spelled inside one of its strings (a textual
            # `</tool_call>`) does not end the block; the close tag is looked for after it.
            decoded = _decode_at(text, _skip_ws(text, body_start))
            search_from = decoded[1] if not isinstance(decoded, str) else body_start
            end = text.find(close_tag, search_from)
            body_end = end if end >= 0 else len(text)
            if isinstance(decoded, str):
                body = text[body_start:body_end]  # report the error as found within the block
                within = _decode_at(body, _skip_ws(body, 0))
                errors.append(within if isinstance(within, str) else decoded)
            else:
                value, stop = decoded
                found, bad = _to_calls(value)
                calls.extend(found)
                errors.extend(bad)
                rest = text[stop:body_end].strip()
                if rest:
                    errors.append(f"unexpected text after the JSON inside {open_tag}: {_clip(rest)}")
            pos = body_end + len(close_tag) if end >= 0 else len(text)
    else:
        # functools[...] and bare JSON calls count only at the very start (after whitespace)
        lead = len(text) - len(text.lstrip())
        match = None if json_answer else _FUNCTOOLS.match(text, lead)
        start = match.end() if match else -1
        if start < 0 and not json_answer:
            bare = _CALL_START.match(text, lead)
            if bare:
                start = bare.start()
        if start < 0:
            texts.append(text)
        else:
            texts.append(text[:lead])
            decoded = _decode_at(text, start)
            if isinstance(decoded, str):
                errors.append(decoded)
                texts.append(text[start:])
            else:
                value, stop = decoded
                found, bad = _to_calls(value)
                calls.extend(found)
                errors.extend(bad)
                texts.append(text[stop:])
    joined = "".join(texts).strip()
    parts: list[Part] = [TextPart(text=joined)] if joined else []
    parts.extend(calls)
    return ParsedCompletion(parts=tuple(parts), errors=tuple(errors))


# ---------------------------------------------------------------- streaming

_FUNCTOOLS_WORD = "functools"
_BARE_PREFIXES = ('[{"name"', '{"name"')


def stream_safe_length(
    text: str, *, open_tag: str = TOOL_CALL, stops: Sequence[str] = (), json_answer: bool = False
) -> int:
    """How many leading characters of a growing completion can be streamed as assistant text now.

    Holds back whatever may still turn out to be a tool-call block (the open tag; `functools[` or a bare
    JSON call at the very start, unless `json_answer`), a stop string, an incomplete character, and
    leading/trailing whitespace (the parser strips it), so that the streamed pieces are always a prefix of
    the final parsed text when the completion has no calls before its text.
    """
    body = text.lstrip()
    if not body:
        return 0
    if not json_answer and ((body[0] in "[{" and _may_be_bare_call(body)) or _may_be_functools(body)):
        return 0
    limit = len(text)
    for marker in (open_tag, *stops):
        if not marker:
            continue
        found = text.find(marker)
        if found >= 0:
            limit = min(limit, found)
    limit = min(limit, len(text) - _partial_suffix(text[:limit], (open_tag, *stops)))
    while limit > 0 and (text[limit - 1].isspace() or text[limit - 1] == "\ufffd"):
        limit -= 1
    return max(limit, 0)


def _partial_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def _may_be_functools(body: str) -> bool:
    """Whether text (without leading whitespace) is, or may still become, `functools[`."""
    if len(body) <= len(_FUNCTOOLS_WORD):
        return _FUNCTOOLS_WORD.startswith(body)
    return body.startswith(_FUNCTOOLS_WORD) and (
        not body[len(_FUNCTOOLS_WORD) :].strip() or _FUNCTOOLS.match(body) is not None
    )


def _may_be_bare_call(body: str) -> bool:
    """Whether text starting with `[` or `{` is, or may still become, a bare JSON tool call."""
    compact = "".join(body[:64].split())[:8]
    return any(p.startswith(compact) or compact.startswith(p) for p in _BARE_PREFIXES)


@dataclass(frozen=True, slots=True)
class PartialCall:
    """A call read from a growing call block: its name, and the raw JSON text of its arguments so far."""

    name: str
    arguments: str
    complete: bool


def scan_call_block(body: str) -> list[PartialCall] | None:
    """Read a growing call block in the layout the grammar writes (`[{"name": "x", "arguments": {...}}, ...`)
    as far as it goes: the calls whose name is complete, the last perhaps with unfinished arguments.

    `body` is the text after the open tag. Returns None when the text leaves that layout (an unconstrained
    model wrote something else), so that a caller streaming calls stops and waits for the parsed result.
    """
    reader = _BlockReader(body)
    calls: list[PartialCall] = []
    try:
        reader.expect("[")
        while True:
            reader.expect("{")
            reader.expect('"name"')
            reader.expect(":")
            name = reader.string()
            calls.append(PartialCall(name, "", False))  # the name is known: a caller may announce the call
            reader.expect(",")
            reader.expect('"arguments"')
            reader.expect(":")
            start = reader.skip_ws()
            end = reader.value_end()
            calls[-1] = PartialCall(name, body[start:end], reader.closed)
            if not reader.closed:
                return calls
            reader.expect("}")
            reader.skip_ws()
            if reader.at(","):
                reader.expect(",")
                continue
            reader.expect("]")
            return calls
    except _Incomplete:
        return calls
    except _OffLayout:
        return None


class _Incomplete(Exception):
    pass


class _OffLayout(Exception):
    pass


class _BlockReader:
    def __init__(self, text: str) -> None:
        self.text, self.pos, self.closed = text, 0, False

    def skip_ws(self) -> int:
        self.pos = _skip_ws(self.text, self.pos)
        return self.pos

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def expect(self, literal: str) -> None:
        self.skip_ws()
        rest = self.text[self.pos : self.pos + len(literal)]
        if rest == literal:
            self.pos += len(literal)
            return
        if literal.startswith(rest):  # the text ends inside the literal
            raise _Incomplete
        raise _OffLayout

    def string(self) -> str:
        self.skip_ws()
        if self.pos >= len(self.text):
            raise _Incomplete
        if self.text[self.pos] != '"':
            raise _OffLayout
        try:
            value, self.pos = _DECODER.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            raise _Incomplete from exc  # unfinished (the grammar writes only valid strings)
        if not isinstance(value, str):
            raise _OffLayout
        return value

    def value_end(self) -> int:
        """Where the JSON object at `pos` ends (just past it), or the end of the text; sets `closed`."""
        text, pos = self.text, self.pos
        if pos >= len(text):
            raise _Incomplete
        if text[pos] != "{":
            raise _OffLayout
        depth, in_string, escape = 0, False, False
        for i in range(pos, len(text)):
            c = text[i]
            if in_string:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    self.pos, self.closed = i + 1, True
                    return i + 1
        self.pos, self.closed = len(text), False
        return len(text)
