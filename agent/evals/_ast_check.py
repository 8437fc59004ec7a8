"""BFCL's AST rules for judging tool calls against possible answers, written anew (no BFCL code is imported).

The rules follow `bfcl_eval/eval_checker/ast_eval/ast_checker.py` (bfcl-eval 2026.3.23) for Python function
docs; `docs/evals.md` lists them. A possible answer maps each parameter to the values that count as right;
`""` among them means the parameter may be left out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Call", "Verdict", "check_call", "check_calls", "standardize"]

Call = tuple[str, Mapping[str, Any]]
"""A call as the checker reads it: the function's name and its decoded arguments."""

# BFCL's Python reading of a declared type; anything else is read as a string, as BFCL's schema conversion does.
_PY_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
    # the JSON-Schema spellings, for function docs already in that dialect
    "number": float,
    "object": dict,
    "list": list,
    "bool": bool,
}
_NESTED = ("array", "tuple", "list")
_STRIPPED = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The checker's judgement of one model turn.

    Attributes:
        ok: the calls are right.
        reason: why not (empty when `ok`).
        kind: a short tag for the failure, e.g. `wrong_count`, `wrong_func_name`, `missing_required`,
            `unexpected_param`, `type_error`, `value_error`, `missing_optional`, `no_match`, `irrelevance`,
            `relevance`, `unparsable` (empty when `ok`).
    """

    ok: bool
    reason: str = ""
    kind: str = ""


_OK = Verdict(True)


def standardize(text: str) -> str:
    """BFCL's string normalisation: spaces and `,./-_*^` removed, lower case, single quotes made double."""
    return _STRIPPED.sub("", text).lower().replace("'", '"')


def check_calls(
    functions: Sequence[Mapping[str, Any]],
    calls: Sequence[Call],
    answers: Sequence[Mapping[str, Mapping[str, Sequence[Any]]]] | None,
    category: str,
) -> Verdict:
    """Judge one model turn's calls the way BFCL's AST checker does for `category`.

    Args:
        functions: the BFCL function docs offered (their own dialect: `dict`, `float`, `tuple`, ...).
        calls: the calls the model made, in order.
        answers: the possible answers, one `{name: {param: [allowed values]}}` per expected call; None for
            the relevance categories, which have none.
        category: a BFCL category; `irrelevance` in it: right when no call is made; `relevance`: right when
            at least one is; `parallel` in it: calls matched to answers in any order; `multiple`: one call,
            to the answer's function among several; otherwise (`simple`): exactly one call, to the first doc.
    """
    if "irrelevance" in category:
        if calls:
            return Verdict(False, f"called {_names(calls)} where no call was wanted", "irrelevance")
        return _OK
    if "relevance" in category:
        return _OK if calls else Verdict(False, "made no call where one was wanted", "relevance")
    if answers is None:
        raise ValueError(f"category {category!r} needs possible answers")
    if len(calls) != len(answers):
        return Verdict(False, f"expected {len(answers)} call(s), got {len(calls)}", "wrong_count")
    if "parallel" in category:
        return _match_any_order(functions, calls, answers)
    if "multiple" in category:
        name = _answer_name(answers[0])
        function = _find(functions, name)
        if function is None:
            return Verdict(False, f"no function doc named {name!r} for the possible answer", "no_doc")
        return check_call(function, calls[0], answers[0])
    if not functions:
        return Verdict(False, "no function doc to check against", "no_doc")
    return check_call(functions[0], calls[0], answers[0])


def _match_any_order(
    functions: Sequence[Mapping[str, Any]],
    calls: Sequence[Call],
    answers: Sequence[Mapping[str, Mapping[str, Sequence[Any]]]],
) -> Verdict:
    """Each answer, in order, takes the first call not yet taken that passes for it (BFCL's greedy matching)."""
    taken: set[int] = set()
    for i, answer in enumerate(answers):
        name = _answer_name(answer)
        function = _find(functions, name)
        if function is None:
            return Verdict(False, f"no function doc named {name!r} for possible answer {i}", "no_doc")
        last = Verdict(False, "every call was already matched", "no_match")
        for j, call in enumerate(calls):
            if j in taken:
                continue
            last = check_call(function, call, answer)
            if last.ok:
                taken.add(j)
                break
        else:
            reason = f"no call matches expected call {i} ({name}); last mismatch: {last.reason}"
            return Verdict(False, reason, "no_match")
    return _OK


def check_call(function: Mapping[str, Any], call: Call, answer: Mapping[str, Mapping[str, Sequence[Any]]]) -> Verdict:
    """Judge one call against one possible answer `{name: {param: [allowed values]}}` and its function doc."""
    expected = _answer_name(answer)
    allowed = answer[expected]
    name, arguments = call
    if name != function.get("name", expected):
        return Verdict(False, f"called {name!r}, expected {function.get('name', expected)!r}", "wrong_func_name")
    parameters = function.get("parameters") or {}
    details: Mapping[str, Any] = parameters.get("properties") or {}
    for param in parameters.get("required") or ():
        if param not in arguments:
            return Verdict(False, f"missing required parameter {param!r}", "missing_required")
    for param, value in arguments.items():
        if param not in details or param not in allowed:
            return Verdict(False, f"unexpected parameter {param!r}", "unexpected_param")
        verdict = _check_value(param, value, details[param], list(allowed[param]))
        if not verdict.ok:
            return verdict
    for param, values in allowed.items():
        if param not in arguments and "" not in values:
            return Verdict(False, f"parameter {param!r} left out, and it is not optional", "missing_optional")
    return _OK


def _check_value(param: str, value: Any, detail: Mapping[str, Any], candidates: list[Any]) -> Verdict:
    declared = str(detail.get("type", "string"))
    expected = _PY_TYPES.get(declared, str)
    nested: type | None = None
    if declared in _NESTED and isinstance(detail.get("items"), Mapping):
        item_type = str(detail["items"].get("type", "string"))
        nested = _PY_TYPES.get(item_type, str)
        declared = f"{declared} of {item_type}"
    if declared == "float" and type(value) is int:  # Python's own int -> float
        value = float(value)
    typed, is_variable = _type_ok(value, candidates, expected, nested)
    if not typed:
        return Verdict(
            False, f"parameter {param!r}: expected {declared}, got {type(value).__name__} {value!r}", "type_error"
        )
    if not is_variable:
        if expected is dict:
            return _dict_ok(param, value, candidates)
        if expected is list and nested is dict:
            return _list_of_dicts_ok(param, value, candidates)
        if expected is str:
            if standardize(value) in [standardize(c) for c in candidates if type(c) is str]:
                return _OK
            return _mismatch(param, value, candidates)
        if expected is list:
            if _standardized(value) in [_standardized(c) if type(c) is list else [] for c in candidates]:
                return _OK
            return _mismatch(param, value, candidates)
    return _OK if value in candidates else _mismatch(param, value, candidates)


def _type_ok(value: Any, candidates: Sequence[Any], expected: type, nested: type | None) -> tuple[bool, bool]:
    """(type accepted, read as a variable). A value of the possible answers' own type, when that differs from
    the declared one, stands for a variable and is then compared as it is. Lists are checked one level deep."""
    answer_type = next((type(c) for c in candidates if c != ""), None)
    is_variable = answer_type is not None and answer_type is not expected
    items: Any = value  # a list when `nested` is set
    if type(value) is expected:
        if nested is None:
            return True, is_variable
        for candidate in candidates:
            if not isinstance(candidate, list) or all(_type_ok(i, candidate, nested, None)[0] for i in items):
                return True, is_variable
        return False, False
    return (True, True) if answer_type is not None and type(value) is answer_type else (False, False)


def _dict_ok(param: str, value: Mapping[str, Any], candidates: list[Any]) -> Verdict:
    """Some candidate dict takes every key given, each value among its allowed ones (strings normalised),
    and every key it lists that was left out allows `""`."""
    failure = Verdict(False, f"parameter {param!r}: no possible answer to compare with", "value_error")
    for candidate in candidates:
        if candidate == "":
            continue
        failure = _one_dict(param, value, candidate)
        if failure.ok:
            return _OK
    return failure


def _one_dict(param: str, value: Mapping[str, Any], candidate: Mapping[str, Sequence[Any]]) -> Verdict:
    for key, item in value.items():
        if key not in candidate:
            return Verdict(False, f"parameter {param!r}: unexpected key {key!r}", "value_error")
        allowed = [standardize(c) if type(c) is str else c for c in candidate[key]]
        if (standardize(item) if type(item) is str else item) not in allowed:
            return Verdict(False, f"parameter {param!r}: key {key!r} = {item!r} is not among {allowed}", "value_error")
    for key, allowed_values in candidate.items():
        if key not in value and "" not in allowed_values:
            return Verdict(False, f"parameter {param!r}: key {key!r} left out", "value_error")
    return _OK


def _list_of_dicts_ok(param: str, value: list[Any], candidates: list[Any]) -> Verdict:
    """Some candidate list has as many dicts, each matching the dict at its position."""
    failure = Verdict(False, f"parameter {param!r}: no possible answer to compare with", "value_error")
    for candidate in candidates:
        items = candidate if type(candidate) is list else []
        if len(value) != len(items):
            failure = Verdict(False, f"parameter {param!r}: {len(value)} dicts, expected {len(items)}", "value_error")
            continue
        for got, want in zip(value, items, strict=True):
            ok_shapes = isinstance(got, Mapping) and isinstance(want, Mapping)
            failure = _one_dict(param, got, want) if ok_shapes else _mismatch(param, got, [want])
            if not failure.ok:
                break
        else:
            return _OK
    return failure


def _standardized(values: list[Any]) -> list[Any]:
    return [standardize(v) if type(v) is str else v for v in values]


def _mismatch(param: str, value: Any, candidates: list[Any]) -> Verdict:
    return Verdict(False, f"parameter {param!r}: {value!r} is not among {candidates}", "value_error")


def _answer_name(answer: Mapping[str, Any]) -> str:
    return next(iter(answer))


def _find(functions: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((f for f in functions if f.get("name") == name), None)


def _names(calls: Sequence[Call]) -> str:
    return ", ".join(name for name, _ in calls)
