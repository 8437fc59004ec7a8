"""Embedding the agent in a web app: one shared model, one stored conversation per user (Starlette + uvicorn).

    python examples/app_embedding.py [--port 8000] [--db app.db] [--model auto]

    curl -s localhost:8000/users/alice/chat -H 'content-type: application/json' -d '{"message": "What is 17 * 23?"}'
    curl -s localhost:8000/users/alice/history

Routes (errors are `{"error": "one line"}` with a 4xx/5xx status):

    POST /users/{user}/chat     {"message": "..."} -> {"reply", "conversation_id", "tool_calls"}
    GET  /users/{user}/history  -> {"user", "conversation_id", "messages": [{"role", "text", ...}]}
    GET  /health                -> {"status": "ok", "model"}

Here the path names the user; a real app takes the user from its authentication instead.

How one model is shared safely across concurrent requests:

* It is loaded once, before the server starts, and every request uses it (loading per request would cost
  seconds and a copy of the weights each time). One `Agent` wraps it: an agent keeps no state between runs.
* `TransformersModel` generates in a worker thread behind its own lock, so the event loop keeps answering other
  requests (history, health) while one generates, and concurrent generations queue instead of corrupting the
  KV cache. The cache is shared too: the common prefix (system prompt, tool definitions) is reused across users.
* Each user's turns are serialised by a per-user `asyncio.Lock`: two requests of one user would otherwise read
  the same history and interleave their messages in the conversation. Different users never wait for each
  other's lock, only for the model.
* The `Store` is thread-safe and commits every step. A user's conversation id is derived from the user id, so a
  restarted app (or several app processes sharing one database) finds the same conversations.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent import Agent, Message, Model, ModelSettings, ToolResultPart
from agent.exceptions import MMAgentError, ModelError, RunError, UserError
from memory import Store
from tools import Tool, tool
from tools.builtin import calculator

SYSTEM = "You are a helpful assistant in a chat app. Use the tools for arithmetic and the time; answer briefly."
USER_ID = re.compile(r"[A-Za-z0-9_.-]{1,48}")
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 4000


@tool
def utc_time() -> str:
    """The current date and time in UTC."""
    return f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"


TOOLS: list[Tool | Callable[..., Any]] = [calculator, utc_time]


class ChatRequest(BaseModel):
    """The body of POST /users/{user}/chat."""

    model_config = ConfigDict(extra="forbid")
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


def conversation_id(user: str) -> str:
    """The stored conversation of a user: derived from the id, so it survives restarts."""
    return f"user-{user}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _user(request: Request) -> str:
    user = str(request.path_params["user"])
    if not USER_ID.fullmatch(user):
        raise UserError("user ids are 1 to 48 letters, digits, '.', '_' or '-'")
    return user


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None once it is over `MAX_BODY_BYTES` (without reading the rest)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    return bytes(body)


def _history_entry(message: Message) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": message.role, "text": message.text}
    if message.tool_calls:
        entry["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in message.tool_calls]
    results = [p for p in message.parts if isinstance(p, ToolResultPart)]
    if results:
        entry["text"] = "\n".join(r.text for r in results)
        entry["tool"] = results[0].name
    return entry


class ChatService:
    """Per-user conversations over one shared agent (and so one shared model) and one store."""

    def __init__(self, agent: Agent, store: Store) -> None:
        if agent.memory is not store:
            raise UserError("the agent must keep its runs in the service's store: Agent(..., memory=store)")
        self.agent = agent
        self.store = store
        # One lock per user while it is in use; a user nobody is talking to holds no lock.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, user: str) -> asyncio.Lock:
        lock = self._locks.get(user)
        if lock is None:
            lock = self._locks[user] = asyncio.Lock()
        return lock

    def _ensure_conversation(self, user: str) -> str:
        cid = conversation_id(user)
        try:
            self.store.conversation(cid)
        except UserError:
            try:
                self.store.create_conversation(conversation_id=cid, title=f"chat with {user}", metadata={"user": user})
            except UserError:  # another process created it in between
                self.store.conversation(cid)
        return cid

    async def chat(self, user: str, message: str) -> dict[str, Any]:
        """Run the agent on the user's message, continuing their conversation."""
        async with self._lock(user):
            cid = await asyncio.to_thread(self._ensure_conversation, user)
            result = await self.agent.run(message, conversation_id=cid)
        calls = [c.name for m in result.new_messages for c in m.tool_calls]
        return {"reply": result.output, "conversation_id": cid, "tool_calls": calls}

    async def history(self, user: str) -> dict[str, Any]:
        """The user's stored conversation (empty before their first message)."""
        cid = conversation_id(user)
        try:
            messages = await asyncio.to_thread(self.store.load_conversation, cid)
        except UserError:
            messages = []
        return {"user": user, "conversation_id": cid, "messages": [_history_entry(m) for m in messages]}


def create_app(model: Model, store: Store, *, settings: ModelSettings | None = None) -> Starlette:
    """The web app: one agent over `model` (shared by every request) keeping each user's chat in `store`."""
    agent = Agent(
        model,
        tools=TOOLS,
        system_prompt=SYSTEM,
        memory=store,
        max_steps=4,
        settings=settings or ModelSettings(max_tokens=200),
    )
    service = ChatService(agent, store)

    async def chat(request: Request) -> JSONResponse:
        try:
            user = _user(request)
            body = await _read_body(request)
            if body is None:
                return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return _error(400, f'the body must be JSON like {{"message": "..."}}: {exc}')
            try:
                parsed = ChatRequest.model_validate(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "body"
                return _error(422, f"{where}: {first['msg']}")
            return JSONResponse(await service.chat(user, parsed.message))
        except UserError as exc:
            return _error(400, str(exc))
        except ModelError as exc:
            return _error(503, f"the model failed: {exc}")
        except RunError as exc:
            return _error(500, f"the agent stopped without an answer: {exc}")
        except MMAgentError as exc:  # the store failed
            return _error(500, str(exc))

    async def history(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await service.history(_user(request)))
        except UserError as exc:
            return _error(400, str(exc))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model.name})

    app = Starlette(
        routes=[
            Route("/users/{user}/chat", chat, methods=["POST"]),
            Route("/users/{user}/history", history, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ]
    )
    app.state.service = service
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A chat web app: per-user conversations over one shared model.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--db", default="app.db", help="memory store: SQLite file or SQLAlchemy URL (default app.db)")
    parser.add_argument("--model", default="auto", help="auto | phi4 | smollm2 | tiny-phi4 | folder | hub id | URL")
    args = parser.parse_args(argv)
    import uvicorn

    from agent.models.resolve import resolve_model

    model = resolve_model(args.model)  # once, before serving: every request shares it
    print(f"model: {model.name}", flush=True)
    with Store(args.db) as store:
        print(f"serving on http://{args.host}:{args.port} (POST /users/NAME/chat, GET /users/NAME/history)", flush=True)
        uvicorn.run(create_app(model, store), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MMAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
