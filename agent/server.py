"""An OpenAI-compatible HTTP endpoint that runs an agent, tools and all, server-side.

```python
import uvicorn
from agent.server import create_app

app = create_app(agent, api_keys={"secret"}, model_name="mmagent")
uvicorn.run(app, host="127.0.0.1", port=8080)
```

Any OpenAI client can then talk to the agent:

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="secret")
reply = client.chat.completions.create(model="mmagent", messages=[{"role": "user", "content": "2+3?"}])
```

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (no auth).

A request's messages become the run's history, and its last message (a user turn: text, images as data URLs,
audio as `input_audio`) the prompt. The agent calls its own tools server-side until it has an answer; the
response holds that final text (never `tool_calls`) and an `mmagent` extension field listing the calls made.
With a memory store on the agent, every response carries a `conversation_id`; send it back as a top-level
`conversation_id` field (the `openai` client: `extra_body={"conversation_id": ...}`) to continue that stored
conversation, and then send only the new turn. Client-side `tools` are refused (400).

Streaming (`stream: true`) sends `chat.completion.chunk` events and then `data: [DONE]`. By default
(`stream_steps="all"`) the text of every model step is streamed as it is generated, so text the model writes
beside a tool call (say "Let me check.") appears in the stream before the final answer (each later step's
text starting after a blank line), whereas the non-streaming response holds the final answer alone.
`stream_steps="final"` buffers each step and sends only the final answer's text (identical to the
non-streaming content, but later). The last chunk carries
`conversation_id` and the `mmagent` extension; `stream_options.include_usage` adds the usage chunk.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 401 (bad or missing bearer
token), 413 (body over `max_body_bytes`), 400 (malformed JSON, schema errors, bad media, unknown
conversation), 404 (unknown model or route), 502 (the agent's model server failed), 500 (any other failure
of the run). An error ends one request, never the server; requests run concurrently. An error after a stream
has started arrives as a final `data: {"error": ...}` event.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Literal

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("agent.server needs Starlette and uvicorn: pip install 'mmagent[server]'") from exc

from agent._loop import Agent
from agent._server_wire import (
    ChatRequest,
    HTTPProblem,
    RunSummary,
    chunk_body,
    completion_body,
    new_completion_id,
    now,
    parse_request,
    problem_for,
    settings_for,
    split_messages,
    sse,
    usage_body,
)
from agent.events import AgentEvent, FinalEvent, ModelResponseEvent, TextDeltaEvent
from agent.exceptions import UserError

__all__ = ["AgentSource", "create_app"]

log = logging.getLogger("mmagent.server")

AgentSource = Agent | Callable[[], Agent | Awaitable[Agent]]
"""An agent shared by all requests, or a function (sync or async) that makes one per request."""

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_DRAIN_BYTES = 16 * 1024 * 1024  # how much of an oversized body is read and dropped before the 413


def create_app(
    agent: AgentSource,
    *,
    api_keys: Collection[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_name: str = "mmagent",
    stream_steps: Literal["all", "final"] = "all",
) -> Starlette:
    """Build the ASGI app serving `agent` as an OpenAI-compatible chat-completions endpoint.

    Args:
        agent: an `Agent` (shared by concurrent requests; runs keep no state on it), or a zero-argument
            function, sync or async, returning one per request.
        api_keys: accepted bearer tokens; None or empty serves without authentication.
        max_body_bytes: the largest request body accepted (images and audio arrive base64-encoded in it).
        model_name: the model id clients name in `model` and that `/v1/models` lists.
        stream_steps: `"all"` streams the text of every model step live; `"final"` only the final answer's.

    Raises:
        UserError: an invalid argument.
    """
    if not isinstance(agent, Agent) and not callable(agent):
        raise UserError(f"create_app needs an Agent or a function returning one, got {type(agent).__name__}")
    if max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be positive, got {max_body_bytes}")
    if not model_name:
        raise UserError("model_name cannot be empty")
    if stream_steps not in ("all", "final"):
        raise UserError(f"stream_steps must be 'all' or 'final', got {stream_steps!r}")
    keys = [k.encode() for k in api_keys or () if k]
    if api_keys and not keys:
        raise UserError("api_keys holds only empty strings")
    service = _Service(agent, keys, max_body_bytes, model_name, stream_steps)
    routes = [
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/models", service.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", service.get_model, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return HTTPProblem(404, f"no route {request.method} {request.url.path}", type="not_found_error").response()
    if status == 405:
        return HTTPProblem(405, f"{request.method} is not allowed on {request.url.path}").response()
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    return HTTPProblem(status, str(detail)).response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_for(exc).response()


class _Service:
    def __init__(
        self,
        source: AgentSource,
        keys: list[bytes],
        max_body_bytes: int,
        model_name: str,
        stream_steps: Literal["all", "final"],
    ) -> None:
        self.source = source
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name
        self.stream_steps = stream_steps
        self.created = now()

    # ------------------------------------------------------------------ routes

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except HTTPProblem as problem:
            return problem.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["model_id"])
        except HTTPProblem as problem:
            return problem.response()
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = await self._read_body(request)
            chat = parse_request(body)
            self._check_model(chat.model)
            history, prompt = split_messages(chat)
            agent = await self._agent()
            settings = settings_for(chat, agent.settings)
            events = agent.run_stream(prompt, history=history, conversation_id=chat.conversation_id, settings=settings)
            if chat.stream:
                return await self._stream(chat, events)
            return await self._complete(events)
        except Exception as exc:  # a bad request, or the run failed: answer this request, keep serving
            failure = problem_for(exc)
            if failure.status >= 500:
                log.error("chat completion failed: %s", failure.message, exc_info=exc)
            return failure.response()

    # ------------------------------------------------------------------ pieces

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        matches = [hmac.compare_digest(given, key) for key in self.keys]  # every key compared, in constant time
        ok = scheme.lower() == "bearer" and bool(given) and any(matches)
        if not ok:
            message = "missing bearer token" if not header else "invalid API key"
            raise HTTPProblem(
                401,
                f"{message}: send `Authorization: Bearer <key>` with a key this server accepts",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _read_body(self, request: Request) -> bytes:
        # An oversized body is still read (and dropped) up to a budget before the 413 goes out: a server that
        # answers and closes while the client is still sending makes the client see a reset, not the 413.
        limit, drain_to = self.max_body_bytes, self.max_body_bytes + max(self.max_body_bytes, _DRAIN_BYTES)
        declared = request.headers.get("content-length")
        size: int | None = None
        if declared is not None:
            try:
                size = int(declared)
            except ValueError as exc:
                raise HTTPProblem(400, f"bad Content-Length header {declared!r}") from exc
            if size > drain_to:
                raise self._too_large(f"{size} bytes", close=True)
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > drain_to:
                raise self._too_large(f"more than {drain_to} bytes", close=True)
            if total > limit:
                chunks.clear()
            else:
                chunks.append(chunk)
        if total > limit:
            raise self._too_large(f"{total} bytes", close=False)
        return b"".join(chunks)

    def _too_large(self, size: str, *, close: bool) -> HTTPProblem:
        return HTTPProblem(
            413,
            f"the request body is {size}; this server accepts at most {self.max_body_bytes} bytes",
            code="request_too_large",
            headers={"Connection": "close"} if close else None,
        )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise HTTPProblem(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                type="not_found_error",
                code="model_not_found",
                param="model",
            )

    def _model_card(self) -> dict[str, object]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mmagent"}

    async def _agent(self) -> Agent:
        if isinstance(self.source, Agent):
            return self.source
        made = self.source()
        if inspect.isawaitable(made):
            made = await made
        if not isinstance(made, Agent):
            raise TypeError(f"the agent factory returned {type(made).__name__}, not an Agent")
        return made

    async def _complete(self, events: AsyncIterator[AgentEvent]) -> Response:
        summary = RunSummary()
        async for event in events:
            summary.add(event)
        if summary.final is None:
            raise RuntimeError("the run ended without a final answer")
        return JSONResponse(completion_body(new_completion_id(), self.model_name, now(), summary))

    async def _stream(self, chat: ChatRequest, events: AsyncIterator[AgentEvent]) -> Response:
        # The first event is awaited before answering, so that a run failing at its start (an unknown
        # conversation, an unreachable model) gets a proper status code rather than a broken stream.
        iterator = aiter(events)
        try:
            first: AgentEvent | None = await anext(iterator)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await _close(events)
            raise
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        body = self._chunks(events, first, include_usage)
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _chunks(
        self, events: AsyncIterator[AgentEvent], first: AgentEvent | None, include_usage: bool
    ) -> AsyncIterator[bytes]:
        cid, created, model = new_completion_id(), now(), self.model_name
        summary = RunSummary()
        pending: list[str] = []  # stream_steps="final": text of the current step, held until it proves final
        streamed_step: int | None = None  # stream_steps="all": the step whose text was streamed last
        try:
            yield sse(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
            event = first
            while event is not None:
                summary.add(event)
                if isinstance(event, TextDeltaEvent) and event.text:
                    if self.stream_steps == "all":
                        text = event.text
                        if streamed_step is not None and streamed_step != event.step:
                            text = "\n\n" + text  # a later step's text starts a new paragraph
                        streamed_step = event.step
                        yield sse(chunk_body(cid, model, created, {"content": text}))
                    else:
                        pending.append(event.text)
                elif isinstance(event, ModelResponseEvent) and pending:
                    final = not event.response.message.tool_calls and not event.response.parse_errors
                    if final:
                        for text in pending:
                            yield sse(chunk_body(cid, model, created, {"content": text}))
                    pending.clear()
                if isinstance(event, FinalEvent):
                    break
                event = await anext(events, None)
            if summary.final is None:
                raise RuntimeError("the run ended without a final answer")
            result = summary.final.result
            extra: dict[str, object] = {"mmagent": summary.extension()}
            if result.conversation_id is not None:
                extra["conversation_id"] = result.conversation_id
            yield sse(chunk_body(cid, model, created, {}, finish_reason=summary.finish_reason, extra=extra))
            if include_usage:
                yield sse(chunk_body(cid, model, created, None, extra={"usage": usage_body(result.usage)}))
        except Exception as exc:  # the stream has started: the error becomes its last event
            problem = problem_for(exc)
            log.error("streamed chat completion failed: %s", problem.message, exc_info=exc)
            yield sse({"error": problem.body()["error"] | {"status": problem.status}})
        finally:
            await _close(events)
        yield sse("[DONE]")


async def _close(events: AsyncIterator[AgentEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
