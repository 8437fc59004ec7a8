"""The agent loop: request -> tool calls (concurrent) -> results -> request, until a final answer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from agent import tracing as _tracing
from agent.events import (
    AgentEvent,
    FinalEvent,
    ModelResponseEvent,
    OutputT,
    PartialOutputEvent,
    RetryEvent,
    RunResult,
    TextDeltaEvent,
    ToolCallEvent,
    ToolProgressEvent,
    ToolResultEvent,
    UsageEvent,
)
from agent.exceptions import (
    ApprovalRequired,
    MaxStepsExceeded,
    MMAgentError,
    RetryBudgetExceeded,
    UsageLimitExceeded,
    UserError,
)
from agent.messages import Message, Part, RetryPart, ToolCallPart, ToolResultPart
from agent.models import Model, ModelResponse, ModelSettings, ResponseFormat, TextDelta, Usage
from agent.protocols import ContextFitter, RunStore
from tools._context import ToolContext
from tools._registry import ApprovalResult, Approver, Deny, Registry, Tool

if TYPE_CHECKING:
    from agent._otel import RunTrace
    from tools.mcp import MCPGroup, MCPTools

__all__ = ["Agent", "UsageLimits"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class UsageLimits:
    """Caps on one run. None means no cap."""

    max_requests: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_total_tokens: int | None = None
    max_tool_calls: int | None = None


@dataclass(slots=True)
class _RunState:
    messages: list[Message]
    first_new: int
    step: int = 0
    usage: Usage = field(default_factory=Usage)
    tool_calls: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None
    conversation_id: str | None = None
    deps: Any = None
    settings: ModelSettings = field(default_factory=ModelSettings)
    pending: list[RetryPart] = field(default_factory=list)  # format errors beside valid calls
    registry: Registry | None = None  # the agent's tools and its MCP servers', for this run
    lease_ttl: float | None = None  # the store's lease on the conversation lasts this long after a renewal
    renewed: float = 0.0  # loop time of the last renewal (a commit or a heartbeat)
    approvals: dict[str, ApprovalResult] = field(default_factory=dict)  # decisions given to `resume`
    trace: RunTrace | None = None  # the run's spans, when agent.tracing is on


_FORMAT_RETRY = "(output format)"
_OUTPUT_RETRY = "(output type)"
_MAX_ERROR = 1500  # characters of a validation error shown to the model
_MAX_PARTIAL = 65536  # characters of a streamed answer re-validated on each delta (beyond: the final event only)


class Agent(Generic[OutputT]):
    """An agent: a model, tools, and the loop that connects them.

    Args:
        model: the backend that answers (`TransformersModel`, `OpenAIModel`, `FunctionModel`, ...).
        tools: functions (plain or `@tool`), `Tool` objects, or a `Registry`.
        system_prompt: instructions sent first in every request.
        max_steps: model requests allowed in one run.
        retries: default retry budget per tool (and for unparsable output) in one run.
        usage_limits: caps on requests and tokens.
        settings: default generation settings.
        approver: called before each call of a tool marked `requires_approval`.
        memory: a `memory.Store` (or any `RunStore`): every step is committed as it completes. A run holds
            its conversation's lease from start to end, so runs on one conversation take turns (see `Store`).
        context: a context policy fitting the history to the model's window before each request.
        mcp: MCP servers (`tools.mcp.MCPTools`) whose tools join the registry; connected for each run, or for
            as long as the agent is entered (`async with agent:`).
        reset_tool_choice: after a step with tool calls, send `tool_choice="auto"` again when the settings
            ask for `required` or a named tool, so a forced first call does not force every later step
            (the run could never end).
        output_type: the type of the final answer (a Pydantic model, a dataclass, `list[int]`, ... anything
            Pydantic's `TypeAdapter` takes); `RunResult.output` is then a validated instance instead of text.
            Every request asks for JSON matching its schema (`ModelSettings.response_format`): in process the
            grammar makes the answer valid by construction, tools still first; over an OpenAI-compatible server
            it is sent as `response_format` json_schema. An answer that does not validate (a backend without
            the constraint) goes back to the model with the error, within the `retries` budget.
        name: what the agent is called in traces (`agent.tracing`) and logs.
    """

    def __init__(
        self,
        model: Model,
        tools: Registry | Iterable[Tool | Callable[..., Any]] = (),
        *,
        system_prompt: str | None = None,
        max_steps: int = 20,
        retries: int = 2,
        usage_limits: UsageLimits | None = None,
        settings: ModelSettings | None = None,
        approver: Approver | None = None,
        memory: RunStore | None = None,
        context: ContextFitter | None = None,
        reset_tool_choice: bool = True,
        mcp: Iterable[MCPTools] = (),
        output_type: type[OutputT] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(model, Model):
            raise UserError(f"model must be an agent.models.Model, got {type(model).__name__}")
        if max_steps < 1:
            raise UserError("max_steps must be at least 1")
        if retries < 0:
            raise UserError("retries cannot be negative")
        self.model = model
        self.registry = tools if isinstance(tools, Registry) else Registry(tools)
        self.system_prompt = system_prompt
        self.max_steps = max_steps
        self.retries = retries
        self.usage_limits = usage_limits or UsageLimits()
        self.settings = settings or ModelSettings()
        self.approver = approver
        self.memory = memory
        self.context = context
        self.reset_tool_choice = reset_tool_choice
        self.output_type = output_type
        self.name = name
        self._output: TypeAdapter[Any] | None = None
        self._output_format: ResponseFormat | None = None
        if output_type is not None:
            try:
                self._output = TypeAdapter(output_type)
                schema = self._output.json_schema()
            except Exception as exc:  # PydanticSchemaGenerationError, PydanticUserError, TypeError ...
                raise UserError(f"output_type {output_type!r} has no JSON schema: {exc}") from exc
            name = getattr(output_type, "__name__", "output")
            self._output_format = ResponseFormat(schema=schema, name=name, strict=True)
        self._call_ids = itertools.count()
        servers = list(mcp)
        self._mcp: MCPGroup | None = None
        if servers:
            from tools.mcp import MCPGroup

            self._mcp = MCPGroup(servers)
        self._entered: contextlib.AsyncExitStack | None = None
        self._depth = 0

    async def __aenter__(self) -> Agent[OutputT]:
        """Keep the MCP servers connected across runs until the block ends (without it, each run connects).
        Blocks may nest: the servers close when the outermost one ends."""
        if self._mcp is not None and self._entered is None:
            stack = contextlib.AsyncExitStack()
            await stack.enter_async_context(self._mcp.opened())
            self._entered = stack
        self._depth += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            stack, self._entered = self._entered, None
            if stack is not None:
                await stack.aclose()

    # ------------------------------------------------------------------ public entry points

    async def run(
        self,
        prompt: str | Message,
        *,
        images: Iterable[Any] = (),
        audio: Iterable[Any] = (),
        history: Sequence[Message] = (),
        conversation_id: str | None = None,
        deps: Any = None,
        settings: ModelSettings | None = None,
        parent_run_id: str | None = None,
    ) -> RunResult[OutputT]:
        """Run until the model answers without calling a tool; return the answer and the transcript.

        Args:
            prompt: the user's text (or a complete user `Message`).
            images: paths, bytes, PIL images or `ImagePart`s sent with the prompt.
            audio: paths, bytes, `(samples, rate)` pairs or `AudioPart`s sent with the prompt.
            history: earlier messages to continue (without a memory store).
            conversation_id: continue this stored conversation (needs `memory`).
            deps: anything tools should receive as `ToolContext.deps`.
            settings: generation settings for this run.
            parent_run_id: with memory, link the stored run to this one (set by `as_tool` for delegated runs).
        """
        result: RunResult[OutputT] | None = None
        async for event in self.run_stream(
            prompt,
            images=images,
            audio=audio,
            history=history,
            conversation_id=conversation_id,
            deps=deps,
            settings=settings,
            parent_run_id=parent_run_id,
        ):
            if isinstance(event, FinalEvent):
                result = event.result
        assert result is not None
        return result

    def run_sync(self, prompt: str | Message, **kwargs: Any) -> RunResult[OutputT]:
        """`run` for code without an event loop."""
        _require_no_loop("run_sync")
        # The result leaves through `box`, not as the task's result: `asyncio.run` restores SIGINT through
        # `signal.signal`, which formats the repr of its handler, a partial holding the finished task, result
        # and all (a 200-step transcript took ~25% of the run to repr).
        box: list[RunResult[OutputT]] = []

        async def main() -> None:
            box.append(await self.run(prompt, **kwargs))

        asyncio.run(main())
        return box[0]

    async def run_stream(
        self,
        prompt: str | Message,
        *,
        images: Iterable[Any] = (),
        audio: Iterable[Any] = (),
        history: Sequence[Message] = (),
        conversation_id: str | None = None,
        deps: Any = None,
        settings: ModelSettings | None = None,
        parent_run_id: str | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """Like `run`, yielding typed events as they happen; the last event is a `FinalEvent`."""
        user = prompt if isinstance(prompt, Message) else Message.user(prompt, images=images, audio=audio)
        if user.role != "user":
            raise UserError(f"the prompt must be a user message, got role {user.role!r}")
        if conversation_id is not None and self.memory is None:
            raise UserError("conversation_id needs an agent with memory=Store(...)")
        state = _RunState(messages=[], first_new=0, deps=deps, settings=self._with_output(settings or self.settings))
        past = list(history)
        if self.memory is not None:
            memory = self.memory
            link = {"parent_run_id": parent_run_id} if parent_run_id is not None else {}  # stores without it work
            started = await self._take_lease(
                lambda: memory.begin_run(
                    conversation_id=conversation_id,
                    new_messages=[user],
                    model_name=self.model.name,
                    system_prompt=self.system_prompt,
                    **link,
                ),
                lambda started: started.run_id,
            )
            state.run_id, state.conversation_id = started.run_id, started.conversation_id
            state.lease_ttl = started.lease_ttl
            past = [*started.history, *past]
        state.messages = [*self._system(), *past, user]
        state.first_new = len(state.messages) - 1
        async for event in self._drive(state):
            yield event

    async def resume(
        self,
        run_id: str,
        *,
        deps: Any = None,
        settings: ModelSettings | None = None,
        approvals: Mapping[str, ApprovalResult] | None = None,
    ) -> RunResult[OutputT]:
        """Continue an interrupted or paused run from its last committed step; completed tool calls are not
        repeated.

        Args:
            run_id: the run (`RunResult.run_id`, `ApprovalRequired.run_id`, `Store.list_runs(status=...)`).
            deps: as for `run`.
            settings: as for `run`.
            approvals: decisions on calls waiting for approval, by call id: True runs the call, `Deny(reason)`
                (or False) refuses it and the model reads the reason. A call still without a decision pauses
                the run again.
        """
        result: RunResult[OutputT] | None = None
        async for event in self.resume_stream(run_id, deps=deps, settings=settings, approvals=approvals):
            if isinstance(event, FinalEvent):
                result = event.result
        assert result is not None
        return result

    async def resume_stream(
        self,
        run_id: str,
        *,
        deps: Any = None,
        settings: ModelSettings | None = None,
        approvals: Mapping[str, ApprovalResult] | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """`resume`, yielding events. Waits for the conversation's lease as `run` does."""
        if self.memory is None:
            raise UserError("resume needs an agent with memory=Store(...)")
        memory = self.memory
        stored = await self._take_lease(lambda: memory.resume_run(run_id), lambda stored: stored.run_id)
        system = self._system()
        state = _RunState(
            messages=[*system, *stored.messages],
            first_new=len(system) + len(stored.messages) - stored.new_message_count,
            step=stored.next_step,
            usage=stored.usage,
            run_id=stored.run_id,
            conversation_id=stored.conversation_id,
            deps=deps,
            settings=self._with_output(settings or self.settings),
            lease_ttl=stored.lease_ttl,
            approvals=dict(approvals or {}),
        )
        run_messages = state.messages[state.first_new :]
        executed = run_messages[:-1] if run_messages and run_messages[-1].role == "assistant" else run_messages
        state.tool_calls = sum(len(m.tool_calls) for m in executed if m.role == "assistant")  # for max_tool_calls
        if self.reset_tool_choice and any(m.role == "tool" for m in run_messages):
            state.settings = dataclasses.replace(state.settings, tool_choice="auto")
        async for event in self._drive(state):
            yield event

    def as_tool(self, name: str | None = None, description: str | None = None, *, timeout: float | None = None) -> Tool:
        """This agent as a tool of another agent (delegation): one argument, `task`.

        The delegated run uses this agent's own tools, prompt, context policy and limits. Its final answer (text,
        or `output_type` as JSON) and the images and audio its tools produced come back as the tool's result, real
        parts for the caller's model; its usage joins the caller's run; with memory (this agent's, or the
        caller's when it has none) its run is stored and linked to the caller's (`Store.list_runs(parent_run_id=)`).

        Args:
            name: the tool's name; default the agent's `name`, else `delegate`.
            description: what the calling model reads about the tool.
            timeout: seconds the delegated run may take; default no limit (its own `max_steps` and limits bound it).
        """
        from agent._delegate import delegate_tool

        return delegate_tool(self, name, description, timeout)

    # ------------------------------------------------------------------ the loop

    def _system(self) -> list[Message]:
        return [Message.system(self.system_prompt)] if self.system_prompt else []

    def _with_output(self, settings: ModelSettings) -> ModelSettings:
        """Ask for the output type's JSON, unless the caller set a `response_format` of their own."""
        if self._output_format is None or settings.response_format is not None:
            return settings
        return dataclasses.replace(settings, response_format=self._output_format)

    def _partial_output(self, text: str) -> Any:
        """The streamed answer so far as a partial output value, or None while it is not one yet."""
        assert self._output is not None
        try:
            return self._output.validate_json(text, experimental_allow_partial="trailing-strings")
        except ValueError:  # ValidationError, or JSON that cannot become the type yet
            return None

    def _read_output(self, final: Message) -> tuple[Any, RetryPart | None]:
        """The final answer as `output_type` (or its text), or the retry telling the model why it is not one."""
        if self._output is None:
            return final.text, None
        try:
            return self._output.validate_json(final.text), None
        except ValidationError as exc:
            error = str(exc)
            if len(error) > _MAX_ERROR:
                error = error[:_MAX_ERROR] + " ..."
            name = self._output_format.name if self._output_format is not None else "output"
            message = f"Your answer is not valid {name} JSON: {error}. Answer again with only JSON matching the schema."
            return None, RetryPart(message=message, name=_OUTPUT_RETRY)

    async def _drive(self, state: _RunState) -> AsyncIterator[AgentEvent]:
        if _tracing._active is not None and state.trace is None:  # the run inside an invoke_agent span
            async for event in _tracing._active.run(self, state, self._drive(state)):
                yield event
            return
        if self._mcp is None:
            state.registry = self.registry
            async for event in self._drive_steps(state):
                yield event
            return
        async with self._mcp.opened():  # no-op for servers connected by `async with agent`
            state.registry = self._mcp.registry(self.registry)
            async for event in self._drive_steps(state):
                yield event

    async def _drive_steps(self, state: _RunState) -> AsyncIterator[AgentEvent]:
        heartbeat = None
        if self.memory is not None and state.run_id is not None and state.lease_ttl is not None:
            state.renewed = asyncio.get_running_loop().time()
            heartbeat = asyncio.ensure_future(self._heartbeat(state, state.lease_ttl))
        try:
            try:
                async for event in self._steps(state):
                    yield event
            finally:
                if heartbeat is not None:
                    heartbeat.cancel()
        except ApprovalRequired:
            raise  # stored as paused, lease released
        except MMAgentError as exc:
            await self._end(state, "failed", f"{type(exc).__name__}: {exc}")
            raise
        except BaseException as exc:  # cancelled or crashed: the committed steps stay resumable
            if not isinstance(exc, asyncio.CancelledError | GeneratorExit | KeyboardInterrupt):
                await self._end(state, "failed", f"{type(exc).__name__}: {exc}")
            elif self.memory is not None and state.run_id is not None:
                with contextlib.suppress(MMAgentError):  # unreleased, the lease still expires
                    await asyncio.to_thread(self.memory.release, state.run_id)
            raise

    async def _heartbeat(self, state: _RunState, ttl: float) -> None:
        """Renew the run's lease whenever a third of `ttl` passed since the last commit or renewal, so a long
        model request or tool keeps the conversation. Quick steps renew through their commits: no extra write."""
        assert self.memory is not None and state.run_id is not None
        loop = asyncio.get_running_loop()
        while True:
            wait = state.renewed + ttl / 3 - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            began = loop.time()
            try:
                await asyncio.to_thread(self.memory.renew, state.run_id)
            except MMAgentError:
                return  # released meanwhile, or lost: the next commit says so
            state.renewed = max(state.renewed, began)

    async def _take_lease(self, call: Callable[[], _T], run_id_of: Callable[[_T], str]) -> _T:
        """Run a store call that takes a conversation's lease (and may wait for it) in a worker thread. If the
        caller is cancelled meanwhile, the thread still finishes: then the lease it took is released."""
        memory = self.memory
        assert memory is not None
        future = asyncio.ensure_future(asyncio.to_thread(call))

        def release_taken(done: asyncio.Future[_T]) -> None:
            if not done.cancelled() and done.exception() is None:
                run_id = run_id_of(done.result())
                threading.Thread(target=_quietly, args=(memory.release, run_id)).start()

        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(release_taken)
            raise

    async def _steps(self, state: _RunState) -> AsyncIterator[AgentEvent]:
        assert state.registry is not None
        tools = state.registry.definitions()
        while True:
            last = state.messages[-1]
            if last.role == "assistant" and last.tool_calls:
                async for event in self._run_tools(state, last):
                    yield event
                state.step += 1
                continue
            if last.role == "assistant":  # resumed after the final answer was committed
                output, retry = self._read_output(last)
                if retry is None:
                    yield await self._finish(state, last, output)
                    return
                async for event in self._retry_output(state, retry):
                    yield event
                continue
            if state.step >= self.max_steps:
                raise MaxStepsExceeded(f"no final answer after {self.max_steps} steps", state.messages)
            self._check_request_limits(state)
            if self._mcp is not None and await self._mcp.refresh():  # a server's tools changed
                state.registry = self._mcp.registry(self.registry)
                tools = state.registry.definitions()
            response: ModelResponse | None = None
            to_send = state.messages
            if self.context is not None:
                to_send = await asyncio.to_thread(self.context.fit, state.messages, tools, self.model)
            stream = self.model.request_stream(to_send, tools, state.settings)
            if state.trace is not None:  # the request inside a chat span
                stream = state.trace.chat(to_send, tools, state.settings, stream)
            streamed, shown = "", None
            async for item in stream:
                if isinstance(item, TextDelta):
                    yield TextDeltaEvent(item.text, state.step)
                    if self._output is not None and len(streamed) < _MAX_PARTIAL:
                        streamed += item.text
                        partial = self._partial_output(streamed)
                        if partial is not None and partial != shown:
                            shown = partial
                            yield PartialOutputEvent(partial, state.step)
                elif isinstance(item, ModelResponse):  # calls are run from the response, not from deltas
                    response = item
            if response is None:
                raise MMAgentError(f"{self.model.name} ended its stream without a response")
            state.messages.append(response.message)
            state.usage = state.usage + response.usage
            await self._commit(state, "model", [response.message])
            yield ModelResponseEvent(response, state.step)
            yield UsageEvent(state.usage, state.step)
            self._check_token_limits(state)
            if response.parse_errors:
                retries = [
                    RetryPart(message=_format_retry(error), name=_FORMAT_RETRY) for error in response.parse_errors
                ]
                for retry in retries:
                    yield RetryEvent(retry, state.step)
                if response.message.tool_calls:  # sent with the results of the calls that did parse
                    state.pending.extend(retries)
                    continue
                message = Message(role="user", parts=tuple(retries))
                state.messages.append(message)
                await self._commit(state, "tools", [message])
                state.step += 1
                for retry in retries:
                    self._count_retry(state, retry)
                continue
            if not response.message.tool_calls:
                output, retry = self._read_output(response.message)
                if retry is None:
                    yield await self._finish(state, response.message, output)
                    return
                async for event in self._retry_output(state, retry):
                    yield event

    async def _retry_output(self, state: _RunState, retry: RetryPart) -> AsyncIterator[AgentEvent]:
        """Send an answer that is not the output type back to the model (one step, counted as a retry)."""
        yield RetryEvent(retry, state.step)
        message = Message(role="user", parts=(retry,))
        state.messages.append(message)
        await self._commit(state, "tools", [message])
        state.step += 1
        self._count_retry(state, retry)

    async def _run_tools(self, state: _RunState, assistant: Message) -> AsyncIterator[AgentEvent]:
        calls = assistant.tool_calls
        state.tool_calls += len(calls)
        limit = self.usage_limits.max_tool_calls
        if limit is not None and state.tool_calls > limit:
            raise UsageLimitExceeded(f"tool call limit of {limit} reached", state.messages)
        await self._pause_for_approvals(state, calls)
        for call in calls:
            yield ToolCallEvent(call, state.step)
        progress: asyncio.Queue[ToolProgressEvent] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._execute(state, call, progress)) for call in calls]
        waiting: set[asyncio.Future[Any]] = set(tasks)
        report: asyncio.Future[ToolProgressEvent] | None = None
        try:
            while waiting:
                report = report or asyncio.ensure_future(progress.get())
                done, _ = await asyncio.wait({*waiting, report}, return_when=asyncio.FIRST_COMPLETED)
                if report in done:
                    yield report.result()
                    report = None
                for task in tasks:
                    if task in done:
                        waiting.discard(task)
                        outcome = task.result()
                        if isinstance(outcome, RetryPart):
                            yield RetryEvent(outcome, state.step)
                        else:
                            yield ToolResultEvent(outcome, state.step)
        finally:
            for future in (*tasks, report):
                if future is not None:
                    future.cancel()
        parts: list[Part] = [task.result() for task in tasks]
        parts.extend(state.pending)
        state.pending.clear()
        message = Message(role="tool", parts=tuple(parts))
        state.messages.append(message)
        await self._commit(state, "tools", [message])
        if self.reset_tool_choice and state.settings.tool_choice not in ("auto", "none"):
            state.settings = dataclasses.replace(state.settings, tool_choice="auto")
        for part in parts:  # budgets are checked once the results are part of the transcript
            if isinstance(part, RetryPart):
                self._count_retry(state, part)

    async def _pause_for_approvals(self, state: _RunState, calls: Sequence[ToolCallPart]) -> None:
        """With no approver but a store, a step whose calls need approval (and have no decision from `resume`)
        pauses before any of its calls runs: the run is stored as `paused` and `ApprovalRequired` raised."""
        if self.approver is not None or self.memory is None or state.run_id is None:
            return  # no store to wait in: the registry refuses such calls ("no approval callback")
        registry = state.registry or self.registry
        waiting = [
            c
            for c in calls
            if (t := registry.get(c.name)) is not None and t.requires_approval and c.id not in state.approvals
        ]
        if waiting:
            await asyncio.to_thread(self.memory.end_run, state.run_id, "paused", None)
            raise ApprovalRequired(state.run_id, waiting, state.messages)

    def _approver(self, state: _RunState) -> Approver | None:
        if not state.approvals:
            return self.approver

        async def decide(call: ToolCallPart, ctx: ToolContext) -> ApprovalResult:
            decision = state.approvals.get(call.id)
            if decision is None:
                if self.approver is None:
                    return Deny("no approval callback is configured")
                answer = self.approver(call, ctx)
                return await answer if inspect.isawaitable(answer) else answer
            return decision

        return decide

    async def _execute(
        self, state: _RunState, call: ToolCallPart, progress: asyncio.Queue[ToolProgressEvent]
    ) -> ToolResultPart | RetryPart:
        def report(done: float, total: float | None, message: str | None) -> None:
            progress.put_nowait(ToolProgressEvent(call.id, done, total, message, state.step))

        ctx = ToolContext(
            call_id=call.id,
            tool_name=call.name,
            step=state.step,
            run_id=state.run_id,
            conversation_id=state.conversation_id,
            deps=state.deps,
            memory=self.memory,
            progress=report,
            add_usage=lambda usage: setattr(state, "usage", state.usage + usage),
        )
        assert state.registry is not None
        execution = state.registry.execute(call, ctx, self._approver(state))
        if state.trace is not None:  # the call inside an execute_tool span
            return await state.trace.tool(call, state.registry, execution)
        return await execution

    def _count_retry(self, state: _RunState, retry: RetryPart) -> None:
        name = retry.name or _FORMAT_RETRY
        count = state.retries.get(name, 0) + 1
        state.retries[name] = count
        t = (state.registry or self.registry).get(name)
        budget = t.retries if t is not None and t.retries is not None else self.retries
        if count > budget:
            what = {
                _FORMAT_RETRY: "the model's output could not be parsed",
                _OUTPUT_RETRY: "the model's answer did not validate as the output type",
            }.get(name, f"tool {name!r}")
            raise RetryBudgetExceeded(
                f"{what} needed more than {budget} retries; last error: {retry.message}", state.messages
            )

    def _check_request_limits(self, state: _RunState) -> None:
        limit = self.usage_limits.max_requests
        if limit is not None and state.usage.requests >= limit:
            raise UsageLimitExceeded(f"request limit of {limit} reached", state.messages)

    def _check_token_limits(self, state: _RunState) -> None:
        u, lim = state.usage, self.usage_limits
        for value, cap, what in (
            (u.input_tokens, lim.max_input_tokens, "input"),
            (u.output_tokens, lim.max_output_tokens, "output"),
            (u.total_tokens, lim.max_total_tokens, "total"),
        ):
            if cap is not None and value > cap:
                raise UsageLimitExceeded(f"{what} token limit of {cap} exceeded ({value})", state.messages)

    async def _finish(self, state: _RunState, final: Message, output: Any) -> FinalEvent:
        await self._end(state, "completed", None)
        result: RunResult[Any] = RunResult(
            output=output,
            messages=list(state.messages),
            new_messages=state.messages[state.first_new :],
            usage=state.usage,
            run_id=state.run_id,
            conversation_id=state.conversation_id,
            model_name=self.model.name,
        )
        return FinalEvent(result, state.step)

    async def _commit(self, state: _RunState, phase: Any, messages: list[Message]) -> None:
        if self.memory is not None and state.run_id is not None:
            began = asyncio.get_running_loop().time()
            memory, run_id, step, usage = self.memory, state.run_id, state.step, state.usage
            await _settled(lambda: memory.commit_step(run_id, step, phase, messages, usage))
            state.renewed = max(state.renewed, began)  # the commit renewed the lease

    async def _end(self, state: _RunState, status: Any, error: str | None) -> None:
        if self.memory is not None and state.run_id is not None:
            memory, run_id = self.memory, state.run_id
            await _settled(lambda: memory.end_run(run_id, status, error))


async def _settled(call: Callable[[], None]) -> None:
    """Run a store write in a worker thread. Cancelled meanwhile, it waits for the write to land (or fail) before
    the cancellation goes on: whoever cancelled a run finds the store as the run left it, not changing under them."""
    write = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await write
        raise


def _quietly(release: Callable[[str], None], run_id: str) -> None:
    with contextlib.suppress(MMAgentError):  # unreleased, the lease still expires
        release(run_id)


def _format_retry(error: str) -> str:
    return f"Your last reply could not be read as tool calls: {error}. Answer in text, or call a tool again."


def _require_no_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise UserError(f"{what} cannot be called from a running event loop: use `await agent.run(...)`")
