"""Random tool registries for testing and benchmarking constrained decoding (test support, no torch).

`random_tools(rng)` builds tools the way `tools.tool` does, through Pydantic models, so the schemas are the
ones real registrations produce: scalar types, required and optional parameters with defaults, enums
(`Literal` and `Enum`), nested models (`$defs`/`$ref`), lists of models, `Optional`/unions (`anyOf`),
numeric and string bounds, patterns, formats, maps (`additionalProperties` schemas), tuples
(`prefixItems`), constants, recursive models, and `additionalProperties: false`.
"""

from __future__ import annotations

import datetime
import enum
import random
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from agent.messages import ToolDefinition

__all__ = ["FEATURES", "random_tools"]


class Color(enum.StrEnum):
    """An `Enum` parameter type."""

    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    """A nested model with a pattern and extra keys forbidden."""

    model_config = ConfigDict(extra="forbid")
    street: str
    zip: Annotated[str, Field(pattern=r"^[0-9]{5}$")]


class Point(BaseModel):
    """A nested model that allows extra keys (no `additionalProperties` in its schema)."""

    x: float
    y: float
    label: str | None = None


class Tree(BaseModel):
    """A recursive model."""

    value: int
    children: list[Tree] = []


_SCALARS: list[tuple[str, Any]] = [
    ("int", int),
    ("float", float),
    ("str", str),
    ("bool", bool),
]

FEATURES: dict[str, list[Any]] = {
    "scalar": [t for _, t in _SCALARS],
    "enum": [Literal["fast", "slow", "auto"], Color],
    "const": [Literal["only"]],
    "nested": [Address, Point],
    "list": [list[int], list[str], list[Address], Annotated[list[int], Field(min_length=1, max_length=3)]],
    "optional": [int | None, str | None, Address | None, Union[int, str]],  # noqa: UP007
    "int_bounds": [Annotated[int, Field(ge=-3, le=40)], Annotated[int, Field(gt=0, lt=1000)]],
    "float_bounds": [Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(gt=-5.5, lt=5.5)]],
    "str_bounds": [Annotated[str, Field(min_length=2, max_length=8)], Annotated[str, Field(max_length=4)]],
    "pattern": [Annotated[str, Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")], Annotated[str, Field(pattern=r"^[a-z]+$")]],
    "format": [datetime.date, uuid.UUID],
    "map": [dict[str, int], dict[str, bool]],
    "tuple": [tuple[int, str]],
    "recursive": [Tree],
}

_NAMES = ["query", "count", "path", "limit", "mode", "target", "items", "options", "value", "when", "owner", "tags"]


def _default_for(rng: random.Random, kind: str, annotation: Any) -> Any:
    """A default valid for `annotation`, or `...` (required)."""
    if rng.random() < 0.6:
        return ...
    if kind == "optional":
        return None
    if annotation is int:
        return 0
    if annotation is str:
        return ""
    if annotation is bool:
        return False
    if kind == "list":
        return [] if "min_length" not in str(annotation) else [1]
    return ...


def random_model(rng: random.Random, name: str, *, max_fields: int = 4) -> type[BaseModel]:
    """A Pydantic model whose fields draw from `FEATURES` (extra keys forbidden)."""
    fields: dict[str, Any] = {}
    for pname in rng.sample(_NAMES, rng.randint(1, max_fields)):
        kind = rng.choice(list(FEATURES))
        annotation = rng.choice(FEATURES[kind])
        fields[pname] = (annotation, _default_for(rng, kind, annotation))
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        name, __config__=ConfigDict(extra="forbid"), **fields
    )
    return model


def random_tool(rng: random.Random, name: str, *, max_params: int = 4) -> ToolDefinition:
    """One tool whose parameters draw from `FEATURES`."""
    model = random_model(rng, f"{name}_arguments", max_fields=max_params)
    schema = model.model_json_schema()
    schema.pop("title", None)
    schema["additionalProperties"] = False
    return ToolDefinition(name=name, description=f"random tool {name}", parameters=schema)


def random_tools(rng: random.Random, *, max_tools: int = 3, max_params: int = 4) -> list[ToolDefinition]:
    """A registry of 1..`max_tools` random tools with distinct names."""
    count = rng.randint(1, max_tools)
    return [random_tool(rng, f"tool_{i}_{rng.randrange(1000)}", max_params=max_params) for i in range(count)]
