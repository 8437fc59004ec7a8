"""The `mmagent` command line: run, chat, serve, mcp, approve, history, ingest, search, eval.

Errors from mmagent (bad paths, unreadable media, missing weights, unreachable servers) print one line and
exit with status 1; usage errors exit with 2.
"""

from __future__ import annotations

import asyncio
import glob
import importlib
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from agent._loop import Agent
from agent.events import AgentEvent, FinalEvent, RetryEvent, TextDeltaEvent, ToolCallEvent, ToolResultEvent
from agent.exceptions import ApprovalRequired, MMAgentError, UserError
from agent.messages import Message, as_audio_part, as_image_part

app = typer.Typer(help="mmagent: tool-calling agents on Phi-4-multimodal.", no_args_is_help=True)
history_app = typer.Typer(help="Stored conversations.", no_args_is_help=True)
app.add_typer(history_app, name="history")
eval_app = typer.Typer(help="Evaluations: BFCL tool calling, speech recognition WER.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

DEFAULT_DB = "mmagent.db"
DEFAULT_SYSTEM = "You are a helpful assistant. Use the tools when they help, then answer briefly."

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="auto | phi4 | smollm2 | tiny-phi4 | folder | hub id | server URL")
]
ServerModelOpt = Annotated[str, typer.Option("--server-model", help="model name to request from a server URL")]
DbOpt = Annotated[str | None, typer.Option("--db", help="memory store: a SQLite path or an SQLAlchemy URL")]
ToolsOpt = Annotated[
    list[str] | None, typer.Option("--tools", help="module or .py file whose @tool functions (or TOOLS) to load")
]
FilesOpt = Annotated[Path | None, typer.Option("--files", help="let the agent read files inside this folder")]
HostOpt = Annotated[list[str] | None, typer.Option("--allow-host", help="let the agent fetch pages from this host")]
McpOpt = Annotated[
    list[str] | None, typer.Option("--mcp", help='use an MCP server started over stdio: "COMMAND ARGS" (repeatable)')
]
McpUrlOpt = Annotated[
    list[str] | None, typer.Option("--mcp-url", help="use an MCP server over Streamable HTTP at this URL (repeatable)")
]
McpTokenOpt = Annotated[
    str | None,
    typer.Option("--mcp-token", envvar="MMAGENT_MCP_TOKEN", help="bearer token for the --mcp-url servers"),
]


def _fail(message: str, code: int = 1) -> None:
    # The message is text, not markup: "pip install 'mmagent[voice]'" must keep its brackets.
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def load_tools(specs: list[str] | None, files: Path | None, hosts: list[str] | None) -> list[Any]:
    """Tools from modules/files (their `TOOLS` list, else every `@tool` function), plus built-ins."""
    from tools.builtin import calculator, file_tools, http_tool

    found: list[Any] = [calculator]
    for spec in specs or []:
        path = Path(spec)
        try:
            if path.suffix == ".py":
                if not path.is_file():
                    raise UserError(f"tools file {spec!r} does not exist")
                module_spec = importlib.util.spec_from_file_location(path.stem, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(spec)
        except UserError:
            raise
        except (Exception, SystemExit) as exc:  # a syntax error, or anything the module raises while importing
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(f"cannot load tools from {spec!r}: {type(exc).__name__}: {detail}".rstrip(": ")) from exc
        listed = getattr(module, "TOOLS", None)
        if listed is None:
            listed = [v for v in vars(module).values() if callable(v) and hasattr(v, "__mmagent_tool__")]
        if not listed:
            raise UserError(f"{spec!r} defines no TOOLS list and no @tool functions")
        found.extend(listed)
    if files is not None:
        found.extend(file_tools(files))
    if hosts:
        found.append(http_tool(hosts))
    return found


def mcp_servers(commands: list[str] | None, urls: list[str] | None, token: str | None) -> list[Any]:
    """`tools.mcp.MCPTools` for each `--mcp "COMMAND ARGS"` and `--mcp-url URL`."""
    if not commands and not urls:
        return []
    import shlex

    from tools.mcp import MCPTools

    servers: list[Any] = []
    for command in commands or []:
        try:
            words = shlex.split(command)
        except ValueError as exc:
            raise UserError(f"--mcp {command!r}: {exc}") from exc
        if not words:
            raise UserError("--mcp needs a command, e.g. --mcp 'python server.py'")
        servers.append(MCPTools.stdio(words))
    servers.extend(MCPTools.http(url, token=token) for url in urls or [])
    return servers


def _build(
    model: str,
    server_model: str,
    db: str | None,
    tools: list[str] | None,
    files: Path | None,
    hosts: list[str] | None,
    mcp: list[Any] | None = None,
) -> Agent:
    from agent.models.resolve import resolve_model

    tool_list = load_tools(tools, files, hosts)
    with err.status(f"loading model {model} ..."):
        backend = resolve_model(model, server_model=server_model)
    err.print(f"[dim]model: {backend.name}[/dim]")
    store = None
    if db is not None:
        from memory import Store

        store = Store(db)
    return Agent(backend, tools=tool_list, system_prompt=DEFAULT_SYSTEM, memory=store, mcp=mcp or ())


async def _stream(agent: Agent, prompt: Message, conversation_id: str | None, as_json: bool) -> str | None:
    return await _show(agent.run_stream(prompt, conversation_id=conversation_id), as_json)


async def _show(events: AsyncIterator[AgentEvent], as_json: bool) -> str | None:
    """Print a run's events (text to stdout, calls and results to stderr); return its conversation id."""
    async for event in events:
        if isinstance(event, TextDeltaEvent) and not as_json:
            out.print(event.text, end="", markup=False)
        elif isinstance(event, ToolCallEvent):
            err.print(f"\n[cyan]-> {event.call.name}[/cyan]({json.dumps(event.call.arguments)[:200]})", markup=True)
        elif isinstance(event, ToolResultEvent):
            mark = "[red]x[/red]" if event.result.is_error else "[green]<-[/green]"
            err.print(f"{mark} {event.result.name}: {event.result.text[:200]!r}")
        elif isinstance(event, RetryEvent):
            err.print(f"[yellow]retry[/yellow] {event.retry.name}: {event.retry.message[:200]}")
        elif isinstance(event, FinalEvent):
            r = event.result
            if as_json:
                out.print_json(
                    json.dumps(
                        {
                            "output": r.output,
                            "model": r.model_name,
                            "conversation_id": r.conversation_id,
                            "run_id": r.run_id,
                            "usage": {"requests": r.usage.requests, "input_tokens": r.usage.input_tokens,
                                      "output_tokens": r.usage.output_tokens},
                        }
                    )
                )  # fmt: skip
            else:
                out.print()
            return r.conversation_id
    return None


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApprovalRequired as exc:
        calls = ", ".join(f"{c.name}({json.dumps(c.arguments)[:80]}) [{c.id}]" for c in exc.calls)
        err.print(f"paused: {calls} wait(s) for approval", markup=False)
        _fail(f"decide with: mmagent approve {exc.run_id} --db ... (--yes CALL_ID | --no CALL_ID | --all)", 3)
    except MMAgentError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    return None


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="the task")],
    image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="an image file (repeatable)")] = None,
    audio: Annotated[list[Path] | None, typer.Option("--audio", "-a", help="an audio file (repeatable)")] = None,
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    db: DbOpt = None,
    tools: ToolsOpt = None,
    files: FilesOpt = None,
    allow_host: HostOpt = None,
    mcp: McpOpt = None,
    mcp_url: McpUrlOpt = None,
    mcp_token: McpTokenOpt = None,
    conversation: Annotated[str | None, typer.Option(help="continue this stored conversation")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Run one task and print the answer (tool calls go to stderr)."""

    def go() -> None:
        message = Message.user(prompt, images=[as_image_part(p) for p in image or []],
                               audio=[as_audio_part(p) for p in audio or []])  # fmt: skip
        servers = mcp_servers(mcp, mcp_url, mcp_token)
        agent = _build(model, server_model, db, tools, files, allow_host, servers)
        asyncio.run(_stream(agent, message, conversation, as_json))

    _guard(go)


@app.command()
def chat(
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    db: DbOpt = DEFAULT_DB,
    tools: ToolsOpt = None,
    files: FilesOpt = None,
    allow_host: HostOpt = None,
    mcp: McpOpt = None,
    mcp_url: McpUrlOpt = None,
    mcp_token: McpTokenOpt = None,
) -> None:
    """Talk with the agent. Attach media with `/image PATH` or `/audio PATH`; `/quit` leaves."""
    servers = _guard(lambda: mcp_servers(mcp, mcp_url, mcp_token))
    agent = _guard(lambda: _build(model, server_model, db, tools, files, allow_host, servers))
    _guard(lambda: asyncio.run(_chat(agent)))


async def _chat(agent: Agent) -> None:
    async with agent:  # MCP servers stay connected for the whole conversation
        await _chat_turns(agent)


async def _read_line(prompt: str) -> str:
    """`input()` on a daemon thread: Ctrl-C ends the program without waiting for a line."""
    import threading

    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()

    def settle(line: str | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(line or "")

    def read() -> None:
        try:
            line = input(prompt)
        except BaseException as exc:  # EOFError (Ctrl-D) goes to the caller
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, line, None)

    threading.Thread(target=read, daemon=True).start()
    return await done


async def _chat_turns(agent: Agent) -> None:
    conversation: str | None = None
    images: list[Any] = []
    clips: list[Any] = []
    while True:
        try:
            line = (await _read_line("you> ")).strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            if line.startswith("/image "):
                images.append(as_image_part(Path(line[7:].strip())))
                err.print(f"[dim]image attached ({len(images)})[/dim]")
                continue
            if line.startswith("/audio "):
                clips.append(as_audio_part(Path(line[7:].strip())))
                err.print(f"[dim]audio attached ({len(clips)})[/dim]")
                continue
            message = Message.user(line, images=images, audio=clips)
            images, clips = [], []
            out.print("agent> ", end="")
            conversation = await _stream(agent, message, conversation, False) or conversation
        except MMAgentError as exc:
            err.print(f"[red]error:[/red] {exc}")


SpeechOpt = Annotated[
    str,
    typer.Option("--speech", help="spoken answers: auto (Kokoro, espeak-ng, or none) | kokoro | espeak-ng | none"),
]


def _speaker(preference: str) -> tuple[Any, str]:
    from agent.voice import choose_speaker

    return choose_speaker(preference)


@app.command()
def voice(
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    db: DbOpt = DEFAULT_DB,
    tools: ToolsOpt = None,
    files: FilesOpt = None,
    allow_host: HostOpt = None,
    speech: SpeechOpt = "auto",
) -> None:
    """Talk with the agent through this machine's microphone and speaker; talk over it to interrupt."""
    from agent.models.resolve import reads_media
    from agent.voice._device import open_sounddevice, run_microphone

    speaker, speech_line = _guard(lambda: _speaker(speech))
    _guard(lambda: open_sounddevice(need_output=speaker is not None))  # before the model loads
    agent = _guard(lambda: _build(model, server_model, db or DEFAULT_DB, tools, files, allow_host))
    if "audio" not in agent.model.input_modalities or not reads_media(agent.model):
        _fail(f"{agent.model.name} cannot hear audio: use Phi-4-multimodal (--model phi4, its folder, or a URL)")
    err.print(f"[dim]model: {agent.model.name}; {speech_line}[/dim]")
    try:
        _guard(lambda: asyncio.run(run_microphone(agent, speaker, echo=lambda text: out.print(text, end=""))))
    except KeyboardInterrupt:
        err.print("\nbye")


@app.command()
def serve(
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help=f"memory store (SQLite path or SQLAlchemy URL); agent mode defaults to {DEFAULT_DB}, "
            "model mode stores only when this is given",
        ),
    ] = None,
    tools: ToolsOpt = None,
    files: FilesOpt = None,
    allow_host: HostOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (1-65535)")] = 8000,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="require this bearer token")] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="auto: a plain model endpoint for requests with client tools, tool turns or response_format, "
            "the agent for the rest; model: always the plain model; agent: always the agent"
        ),
    ] = "auto",
    served_model_name: Annotated[
        list[str] | None,
        typer.Option("--served-model-name", help="another model id clients may use (repeatable)"),
    ] = None,
    drop_unreadable_media: Annotated[
        bool,
        typer.Option(help="drop images/audio the model cannot read (with a Warning header) instead of a 400"),
    ] = False,
    request_timeout: Annotated[float, typer.Option(help="seconds one request may run")] = 600.0,
    speech: SpeechOpt = "auto",
    mcp: McpOpt = None,
    mcp_url: McpUrlOpt = None,
    mcp_token: McpTokenOpt = None,
) -> None:
    """Serve an OpenAI-compatible /v1/chat/completions endpoint: a plain model for other frameworks' agents
    (model mode), or this agent with its server-side tools (agent mode)."""
    from agent.server import create_app
    from agent.server import serve as run_server

    _check_listening(port, api_key)
    if mode not in ("auto", "agent", "model"):
        _fail(f"--mode must be auto, agent or model, got {mode!r}")
    if not request_timeout > 0:
        _fail(f"--request-timeout must be positive, got {request_timeout}")
    servers = _guard(lambda: mcp_servers(mcp, mcp_url, mcp_token))  # connected while the server runs
    speaker, speech_line = _guard(lambda: _speaker(speech))
    agent = _guard(lambda: _build(model, server_model, db or DEFAULT_DB, tools, files, allow_host, servers))
    application = _guard(
        lambda: create_app(
            agent,
            api_keys=set(api_key) if api_key else None,
            model_name=agent.model.name,
            aliases=served_model_name or (),
            mode=mode,  # type: ignore[arg-type]
            store=agent.memory if db is not None else None,
            drop_unreadable_media=drop_unreadable_media,
            request_timeout=request_timeout,
            speaker=speaker,
        )
    )
    names = ", ".join([agent.model.name, *(served_model_name or ())])
    err.print(f"serving {names} on http://{host}:{port}/v1 ({mode} mode)")
    err.print(f"[dim]realtime voice: ws://{host}:{port}/v1/realtime; {speech_line}[/dim]")
    try:
        _guard(lambda: run_server(application, host=host, port=port, agent=agent))
    except OSError as exc:  # the address is taken, or not ours to bind
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


@app.command("mcp")
def mcp_command(
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    db: DbOpt = None,
    tools: ToolsOpt = None,
    files: FilesOpt = None,
    allow_host: HostOpt = None,
    transport: Annotated[str, typer.Option(help="stdio (for a client that starts this process) or http")] = "stdio",
    host: Annotated[str, typer.Option(help="http: address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="http: port to listen on (1-65535)")] = 8765,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="http: require this bearer token")] = None,
    model_tools: Annotated[
        bool, typer.Option(help="also offer transcribe, describe_image, ask and recall, backed by the model")
    ] = True,
) -> None:
    """Serve the agent's tools, and tools backed by its model, to any MCP host (stdio or Streamable HTTP)."""
    if transport not in ("stdio", "http"):
        _fail(f"--transport must be stdio or http, got {transport!r}")
    _check_listening(port, api_key)
    from agent.mcp_server import build_mcp_server, serve_http, serve_stdio

    agent = _guard(lambda: _build(model, server_model, db, tools, files, allow_host))  # messages go to stderr
    server = _guard(lambda: build_mcp_server(agent, model_tools=model_tools))
    if transport == "stdio":
        _guard(lambda: serve_stdio(server))
        return
    err.print(f"serving MCP on http://{host}:{port}/mcp")
    try:
        _guard(lambda: serve_http(server, host=host, port=port, api_keys=set(api_key) if api_key else None))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _check_listening(port: int, api_key: list[str] | None) -> None:
    if not 0 < port < 65536:
        _fail(f"--port must be between 1 and 65535, got {port}")
    if api_key is not None and not all(k.strip() for k in api_key):
        _fail("--api-key cannot be empty: pass the token clients must send, or leave the option out")


@app.command()
def approve(
    run_id: Annotated[str, typer.Argument(help="the paused run (printed when it paused)")],
    db: DbOpt = DEFAULT_DB,
    yes: Annotated[list[str] | None, typer.Option("--yes", help="approve this call id (repeatable)")] = None,
    no: Annotated[list[str] | None, typer.Option("--no", help="deny this call id (repeatable)")] = None,
    reason: Annotated[str, typer.Option(help="why, for denied calls (the model reads it)")] = "denied by the user",
    approve_all: Annotated[bool, typer.Option("--all", help="approve every waiting call")] = False,
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    tools: ToolsOpt = None,
    files: FilesOpt = None,
    allow_host: HostOpt = None,
    mcp: McpOpt = None,
    mcp_url: McpUrlOpt = None,
    mcp_token: McpTokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """List the calls a paused run waits on; with --yes/--no/--all, decide and continue the run (give the
    same --model and tool options the run was started with)."""

    def go() -> None:
        from tools import Deny

        store = _store(db or DEFAULT_DB)
        stored = store.load_run(run_id)
        last = stored.messages[-1] if stored.messages else None
        waiting = list(last.tool_calls) if last is not None and last.role == "assistant" else []
        if stored.status != "paused" or not waiting:
            _fail(f"run {run_id} is {stored.status}, not waiting for approvals")
        if not (yes or no or approve_all):
            for call in waiting:
                out.print(f"{call.id}  {call.name}  {json.dumps(call.arguments, ensure_ascii=False)}", markup=False)
            return
        ids = {c.id for c in waiting}
        unknown = sorted({*(yes or []), *(no or [])} - ids)
        if unknown:
            _fail(f"no waiting call {unknown[0]!r} in run {run_id} (waiting: {', '.join(sorted(ids))})")
        decisions: dict[str, Any] = dict.fromkeys(ids if approve_all else yes or [], True)
        decisions.update({i: Deny(reason) for i in no or []})
        servers = mcp_servers(mcp, mcp_url, mcp_token)
        agent = _build(model, server_model, db or DEFAULT_DB, tools, files, allow_host, servers)
        asyncio.run(_show(agent.resume_stream(run_id, approvals=decisions), as_json))

    _guard(go)


def _store(db: str) -> Any:
    from memory import Store

    if "://" not in db and not Path(db).exists():
        _fail(f"no memory store at {db!r}")
    return Store(db)


@history_app.command("list")
def history_list(db: DbOpt = DEFAULT_DB, limit: int = 20) -> None:
    """List conversations, newest first."""
    store = _guard(lambda: _store(db or DEFAULT_DB))
    for c in store.list_conversations(limit=limit):
        out.print(f"{c.id}  {c.updated_at:%Y-%m-%d %H:%M}  {c.message_count:4d} msgs  {c.title or ''}")


@history_app.command("search")
def history_search(query: str, db: DbOpt = DEFAULT_DB, limit: int = 20) -> None:
    """Full-text search over stored messages and tool results."""
    store = _guard(lambda: _store(db or DEFAULT_DB))
    for hit in _guard(lambda: store.search(query, limit=limit)):
        out.print(f"{hit.conversation_id}  {hit.role:9s}  {hit.text[:100]!r}")


@history_app.command("show")
def history_show(conversation_id: str, db: DbOpt = DEFAULT_DB) -> None:
    """Print a conversation."""
    store = _guard(lambda: _store(db or DEFAULT_DB))
    for m in _guard(lambda: store.load_conversation(conversation_id)):
        kinds = ", ".join(p.kind for p in m.parts if p.kind != "text")
        out.print(f"[bold]{m.role}[/bold]: {m.text}" + (f"  [dim]({kinds})[/dim]" if kinds else ""))


@history_app.command("export")
def history_export(conversation_id: str, db: DbOpt = DEFAULT_DB, output: Path | None = None) -> None:
    """Export a conversation as JSON (OpenAI messages with media inline)."""
    store = _guard(lambda: _store(db or DEFAULT_DB))
    data = json.dumps(_guard(lambda: store.export_conversation(conversation_id)), ensure_ascii=False)
    if output is None:
        sys.stdout.write(data + "\n")
        return
    try:
        output.write_text(data, encoding="utf-8")
    except OSError as exc:  # a missing folder, a directory, no permission, a full disk
        _fail(f"cannot write {str(output)!r}: {exc.strerror or exc}")
    err.print(f"wrote {output}")


def _report_path(report: Path) -> Path:
    """Refuse a report path whose folder is missing before any model loads."""
    if not report.parent.is_dir():
        _fail(f"cannot write the report {str(report)!r}: no folder {str(report.parent)!r}")
    if report.is_dir():
        _fail(f"cannot write the report {str(report)!r}: it is a folder")
    return report


def _write_report(report: Path, data: dict[str, Any]) -> None:
    try:
        report.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write the report {str(report)!r}: {exc.strerror or exc}")


@eval_app.command("bfcl")
def eval_bfcl(
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    categories: Annotated[
        list[str] | None,
        typer.Option("--categories", "-c", help="comma-separated BFCL v4 categories (default: all single-turn ones)"),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="at most N cases per category, a fixed sample")] = None,
    seed: Annotated[int, typer.Option(help="the sample's seed")] = 0,
    constrained: Annotated[
        bool | None,
        typer.Option("--constrained/--unconstrained", help="grammar on or off (in-process models; default on)"),
    ] = None,
    both: Annotated[
        bool,
        typer.Option("--both", help="run constrained, then unconstrained (only where the grammar steered a token)"),
    ] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens per answer")] = 512,
    report: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("bfcl-report.json"),
    data: Annotated[Path | None, typer.Option(help="a folder laid out as bfcl-eval's data/ (default: its own)")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="go on from the journal an interrupted run left beside the report")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard such a journal and start over")] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, help="requests in flight (a server that batches answers them together)")
    ] = 1,
) -> None:
    """Berkeley Function Calling Leaderboard v4 (single-turn categories), AST-checked, through the model seam.

    Each mode's results go to a journal beside the report (`REPORT.<mode>.jsonl`) as they are judged; after an
    interruption, the same command with --resume asks only the cases not yet judged. With --both, a case whose
    constrained answer the grammar did not steer at all is not asked again unconstrained: greedy decoding without
    the grammar writes the same tokens (the report marks such results `reused`).
    """
    from agent.evals import BFCL_CATEGORIES, bfcl_version, load_bfcl
    from agent.models import ModelSettings
    from agent.models.resolve import resolve_model

    _report_path(report)
    journals = sorted(report.parent.glob(glob.escape(report.name) + ".*.jsonl"))
    if resume and fresh:
        _fail("--resume and --fresh contradict each other: choose one")
    if journals and not resume and not fresh:
        _fail(f"an interrupted run left {', '.join(str(j) for j in journals)}: "
              "--resume to go on from it, or --fresh to start over")  # fmt: skip
    for stale in journals if fresh else []:
        stale.unlink()
    names = [c.strip() for item in categories or [] for c in item.split(",") if c.strip()] or list(BFCL_CATEGORIES)
    cases = _guard(lambda: load_bfcl(names, data_dir=data, limit=limit, seed=seed))
    with err.status(f"loading model {model} ..."):
        backend = _guard(lambda: resolve_model(model, server_model=server_model))
    err.print(f"[dim]model: {backend.name}; {len(cases)} cases[/dim]")
    settings = ModelSettings(tool_choice="auto", max_tokens=max_tokens)
    document: dict[str, Any] = {"benchmark": "BFCL v4", "bfcl_eval": bfcl_version(), "model": backend.name,
                                "categories": names, "limit": limit, "seed": seed, "max_tokens": max_tokens,
                                "runs": []}  # fmt: skip
    runs: list[Any] = []
    for flag in [True, False] if both else [constrained]:
        reuse = {r.id: r for r in runs[0].results} if runs and runs[0].mode == "constrained" else None
        runs.append(_bfcl_mode(backend, cases, flag, settings, report, concurrency, reuse))
        document["runs"].append(runs[-1].to_json())
        _write_report(report, document)  # after each mode: a later failure keeps what ran
    for run in runs:  # all of it is in the report now
        Path(f"{report}.{run.mode}.jsonl").unlink(missing_ok=True)
    _print_bfcl(names, runs)
    err.print(f"wrote {report}")


def _bfcl_mode(
    backend: Any,
    cases: list[Any],
    constrained: bool | None,
    settings: Any,
    report: Path,
    concurrency: int,
    reuse: dict[str, Any] | None = None,
) -> Any:
    """One pass over the cases with the grammar on, off, or as the backend is: a progress bar (cases judged, right
    so far, time left) and a line per category done."""
    from collections import Counter

    from agent._progress import progress_bar
    from agent.evals import BfclResult, run_bfcl, with_constraint

    totals = Counter(case.category for case in cases)
    seen: dict[str, list[int]] = {}  # category -> [right, judged]
    bar = progress_bar(err, extra="{task.fields[right]} right", transient=True)
    task = bar.add_task("cases", total=len(cases), right=0)

    def tick(result: BfclResult) -> None:
        count = seen.setdefault(result.category, [0, 0])
        count[0] += result.ok
        count[1] += 1
        bar.update(task, advance=1, right=sum(right for right, _ in seen.values()))
        if count[1] == totals[result.category]:
            bar.console.print(f"  {result.category}: {count[0]}/{count[1]}")

    async def go() -> Any:
        with with_constraint(backend, constrained) as mode:
            err.print(f"[bold]{mode}[/bold]")
            journal = Path(f"{report}.{mode}.jsonl")
            with bar:
                return await run_bfcl(backend, cases, mode=mode, settings=settings, progress=tick, journal=journal,
                                      concurrency=concurrency, reuse=reuse)  # fmt: skip

    try:
        run = _guard(lambda: asyncio.run(go()))
        reused = sum(r.reused for r in run.results)
        if reused:
            err.print(f"  {reused} of {len(run.results)} answers taken from the constrained pass (no token steered)")
        return run
    except typer.Exit as exc:
        if exc.exit_code == 130:  # Ctrl-C: what was judged is in the journal
            err.print("the cases judged so far are kept: run the same command with --resume to go on")
        raise


def _print_bfcl(names: list[str], runs: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="BFCL v4 AST accuracy")
    table.add_column("category")
    table.add_column("cases", justify="right")
    for run in runs:
        table.add_column(run.mode, justify="right")
    counts = [run.counts() for run in runs]
    for name in names:
        total = counts[0].get(name, (0, 0))[1] if counts else 0
        table.add_row(name, str(total), *(f"{c[name][0] / c[name][1]:.3f}" if c.get(name) else "-" for c in counts))
    table.add_row("overall", str(len(runs[0].results) if runs else 0), *(f"{run.overall:.3f}" for run in runs))
    out.print(table)


@eval_app.command("asr")
def eval_asr(
    folder: Annotated[Path, typer.Argument(help="NAME.wav + NAME.txt pairs, or a manifest.jsonl")],
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    normalize: Annotated[
        bool, typer.Option(help="lower-case and strip punctuation on both sides before scoring")
    ] = True,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens per transcription")] = 512,
    report: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("asr-report.json"),
) -> None:
    """Word error rate of the model's transcriptions (jiwer), one request per clip through the model seam."""
    from agent.evals import AsrResult, load_asr_folder, run_asr
    from agent.models import ModelSettings
    from agent.models.resolve import reads_media, resolve_model

    _report_path(report)
    clips = _guard(lambda: load_asr_folder(folder))
    with err.status(f"loading model {model} ..."):
        backend = _guard(lambda: resolve_model(model, server_model=server_model))
    if "audio" not in backend.input_modalities or not reads_media(backend):
        _fail(f"{backend.name} cannot read audio: pass a Phi-4-multimodal model (--model phi4, its folder, or a URL)")
    err.print(f"[dim]model: {backend.name}; {len(clips)} clips[/dim]")
    settings = ModelSettings(max_tokens=max_tokens, tool_choice="none")

    def show(result: AsrResult) -> None:
        err.print(f"  {result.name}: WER {result.wer:.3f}")

    run = _guard(lambda: asyncio.run(run_asr(backend, clips, normalize=normalize, settings=settings, progress=show)))
    _write_report(report, {"benchmark": "ASR WER", **run.to_json()})
    out.print(f"WER {run.wer:.4f} over {len(run.results)} clips ({run.substitutions} substitutions, "
              f"{run.deletions} deletions, {run.insertions} insertions; {run.hits} words right)")  # fmt: skip
    err.print(f"wrote {report}")


EmbedderOpt = Annotated[
    str,
    typer.Option("--embedder", help="vectors for search by meaning: none | minilm (all-MiniLM-L6-v2) | a model folder"),
]


def _embedder(spec: str) -> Any:
    from agent.embedding import TransformersEmbedder

    spec = spec.strip()
    if spec in ("", "none"):
        return None
    if spec == "minilm":
        return TransformersEmbedder.minilm()
    return TransformersEmbedder.from_pretrained(spec)


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="files, folders (walked) and http(s) URLs")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="the collection to add them to")] = "default",
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = "auto",
    server_model: ServerModelOpt = "microsoft/Phi-4-multimodal-instruct",
    embedder: EmbedderOpt = "none",
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="a host URLs may be fetched from (repeatable)")
    ] = None,
    download_dir: Annotated[Path | None, typer.Option(help="where fetched files are kept")] = None,
    keyframes: Annotated[int, typer.Option(min=1, max=3, help="keyframes per scene")] = 1,
    concurrency: Annotated[int, typer.Option(min=1, help="extractor requests in flight (for a server)")] = 1,
) -> None:
    """Ingest videos, recordings, images and PDFs: scene captions, transcripts and page text, searchable later.

    Re-ingesting an unchanged file does nothing; an interrupted ingest continues where it stopped.
    """
    from agent.ingest import Ingestor
    from agent.models.resolve import resolve_media_model

    store = _guard(lambda: _open_store(db or DEFAULT_DB))
    vectors = _guard(lambda: _embedder(embedder))
    with err.status(f"loading model {model} ..."):
        backend, _ = _guard(lambda: resolve_media_model(model, "see images or hear audio", echo=err.print))
    err.print(f"[dim]model: {backend.name}; embedder: {vectors.name if vectors else 'none (full-text only)'}[/dim]")
    ingestor = Ingestor(
        store,
        backend,
        embedder=vectors,
        allowed_hosts=allow_host or (),
        download_dir=download_dir,
        keyframes_per_scene=keyframes,
        concurrency=concurrency,
        progress=True,
    )
    report = _guard(lambda: ingestor.ingest_sync(sources, collection=collection))
    for item in report.sources:
        if item.status == "failed":
            err.print(f"[red]failed[/red] {escape(item.uri)}: {escape(item.error or '')}", soft_wrap=True)
            continue
        length = f", {item.media_seconds:.1f} s" if item.media_seconds else ""
        out.print(
            f"{item.status:9s} {item.uri} (source {item.source_id}, {item.kind}{length}): {item.segments} segments, "
            f"{item.features} features, {item.vectors} vectors written",
            soft_wrap=True,
            markup=False,
        )
    media = sum(s.media_seconds or 0.0 for s in report.sources if s.status != "failed")
    rate = f"; {media / report.seconds:.2f} media s per s" if media and report.seconds else ""
    err.print(f"[dim]{len(report.sources)} sources in {report.seconds:.1f} s{rate}[/dim]")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for")],
    collection: Annotated[str | None, typer.Option("--collection", "-c", help="only this collection")] = None,
    db: DbOpt = DEFAULT_DB,
    embedder: EmbedderOpt = "none",
    kinds: Annotated[list[str] | None, typer.Option("--kind", help="scene | audio | image | page (repeatable)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per hit")] = False,
) -> None:
    """Search ingested media: best segments first, with where they are (source, time span or page)."""
    from agent.ingest import citation

    store = _guard(lambda: _store(db or DEFAULT_DB))
    vectors = _guard(lambda: _embedder(embedder))
    bad = sorted(set(kinds or ()) - {"scene", "audio", "image", "page"})
    if bad:
        _fail(f"unknown kind(s) {bad}: use scene, audio, image or page", code=2)
    vector = vectors.embed_texts([query])[0] if vectors is not None else None
    hits = _guard(
        lambda: store.search_media(
            query,
            vector=vector,
            embedder=vectors.name if vectors is not None else None,
            collection=collection,
            kinds=kinds,
            limit=limit,
        )
    )
    for hit in hits:
        if as_json:
            seg = hit.segment
            row = {"source": hit.source.uri, "source_id": hit.source.id, "kind": seg.kind, "start": seg.start,
                   "end": seg.end, "page": seg.page, "score": hit.score, "features": hit.features,
                   "keyframes": [r.sha256 for r in seg.media if r.role == "keyframe"]}  # fmt: skip
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            out.print(f"[bold]{escape(citation(hit))}[/bold]  {escape(hit.snippet)}", soft_wrap=True)
    if not hits:
        err.print(f"nothing matches {query!r}")


def _open_store(db: str) -> Any:
    """A store to write to: created when missing (its folder must exist)."""
    from memory import Store

    if "://" not in db and not Path(db).expanduser().parent.is_dir():
        _fail(f"no folder for the memory store {db!r}")
    return Store(db)


def main() -> None:
    """Entry point of the `mmagent` command."""
    app()


if __name__ == "__main__":
    main()
