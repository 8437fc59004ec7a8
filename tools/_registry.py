"""Tools, the `@tool` decorator and the `Registry` that validates and runs model calls."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import jsonschema
import jsonschema_rs
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ValidationError

from agent import _media
from agent.exceptions import ModelRetry, ToolArgumentsError, ToolDefinitionError, UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolDefinition,
    ToolResultPart,
    as_audio_part,
    as_image_part,
)
from tools._context import ToolContext
from tools._schema import analyse

log = logging.getLogger("mmagent.tools")

F = TypeVar("F", bound=Callable[..., Any])
ContentPart = TextPart | ImagePart | AudioPart

_ATTR = "__mmagent_tool__"
_MAX_ERRORS = 3
_MAX_REPR = 80


@dataclass(frozen=True, slots=True)
class Deny:
    """Returned by an approval callback to refuse a call; `reason` is shown to the model."""

    reason: str = "the user denied this call"


ApprovalResult = bool | Deny
Approver = Callable[[ToolCallPart, ToolContext], ApprovalResult | Awaitable[ApprovalResult]]


@dataclass(slots=True)
class Tool:
    """A callable the model may use, with its schema and run-time limits.

    Build one with `@tool`, `Tool.from_function` or `Tool.from_schema`.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    timeout: float | None = None
    retries: int | None = None
    requires_approval: bool = False
    _args_model: type[BaseModel] | None = field(default=None, repr=False)
    _context_param: str | None = field(default=None, repr=False)
    _positional: tuple[str, ...] = field(default=(), repr=False)
    _validator: Any = field(default=None, repr=False)
    _fast: Any = field(default=None, repr=False)
    _is_async: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r}, parameters={self.parameters!r})"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "a").replace("-", "a").isalnum():
            raise ToolDefinitionError(self.name, ["names may hold only letters, digits, '_' and '-'"])
        try:
            cls = jsonschema.validators.validator_for(self.parameters, default=jsonschema.Draft202012Validator)
            cls.check_schema(self.parameters)
        except SchemaError as exc:
            raise ToolDefinitionError(self.name, [f"invalid JSON schema: {exc.message}"]) from exc
        if self.parameters.get("type", "object") != "object":
            raise ToolDefinitionError(self.name, ["the parameters schema must describe an object"])
        if self.timeout is not None and not self.timeout > 0:
            raise ToolDefinitionError(self.name, [f"timeout must be positive, got {self.timeout}"])
        self._validator = cls(self.parameters)  # detailed messages when a call is invalid
        try:
            self._fast = jsonschema_rs.validator_for(self.parameters)  # the hot path: ~1 us per check
        except (ValueError, jsonschema_rs.ValidationError):
            self._fast = None
        self._is_async = inspect.iscoroutinefunction(self.function)

    @classmethod
    def from_function(
        cls,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        requires_approval: bool = False,
    ) -> Tool:
        """Derive name, description and schema from a function's signature and Google-style docstring."""
        tool_name = name or function.__name__
        info = analyse(function, tool_name, description)
        return cls(
            name=tool_name,
            description=info.description,
            parameters=info.parameters,
            function=function,
            timeout=timeout,
            retries=retries,
            requires_approval=requires_approval,
            _args_model=info.args_model,
            _context_param=info.context_param,
            _positional=info.positional,
        )

    @classmethod
    def from_schema(
        cls,
        name: str,
        parameters: Mapping[str, Any],
        function: Callable[..., Any],
        *,
        description: str = "",
        timeout: float | None = None,
        retries: int | None = None,
        requires_approval: bool = False,
    ) -> Tool:
        """Wrap a callable taking keyword arguments described by an existing JSON schema."""
        return cls(
            name=name,
            description=description,
            parameters=dict(parameters),
            function=function,
            timeout=timeout,
            retries=retries,
            requires_approval=requires_approval,
        )

    @property
    def definition(self) -> ToolDefinition:
        """What the model is shown."""
        return ToolDefinition(name=self.name, description=self.description, parameters=self.parameters)

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check raw model arguments against the schema, then coerce them with Pydantic.

        Raises:
            ToolArgumentsError: with a short message naming each bad argument, for the model.
        """
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(self.name, f"arguments must be a JSON object, got {_short(arguments)}")
        if self._fast is not None and self._fast.is_valid(arguments):
            errors = []
        else:
            errors = list(self._validator.iter_errors(arguments))
        if errors:
            errors.sort(key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
            lines = [_describe_schema_error(e) for e in errors[:_MAX_ERRORS]]
            if len(errors) > _MAX_ERRORS:
                lines.append(f"... and {len(errors) - _MAX_ERRORS} more")
            raise ToolArgumentsError(self.name, "; ".join(lines))
        if self._args_model is None:
            return arguments
        try:
            model = self._args_model.model_validate(arguments)
        except ValidationError as exc:
            lines = [
                f"argument {_loc(err['loc'])}: {err['msg']} (got {_short(err.get('input'))})"
                for err in exc.errors()[:_MAX_ERRORS]
            ]
            raise ToolArgumentsError(self.name, "; ".join(lines)) from None
        return {name: getattr(model, name) for name in type(model).model_fields}

    async def run(self, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        """Call the function with validated arguments (sync functions in a worker thread), within the timeout."""
        args: list[Any] = []
        kwargs = dict(arguments)
        if self._context_param is not None:
            args.append(ctx)
        args.extend(kwargs.pop(p) for p in self._positional if p in kwargs)
        if self._is_async:
            awaitable: Awaitable[Any] = self.function(*args, **kwargs)
        else:
            awaitable = asyncio.to_thread(functools.partial(self.function, *args, **kwargs))
        if self.timeout is None:
            return await awaitable
        return await asyncio.wait_for(awaitable, self.timeout)


@overload
def tool(function: F, /) -> F: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    requires_approval: bool = False,
) -> Callable[[F], F]: ...
def tool(
    function: F | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    requires_approval: bool = False,
) -> F | Callable[[F], F]:
    """Mark a function as a tool. The function stays callable as before; the schema is checked now.

    Args:
        function: the function, when used as a bare `@tool`.
        name: name shown to the model (default: the function's name).
        description: description (default: the docstring's summary).
        timeout: seconds before the call is abandoned and the model told so.
        retries: how many retry requests this tool may cause in one run (default: the agent's).
        requires_approval: ask the agent's approval callback before each call.
    """

    def mark(fn: F) -> F:
        spec = Tool.from_function(
            fn,
            name=name,
            description=description,
            timeout=timeout,
            retries=retries,
            requires_approval=requires_approval,
        )
        setattr(fn, _ATTR, spec)
        return fn

    return mark(function) if function is not None else mark


def as_tool(value: Tool | Callable[..., Any]) -> Tool:
    """A `Tool` from a Tool, a `@tool` function or a plain function."""
    if isinstance(value, Tool):
        return value
    spec = getattr(value, _ATTR, None)
    if isinstance(spec, Tool):
        return spec
    if callable(value):
        return Tool.from_function(value)
    raise UserError(f"cannot use {value!r} as a tool: pass a function or a Tool")


class Registry:
    """The tools an agent may call, by name."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, value: Tool | Callable[..., Any]) -> Tool:
        """Register a tool; a second tool with the same name is an error."""
        t = as_tool(value)
        if t.name in self._tools:
            raise ToolDefinitionError(t.name, ["a tool with this name is already registered"])
        self._tools[t.name] = t
        return t

    def add_openai(
        self, definitions: Sequence[Mapping[str, Any]], functions: Mapping[str, Callable[..., Any]]
    ) -> list[Tool]:
        """Register OpenAI function definitions (or MCP tool listings) with the callables that run them."""
        added = []
        for entry in definitions:
            d = ToolDefinition.from_openai(dict(entry))
            if d.name not in functions:
                raise ToolDefinitionError(d.name, ["no function was given to run this definition"])
            added.append(self.add(Tool.from_schema(d.name, d.parameters, functions[d.name], description=d.description)))
        return added

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Any:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        """The tool called `name`, or None."""
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._tools)

    def definitions(self) -> list[ToolDefinition]:
        """The definitions shown to the model."""
        return [t.definition for t in self._tools.values()]

    def validate(self, name: str, arguments: Any) -> dict[str, Any]:
        """Validate raw arguments for the tool `name`.

        Raises:
            ToolArgumentsError: unknown tool, or arguments that do not match its schema.
        """
        t = self._tools.get(name)
        if t is None:
            raise ToolArgumentsError(name, f"unknown tool {name!r}; available: {', '.join(self._tools) or 'none'}")
        return t.validate(arguments)

    async def execute(
        self, call: ToolCallPart, ctx: ToolContext, approver: Approver | None = None
    ) -> ToolResultPart | RetryPart:
        """Validate and run one call. Never raises for model mistakes or tool failures.

        Returns a `ToolResultPart` for a result (or a denied approval) and a `RetryPart` for invalid
        arguments, an unknown tool, `ModelRetry`, a timeout or an exception inside the tool.
        """
        try:
            arguments = self.validate(call.name, call.arguments)
        except ToolArgumentsError as exc:
            return RetryPart(message=exc.message, call_id=call.id, name=call.name)
        t = self._tools[call.name]
        if t.requires_approval:
            decision: ApprovalResult = Deny("no approval callback is configured")
            if approver is not None:
                decision = approver(call, ctx)  # type: ignore[assignment]
                if inspect.isawaitable(decision):
                    decision = await decision
            if decision is not True:
                reason = decision.reason if isinstance(decision, Deny) else "the user denied this call"
                return _result(call, (TextPart(text=f"Call denied: {reason}"),), is_error=True)
        try:
            value = await t.run(arguments, ctx)
        except ModelRetry as exc:
            return RetryPart(message=exc.message, call_id=call.id, name=call.name)
        except TimeoutError:
            return RetryPart(message=f"the tool timed out after {t.timeout:g} s", call_id=call.id, name=call.name)
        except Exception as exc:
            log.warning("tool %s raised %s", call.name, exc, exc_info=True)
            return RetryPart(message=f"the tool failed: {type(exc).__name__}: {exc}", call_id=call.id, name=call.name)
        try:
            content = to_content(value)
        except UserError as exc:
            return _result(call, (TextPart(text=f"the tool returned an unusable value: {exc}"),), is_error=True)
        return _result(call, content)


def _result(call: ToolCallPart, content: tuple[ContentPart, ...], *, is_error: bool = False) -> ToolResultPart:
    return ToolResultPart(call_id=call.id, name=call.name, content=content, is_error=is_error)


def to_content(value: Any) -> tuple[ContentPart, ...]:
    """Turn a tool's return value into result parts: text, JSON text, images and audio."""
    if isinstance(value, TextPart | ImagePart | AudioPart):
        return (value,)
    if isinstance(value, str):
        return (TextPart(text=value),)
    if isinstance(value, BaseModel):
        return (TextPart(text=value.model_dump_json()),)
    if isinstance(value, bytes | bytearray | memoryview):
        media_type = _media.sniff_media_type(bytes(value)) or ""
        if media_type.startswith("image/"):
            return (as_image_part(value),)
        if media_type.startswith("audio/"):
            return (as_audio_part(value),)
        raise UserError(f"{len(value)} bytes of unknown format (not an image or audio clip)")
    if hasattr(value, "save") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return (ImagePart.from_pil(value),)
    if isinstance(value, list | tuple) and value and any(_is_media(v) for v in value):
        return tuple(p for v in value for p in to_content(v))
    try:
        return (TextPart(text=json.dumps(value, ensure_ascii=False, default=_json_default)),)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot turn {type(value).__name__} into a tool result: {exc}") from exc


def _is_media(value: Any) -> bool:
    return isinstance(value, ImagePart | AudioPart | bytes) or (hasattr(value, "save") and hasattr(value, "mode"))


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _short(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _loc(loc: Sequence[Any]) -> str:
    return "'" + ".".join(str(p) for p in loc) + "'" if loc else "(root)"


def _describe_schema_error(error: jsonschema.ValidationError) -> str:
    where = _loc(list(error.absolute_path))
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        prefix = "" if where == "(root)" else f"in {where}: "
        return f"{prefix}missing required argument '{missing}'"
    if error.validator == "additionalProperties":
        prefix = "" if where == "(root)" else f"in {where}: "
        return f"{prefix}{error.message.replace('Additional properties', 'unexpected arguments')}"
    expected = error.validator_value
    if error.validator in ("type", "enum", "const"):
        return f"argument {where}: expected {error.validator} {_short(expected)}, got {_short(error.instance)}"
    return f"argument {where}: {error.message if len(error.message) < 200 else error.message[:197] + '...'}"
