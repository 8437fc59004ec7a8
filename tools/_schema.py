"""Derive a tool's JSON schema and argument validator from a Python signature, with Pydantic's public API."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, PydanticUserError, create_model
from pydantic.fields import FieldInfo

from agent.exceptions import ToolDefinitionError


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """What registration learned from a function."""

    description: str
    parameters: dict[str, Any]
    args_model: type[BaseModel]
    context_param: str | None
    positional: tuple[str, ...]  # parameters that must be passed positionally


def _is_context(annotation: Any) -> bool:
    from tools._context import ToolContext

    origin = typing.get_origin(annotation)
    target = origin if origin is not None else annotation
    return inspect.isclass(target) and issubclass(target, ToolContext)


def _resolve_hints(fn: Callable[..., Any], sig: inspect.Signature, problems: list[str]) -> dict[str, Any]:
    """Type hints per parameter; unresolvable ones are reported by name instead of failing the whole tool."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
        return {p: hints.get(p, Any) for p in sig.parameters}
    except Exception:
        pass
    namespace = dict(getattr(fn, "__globals__", {}))
    resolved: dict[str, Any] = {}
    for pname, param in sig.parameters.items():
        annotation = param.annotation
        if annotation is inspect.Parameter.empty:
            resolved[pname] = Any
            continue
        try:
            resolved[pname] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        except Exception as exc:
            problems.append(
                f"parameter {pname!r}: cannot resolve type {annotation!r} ({exc}); "
                "types used by tools must be importable at module level"
            )
    return resolved


def analyse(fn: Callable[..., Any], name: str, description: str | None) -> SignatureInfo:
    """Build the schema and validator; gather every problem and raise `ToolDefinitionError` once."""
    problems: list[str] = []
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolDefinitionError(name, [f"cannot read the signature of {fn!r}: {exc}"]) from exc
    hints = _resolve_hints(fn, sig, problems)

    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    param_docs = {p.arg_name: p.description for p in doc.params if p.description}
    summary = "\n\n".join(s for s in (doc.short_description, doc.long_description) if s)

    fields: dict[str, Any] = {}
    context_param: str | None = None
    positional: list[str] = []
    for index, (pname, param) in enumerate(sig.parameters.items()):
        if pname not in hints:
            continue  # could not be resolved: already reported
        annotation = hints[pname]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            problems.append(f"parameter {pname!r}: *args/**kwargs cannot be described to a model")
            continue
        if _is_context(annotation):
            if index != 0:
                problems.append(f"parameter {pname!r}: a ToolContext parameter must come first")
            context_param = pname
            continue
        if param.kind == param.POSITIONAL_ONLY:
            positional.append(pname)
        default = ... if param.default is inspect.Parameter.empty else param.default
        info = Field(default=default)
        if pname in param_docs:
            info = Field(default=default, description=param_docs[pname])
        fields[pname] = (annotation, info)
        try:  # check each parameter alone, so the error names it
            create_model("_Check", **{pname: (annotation, FieldInfo.merge_field_infos(info))}).model_json_schema()  # type: ignore[call-overload]
        except (PydanticUserError, TypeError, ValueError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0]
            problems.append(f"parameter {pname!r} of type {annotation!r} has no JSON schema: {first}")
    if problems:
        raise ToolDefinitionError(name, problems)

    args_model = create_model(  # type: ignore[call-overload]
        f"{name}_arguments",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=False),
        **fields,
    )
    schema = args_model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    schema.setdefault("properties", {})
    schema["additionalProperties"] = False
    return SignatureInfo(
        description=description if description is not None else summary,
        parameters=schema,
        args_model=args_model,
        context_param=context_param,
        positional=tuple(positional),
    )
