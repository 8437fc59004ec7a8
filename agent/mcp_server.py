"""An MCP server (stdio or Streamable HTTP) exposing an agent's tools and the model behind it.

```python
from agent import Agent
from agent.mcp_server import build_mcp_server, serve_http, serve_stdio
from memory import Store

agent = Agent(model, tools=[...], memory=Store("mmagent.db"))
server = build_mcp_server(agent)
serve_stdio(server)  # for a client that launches this process (Claude Desktop, an IDE, `mcp.Client`)
serve_http(server, port=8765, api_keys={"secret"})  # Streamable HTTP at http://127.0.0.1:8765/mcp
```

What a client sees:

* **The agent's registered tools** (`agent.registry`), with their own names, descriptions and JSON schemas.
  Calls go through `Registry.execute`, exactly as the agent's own calls do: the same argument validation and
  messages, timeouts, approval callback (`agent.approver`) and failure handling. A tool's text, images and
  audio come back as MCP `TextContent`, `ImageContent` and `AudioContent`; invalid arguments, a tool that
  raised or timed out (a retry request for the model) and error results come back with `isError: true` and
  the message as text.
* **Tools backed by the model** (`model_tools=True`): `transcribe` (audio in, text out, with Phi-4's own
  speech-recognition prompt), `describe_image` (image and an optional question in, text out), `ask` (a run of
  the agent, with its tools and system prompt, on a prompt with optional images and audio; it returns the
  final answer, and with a memory store a `conversation_id` to continue that conversation), and `recall`
  (with a memory store: search the stored conversations; matching text, with the images and audio stored
  beside it). Tools that need images or audio are left out when the model cannot read them
  (`model.input_modalities`), and the server's instructions say so. A registered tool with the same name as
  one of these wins; the model tool is left out.

**Media arguments** are JSON strings: the file's bytes in base64 (line breaks allowed), or a data URL
(`data:image/png;base64,...`). The format is read from the bytes, never from a label: PNG, JPEG, GIF, BMP
or WEBP images; WAV, FLAC, OGG or MP3 audio. Every clip and image passes the project's media gate
(`as_image_part` / `as_audio_part`: header-declared size limits, data that verifies); bad base64, an unknown
format, an oversized image (say a PNG declaring 60000x60000 pixels) or a decoded size over `MAX_MEDIA_BYTES`
is an `isError` result naming the argument, never the end of the server.

An unknown tool name is a JSON-RPC error (`-32602`, invalid params), as the MCP specification asks.

**Streamable HTTP** (`serve_http`, `create_http_app`): bound to 127.0.0.1 unless told otherwise; with
`api_keys`, every request must carry `Authorization: Bearer <key>` (compared in constant time against each
key); otherwise the answer is a 401 with `WWW-Authenticate: Bearer`. Request bodies may hold up to
`DEFAULT_MAX_BODY_BYTES` (media travel base64-encoded in them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

try:
    import mcp_types as types
    from mcp.server import Server, ServerRequestContext
    from mcp.server.stdio import stdio_server
    from mcp.shared.exceptions import MCPError
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised only without the SDK
    raise ImportError("agent.mcp_server needs the MCP Python SDK: pip install 'mcp>=2.3'") from exc

from pydantic import ValidationError

from agent._loop import Agent
from agent.exceptions import MediaError, MMAgentError, ModelRetry, ToolArgumentsError, UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    RetryPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    as_audio_part,
    as_image_part,
)
from agent.models import ModelSettings
from agent.server import bind_socket
from tools import Tool, ToolContext, to_content

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DESCRIBE_PROMPT",
    "MAX_MEDIA_BYTES",
    "MODEL_TOOL_TIMEOUT",
    "TRANSCRIBE_PROMPT",
    "build_mcp_server",
    "create_http_app",
    "run_stdio",
    "serve_http",
    "serve_stdio",
]

log = logging.getLogger("mmagent.mcp")

TRANSCRIBE_PROMPT = "Transcribe the audio clip into text."
"""Phi-4-multimodal's own speech-recognition instruction (as `examples/voice_assistant.py` sends it)."""

DESCRIBE_PROMPT = "Describe this image."
"""What `describe_image` asks when the caller gives no question."""

MAX_MEDIA_BYTES = 32 * 1024 * 1024
"""The most bytes one media argument may decode to (the gate's pixel and duration limits apply too)."""

DEFAULT_MAX_BODY_BYTES = 48 * 1024 * 1024
"""The largest Streamable HTTP request body accepted: one `MAX_MEDIA_BYTES` argument, base64-encoded."""

MODEL_TOOL_TIMEOUT = 600.0
"""Seconds a call of a model tool (`transcribe`, `describe_image`, `ask`, `recall`) may take."""

_MAX_MEDIA_CHARS = (MAX_MEDIA_BYTES + 2) // 3 * 4 + 4096  # base64 of MAX_MEDIA_BYTES, line breaks and a header
_IMAGE_FORMATS = "PNG, JPEG, GIF, BMP or WEBP"
_AUDIO_FORMATS = "WAV, FLAC, OGG or MP3"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_mcp_server(agent: Agent, *, name: str = "mmagent", model_tools: bool = True) -> Server[Any]:
    """An MCP server exposing `agent`'s registered tools and, with `model_tools`, tools backed by its model.

    The SDK's low-level `Server` is used because our tools come with ready JSON schemas (the high-level
    `MCPServer` derives schemas from Python signatures). Run it with `serve_stdio` / `run_stdio` or
    `serve_http` / `create_http_app`; `mcp.Client(server)` connects to it in process.

    Args:
        agent: the agent whose tools, model, approver and memory store are served. Its registry is read when
            the server is built: tools added later are not listed.
        name: the server's name in the MCP handshake.
        model_tools: also offer `transcribe`, `describe_image`, `ask` and `recall` (see the module docstring).

    Raises:
        UserError: `agent` is not an `Agent`, or `name` is empty.
    """
    if not isinstance(agent, Agent):
        raise UserError(f"build_mcp_server needs an Agent, got {type(agent).__name__}")
    if not isinstance(name, str) or not name.strip():
        raise UserError("the server name must be a non-empty string")
    catalog = _Catalog(agent, model_tools=model_tools)
    return Server(
        name,
        version=_version(),
        instructions=catalog.instructions(),
        get_tool_input_schema=catalog.input_schema,
        on_list_tools=catalog.list_tools,
        on_call_tool=catalog.call_tool,
    )


async def run_stdio(server: Server[Any]) -> None:
    """Serve `server` over this process's stdin and stdout until the client closes stdin.

    While it serves, the SDK points file descriptor 1 at stderr, so stray prints (a progress bar, a tool's
    `print`) cannot corrupt the JSON-RPC stream. Log to stderr.
    """
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_stdio(server: Server[Any]) -> None:
    """`run_stdio` for code without an event loop (the CLI): blocks until the client closes stdin."""
    asyncio.run(run_stdio(server))


def create_http_app(
    server: Server[Any],
    *,
    api_keys: Collection[str] | None = None,
    path: str = "/mcp",
    host: str = "127.0.0.1",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The ASGI app serving `server` over Streamable HTTP at `path`, behind a bearer token when `api_keys`.

    Run it with `serve_http`, or with uvicorn yourself (its lifespan must run: it starts the SDK's session
    manager). An app can be created once per server.

    Args:
        server: from `build_mcp_server`.
        api_keys: accepted bearer tokens; None or empty serves without authentication.
        path: the endpoint's path.
        host: the address the app will be served on; for a loopback address the SDK's DNS-rebinding
            protection (Host and Origin checks) is on.
        max_body_bytes: the largest request body accepted (a 413 past it).

    Raises:
        UserError: `api_keys` holds only empty strings, `path` does not start with "/", or a bad size.
    """
    keys = [k.encode() for k in api_keys or () if k]
    if api_keys and not keys:
        raise UserError("api_keys holds only empty strings")
    if not path.startswith("/"):
        raise UserError(f"path must start with '/', got {path!r}")
    if max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be positive, got {max_body_bytes}")
    app = server.streamable_http_app(streamable_http_path=path, host=host, max_request_body_size=max_body_bytes)
    if keys:
        app.add_middleware(_BearerAuth, keys=keys)
    return app


def serve_http(
    server: Server[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Collection[str] | None = None,
    path: str = "/mcp",
    log_level: str = "warning",
) -> None:
    """Serve `server` over Streamable HTTP at `http://host:port/path` with uvicorn until interrupted.

    Args:
        server: from `build_mcp_server`.
        host: the address to listen on; the default accepts connections from this machine only.
        port: the port (0 picks a free one).
        api_keys: accepted bearer tokens; None or empty serves without authentication (a warning is logged
            when the address is not a loopback one).
        path: the endpoint's path.
        log_level: uvicorn's log level.

    Raises:
        UserError: see `create_http_app`.
        OSError: the address cannot be bound (in use, not ours, a bad host name), before anything starts.
    """
    import uvicorn

    app = create_http_app(server, api_keys=api_keys, path=path, host=host)
    if not api_keys and host not in _LOOPBACK:
        log.warning("serving MCP on %s without api_keys: anyone who can reach this address may call the tools", host)
    sock = bind_socket(host, port)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmagent")
    except PackageNotFoundError:  # pragma: no cover - a source checkout that was never installed
        return "0"


class _BearerAuth:
    """ASGI middleware: HTTP requests without one of the accepted bearer tokens get a 401."""

    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the SDK's session manager starts and stops here
            await self.app(scope, receive, send)
            return
        header = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        given = token.strip()
        matches = [hmac.compare_digest(given, key) for key in self.keys]  # every key compared, in constant time
        if scheme.lower() == b"bearer" and given and any(matches):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: closed with "policy violation"
            await send({"type": "websocket.close", "code": 1008})
            return
        message = "missing bearer token" if not header else "invalid bearer token"
        body = json.dumps(
            {"error": "invalid_token", "error_description": f"{message}: send `Authorization: Bearer <key>`"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer error="invalid_token"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the tools


@dataclass(frozen=True, slots=True)
class _ModelTool:
    """A tool of this server (not of the agent's registry): a `Tool` for its schema and validation, run with
    our own error handling because it returns a whole `CallToolResult` (structured content for `ask`)."""

    tool: Tool
    run: Callable[..., Awaitable[types.CallToolResult]]
    read_only: bool
    output_schema: dict[str, Any] | None = None


class _Catalog:
    """The tools one server offers, and how each call runs."""

    def __init__(self, agent: Agent, *, model_tools: bool) -> None:
        self.agent = agent
        self.registered = {t.name: t for t in agent.registry}
        self.notes: list[str] = []
        self.model_tools: dict[str, _ModelTool] = {}
        if model_tools:
            for spec in self._model_tools():
                if spec.tool.name in self.registered:
                    self._note(f"the agent's own tool {spec.tool.name!r} is served instead of the built-in one")
                else:
                    self.model_tools[spec.tool.name] = spec
        self.listing = [self._describe(t) for t in self.registered.values()]
        self.listing.extend(self._describe(s.tool, s) for s in self.model_tools.values())

    def _note(self, note: str) -> None:
        log.info("mcp: %s", note)
        self.notes.append(note)

    def instructions(self) -> str:
        model = self.agent.model
        lines = [f"Tools of an mmagent agent on {model.name}."]
        if self.model_tools:
            lines.append(
                "Media arguments are strings: the file's bytes in base64, or a data URL "
                "(data:<type>;base64,<data>); the format is read from the bytes."
            )
        lines.extend(f"Note: {note}." for note in self.notes)
        return " ".join(lines)

    # ------------------------------------------------------------------ MCP handlers

    def input_schema(self, name: str) -> Mapping[str, Any] | None:
        spec = self.registered.get(name) or (self.model_tools[name].tool if name in self.model_tools else None)
        return None if spec is None else spec.parameters

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.listing)

    async def call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        name, arguments = params.name, params.arguments or {}
        if name in self.registered:
            return await self._call_registered(name, arguments)
        spec = self.model_tools.get(name)
        if spec is None:
            available = ", ".join([*self.registered, *self.model_tools]) or "none"
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {name!r}; available: {available}")
        return await self._call_model_tool(spec, arguments)

    async def _call_registered(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        call_id = f"mcp-{uuid.uuid4().hex[:12]}"
        try:
            call = ToolCallPart(id=call_id, name=name, arguments=arguments)
        except ValidationError as exc:  # a lone surrogate ("\ud800" in the JSON) is not valid UTF-8
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()[:3])
            return _error(f"invalid arguments: {problems}")
        ctx = ToolContext(call_id=call_id, tool_name=name, memory=self.agent.memory)
        outcome = await self.agent.registry.execute(call, ctx, self.agent.approver)
        return _result(outcome)

    async def _call_model_tool(self, spec: _ModelTool, arguments: dict[str, Any]) -> types.CallToolResult:
        name = spec.tool.name
        try:
            validated = spec.tool.validate(arguments)
        except ToolArgumentsError as exc:
            return _error(exc.message)
        try:
            return await asyncio.wait_for(spec.run(**validated), MODEL_TOOL_TIMEOUT)
        except UserError as exc:  # the caller's input (bad media, an unknown conversation, ...)
            return _error(str(exc))
        except ModelRetry as exc:
            return _error(exc.message)
        except TimeoutError:
            return _error(f"{name} timed out")
        except MMAgentError as exc:  # the run or the model failed: the server goes on
            log.warning("mcp: %s failed: %s: %s", name, type(exc).__name__, exc)
            return _error(f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("mcp: %s failed", name)
            return _error(f"{name} failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _describe(tool: Tool, spec: _ModelTool | None = None) -> types.Tool:
        return types.Tool(
            name=tool.name,
            description=tool.description,
            input_schema=tool.parameters,
            output_schema=spec.output_schema if spec is not None else None,
            annotations=types.ToolAnnotations(read_only_hint=True) if spec is not None and spec.read_only else None,
        )

    # ------------------------------------------------------------------ model tools

    def _model_tools(self) -> list[_ModelTool]:
        model = self.agent.model
        hears, sees = "audio" in model.input_modalities, "image" in model.input_modalities
        specs: list[_ModelTool] = []
        if hears:
            specs.append(self._transcribe())
        if sees:
            specs.append(self._describe_image())
        missing = [what for what, ok in (("images", sees), ("audio", hears)) if not ok]
        if missing:
            left_out = [n for n, ok in (("transcribe", hears), ("describe_image", sees)) if not ok]
            self._note(
                f"{model.name} reads no {' or '.join(missing)}, so {' and '.join(left_out)} "
                f"{'is' if len(left_out) == 1 else 'are'} not offered and ask takes no {' or '.join(missing)}"
            )
        specs.append(self._ask(sees, hears))
        memory = self.agent.memory
        if memory is not None and hasattr(memory, "search") and hasattr(memory, "artifact"):
            specs.append(self._recall(memory))
        elif memory is not None:
            self._note("the agent's memory store cannot be searched, so recall is not offered")
        return specs

    def _settings(self) -> ModelSettings:
        """The agent's settings for a plain model request without tools."""
        return dataclasses.replace(self.agent.settings, tool_choice="none", response_format=None)

    def _transcribe(self) -> _ModelTool:
        model = self.agent.model

        async def transcribe(audio: str) -> types.CallToolResult:
            part = await asyncio.to_thread(_audio_argument, audio, "audio")
            message = Message.user(TRANSCRIBE_PROMPT, audio=[part])
            response = await model.request([message], [], self._settings())
            return _text(response.message.text.strip())

        schema = _object({"audio": _media_schema(f"the audio clip ({_AUDIO_FORMATS}, any sample rate)")})
        description = f"Transcribe speech in an audio clip into text, with {model.name}."
        return _ModelTool(Tool.from_schema("transcribe", schema, transcribe, description=description), transcribe, True)

    def _describe_image(self) -> _ModelTool:
        model = self.agent.model

        async def describe_image(image: str, question: str = DESCRIBE_PROMPT) -> types.CallToolResult:
            part = await asyncio.to_thread(_image_argument, image, "image")
            message = Message.user(question or DESCRIBE_PROMPT, images=[part])
            response = await model.request([message], [], self._settings())
            return _text(response.message.text.strip())

        schema = _object(
            {
                "image": _media_schema(f"the image ({_IMAGE_FORMATS})"),
                "question": {
                    "type": "string",
                    "description": f"what to ask about the image (default: {DESCRIBE_PROMPT!r})",
                },
            },
            required=["image"],
        )
        description = f"Describe an image, or answer a question about it, with {model.name}."
        tool = Tool.from_schema("describe_image", schema, describe_image, description=description)
        return _ModelTool(tool, describe_image, True)

    def _ask(self, sees: bool, hears: bool) -> _ModelTool:
        agent = self.agent

        async def ask(
            prompt: str,
            images: list[str] | None = None,
            audio: list[str] | None = None,
            conversation_id: str | None = None,
        ) -> types.CallToolResult:
            seen = [await asyncio.to_thread(_image_argument, v, f"images[{i}]") for i, v in enumerate(images or ())]
            heard = [await asyncio.to_thread(_audio_argument, v, f"audio[{i}]") for i, v in enumerate(audio or ())]
            message = Message.user(prompt, images=seen, audio=heard)  # UserError for text that is not valid UTF-8
            result = await agent.run(message, conversation_id=conversation_id)
            content: list[types.ContentBlock] = [types.TextContent(text=result.output)]
            if result.conversation_id is not None:
                content.append(
                    types.TextContent(
                        text=f"conversation_id: {result.conversation_id} (pass it to ask to continue this conversation)"
                    )
                )
            structured = {"answer": result.output, "conversation_id": result.conversation_id}
            return types.CallToolResult(content=content, structured_content=structured)

        properties: dict[str, Any] = {"prompt": {"type": "string", "minLength": 1, "description": "the request"}}
        if sees:
            properties["images"] = {
                "type": "array",
                "items": _media_schema(f"an image ({_IMAGE_FORMATS})"),
                "description": "images to send with the prompt",
            }
        if hears:
            properties["audio"] = {
                "type": "array",
                "items": _media_schema(f"an audio clip ({_AUDIO_FORMATS})"),
                "description": "audio clips to send with the prompt",
            }
        if agent.memory is not None:
            properties["conversation_id"] = {
                "type": "string",
                "minLength": 1,
                "description": "continue this stored conversation (an id an earlier ask returned)",
            }
        description = f"Ask the mmagent agent ({agent.model.name}, with its own tools) and get its final answer." + (
            " Returns a conversation_id to continue the conversation." if agent.memory is not None else ""
        )
        output = {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "conversation_id": {"type": ["string", "null"]}},
            "required": ["answer", "conversation_id"],
        }
        tool = Tool.from_schema("ask", _object(properties, required=["prompt"]), ask, description=description)
        return _ModelTool(tool, ask, False, output)

    def _recall(self, store: Any) -> _ModelTool:
        from memory import recall_tool

        most = 20
        inner = recall_tool(store, limit=most, max_media=8)

        async def recall(query: str, conversation_id: str | None = None, limit: int = 5) -> types.CallToolResult:
            arguments = {"query": query, "scope": "conversation" if conversation_id else "all", "limit": limit}
            ctx = ToolContext(call_id="mcp-recall", tool_name="recall", conversation_id=conversation_id, memory=store)
            value = await inner.run(arguments, ctx)
            return _content_result(to_content(value))

        schema = _object(
            {
                "query": {"type": "string", "minLength": 1, "description": "keywords to look for"},
                "conversation_id": {"type": "string", "minLength": 1, "description": "search only this conversation"},
                "limit": {"type": "integer", "minimum": 1, "maximum": most, "description": "most passages (default 5)"},
            },
            required=["query"],
        )
        description = (
            "Search the agent's stored conversations by keywords: the best-matching passages, with the images "
            "and audio stored beside them."
        )
        return _ModelTool(Tool.from_schema("recall", schema, recall, description=description), recall, True)


# ---------------------------------------------------------------- arguments and results


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _media_schema(what: str) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "contentEncoding": "base64",
        "description": f"{what}: the file's bytes in base64, or a data URL (data:<type>;base64,<data>)",
    }


def _decode_media(value: str, argument: str, kind: str) -> bytes:
    """The bytes of a base64 string or data URL.

    Raises:
        MediaError: not base64, a data URL that is not base64, empty, or over `MAX_MEDIA_BYTES`.
    """
    if len(value) > _MAX_MEDIA_CHARS:
        raise MediaError(f"argument {argument!r}: {len(value)} characters of base64 is over the limit of {_mb()}")
    payload = value
    if value[:5].lower() == "data:":
        header, comma, payload = value.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise MediaError(f"argument {argument!r}: a data URL must be base64 (data:<type>;base64,<data>)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"argument {argument!r}: not valid base64 ({exc})") from None
    if not data:
        raise MediaError(f"argument {argument!r}: the {kind} is empty")
    if len(data) > MAX_MEDIA_BYTES:
        raise MediaError(f"argument {argument!r}: {len(data)} bytes is over the limit of {_mb()}")
    return data


def _mb() -> str:
    return f"{MAX_MEDIA_BYTES // (1024 * 1024)} MB"


def _image_argument(value: str, argument: str) -> ImagePart:
    data = _decode_media(value, argument, "image")
    try:
        return as_image_part(data)
    except MediaError as exc:
        raise MediaError(f"argument {argument!r}: {exc}") from None


def _audio_argument(value: str, argument: str) -> AudioPart:
    data = _decode_media(value, argument, "audio clip")
    try:
        return as_audio_part(data)
    except MediaError as exc:
        raise MediaError(f"argument {argument!r}: {exc}") from None


def _text(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)])


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def _content_result(
    parts: tuple[TextPart | ImagePart | AudioPart, ...], *, is_error: bool = False
) -> types.CallToolResult:
    content: list[types.ContentBlock] = []
    for part in parts:
        if isinstance(part, TextPart):
            content.append(types.TextContent(text=part.text))
        elif isinstance(part, ImagePart):
            content.append(types.ImageContent(data=_b64(part.data), mime_type=part.media_type))
        else:
            content.append(types.AudioContent(data=_b64(part.data), mime_type=part.media_type))
    return types.CallToolResult(content=content, is_error=is_error)


def _result(outcome: ToolResultPart | RetryPart) -> types.CallToolResult:
    if isinstance(outcome, RetryPart):  # invalid arguments, a failure, a timeout: a retry request for a model
        return _error(outcome.message)
    return _content_result(outcome.content, is_error=outcome.is_error)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
