"""An OpenAI-compatible HTTP endpoint with two faces: a plain Phi-4 model for the client's own agent (model
mode), and mmagent's agent with its server-side tools (agent mode).

```python
import uvicorn
from agent.server import create_app

app = create_app(agent, api_keys={"secret"}, model_name="phi4", aliases=["gpt-4o-mini"])
uvicorn.run(app, host="127.0.0.1", port=8080)
```

**Model mode** (requests that bring `tools`, a `tool_choice`, a `response_format`, `logprobs`, or tool turns
of the client's own agent; every request with `mode="model"`): the server is a model endpoint for any agent
framework. The client's tools are rendered in Phi-4's native tool format and decoding is grammar-constrained
by `tool_choice` (`auto`, `none`, `required` or a named function) and `parallel_tool_calls`, so every call
parses and validates against its schema; calls come back as OpenAI `tool_calls` with `finish_reason:
"tool_calls"`, streamed as OpenAI tool-call deltas (index, id and name first, then argument pieces), never as
content. Conversations the client sends back may hold assistant `tool_calls` and `role: tool` results with
text, images (`image_url`) and audio (`input_audio`), which reach the model as pixels and samples; a result
without its call, or a call without its result, is a 400 naming the message. `response_format`
(`json_object`, `json_schema` strict or not) constrains the answer to valid JSON of that schema;
`logprobs`/`top_logprobs` come from the distribution each token was sampled from (after the grammar's
mask, before temperature). Nothing is stored unless a `store` is given.

**Agent mode** (everything else; every request with `mode="agent"`): a request's messages become the run's
history, and its last message (a user turn: text, images as data URLs, audio as `input_audio`) the prompt.
The agent calls its own tools server-side until it has an answer; the response holds that final text (never
`tool_calls`) and an `mmagent` extension field listing the calls made. With a memory store on the agent,
every response carries a `conversation_id`; send it back as a top-level `conversation_id` field (the `openai`
client: `extra_body={"conversation_id": ...}`) to continue that stored conversation, and then send only the
new turn. Streaming sends the text of every model step (`stream_steps="all"`, later steps after a blank
line) or only the final answer's (`"final"`).

Routes: `POST /v1/chat/completions`, `GET /v1/models` (the model name and its aliases), `GET
/v1/models/{id}`, `GET /health` (no auth). Parameters OpenAI defines but this server does not implement
(penalties, `logit_bias`, `n` > 1, audio output, ...) are refused with a 400 that names them; fields that do
not change the output (`user`, `metadata`, `store`, ...) are accepted.

Limits, each a 4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` and never the
end of the server: 401 (bad or missing bearer token), 413 (body over `max_body_bytes`), 400 (malformed JSON,
JSON nested deeper than 64 levels, strings that are not valid Unicode, schema errors, bad or oversized
media, media the model cannot read, a prompt over `max_prompt_chars`, an unknown conversation), 404 (unknown
model or route), 409 (the stored conversation is busy with another run; or, code `approval_required`, the run
paused before calls of tools marked `requires_approval`: the error carries `run_id` and `calls`, and `POST
/v1/runs/{run_id}/approvals` with `{"approvals": {call_id: true | false | {"deny": reason}}}` continues it and
answers with its chat completion), 504 (the request ran past
`request_timeout`), 502 (the agent's model server failed), 500 (anything else). Errors after a stream has
started arrive as a final `data: {"error": ...}` event. A model-mode response carries `Server-Timing:
model;dur=<ms>`, the time its generation took. Requests run concurrently; `serve()` runs uvicorn with
malformed HTTP answered in the same JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, Literal

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("agent.server needs Starlette and uvicorn: pip install 'mmagent[server]'") from exc

from agent._loop import Agent
from agent._server_model import ChunkWriter, ModelCall, check_media, completion_body, prepare
from agent._server_wire import (
    ChatRequest,
    HTTPProblem,
    RunSummary,
    check_agent_request,
    chunk_body,
    new_completion_id,
    now,
    parse_approvals,
    parse_request,
    problem_for,
    settings_for,
    split_messages,
    sse,
    usage_body,
)
from agent._server_wire import (
    completion_body as agent_completion_body,
)
from agent.events import AgentEvent, FinalEvent, ModelResponseEvent, TextDeltaEvent
from agent.exceptions import UserError
from agent.messages import Message
from agent.models import Model, ModelResponse, TextDelta, ToolCallDelta

__all__ = ["AgentSource", "Mode", "bind_socket", "create_app", "serve"]

log = logging.getLogger("mmagent.server")

AgentSource = Agent | Callable[[], Agent | Awaitable[Agent]]
"""An agent shared by all requests, or a function (sync or async) that makes one per request."""

Mode = Literal["auto", "agent", "model"]
"""`auto`: model mode for requests with client tools/formats/tool turns, agent mode for the rest."""

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 600.0
CHARS_PER_TOKEN_CEILING = 8
"""`max_prompt_chars` defaults to the model's context length times this: text that long cannot fit (real text
averages 3-4 characters per token), so it is refused before it is tokenized or stored."""
_DRAIN_BYTES = 16 * 1024 * 1024  # how much of an oversized body is read and dropped before the 413


def create_app(
    agent: AgentSource | Model,
    *,
    api_keys: Collection[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_name: str = "mmagent",
    aliases: Sequence[str] = (),
    stream_steps: Literal["all", "final"] = "all",
    mode: Mode = "auto",
    store: Any = None,
    drop_unreadable_media: bool = False,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    max_prompt_chars: int | None = None,
    speaker: Any = None,
    realtime: bool = True,
) -> Starlette:
    """Build the ASGI app serving `agent` as an OpenAI-compatible chat-completions endpoint.

    Args:
        agent: an `Agent` (shared by concurrent requests; runs keep no state on it), a zero-argument function,
            sync or async, returning one per request, or a bare `Model` (model mode only).
        api_keys: accepted bearer tokens; None or empty serves without authentication.
        max_body_bytes: the largest request body accepted (images and audio arrive base64-encoded in it).
        model_name: the model id `/v1/models` lists first and responses carry.
        aliases: more ids clients may name in `model` (listed too); any other id is a 404.
        stream_steps: agent mode: `"all"` streams the text of every model step live; `"final"` only the final
            answer's.
        mode: `auto` (model mode when a request brings tools, a `tool_choice`, a `response_format`,
            `logprobs` or tool turns; agent mode otherwise), `agent` or `model`.
        store: where model mode keeps each request and its answer as a conversation (a `memory.Store`);
            None stores nothing (clients resend their history anyway). Agent mode uses the agent's memory.
        drop_unreadable_media: leave out images/audio the model cannot read, saying so in a `Warning` header,
            instead of refusing the request with a 400.
        request_timeout: seconds one request may run (generation is cancelled past it: 504); None for none.
        max_prompt_chars: the most characters of text (messages and tool schemas) a request may carry;
            default `CHARS_PER_TOKEN_CEILING` x the model's context length.
        speaker: an `agent.voice.Speaker` for the Realtime endpoint's speech output; None answers in text only.
        realtime: serve the OpenAI Realtime subset (`agent.voice`) at `/v1/realtime` (WebSocket) in agent
            mode: spoken turns in, the agent's answer as text and speech out. Needs `mmagent[voice]`.

    Raises:
        UserError: an invalid argument.
    """
    if not isinstance(agent, Agent | Model) and not callable(agent):
        raise UserError(
            f"create_app needs an Agent, a Model or a function returning an Agent, got {type(agent).__name__}"
        )
    if max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be positive, got {max_body_bytes}")
    names = [model_name, *(a for a in aliases if a != model_name)]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise UserError("model_name and aliases must be non-empty strings")
    if stream_steps not in ("all", "final"):
        raise UserError(f"stream_steps must be 'all' or 'final', got {stream_steps!r}")
    if mode not in ("auto", "agent", "model"):
        raise UserError(f"mode must be 'auto', 'agent' or 'model', got {mode!r}")
    if isinstance(agent, Model):
        if mode == "agent":
            raise UserError("a bare Model serves model mode only: pass an Agent for agent mode")
        mode = "model"
    if request_timeout is not None and not request_timeout > 0:
        raise UserError(f"request_timeout must be positive, got {request_timeout}")
    keys = [k.encode() for k in api_keys or () if k]
    if api_keys and not keys:
        raise UserError("api_keys holds only empty strings")
    service = _Service(
        agent,
        keys,
        max_body_bytes,
        names,
        stream_steps,
        mode,
        store,
        drop_unreadable_media,
        request_timeout,
        max_prompt_chars,
    )
    routes: list[Route | WebSocketRoute] = [
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/runs/{run_id}/approvals", service.approvals, methods=["POST"]),
        Route("/v1/models", service.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", service.get_model, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
    ]
    if realtime and not isinstance(agent, Model):

        async def realtime_endpoint(websocket: WebSocket) -> None:
            from agent.voice._realtime import serve_realtime

            await serve_realtime(websocket, service._agent, keys, speaker)

        routes.append(WebSocketRoute("/v1/realtime", realtime_endpoint))
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
        lifespan=_keep_connected(agent),
    )


def _keep_connected(source: AgentSource | Model) -> Callable[[Starlette], Any]:
    """A lifespan that keeps a shared agent's MCP servers connected while the app runs (without a lifespan,
    each run connects its own)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if isinstance(source, Agent):
            async with source:
                yield
        else:
            yield

    return lifespan


def serve(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    agent: Agent | None = None,
) -> None:
    """Run `app` with uvicorn until interrupted; malformed HTTP gets a 400 in OpenAI's JSON error shape.

    Args:
        app: from `create_app`.
        host: address to listen on.
        port: port to listen on.
        log_level: uvicorn's.
        agent: entered before serving (its MCP servers connected, so a server that cannot start is an error
            here, not a failed startup) and left after.

    Raises:
        OSError: the address cannot be bound (in use, not ours, a bad host name), before anything starts.
        MMAgentError: the agent's MCP servers cannot be connected.
    """
    import uvicorn

    sock = bind_socket(host, port)
    config = uvicorn.Config(app, log_level=log_level, http=_json_400_protocol(), lifespan="on")

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if agent is not None:
                await stack.enter_async_context(agent)
            await uvicorn.Server(config).serve(sockets=[sock])

    try:
        asyncio.run(main())
    finally:
        sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` for uvicorn to serve on (bound first, so a taken port is an OSError
    before anything starts).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections: without it, Nagle's algorithm against the client's delayed ACK
        # added ~40 ms to every response (benchmarks/serve.py measured 47 ms of HTTP overhead, 3 ms with it).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _json_400_protocol() -> type[Any]:
    """uvicorn's h11 protocol with its protocol-level 400 (sent before any app runs) in JSON."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JSONErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(HTTPProblem(400, f"malformed HTTP request: {msg}").body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return JSONErrorH11Protocol


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
        source: AgentSource | Model,
        keys: list[bytes],
        max_body_bytes: int,
        names: list[str],
        stream_steps: Literal["all", "final"],
        mode: Mode,
        store: Any,
        drop_media: bool,
        request_timeout: float | None,
        max_prompt_chars: int | None,
    ) -> None:
        self.source = source
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.names = names
        self.stream_steps = stream_steps
        self.mode = mode
        self.store = store
        self.drop_media = drop_media
        self.request_timeout = request_timeout
        self.max_prompt_chars = max_prompt_chars
        self.created = now()

    # ------------------------------------------------------------------ routes

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except HTTPProblem as problem:
            return problem.response()
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.names]})

    async def get_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = self._check_model(request.path_params["model_id"])
        except HTTPProblem as problem:
            return problem.response()
        return JSONResponse(self._model_card(name))

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = await self._read_body(request)
            chat = parse_request(body)
            name = self._check_model(chat.model)
            if self.mode == "model" or (self.mode == "auto" and chat.uses_client_tools()):
                return await self._model_mode(chat, name)
            return await self._agent_mode(chat, name)
        except ClientDisconnect:  # the client hung up mid-body: nobody reads an answer, nothing to log
            log.info("client disconnected while sending its request")
            return Response(status_code=400)
        except Exception as exc:  # a bad request, or the run failed: answer this request, keep serving
            failure = problem_for(exc)
            if failure.status >= 500:
                log.error("chat completion failed: %s", failure.message, exc_info=exc)
            return failure.response()

    # ------------------------------------------------------------------ model mode

    async def _model_mode(self, chat: ChatRequest, name: str) -> Response:
        model, base = await self._model()
        call = prepare(chat, model, base, drop_media=self.drop_media)
        self._check_prompt_size(chat, model)
        headers = _dropped_header(call.dropped)
        cid, created = new_completion_id(), now()
        if chat.stream:
            stream = _deadline(model.request_stream(call.messages, call.tools, call.settings), self.request_timeout)
            first = await _first(stream)
            chunks = self._model_chunks(chat, call, stream, first, ChunkWriter(cid, name, created))
            return _event_stream(chunks, headers)
        started = time.perf_counter()
        async with _timeout(self.request_timeout):
            response = await model.request(call.messages, call.tools, call.settings)
        timing = {"Server-Timing": f"model;dur={(time.perf_counter() - started) * 1000:.3f}"}
        conversation = await self._keep(call, response.message)
        body = completion_body(cid, name, created, response, self._extension(response, conversation))
        return JSONResponse(body, headers={**timing, **(headers or {})})

    async def _model_chunks(
        self,
        chat: ChatRequest,
        call: ModelCall,
        stream: AsyncIterator[TextDelta | ToolCallDelta | ModelResponse],
        first: TextDelta | ToolCallDelta | ModelResponse | None,
        writer: ChunkWriter,
    ) -> AsyncIterator[bytes]:
        try:
            yield sse(writer.start())
            item = first
            while item is not None:
                if isinstance(item, TextDelta) and item.text:
                    yield sse(writer.text_delta(item.text))
                elif isinstance(item, ToolCallDelta):
                    chunk = writer.call_delta(item)
                    if chunk is not None:
                        yield sse(chunk)
                elif isinstance(item, ModelResponse):
                    closing, message, problems = writer.finish(item)
                    for problem in problems:
                        log.warning("streamed tool call disagrees with the parsed response: %s", problem)
                    conversation = await self._keep(call, message)
                    closing[-1]["mmagent"] = self._extension(item, conversation)
                    for chunk in closing:
                        yield sse(chunk)
                    if chat.stream_options and chat.stream_options.include_usage:
                        yield sse(writer.usage(item))
                    break
                item = await anext(stream, None)
            else:
                raise RuntimeError("the model ended its stream without a response")
        except Exception as exc:  # the stream has started: the error becomes its last event
            yield _error_event(exc)
        finally:
            await _close(stream)
        yield sse("[DONE]")

    async def _keep(self, call: ModelCall, answer: Message) -> str | None:
        """Model mode with a store: the request's messages and the answer as one new conversation."""
        if self.store is None:
            return None
        messages = [*call.messages, answer]
        return str(await asyncio.to_thread(self.store.create_conversation, messages, metadata={"mode": "model"}))

    def _extension(self, response: ModelResponse, conversation: str | None) -> dict[str, Any]:
        extension: dict[str, Any] = {"model": response.model_name, "conversation_id": conversation}
        if response.parse_errors:
            extension["parse_errors"] = list(response.parse_errors)
        return extension

    # ------------------------------------------------------------------ agent mode

    async def _agent_mode(self, chat: ChatRequest, name: str) -> Response:
        check_agent_request(chat)
        agent = await self._agent()
        raw, dropped = check_media(chat.messages, agent.model, drop=self.drop_media)
        chat = chat.model_copy(update={"messages": raw})
        self._check_prompt_size(chat, agent.model)  # before anything is stored
        history, prompt = split_messages(chat)
        settings = settings_for(chat, agent.settings)
        events = agent.run_stream(prompt, history=history, conversation_id=chat.conversation_id, settings=settings)
        events = _deadline(events, self.request_timeout)
        headers = _dropped_header(dropped)
        if chat.stream:
            first = await _first(events)
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return _event_stream(self._agent_chunks(events, first, include_usage, name), headers)
        summary = RunSummary()
        try:
            async for event in events:
                summary.add(event)
        finally:
            await _close(events)
        if summary.final is None:
            raise RuntimeError("the run ended without a final answer")
        return JSONResponse(agent_completion_body(new_completion_id(), name, now(), summary), headers=headers)

    async def approvals(self, request: Request) -> Response:
        """Decide on a paused run's calls and continue it: `{"approvals": {call_id: true | false | {"deny":
        "reason"}}}`; the answer is the run's chat completion (or another 409 if calls still wait)."""
        try:
            self._authorize(request)
            decisions = parse_approvals(await self._read_body(request))
            agent = await self._agent()
            if agent.memory is None:
                raise HTTPProblem(400, "approvals need a server with a memory store (--db)", code="no_store")
            events = agent.resume_stream(request.path_params["run_id"], approvals=decisions)
            summary = RunSummary()
            try:
                async for event in _deadline(events, self.request_timeout):
                    summary.add(event)
            finally:
                await _close(events)
            if summary.final is None:
                raise RuntimeError("the run ended without a final answer")
            body = agent_completion_body(new_completion_id(), self.names[0], now(), summary)
            return JSONResponse(body)
        except ClientDisconnect:
            return Response(status_code=400)
        except Exception as exc:
            failure = problem_for(exc)
            if failure.status >= 500:
                log.error("approvals failed: %s", failure.message, exc_info=exc)
            return failure.response()

    async def _agent_chunks(
        self, events: AsyncIterator[AgentEvent], first: AgentEvent | None, include_usage: bool, model: str
    ) -> AsyncIterator[bytes]:
        cid, created = new_completion_id(), now()
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
            yield _error_event(exc)
        finally:
            await _close(events)
        yield sse("[DONE]")

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

    def _check_model(self, model: str | None) -> str:
        """The served name a request names (the first when it names none); 404 for any other."""
        if model is None:
            return self.names[0]
        if model not in self.names:
            raise HTTPProblem(
                404,
                f"the model {model!r} does not exist; this server serves {', '.join(map(repr, self.names))}",
                type="not_found_error",
                code="model_not_found",
                param="model",
            )
        return model

    def _check_prompt_size(self, chat: ChatRequest, model: Model) -> None:
        limit = self.max_prompt_chars
        if limit is None and model.context_length:
            limit = model.context_length * CHARS_PER_TOKEN_CEILING
        if limit is None:
            return
        size = _text_size(chat.messages) + len(json.dumps(chat.tools)) if chat.tools else _text_size(chat.messages)
        if size > limit:
            raise HTTPProblem(
                400,
                f"the prompt holds {size} characters of text; {model.name} reads at most about "
                f"{model.context_length or limit} tokens, so this server takes at most {limit} characters",
                code="context_length_exceeded",
                param="messages",
            )

    def _model_card(self, name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "mmagent"}

    async def _agent(self) -> Agent:
        if isinstance(self.source, Agent):
            return self.source
        if isinstance(self.source, Model):
            raise HTTPProblem(400, "this server serves a bare model: requests are served in model mode only")
        made = self.source()
        if inspect.isawaitable(made):
            made = await made
        if not isinstance(made, Agent):
            raise TypeError(f"the agent factory returned {type(made).__name__}, not an Agent")
        return made

    async def _model(self) -> tuple[Model, Any]:
        if isinstance(self.source, Model):
            from agent.models import ModelSettings

            return self.source, ModelSettings()
        agent = await self._agent()
        return agent.model, agent.settings


def _text_size(messages: list[dict[str, Any]]) -> int:
    """Characters of text in OpenAI messages (content strings, text parts and tool-call arguments). Runs before
    the messages are checked, so any shape is possible: what is not text counts nothing."""
    total = 0
    for message in messages:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part in parts:
            text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
            total += len(text) if isinstance(text, str) else 0
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            fn = call.get("function") if isinstance(call, dict) else None
            arguments = fn.get("arguments") if isinstance(fn, dict) else None
            total += len(arguments) if isinstance(arguments, str) else 0
    return total


def _dropped_header(dropped: list[str]) -> dict[str, str] | None:
    if not dropped:
        return None
    return {"Warning": f'299 mmagent "dropped media the model cannot read: {", ".join(dropped)}"'}


async def _first(stream: AsyncIterator[Any]) -> Any:
    """The first item of a stream, awaited before answering: a request failing at its start (an unknown
    conversation, an unreachable model) gets a proper status code rather than a broken stream."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except BaseException:
        await _close(stream)
        raise


def _event_stream(chunks: AsyncIterator[bytes], headers: dict[str, str] | None) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


def _error_event(exc: BaseException) -> bytes:
    problem = problem_for(exc)
    log.error("streamed chat completion failed: %s", problem.message, exc_info=exc)
    return sse({"error": problem.body()["error"] | {"status": problem.status}})


class _timeout:
    """`asyncio.timeout` that raises an `HTTPProblem` (504) saying which limit was reached."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._inner = asyncio.timeout(seconds)

    async def __aenter__(self) -> None:
        await self._inner.__aenter__()

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            await self._inner.__aexit__(kind, exc, tb)
        except TimeoutError as timed_out:
            raise HTTPProblem(
                504,
                f"the request ran longer than this server's limit of {self.seconds:g} s and was stopped",
                type="server_error",
                code="request_timeout",
            ) from timed_out


async def _deadline(stream: AsyncIterator[Any], seconds: float | None) -> AsyncIterator[Any]:
    """`stream` with a deadline on the whole of it (generation is cancelled when it passes)."""
    try:
        async with _timeout(seconds):
            async for item in stream:
                yield item
    finally:
        await _close(stream)


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
