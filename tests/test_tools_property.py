"""Property tests: random tool signatures, random JSON arguments.

The registry must (1) never raise anything but `ToolArgumentsError` on arbitrary JSON and (2) accept every
value its own published schema admits.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import json
from typing import Annotated, Any, Literal, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, create_model

from tools import Tool, ToolArgumentsError

_names = itertools.count()


class Shade(enum.Enum):
    LIGHT = "light"
    DARK = "dark"


LEAVES: list[Any] = [
    int,
    float,
    str,
    bool,
    Shade,
    Literal["a", "b", "c"],
    Literal[1, 2, 3],
    Annotated[int, Field(ge=-5, le=5)],
    Annotated[float, Field(gt=0, lt=1)],
    Annotated[str, Field(min_length=1, max_length=4)],
]


def _types(depth: int) -> st.SearchStrategy[Any]:
    leaf = st.sampled_from(LEAVES)
    if depth == 0:
        return leaf
    inner = _types(depth - 1)
    return st.one_of(
        leaf,
        inner.map(lambda t: list[t]),  # type: ignore[valid-type]
        inner.map(lambda t: dict[str, t]),  # type: ignore[valid-type]
        inner.map(lambda t: Optional[t]),  # noqa: UP045
        st.lists(inner, min_size=1, max_size=3).map(_model),
    )


def _model(field_types: list[Any]) -> type[BaseModel]:
    fields = {f"f{i}": (t, ...) for i, t in enumerate(field_types)}
    return create_model(f"M{next(_names)}", **fields)  # type: ignore[call-overload,no-any-return]


@st.composite
def tools(draw: st.DrawFn) -> Tool:
    count = draw(st.integers(min_value=0, max_value=4))
    params = []
    for i in range(count):
        annotation = draw(_types(2))
        optional = draw(st.booleans()) and i >= count - 2
        params.append(
            inspect.Parameter(
                f"p{i}",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Optional[annotation] if optional else annotation,  # noqa: UP045
                default=None if optional else inspect.Parameter.empty,
            )
        )

    def fn(**kwargs: Any) -> Any:
        return kwargs

    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return Tool.from_function(fn, name=f"tool{next(_names)}")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tool=tools(), data=st.data())
def test_arbitrary_json_raises_only_the_documented_error(tool: Tool, data: st.DataObject) -> None:
    names = list(tool.parameters["properties"])
    keys = st.sampled_from(names) | st.text(max_size=3) if names else st.text(max_size=3)
    arguments = data.draw(st.one_of(JSON, st.dictionaries(keys, JSON, max_size=5)))
    try:
        tool.validate(arguments)
    except ToolArgumentsError as exc:
        assert exc.message  # noqa: PT017 and exc.tool_name == tool.name


def from_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values admitted by `schema`, for the JSON Schema subset Pydantic emits (written from the schema alone)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        return from_schema(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
            max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
            allow_infinity=False,
        ) | (
            st.integers(-(10**6), 10**6)
            if "minimum" not in schema and "exclusiveMinimum" not in schema
            else st.nothing()
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 8))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root), max_size=3)
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties", True)
        fixed = st.fixed_dictionaries(
            {k: from_schema(v, root) for k, v in props.items() if k in required},
            optional={k: from_schema(v, root) for k, v in props.items() if k not in required},
        )
        if isinstance(extra, dict):
            more = st.dictionaries(
                st.text(max_size=4).filter(lambda k: k not in props), from_schema(extra, root), max_size=2
            )
            return st.tuples(fixed, more).map(lambda pair: {**pair[1], **pair[0]})
        return fixed
    raise AssertionError(f"schema feature not covered by the test generator: {schema}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tool=tools(), data=st.data())
def test_every_value_the_schema_admits_is_accepted(tool: Tool, data: st.DataObject) -> None:
    arguments = data.draw(from_schema(tool.parameters))
    arguments = json.loads(json.dumps(arguments))  # exactly what a model's JSON would decode to
    validated = tool.validate(arguments)
    assert set(validated) == set(tool.parameters["properties"])
    for name, value in arguments.items():  # scalar values come through unchanged (enums by their value)
        got = validated[name]
        got = got.value if isinstance(got, enum.Enum) else got
        if isinstance(value, str | bool) or value is None:
            assert got == value
