"""Tools from MCP servers (stdio or Streamable HTTP), with images and audio as real model input.

```python
from agent import Agent
from tools.mcp import MCPTools

files = MCPTools.stdio("npx", "-y", "@modelcontextprotocol/server-filesystem", "/data")
charts = MCPTools.http("http://127.0.0.1:8123/mcp", token="secret")
agent = Agent(model, mcp=[files, charts])
agent.run_sync("Plot last month's sales and tell me what stands out.")  # sessions open and close with the run

async with agent:  # or keep the sessions open across runs
    await agent.run("...")
```

Built on the official `mcp` SDK (2.x; `pip install 'mmagent[mcp]'`). Each server's tools join the agent's registry
with their JSON schemas and are validated as ours are. Names are kept as MCP allows them (letters, digits, `_`,
`-`, `.`, `/`); a name already taken by an earlier tool (the agent's own, or another server's) is given the
server's prefix, `<server name>.<tool>` (`prefix=` sets it for every tool of a server). When a server says its tools
changed (`tools/list_changed`, or a `subscriptions/listen` event on 2026-07-28 servers), the agent relists them
before its next model request.

Results: text as text; `structured_content` as JSON text when the server sent no text; images and audio as
`ImagePart`/`AudioPart` through the media gate (the model sees pixels and samples, within the context policy's
caps); embedded resources as text or media; resource links as a line naming the URI (`resources=True` adds a
`read_resource` tool that reads one). A result with `isError` is sent back to the model as a retry. Progress
notifications become `ToolProgressEvent`s in the agent's event stream. A server that crashes, hangs past the
tool's timeout or is unreachable gives that call a clear error; the run goes on.

Resources and prompts for the application: `await server.read_resource(uri)` (parts to attach to a turn),
`await server.prompt(name, arguments)` (messages). Elicitation (a server asking the user for input) goes to
`on_elicit`; without one it is declined.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TextIO

from agent.exceptions import MediaError, ModelRetry, UserError
from agent.messages import (
    AudioPart,
    ImagePart,
    Message,
    TextPart,
    as_audio_part,
    as_image_part,
    replace_surrogates,
)
from tools._context import ToolContext
from tools._registry import Registry, Tool

if TYPE_CHECKING:
    import mcp_types
    from mcp import Client
    from mcp.shared.dispatcher import ProgressFnT

__all__ = ["Elicit", "MCPGroup", "MCPTools"]

log = logging.getLogger("mmagent.mcp")

ContentPart = TextPart | ImagePart | AudioPart
Elicit = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
"""`(message, requested_schema) -> answers, or None to decline`: a server asking the user for input."""

_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")


def _sdk() -> Any:
    try:
        import mcp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError("MCP support needs the `mcp` package: pip install 'mmagent[mcp]'") from exc
    return mcp


class MCPTools:
    """One MCP server's tools, resources and prompts. Build it with `MCPTools.stdio` or `MCPTools.http`; it
    connects as an async context manager (an `Agent` given it in `mcp=` does that for you).

    Attributes:
        name: the server's name (for messages and clashing tool names); defaults to what the server reports.
        tools: the server's tools as registry tools (empty until connected).
    """

    def __init__(
        self,
        connect: Callable[[TextIO], Any],
        *,
        label: str,
        name: str | None = None,
        prefix: str | None = None,
        timeout: float | None = None,
        resources: bool = False,
        on_elicit: Elicit | None = None,
        errlog: TextIO | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise UserError(f"timeout must be positive, got {timeout}")
        self._connect = connect
        self._label = label
        self.name = name or label
        self._named = name is not None
        self.prefix = prefix
        self.timeout = timeout
        self.resources = resources
        self.on_elicit = on_elicit
        self._errlog = errlog
        self.tools: list[Tool] = []
        self._client: Client | None = None
        self._stack: AsyncExitStack | None = None
        self._stale = False
        self._dead: str | None = None
        self._taken: frozenset[str] = frozenset()
        self._listing: list[mcp_types.Tool] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def stdio(
        cls,
        command: str | Sequence[str],
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        name: str | None = None,
        prefix: str | None = None,
        timeout: float | None = None,
        resources: bool = False,
        on_elicit: Elicit | None = None,
        errlog: TextIO | None = None,
    ) -> MCPTools:
        """A server started as a subprocess that speaks MCP on its stdin/stdout.

        Args:
            command: the executable (or the whole command line as a list).
            *args: its arguments.
            env: extra environment variables for it.
            cwd: its working directory.
            name: what to call the server (default: the name it reports).
            prefix: put before every tool name (default: only before names that clash).
            timeout: seconds one call of its tools may take (default: the registry's, 60 s).
            resources: add a `read_resource` tool the model can call.
            on_elicit: answers the server's questions to the user (default: declined).
            errlog: where the server's stderr goes (default: this process's stderr).
        """
        parts = [command] if isinstance(command, str) else list(command)
        if not parts or not parts[0]:
            raise UserError("MCPTools.stdio needs a command")
        program, arguments = parts[0], [*parts[1:], *args]

        def connect(errlog: TextIO) -> Any:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            params = StdioServerParameters(command=program, args=arguments, env=dict(env or {}) or None, cwd=cwd)
            return stdio_client(params, errlog=errlog)

        label = " ".join([program.rsplit("/", 1)[-1], *arguments])[:60]
        return cls(
            connect, label=label, name=name, prefix=prefix, timeout=timeout, resources=resources,
            on_elicit=on_elicit, errlog=errlog,
        )  # fmt: skip

    @classmethod
    def http(
        cls,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        name: str | None = None,
        prefix: str | None = None,
        timeout: float | None = None,
        resources: bool = False,
        on_elicit: Elicit | None = None,
    ) -> MCPTools:
        """A server reached over Streamable HTTP.

        Args:
            url: the endpoint, e.g. `http://127.0.0.1:8000/mcp`.
            headers: extra HTTP headers.
            token: sent as `Authorization: Bearer <token>`.
            name, prefix, timeout, resources, on_elicit: as for `stdio`.
        """
        if not url.startswith(("http://", "https://")):
            raise UserError(f"MCPTools.http needs an http(s) URL, got {url!r}")
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"

        def connect(errlog: TextIO) -> Any:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            client = httpx2.AsyncClient(headers=sent, timeout=httpx2.Timeout(30.0, read=300.0))
            return _closing(streamable_http_client(url, http_client=client), client)

        return cls(
            connect, label=url, name=name, prefix=prefix, timeout=timeout, resources=resources, on_elicit=on_elicit
        )

    # ------------------------------------------------------------------ the session

    @property
    def connected(self) -> bool:
        """True between entering and leaving the context manager."""
        return self._client is not None

    @property
    def stale(self) -> bool:
        """The server said its tools changed since they were listed (`refresh` relists them)."""
        return self._stale

    async def __aenter__(self) -> MCPTools:
        if self._client is not None:
            raise UserError(f"MCP server {self.name!r} is already connected")
        mcp = _sdk()
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            errlog = _with_fileno(self._errlog or sys.stderr)
            client = mcp.Client(
                self._connect(errlog),
                message_handler=self._on_message,
                elicitation_callback=self._elicit,
                read_timeout_seconds=None,
            )
            connected: Client = await stack.enter_async_context(client)
            self._client, self._stack = connected, stack
            if not self._named:
                info = connected.server_info
                self.name = (info.name if info is not None and info.name else None) or self._label
            self._dead = None
            await self._list()
            await self._watch(stack)
        except BaseException as exc:
            self._client = None
            self._stack = None
            with contextlib.suppress(Exception):
                await stack.aclose()
            if isinstance(exc, Exception) and not isinstance(exc, UserError):
                raise UserError(f"cannot connect to the MCP server {self._label!r}: {_reason(exc)}") from exc
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._stack, self._client = self._stack, None, None
        self.tools = []
        if stack is not None:
            with contextlib.suppress(Exception):  # a server that died already: nothing left to close cleanly
                await stack.aclose()

    async def refresh(self) -> bool:
        """Relist the tools if the server said they changed; True when it did."""
        if not self._stale or self._client is None or self._dead is not None:
            return False
        self._stale = False
        await self._list()
        return True

    def claim_names(self, taken: frozenset[str]) -> None:
        """Names already used by earlier tools: clashing ones of this server get its prefix."""
        self._taken = taken
        if self._client is not None:
            self.tools = self._tools_from(self._listing)

    # ------------------------------------------------------------------ resources and prompts

    async def read_resource(self, uri: str) -> list[ContentPart]:
        """A resource's contents as parts (text, images, audio) to attach to a turn or return from a tool."""
        client = self._require()
        try:
            result = await client.read_resource(uri)
        except Exception as exc:
            raise self._failure(f"cannot read resource {uri!r}", exc) from exc
        return [part for item in result.contents for part in _resource_parts(item)]

    async def list_resources(self) -> list[dict[str, Any]]:
        """The server's resources: uri, name, description, mimeType."""
        client = self._require()
        result = await client.list_resources()
        return [r.model_dump(by_alias=True, exclude_none=True) for r in result.resources]

    async def prompt(self, name: str, arguments: Mapping[str, str] | None = None) -> list[Message]:
        """An MCP prompt (a message template) filled in, as messages to send."""
        client = self._require()
        try:
            result = await client.get_prompt(name, dict(arguments or {}))
        except Exception as exc:
            raise self._failure(f"cannot get prompt {name!r}", exc) from exc
        out: list[Message] = []
        for message in result.messages:
            parts = _parts([message.content], resource_tool=False)
            if message.role == "assistant":
                out.append(Message.assistant("".join(p.text for p in parts if isinstance(p, TextPart))))
            else:
                out.append(Message(role="user", parts=tuple(parts)))
        return out

    # ------------------------------------------------------------------ internals

    def _require(self) -> Client:
        if self._client is None:
            raise UserError(f"MCP server {self.name!r} is not connected (use `async with` or Agent(mcp=[...]))")
        return self._client

    async def _list(self) -> None:
        client = self._require()
        listing: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(100):  # pages
            page = await client.list_tools(cursor=cursor)
            listing.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        self._listing = listing
        self.tools = self._tools_from(listing)

    def _tools_from(self, listing: Sequence[mcp_types.Tool]) -> list[Tool]:
        tools: list[Tool] = []
        used = set(self._taken)
        for entry in listing:
            name = self._tool_name(entry.name, used)
            if name is None:
                continue
            used.add(name)
            schema = dict(entry.input_schema or {"type": "object", "properties": {}})
            try:
                tools.append(
                    Tool.from_schema(
                        name,
                        schema,
                        self._caller(entry.name),
                        description=entry.description or entry.title or "",
                        timeout=self.timeout,
                        context=True,
                    )
                )
            except UserError as exc:  # a schema our registry cannot take: leave the tool out, say why
                log.warning("MCP server %r: tool %r left out: %s", self.name, entry.name, exc)
        if self.resources:
            name = self._tool_name("read_resource", used)
            if name is not None:
                tools.append(self._resource_tool(name))
        return tools

    def _tool_name(self, original: str, used: set[str]) -> str | None:
        name = f"{self.prefix}{original}" if self.prefix else original
        if name in used:
            name = f"{self.name}.{original}"
        if not _NAME.fullmatch(name) or name in used:
            log.warning(
                "MCP server %r: tool %r left out: the name %r is not usable or taken", self.name, original, name
            )
            return None
        return name

    def _caller(self, remote: str) -> Callable[..., Awaitable[list[ContentPart]]]:
        async def call(ctx: ToolContext, **arguments: Any) -> list[ContentPart]:
            client = self._require()
            if self._dead is not None:
                raise ModelRetry(self._dead)
            progress = _progress_callback(ctx)
            try:
                result = await client.call_tool(remote, arguments, progress_callback=progress)
            except Exception as exc:
                raise self._failure(f"calling {remote!r} failed", exc) from exc
            parts = _parts(result.content, resource_tool=self.resources)
            if result.structured_content is not None and not any(isinstance(p, TextPart) for p in parts):
                parts.insert(0, TextPart(text=replace_surrogates(json.dumps(result.structured_content))))
            if result.is_error:
                text = "".join(p.text for p in parts if isinstance(p, TextPart)) or "the tool reported an error"
                raise ModelRetry(text)
            return parts or [TextPart(text="(no content)")]

        return call

    def _resource_tool(self, name: str) -> Tool:
        async def read_resource(ctx: ToolContext, uri: str) -> list[ContentPart]:
            return await self.read_resource(uri) or [TextPart(text="(empty resource)")]

        schema = {"type": "object", "properties": {"uri": {"type": "string"}}, "required": ["uri"]}
        return Tool.from_schema(
            name,
            schema,
            read_resource,
            description=f"Read a resource of the MCP server {self.name!r} by its URI (text, images or audio).",
            timeout=self.timeout,
            context=True,
        )

    def _failure(self, what: str, exc: BaseException) -> ModelRetry:
        reason = _reason(exc)
        if "closed" in reason.lower() or type(exc).__name__ in ("ClosedResourceError", "BrokenResourceError"):
            self._dead = f"the MCP server {self.name!r} is not running any more: its tools cannot be called now"
            log.warning("%s (%s)", self._dead, reason)
            return ModelRetry(self._dead)
        return ModelRetry(f"{what} on the MCP server {self.name!r}: {reason}")

    async def _watch(self, stack: AsyncExitStack) -> None:
        """Listen for tool-list changes on 2026-07-28 servers (older ones send a notification instead)."""
        import anyio

        client = self._require()
        try:
            subscription = await stack.enter_async_context(client.listen(tools_list_changed=True))
        except Exception:  # an older server: `notifications/tools/list_changed` reaches `_on_message`
            return
        group = await stack.enter_async_context(anyio.create_task_group())

        async def watch() -> None:
            with contextlib.suppress(Exception):
                async for _event in subscription:
                    self._stale = True

        group.start_soon(watch)
        stack.callback(group.cancel_scope.cancel)

    async def _on_message(self, message: Any) -> None:
        method = getattr(message, "method", None)
        if method == "notifications/tools/list_changed":
            self._stale = True
        elif isinstance(message, Exception):
            log.debug("MCP server %r: %s", self.name, _reason(message))

    async def _elicit(self, context: Any, params: Any) -> Any:
        import mcp_types

        schema = getattr(params, "requested_schema", None)
        if self.on_elicit is None or schema is None:
            return mcp_types.ElicitResult(action="decline")
        requested = dict(schema) if isinstance(schema, dict) else schema.model_dump(by_alias=True, exclude_none=True)
        answer = await self.on_elicit(str(params.message), requested)
        return (
            mcp_types.ElicitResult(action="decline")
            if answer is None
            else mcp_types.ElicitResult(action="accept", content=answer)
        )

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"MCPTools({self.name!r}, {state}, {len(self.tools)} tools)"


class MCPGroup:
    """The MCP servers of one agent: opened together, their tools joined to a base registry in order (a name
    already taken gets its server's prefix), relisted when a server says its tools changed."""

    def __init__(self, servers: Sequence[MCPTools]) -> None:
        names = [s.name for s in servers]
        if len(set(map(id, servers))) != len(servers):
            raise UserError(f"the same MCPTools is given twice: {names}")
        self.servers = list(servers)

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Connect the servers that are not connected yet for the duration of the block (then close those)."""
        async with AsyncExitStack() as stack:
            for server in self.servers:
                if not server.connected:
                    await stack.enter_async_context(server)
            yield

    def registry(self, base: Registry) -> Registry:
        """`base`'s tools and then each server's, in order."""
        taken = set(base.names)
        tools: list[Tool] = [*base]
        for server in self.servers:
            server.claim_names(frozenset(taken))
            tools.extend(server.tools)
            taken.update(t.name for t in server.tools)
        return Registry(tools, default_timeout=base.default_timeout)

    async def refresh(self) -> bool:
        """Relist the tools of every server that said they changed; True when any did."""
        changed = False
        for server in self.servers:
            changed = await server.refresh() or changed
        return changed


@contextlib.asynccontextmanager
async def _closing(transport: Any, client: Any) -> Any:
    try:
        async with transport as streams:
            yield streams
    finally:
        await client.aclose()


def _with_fileno(stream: TextIO) -> TextIO:
    """A stream a subprocess can write to: the one given, else the process's real stderr (pytest and notebooks
    replace `sys.stderr` with objects that have no file descriptor), else the null device."""
    for candidate in (stream, sys.__stderr__):
        try:
            if candidate is not None:
                candidate.fileno()
                return candidate
        except (OSError, ValueError, AttributeError):
            continue
    return open(os.devnull, "w")  # lives as long as the server process


def _progress_callback(ctx: ToolContext) -> ProgressFnT | None:
    report = ctx.progress
    if report is None:
        return None

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        report(progress, total, message)

    return on_progress


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # anyio's task groups wrap the real error
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parts(content: Sequence[Any], *, resource_tool: bool) -> list[ContentPart]:
    """MCP content blocks as our parts; media through the gate (refused media becomes a note)."""
    parts: list[ContentPart] = []
    for block in content:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(TextPart(text=replace_surrogates(block.text)))
        elif kind in ("image", "audio"):
            parts.append(_media(kind, block.data, block.mime_type))
        elif kind == "resource":
            parts.extend(_resource_parts(block.resource))
        elif kind == "resource_link":
            how = "call read_resource to read it" if resource_tool else "not read"
            described = ", ".join(str(x) for x in (block.name, block.mime_type) if x)
            parts.append(TextPart(text=f"[resource {block.uri} ({described}): {how}]"))
    return parts


def _resource_parts(item: Any) -> list[ContentPart]:
    uri = str(getattr(item, "uri", ""))
    mime = getattr(item, "mime_type", None) or ""
    text = getattr(item, "text", None)
    if text is not None:
        return [TextPart(text=replace_surrogates(f"[resource {uri}]\n{text}"))]
    blob = getattr(item, "blob", None) or ""
    if mime.startswith(("image/", "audio/")):
        return [_media("image" if mime.startswith("image/") else "audio", blob, mime)]
    return [TextPart(text=f"[resource {uri}: {mime or 'binary'}, {len(blob) * 3 // 4} bytes, not shown]")]


def _media(kind: str, data: str, mime_type: str) -> ContentPart:
    try:
        raw = base64.b64decode(data, validate=True)
        return as_image_part(raw) if kind == "image" else as_audio_part(raw)
    except (binascii.Error, ValueError, MediaError) as exc:
        return TextPart(text=f"[{kind} ({mime_type}) left out: {exc}]")
