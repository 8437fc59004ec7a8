"""Tools, the `@tool` decorator and the `Registry` that validates and runs model calls.

Whatever a tool does, the run goes on: an exception of any kind (`SystemExit`, `KeyboardInterrupt`,
`StopIteration`, a `CancelledError` of the tool's own, an exception whose message cannot be read), a call
past its timeout, a value that cannot become a result, all go back to the model as a retry request or an
error result. Only the cancellation of the awaiting task by its owner is passed on.

Timeouts: every call has one, `DEFAULT_TIMEOUT` (60 s) unless the tool (`@tool(timeout=...)`) or the
registry (`Registry(default_timeout=...)`) says otherwise; `math.inf` means no timeout. A call past its
timeout is abandoned, not awaited: an async tool's task is cancelled and left to finish on its own (even
one that ignores the cancellation), a sync tool's thread is left running. Sync tools run in daemon worker
threads that nothing joins, so neither the event loop's shutdown (`asyncio.run`, `Agent.run_sync`) nor
the interpreter's exit waits for a call that was given up on. A result that arrives after the timeout (an
async tool that blocked the event loop) counts as a timeout too.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
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
    replace_surrogates,
)
from tools._context import ToolContext
from tools._schema import analyse

log = logging.getLogger("mmagent.tools")

F = TypeVar("F", bound=Callable[..., Any])
ContentPart = TextPart | ImagePart | AudioPart

_ATTR = "__mmagent_tool__"
_NAME = re.compile(r"[\w.\-/]{1,128}")  # MCP's tool names (and any letter, as before)
_MAX_ERRORS = 3
_MAX_REPR = 80

DEFAULT_TIMEOUT = 60.0
"""Seconds a tool call may take when neither the tool nor the registry sets a timeout."""


@dataclass(frozen=True, slots=True)
class Deny:
    """Returned by an approval callback to refuse a call; `reason` is shown to the model."""

    reason: str = "the user denied this call"


ApprovalResult = bool | Deny
Approver = Callable[[ToolCallPart, ToolContext], ApprovalResult | Awaitable[ApprovalResult]]


@dataclass(slots=True)
class Tool:
    """A callable the model may use, with its schema and run-time limits.

    Build one with `@tool`, `Tool.from_function` or `Tool.from_schema`. `timeout` is in seconds: None
    takes the registry's default (`DEFAULT_TIMEOUT`, 60 s, unless `Registry(default_timeout=...)`), and
    `math.inf` means no timeout.
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
        if not _NAME.fullmatch(self.name):
            raise ToolDefinitionError(self.name, ["names are 1-128 letters, digits, '_', '-', '.' or '/' (as MCP's)"])
        try:
            cls = jsonschema.validators.validator_for(self.parameters, default=jsonschema.Draft202012Validator)
            cls.check_schema(self.parameters)
        except SchemaError as exc:
            raise ToolDefinitionError(self.name, [f"invalid JSON schema: {exc.message}"]) from exc
        if self.parameters.get("type", "object") != "object":
            raise ToolDefinitionError(self.name, ["the parameters schema must describe an object"])
        if self.timeout is not None and not self.timeout > 0:
            raise ToolDefinitionError(self.name, [f"timeout must be positive (math.inf: none), got {self.timeout}"])
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
        context: bool = False,
    ) -> Tool:
        """Wrap a callable taking keyword arguments described by an existing JSON schema (with `context`, a
        `ToolContext` first)."""
        return cls(
            name=name,
            description=description,
            parameters=dict(parameters),
            function=function,
            timeout=timeout,
            retries=retries,
            requires_approval=requires_approval,
            _context_param="ctx" if context else None,
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
        """Call the function with validated arguments (sync functions in a worker thread), within the timeout.

        The timeout is the tool's own, else `DEFAULT_TIMEOUT` (a `Registry` applies its `default_timeout`).

        Raises:
            TimeoutError: the call took longer; it is abandoned, not awaited (see the module docstring).
            BaseException: whatever the function raised.
        """
        limit = self.timeout if self.timeout is not None else DEFAULT_TIMEOUT
        value, error = await self._call(arguments, ctx, limit)
        if error is not None:
            raise error
        return value

    async def _call(self, arguments: dict[str, Any], ctx: ToolContext, limit: float) -> _Outcome:
        """`(value, None)`, or `(None, error)` for anything the function raised, whatever its class.

        Raises:
            TimeoutError: the call took longer than `limit` seconds and was abandoned.
            asyncio.CancelledError: only when the awaiting task itself is cancelled (the call is abandoned).
        """
        args: list[Any] = []
        kwargs = dict(arguments)
        if self._context_param is not None:
            args.append(ctx)
        args.extend(kwargs.pop(p) for p in self._positional if p in kwargs)
        loop = asyncio.get_running_loop()
        if self._is_async:
            pending: asyncio.Future[_Outcome] = loop.create_task(_boxed(self.function, args, kwargs))
        else:
            pending = _WORKERS.submit(loop, functools.partial(self.function, *args, **kwargs))
        return await _settle(pending, limit)


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
        timeout: seconds before the call is abandoned and the model told so (default: the registry's,
            `DEFAULT_TIMEOUT` = 60 s unless set there; `math.inf`: no timeout).
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
    """The tools an agent may call, by name.

    Args:
        tools: functions (plain or `@tool`) and `Tool` objects.
        default_timeout: seconds allowed to a call of a tool that sets no timeout of its own (`math.inf`:
            none). A call past its timeout is abandoned and the model told so.
    """

    def __init__(
        self, tools: Iterable[Tool | Callable[..., Any]] = (), *, default_timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if not default_timeout > 0:
            raise UserError(f"default_timeout must be positive (math.inf: none), got {default_timeout}")
        self.default_timeout = default_timeout
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

        Returns a `ToolResultPart` for a result (or a denied approval, or a value that cannot become a
        result) and a `RetryPart` for invalid arguments, an unknown tool, `ModelRetry`, a timeout or an
        exception of any class inside the tool. Only the cancellation of the awaiting task is raised.
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
        timeout = t.timeout if t.timeout is not None else self.default_timeout
        try:
            value, error = await t._call(arguments, ctx, timeout)
        except TimeoutError:
            return _retry(call, f"the tool timed out after {timeout:g} s")
        if isinstance(error, ModelRetry):
            return _retry(call, _message(error))
        if error is not None:
            log.warning("tool %s failed: %s", call.name, _describe(error), exc_info=error)
            return _retry(call, f"the tool failed: {_describe(error)}")
        try:
            content = to_content(value)
        except BaseException as exc:  # the value's own methods (save, isoformat, ...) are the tool's code
            if _owner_cancelled(exc):
                raise
            text = _message(exc) if isinstance(exc, UserError) else _describe(exc)
            return _result(call, (TextPart(text=f"the tool returned an unusable value: {text}"),), is_error=True)
        return _result(call, content)


def _result(call: ToolCallPart, content: tuple[ContentPart, ...], *, is_error: bool = False) -> ToolResultPart:
    return ToolResultPart(call_id=call.id, name=call.name, content=content, is_error=is_error)


def _retry(call: ToolCallPart, message: str) -> RetryPart:
    return RetryPart(message=replace_surrogates(message), call_id=call.id, name=call.name)


def _describe(error: BaseException) -> str:
    """`Class: message` for the model, even when the exception's `__str__` fails or holds invalid UTF-8."""
    name = type(error).__name__
    try:
        text = str(error)
    except BaseException:  # the tool's code; whatever it raises, the run goes on
        return f"{name} (its message could not be read)"
    return f"{name}: {replace_surrogates(text)}" if text else name


def _message(error: ModelRetry | UserError) -> str:
    try:
        return replace_surrogates(str(error.message if isinstance(error, ModelRetry) else error))
    except BaseException:  # a subclass's message is the tool's code
        return f"{type(error).__name__} (its message could not be read)"


# ---------------------------------------------------------------- running calls

_Outcome = tuple[Any, BaseException | None]
_abandoned: set[asyncio.Future[_Outcome]] = set()  # tasks given up on, kept alive until they finish


def _owner_cancelled(error: BaseException) -> bool:
    """Is `error` the cancellation of the running task by its owner (not a CancelledError some code raised)?"""
    if not isinstance(error, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _boxed(function: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> _Outcome:
    """Run an async tool in its own task; what it raises becomes a value (a Task would re-raise `SystemExit`
    and `KeyboardInterrupt` out of the event loop)."""
    try:
        coroutine: Coroutine[Any, Any, Any] = function(*args, **kwargs)
        return await coroutine, None
    except BaseException as exc:  # SystemExit, StopIteration, ... are the tool's outcome
        if _owner_cancelled(exc):  # cancelled by `_settle` (a timeout) or the loop's shutdown: end as cancelled
            raise
        return None, exc


async def _settle(pending: asyncio.Future[_Outcome], limit: float) -> _Outcome:
    """The outcome of `pending` within `limit` seconds; past it, or when cancelled, `pending` is abandoned.

    Waits on a future of its own, not on `pending`: cancelling a task that awaits a task cancels and waits for
    that task too, which a tool ignoring cancellation would turn into a hang.
    """
    start = time.monotonic()
    if not pending.done():
        waiter = asyncio.get_running_loop().create_future()
        wake = functools.partial(_wake, waiter)
        pending.add_done_callback(wake)
        timer = None if limit == math.inf else waiter.get_loop().call_later(limit, wake, None)
        try:
            await waiter
        except asyncio.CancelledError:
            _abandon(pending)
            raise
        finally:
            pending.remove_done_callback(wake)
            if timer is not None:
                timer.cancel()
    if not pending.done() or time.monotonic() - start > limit:  # late: an async tool blocked the event loop
        _abandon(pending)
        raise TimeoutError
    if pending.cancelled():  # the tool cancelled its own task: its failure, not the caller's cancellation
        return None, asyncio.CancelledError("the tool's task was cancelled")
    return pending.result()


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _abandon(pending: asyncio.Future[_Outcome]) -> None:
    if pending.done():
        _report_late(pending)
        return
    pending.cancel()  # a thread's future: its result is dropped; a task: cancelled, and may ignore it
    if isinstance(pending, asyncio.Task):
        _abandoned.add(pending)
        pending.add_done_callback(_report_late)


def _report_late(pending: asyncio.Future[_Outcome]) -> None:
    _abandoned.discard(pending)
    if not pending.cancelled():
        _log_abandoned(pending.result())


def _log_abandoned(outcome: _Outcome) -> None:
    if outcome[1] is not None:
        log.warning("an abandoned tool call ended with %s", _describe(outcome[1]))


class _Workers:
    """Daemon threads for sync tools: reused while busy ones stay free to be abandoned.

    Unlike `asyncio.to_thread` (the loop's default executor, joined by `asyncio.run` on shutdown and by the
    interpreter at exit), nothing waits for these threads. A call that is abandoned keeps its thread until
    it returns; new calls start new threads meanwhile. Idle threads end after `idle_s` seconds. A forked
    child starts with no threads, so it starts with an empty pool too.
    """

    def __init__(self, idle_s: float = 60.0) -> None:
        self._idle_s = idle_s
        self._names = itertools.count()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[_Outcome], Any]] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Semaphore(0)  # one count per thread waiting for a job

    def submit(self, loop: asyncio.AbstractEventLoop, function: Callable[[], Any]) -> asyncio.Future[_Outcome]:
        future: asyncio.Future[_Outcome] = loop.create_future()
        self._jobs.put((loop, future, functools.partial(contextvars.copy_context().run, function)))
        if not self._idle.acquire(blocking=False):
            name = f"mmagent-tool-{next(self._names)}"
            threading.Thread(target=self._work, name=name, daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            try:
                loop, future, function = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                if self._idle.acquire(blocking=False):  # no submitter counts on this thread: leave
                    return
                continue
            try:
                outcome: _Outcome = (function(), None)
            except BaseException as exc:  # StopIteration, SystemExit... are the tool's outcome
                outcome = (None, exc)
            del function
            try:
                loop.call_soon_threadsafe(_deliver, future, outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                _log_abandoned(outcome)
            del loop, future, outcome
            self._idle.release()


def _deliver(future: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    if future.done():  # abandoned after a timeout
        _log_abandoned(outcome)
    else:
        future.set_result(outcome)


_WORKERS = _Workers()


def to_content(value: Any) -> tuple[ContentPart, ...]:
    """Turn a tool's return value into result parts: text, JSON text, images and audio.

    A tool's output is not the caller's input: lone surrogates in its text become U+FFFD, and the bytes and
    PIL images it returns pass the media gate (`agent._media`). Parts it returns are kept as they are, like
    parts passed to `Message.user`: whoever builds an `ImagePart` around raw bytes vouches for them.

    Raises:
        UserError: the value cannot become a result (`MediaError` for media refused by the gate).
    """
    if isinstance(value, TextPart | ImagePart | AudioPart):
        return (value,)
    if isinstance(value, str):
        return (TextPart(text=replace_surrogates(value)),)
    if isinstance(value, BaseModel):
        return (TextPart(text=replace_surrogates(_dump_model(value))),)
    if isinstance(value, bytes | bytearray | memoryview):
        media_type = _media.sniff_media_type(bytes(value)) or ""
        if media_type.startswith("image/"):
            return (as_image_part(value),)
        if media_type.startswith("audio/"):
            return (as_audio_part(value),)
        raise UserError(f"{len(value)} bytes of unknown format (not an image or audio clip)")
    if hasattr(value, "save") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return (ImagePart.from_pil(value),)
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, TextPart | ImagePart | AudioPart) for v in value)
    ):
        return tuple(value)  # parts, as a tool built on other tools returns them
    if isinstance(value, list | tuple) and value and any(_is_media(v) for v in value):
        return tuple(p for v in value for p in to_content(v))
    try:
        text = json.dumps(value, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UserError(f"cannot turn {type(value).__name__} into a tool result: {_describe(exc)}") from exc
    return (TextPart(text=replace_surrogates(text)),)


def _dump_model(value: BaseModel) -> str:
    try:
        return value.model_dump_json()
    except ValueError:  # pydantic-core refuses to encode lone surrogates; the json module keeps them
        return json.dumps(value.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))


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
