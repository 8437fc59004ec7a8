"""BFCL v4 single-turn categories through the model seam: data, schema conversion, runs and reports.

The data ship in the `bfcl-eval` package (`bfcl_eval/data/BFCL_v4_<category>.json`, one JSON object a line,
and `possible_answer/` beside them); only those files are read, through `importlib.resources`, so the
package can be installed with `--no-deps` (its own dependencies are the API clients of every provider).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.evals._ast_check import Call, check_calls
from agent.exceptions import ContextOverflowError, ModelError, ModelHTTPError, UserError
from agent.messages import Message, ToolDefinition
from agent.models import Model, ModelSettings

__all__ = [
    "BFCL_CATEGORIES",
    "BfclCase",
    "BfclResult",
    "BfclRun",
    "bfcl_data_dir",
    "bfcl_version",
    "load_bfcl",
    "run_bfcl",
    "to_json_schema",
    "to_tool_definition",
    "with_constraint",
]

BFCL_CATEGORIES: tuple[str, ...] = (
    "simple",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "irrelevance",
    "live_irrelevance",
    "live_relevance",
)
"""The single-turn categories of BFCL v4 (`simple` is BFCL's `simple_python`)."""

_FILES = {"simple": "simple_python"}
_NO_ANSWERS = ("irrelevance", "live_irrelevance", "live_relevance")
_PYTHON_HINT = " Note that the provided function is in Python 3 syntax."  # what BFCL adds to each function doc


# ------------------------------------------------------------------ data


@dataclass(frozen=True, slots=True)
class BfclCase:
    """One BFCL entry, ready for a request.

    Attributes:
        id: BFCL's id (`simple_python_12`, `live_multiple_3-1-0`, ...).
        category: one of `BFCL_CATEGORIES`.
        messages: the question as messages (user turns, and the system turns some live entries carry).
        functions: the function docs as BFCL wrote them (the checker reads their declared types).
        tools: the same docs as `ToolDefinition`s (JSON Schema), what the model is shown.
        answers: the possible answers, one `{name: {param: [values]}}` per expected call; None where the
            category has none (irrelevance, relevance).
    """

    id: str
    category: str
    messages: tuple[Message, ...]
    functions: tuple[dict[str, Any], ...]
    tools: tuple[ToolDefinition, ...]
    answers: tuple[dict[str, Any], ...] | None


def bfcl_data_dir() -> Path:
    """The data folder of the installed `bfcl-eval` package.

    Raises:
        UserError: the package is not installed.
    """
    if importlib.util.find_spec("bfcl_eval") is None:
        raise UserError(
            "the BFCL data come with the bfcl-eval package: pip install mmagent[eval] "
            "(or pip install --no-deps bfcl-eval), or pass --data FOLDER"
        )
    return Path(str(importlib.resources.files("bfcl_eval") / "data"))


def bfcl_version() -> str:
    """The installed bfcl-eval version, or `unknown`."""
    try:
        return importlib.metadata.version("bfcl-eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_bfcl(
    categories: Sequence[str] = BFCL_CATEGORIES,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[BfclCase]:
    """Read BFCL v4 cases, category by category.

    Args:
        categories: names from `BFCL_CATEGORIES`.
        data_dir: a folder laid out as bfcl-eval's `data/` (`BFCL_v4_<file>.json`, `possible_answer/`);
            by default the installed package's.
        limit: at most this many cases per category: a sample drawn with `seed`, kept in BFCL's order.
        seed: the sample's seed (the same seed and data give the same cases).

    Raises:
        UserError: an unknown category, a missing file, or an entry that is not BFCL's format (the message
            names the file and line).
    """
    unknown = [c for c in categories if c not in BFCL_CATEGORIES]
    if unknown:
        raise UserError(f"unknown BFCL categories {unknown}: choose from {', '.join(BFCL_CATEGORIES)}")
    if limit is not None and limit < 1:
        raise UserError(f"the limit must be at least 1, got {limit}")
    root = Path(data_dir) if data_dir is not None else bfcl_data_dir()
    cases: list[BfclCase] = []
    for category in categories:
        entries = _read_lines(root / f"BFCL_v4_{_FILES.get(category, category)}.json")
        if limit is not None and len(entries) > limit:
            keep = sorted(random.Random(f"{seed}:{category}").sample(range(len(entries)), limit))
            entries = [entries[i] for i in keep]
        answers: dict[str, list[Any]] = {}
        if category not in _NO_ANSWERS:
            path = root / "possible_answer" / f"BFCL_v4_{_FILES.get(category, category)}.json"
            for where, entry in _read_lines(path):
                answers[_field(entry, "id", str, where)] = _field(entry, "ground_truth", list, where)
        cases.extend(_case(category, where, entry, answers) for where, entry in entries)
    return cases


def _read_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read BFCL data {str(path)!r}: {exc.strerror or exc}") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed BFCL data in {where}: {exc.msg}") from exc
        if not isinstance(entry, dict):
            raise UserError(f"malformed BFCL data in {where}: expected a JSON object")
        entries.append((where, entry))
    return entries


def _field(entry: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind):
        raise UserError(f"malformed BFCL data in {where}: {key!r} should be a {kind.__name__}")
    return value


def _case(category: str, where: str, entry: Mapping[str, Any], answers: Mapping[str, list[Any]]) -> BfclCase:
    case_id = _field(entry, "id", str, where)
    turns = _field(entry, "question", list, where)
    functions = _field(entry, "function", list, where)
    messages: list[Message] = []
    for turn in turns:
        for item in turn if isinstance(turn, list) else [turn]:
            messages.append(_message(item, where))
    if not messages:
        raise UserError(f"malformed BFCL data in {where}: the question has no messages")
    for function in functions:
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise UserError(f"malformed BFCL data in {where}: each function needs a name")
        parameters = function.get("parameters", {})
        if not (isinstance(parameters, dict) and isinstance(parameters.get("properties", {}), dict)):
            raise UserError(f"malformed BFCL data in {where}: {function['name']!r} needs parameters with properties")
    try:
        tools = tuple(to_tool_definition(f) for f in functions)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"malformed BFCL data in {where}: a function doc cannot be read ({exc})") from exc
    expected: tuple[dict[str, Any], ...] | None = None
    if category not in _NO_ANSWERS:
        if case_id not in answers:
            raise UserError(f"malformed BFCL data: no possible answer for {case_id!r} ({where})")
        expected = tuple(answers[case_id])
        if not all(_answer_shape(a) for a in expected):
            raise UserError(
                f"malformed BFCL data: the possible answer for {case_id!r} is not [{{name: {{param: [values]}}}}]"
            )
    return BfclCase(case_id, category, tuple(messages), tuple(functions), tools, expected)


def _answer_shape(answer: Any) -> bool:
    if not (isinstance(answer, dict) and len(answer) == 1):
        return False
    params = next(iter(answer.values()))
    return isinstance(params, dict) and all(isinstance(v, list) for v in params.values())


def _message(item: Any, where: str) -> Message:
    if not (isinstance(item, dict) and isinstance(item.get("content"), str)):
        raise UserError(f"malformed BFCL data in {where}: each message needs a role and text content")
    role, text = item.get("role"), item["content"]
    if role == "system":
        return Message.system(text)
    if role == "assistant":
        return Message.assistant(text)
    if role == "user":
        return Message.user(text or " ")
    raise UserError(f"malformed BFCL data in {where}: unknown role {role!r}")


# ------------------------------------------------------------------ schema conversion

# BFCL's type names to JSON Schema's (bfcl_eval's GORILLA_TO_OPENAPI, for the Python dialect); others: string.
_JSON_TYPES = {
    "integer": "integer",
    "float": "number",
    "number": "number",
    "string": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
    "any": "string",  # BFCL's checker reads `any` as a Python str
}
_KEPT = (
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
)
_INTEGER = re.compile(r"[+-]?\d+")


def to_tool_definition(function: Mapping[str, Any]) -> ToolDefinition:
    """A BFCL function doc as a `ToolDefinition` whose parameters are JSON Schema.

    The description gets BFCL's note that the function is Python 3; parameters are converted by
    `to_json_schema`.
    """
    parameters = function.get("parameters") or {}
    schema = to_json_schema({**parameters, "type": "dict"})
    return ToolDefinition(
        name=function["name"], description=str(function.get("description") or "") + _PYTHON_HINT, parameters=schema
    )


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """One BFCL parameter schema as JSON Schema.

    * types: `dict` -> `object`, `float` -> `number` (with BFCL's "This is a float type value." appended to the
      description), `tuple` -> `array`, `any` -> `string` (the checker accepts only strings for it), unknown ->
      `string`; nested `properties` and `items` converted the same way.
    * `enum` values are coerced to the declared type where they can be (`"1"` for an integer, `"True"` for a
      boolean); values that cannot (`"dontcare"` for an integer) are offered as strings beside the typed
      values (`anyOf`), which BFCL's checker accepts when the possible answers are strings. An `enum` on an
      array lists its items' values, so it moves to `items`.
    * a `default` is a value the function takes: it is coerced like an enum value, and one outside the enum or
      the type (`"dontcare"` for an integer) is offered beside them the same way; a default that is not a scalar
      and does not fit moves into the description.
    * `optional` (not JSON Schema) is dropped, as is anything else outside the keywords kept in `_KEPT`.
    """
    declared = str(node.get("type", "string"))
    kind = _JSON_TYPES.get(declared, "string")
    out: dict[str, Any] = {"type": kind}
    description = str(node.get("description") or "")
    if declared == "float":
        description += " This is a float type value."
    if kind == "object" and isinstance(node.get("properties"), Mapping):
        properties = {str(k): to_json_schema(v) for k, v in node["properties"].items() if isinstance(v, Mapping)}
        out["properties"] = properties
        required = [r for r in node.get("required") or () if r in properties]
        if required:
            out["required"] = required
    if kind == "array":
        items = node.get("items")
        out["items"] = to_json_schema(items) if isinstance(items, Mapping) else {}
        if isinstance(node.get("enum"), list) and "enum" not in out["items"] and out["items"]:
            out["items"] = _with_enum(out["items"], node["enum"])
    for key in _KEPT:
        if key in node:
            out[key] = copy.deepcopy(node[key])
    default = node.get("default", _MISSING)
    if default is not _MISSING:
        typed = _coerce(default, kind)
        if default is not None and typed is not _MISSING:
            out["default"] = copy.deepcopy(typed)
        else:
            description += f" Default: {json.dumps(default, ensure_ascii=False)}."
    if kind not in ("array", "object"):
        offered = list(node["enum"]) if isinstance(node.get("enum"), list) else None
        if _scalar(default):  # a default is a value the function takes, so it is offered too
            if offered is not None and default not in offered:
                offered.append(default)
            elif offered is None and _coerce(default, kind) is _MISSING:
                offered = [default]
        if offered is not None:
            out = _with_enum(out, offered)
    if description:
        out["description"] = description.strip()
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _with_enum(schema: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    kind = schema.get("type")
    typed: list[Any] = []
    others: list[Any] = []
    for value in values:
        coerced = _coerce(value, kind)
        (others if coerced is _MISSING else typed).append(value if coerced is _MISSING else coerced)
    if not others:
        return {**schema, "enum": typed}
    strings = [v if isinstance(v, str) else json.dumps(v) for v in others]
    typed_branch = {"type": kind, "enum": typed} if typed else {"type": kind}
    description = schema.get("description")
    rest = {k: v for k, v in schema.items() if k not in ("type", "description", "default")}
    merged: dict[str, Any] = {"anyOf": [{**typed_branch, **rest}, {"type": "string", "enum": strings}]}
    if description:
        merged["description"] = description
    return merged


_MISSING = object()


def _coerce(value: Any, kind: Any) -> Any:
    """`value` as a JSON value of `kind`, or `_MISSING`."""
    if kind == "string":
        return value if isinstance(value, str) else (json.dumps(value) if _scalar(value) else _MISSING)
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return _MISSING
    if kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value)
        return _MISSING
    if kind == "number":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return _MISSING
            return number if math.isfinite(number) else _MISSING
        return _MISSING
    return value if _fits(value, kind) else _MISSING


def _fits(value: Any, kind: str) -> bool:
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    return checks.get(kind, lambda v: False)(value)


# ------------------------------------------------------------------ running


@dataclass(frozen=True, slots=True)
class BfclResult:
    """One case's outcome.

    Attributes:
        id: the case's BFCL id.
        category: its category.
        ok: the checker's verdict.
        reason: why not (empty when ok).
        kind: the checker's failure tag (see `agent.evals.Verdict`).
        calls: the calls made, as BFCL writes them: `[{name: arguments}, ...]`.
        text: the model's text besides the calls.
        parse_errors: what the backend could not read as calls.
        seconds: the request's wall time.
        steered: how many output tokens the grammar chose rather than the model (`ModelResponse.steered_tokens`;
            None when decoding was not constrained).
        reused: not asked again: taken from a constrained run where the grammar steered nothing (see `run_bfcl`).
    """

    id: str
    category: str
    ok: bool
    reason: str
    kind: str
    calls: list[dict[str, Any]]
    text: str = ""
    parse_errors: tuple[str, ...] = ()
    seconds: float = 0.0
    steered: int | None = None
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        extra = {"steered": self.steered} if self.steered is not None else {}
        return {
            "id": self.id,
            "category": self.category,
            "ok": self.ok,
            "reason": self.reason,
            "kind": self.kind,
            "calls": self.calls,
            "text": self.text,
            "parse_errors": list(self.parse_errors),
            "seconds": round(self.seconds, 3),
            **extra,
            **({"reused": True} if self.reused else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BfclResult:
        """The result `to_json` wrote.

        Raises:
            KeyError, TypeError, ValueError: `data` is not such a result.
        """
        calls = data["calls"]
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise TypeError("calls must be a list of objects")
        steered = data.get("steered")
        return cls(str(data["id"]), str(data["category"]), bool(data["ok"]), str(data["reason"]), str(data["kind"]),
                   calls, str(data.get("text", "")), tuple(str(e) for e in data.get("parse_errors", ())),
                   float(data.get("seconds", 0.0)), None if steered is None else int(steered),
                   bool(data.get("reused", False)))  # fmt: skip


@dataclass(slots=True)
class BfclRun:
    """One pass over the cases in one mode.

    Attributes:
        mode: `constrained`, `unconstrained`, or `default` for a model without that switch.
        model: the model's name.
        results: per case, in order.
        seconds: the whole pass's wall time.
    """

    mode: str
    model: str
    results: list[BfclResult] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, tuple[int, int]]:
        """(right, total) per category, in the order categories first appear."""
        counts: dict[str, tuple[int, int]] = {}
        for r in self.results:
            right, total = counts.get(r.category, (0, 0))
            counts[r.category] = (right + r.ok, total + 1)
        return counts

    def accuracy(self) -> dict[str, float]:
        """Right / total per category."""
        return {c: right / total for c, (right, total) in self.counts().items()}

    @property
    def overall(self) -> float:
        """Right / total over every case (0.0 for no cases)."""
        return sum(r.ok for r in self.results) / len(self.results) if self.results else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "model": self.model,
            "overall": self.overall,
            "accuracy": self.accuracy(),
            "counts": {c: {"right": right, "total": total} for c, (right, total) in self.counts().items()},
            "seconds": round(self.seconds, 1),
            "cases": [r.to_json() for r in self.results],
        }


async def run_bfcl(
    model: Model,
    cases: Sequence[BfclCase],
    *,
    mode: str = "default",
    settings: ModelSettings | None = None,
    progress: Callable[[BfclResult], None] | None = None,
    journal: str | Path | None = None,
    concurrency: int = 1,
    reuse: Mapping[str, BfclResult] | None = None,
) -> BfclRun:
    """Ask `model` each case once (`Model.request`, `tool_choice="auto"`) and judge its calls.

    A case whose request the model refuses (too long for its context, or a server's 4xx) counts as wrong with
    the reason; other model errors (a server that cannot be reached, a load failure) end the run.

    With a `journal`, each result is appended to that file (JSON lines, flushed to disk) as soon as it is
    judged, and cases it already holds are not asked again: a run stopped at any point (a crash, Ctrl-C,
    kill -9) goes on from where it stopped when called again with the same journal. The journal's first line
    names the model, mode and settings; a journal written under others is refused rather than mixed in.

    Args:
        model: any backend.
        cases: from `load_bfcl`.
        mode: the label stored with the run (see `with_constraint`).
        settings: generation settings; by default `ModelSettings(tool_choice="auto", max_tokens=512)`.
        progress: called with each result as it comes (results taken from the journal first, in case order).
        journal: a file to resume from and write to (created if missing).
        concurrency: requests in flight at once. A server that batches (vLLM, `mmagent serve` in model mode on
            a GPU) answers them together; an in-process model answers one at a time whatever this is. Results
            are still reported in case order; `progress` and the journal see them as they finish.
        reuse: for an unconstrained pass at temperature 0, the same model's constrained results with the same
            settings, by case id. A case whose constrained result says the grammar steered no token
            (`steered == 0`) is not asked again: free greedy decoding writes the same tokens, so its result is
            that one, marked `reused`. On a small model most answers are text the grammar never touches, which
            halves the cost of comparing the two modes.

    Raises:
        UserError: the journal was written by another model, mode or settings, or cannot be read or written;
            `concurrency` is below 1; `reuse` with a temperature above 0.
    """
    if concurrency < 1:
        raise UserError(f"concurrency must be at least 1, got {concurrency}")
    settings = settings or ModelSettings(tool_choice="auto", max_tokens=512)
    if reuse and settings.temperature > 0:
        raise UserError("reuse needs greedy decoding (temperature 0): sampled outputs differ from run to run")
    run = BfclRun(mode=mode, model=model.name)
    book = _Journal(Path(journal), model.name, mode, settings) if journal is not None else None
    done = book.load() if book is not None else {}
    resumed = [r for r in (done.get((case.id, _digest(case))) for case in cases) if r is not None] if done else []
    for result in resumed:
        if progress is not None:
            progress(result)
    started = time.perf_counter()
    results: dict[str, BfclResult] = {r.id: r for r in resumed}
    slots = asyncio.Semaphore(concurrency)

    async def ask(case: BfclCase) -> None:
        same = (reuse or {}).get(case.id)
        if same is not None and same.steered == 0 and same.category == case.category:
            results[case.id] = result = dataclasses.replace(same, seconds=0.0, steered=None, reused=True)
        else:
            async with slots:
                results[case.id] = result = await _one(model, case, settings)
        if book is not None:
            book.append(case, result)
        if progress is not None:
            progress(result)

    try:
        async with asyncio.TaskGroup() as group:  # a run-ending error cancels the rest; the journal keeps what ended
            for case in cases:
                if case.id not in results:
                    group.create_task(ask(case))
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    finally:
        if book is not None:
            book.close()
    run.results = [results[case.id] for case in cases]
    run.seconds = time.perf_counter() - started + sum(r.seconds for r in resumed)
    return run


def _digest(case: BfclCase) -> str:
    """What identifies a case's content (a journal's result stands only for the case it was judged on)."""
    content = [case.category, [(m.role, m.text) for m in case.messages], case.functions, case.answers]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Journal:
    """A run's results as JSON lines: a header line, then one `{"case": digest, "result": {...}}` per case."""

    def __init__(self, path: Path, model: str, mode: str, settings: ModelSettings) -> None:
        self.path = path
        self.header = {
            "bfcl_journal": 1,
            "model": model,
            "mode": mode,
            "settings": {k: getattr(settings, k) for k in _JOURNAL_SETTINGS},
        }
        self._file: Any = None

    def load(self) -> dict[tuple[str, str], BfclResult]:
        """The results already judged, by (case id, digest); creates the journal when there is none."""
        try:
            raw = self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            raise UserError(f"cannot read the journal {str(self.path)!r}: {exc.strerror or exc}") from None
        if not raw.strip() or b"\n" not in raw:  # a new journal, or one killed while writing its header
            self._open("w")
            self._write(self.header)
            return {}
        lines = raw.split(b"\n")
        complete = len(raw) if raw.endswith(b"\n") else len(raw) - len(lines[-1])  # a line cut by a crash
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if header != json.loads(json.dumps(self.header)):
            found = header if isinstance(header, dict) else {}
            raise UserError(
                f"the journal {str(self.path)!r} holds another run (model {found.get('model')!r}, mode "
                f"{found.get('mode')!r}, settings {found.get('settings')}; this one: model {self.header['model']!r}, "
                f"mode {self.header['mode']!r}, settings {self.header['settings']}): remove it or use another file"
            )
        done: dict[tuple[str, str], BfclResult] = {}
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip() or (number == len(lines) and complete < len(raw)):
                continue
            try:
                entry = json.loads(line)
                result = BfclResult.from_json(entry["result"])
                done[(result.id, str(entry["case"]))] = result
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"the journal {str(self.path)!r} line {number} is not a result: {exc}") from None
        self._open("r+b")
        self._file.truncate(complete)  # drop a cut line so the next one starts clean
        self._file.seek(complete)
        return done

    def append(self, case: BfclCase, result: BfclResult) -> None:
        self._write({"case": _digest(case), "result": result.to_json()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, how: str) -> None:
        try:
            self._file = self.path.open(how if "b" in how else how + "b")
        except OSError as exc:
            raise UserError(f"cannot write the journal {str(self.path)!r}: {exc.strerror or exc}") from None

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())


_JOURNAL_SETTINGS = ("max_tokens", "temperature", "top_p", "seed", "tool_choice", "stop", "parallel_tool_calls")


async def _one(model: Model, case: BfclCase, settings: ModelSettings) -> BfclResult:
    started = time.perf_counter()
    try:
        response = await model.request(case.messages, case.tools, settings)
    except (ContextOverflowError, ModelHTTPError) as exc:
        if isinstance(exc, ModelHTTPError) and not (exc.status_code and 400 <= exc.status_code < 500):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return BfclResult(case.id, case.category, False, f"model error: {message}", "model_error", [])
    seconds = time.perf_counter() - started
    reply = response.message
    calls: list[Call] = [(c.name, c.arguments) for c in reply.tool_calls]
    shown = [{name: dict(arguments)} for name, arguments in calls]
    if response.parse_errors and case.answers is not None:  # BFCL: output that does not decode is wrong
        reason = f"unparsable output: {response.parse_errors[0]}"
        return BfclResult(case.id, case.category, False, reason, "unparsable", shown, reply.text,
                          response.parse_errors, seconds, response.steered_tokens)  # fmt: skip
    verdict = check_calls(case.functions, calls, case.answers, case.category)
    return BfclResult(case.id, case.category, verdict.ok, verdict.reason, verdict.kind, shown, reply.text,
                      response.parse_errors, seconds, response.steered_tokens)  # fmt: skip


@contextlib.contextmanager
def with_constraint(model: Model, constrained: bool | None) -> Iterator[str]:
    """Switch an in-process model's grammar on or off for a block; yields the mode's label.

    `constrained=None`, or a backend without the switch (a server, a test model), leaves the model as it is
    and yields `default`. Without llguidance a constrained model decodes freely (and warns), so the label
    says `unconstrained`.

    Raises:
        ModelError: constrained or unconstrained decoding was asked of a backend without the switch.
    """
    current = getattr(model, "constrained", None)
    grammar = importlib.util.find_spec("llguidance") is not None
    if constrained is None:
        on = isinstance(current, bool) and current and grammar
        yield "default" if not isinstance(current, bool) else ("constrained" if on else "unconstrained")
        return
    if not isinstance(current, bool):
        raise ModelError(
            f"{model.name} has no constrained/unconstrained switch (only in-process models do): "
            "leave out --constrained/--unconstrained/--both"
        )
    model.constrained = constrained  # type: ignore[attr-defined]
    try:
        yield "constrained" if constrained and grammar else "unconstrained"
    finally:
        model.constrained = current  # type: ignore[attr-defined]
