"""Shared pieces of the model-mode server tests: a real uvicorn server on loopback, and a turn script that makes
a served model behave like an agent's model (call a tool after a user turn, answer after a tool result).

Random weights emit noise, and a 135M model rarely picks a tool on its own: `TurnScript` is a logits processor
(the backend's own extension point, like `agent.models.tiny.ScriptedOutputs`) that forces at most the opening
of a call (`<|tool_call|>`, optionally with a tool name), after which the grammar-constrained decoder writes the
arguments, and that steers later text to end soon. Everything else (rendering, the grammar, parsing, the
server, the clients) runs for real.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

FREE = ""
"""A turn the model (under the grammar) writes on its own."""
TEXT = None
"""A turn answered in text (no call can start), steered to end after a few tokens."""


class TurnScript:
    """Per generation: which turn of the agent loop it is (assistant turns before it), and what
    to force for it: `prefixes[turn]` is a completion prefix (`FREE`, a call opening such as
    `'<|tool_call|>[{"name": "get_weather", "arguments": '`, or `TEXT`); turns past the list are `TEXT`.

    After `soft_end` generated tokens, the end of turn and JSON closers (`"`, `}`, `]`) get a large bonus: the
    grammar still decides what is allowed, so a call or a JSON answer is closed validly, just soon.
    """

    def __init__(self, tokenizer: Any, *, chatml: bool, soft_end: int = 16) -> None:
        self.tokenizer = tokenizer
        self.chatml = chatml
        self.soft_end = soft_end
        self.prefixes: list[str | None] = [call_opening(chatml=chatml)]  # a call after the user, then text
        self.turns: list[int] = []  # the turn of every generation seen (tests assert on it)
        vocab = tokenizer.get_vocab()
        if chatml:
            self.open_ban = list(tokenizer("<tool_call>", add_special_tokens=False)["input_ids"][:1])
            self.enders = [int(tokenizer.convert_tokens_to_ids("<|im_end|>"))]
        else:
            self.open_ban = [vocab["<|tool_call|>"]]
            self.enders = [vocab["<|end|>"]]
        closers = {t for text in ('"', "}", "]", '"}', "}]", '"}}') for t in self._ids(text)[:1]}
        self.closers = sorted(closers | set(self.enders))
        self._last: list[int] = []
        self._forced: list[int] = []
        self._text = False
        self._start = 0

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _turn(self, prompt: str) -> int:
        """Assistant turns before this one (one run of an agent loop per conversation in these tests; some
        frameworks send tool results back as user turns, so the user turns do not delimit runs)."""
        if self.chatml:
            return sum(1 for seg in prompt.split("<|im_start|>") if seg.startswith("assistant")) - 1
        return prompt.count("<|assistant|>") - 1

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        ids = input_ids[0].tolist()
        if not (len(ids) == len(self._last) + 1 and ids[: len(self._last)] == self._last):
            self._new_generation(ids)
        self._last = ids
        produced = len(ids) - self._start
        if produced < len(self._forced):
            forced = scores.new_full(scores.shape, float("-inf"))
            forced[..., self._forced[produced]] = 0.0
            return forced
        if self._text:
            scores[..., self.open_ban] = float("-inf")
        if produced >= self.soft_end:
            scores[..., self.enders if self._text else self.closers] += 1000.0
        return scores

    def _new_generation(self, ids: list[int]) -> None:
        prompt = str(self.tokenizer.decode(ids, skip_special_tokens=False))
        turn = max(self._turn(prompt), 0)
        self.turns.append(turn)
        prefix = self.prefixes[turn] if turn < len(self.prefixes) else TEXT
        self._start = len(ids)
        self._text = prefix is None
        self._forced = self._ids(prefix) if prefix else []
        opening = "<tool_call>" if self.chatml else "<|tool_call|>"
        if ("<tools>" if self.chatml else "<|tool|>") not in prompt:
            self._forced = []  # a request without tools: nothing to call
        generation_prompt = "<|im_start|>assistant" if self.chatml else "<|assistant|>"
        if opening in prompt[prompt.rfind(generation_prompt) :]:
            # tool_choice required/named: the backend already put a call opening in the prompt; a prefix that
            # names the tool continues it (required), a named tool needs nothing more
            rest = prefix.removeprefix(opening) if prefix and prompt.endswith(opening) else ""
            self._forced = self._ids(rest) if rest else []


def call_opening(name: str | None = None, *, chatml: bool = False) -> str:
    """The start of a call block (naming `name` when given) for `TurnScript.prefixes`."""
    opening = "<tool_call>" if chatml else "<|tool_call|>"
    return opening if name is None else opening + '[{"name": "' + name + '", "arguments": '


@dataclass
class Running:
    base_url: str
    server: uvicorn.Server


@contextmanager
def running(app: Any) -> Iterator[Running]:
    """Serve an ASGI app with uvicorn on a free loopback port for the duration of the block."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}/v1", server)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def stub_model_server(
    call_for: Callable[[str], tuple[str, dict[str, Any]]], answer: Callable[[str], str]
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in OpenAI-compatible model server on loopback: after a user turn it asks for the call
    `call_for(user_text)` gives (name, arguments), after a tool result it answers `answer(result_text)`.
    Yields its base URL and the request bodies it received."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen: list[dict[str, Any]] = []

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append(body)
        last = body["messages"][-1]
        if last["role"] == "tool":
            message: dict[str, Any] = {"role": "assistant", "content": answer(last["content"])}
        else:
            name, arguments = call_for(last["content"])
            function = {"name": name, "arguments": json.dumps(arguments)}
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": function}],
            }
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return JSONResponse(
            {"id": "x", "object": "chat.completion", "model": body.get("model"), "choices": [choice], "usage": usage}
        )

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    with running(app) as served:
        yield served.base_url, seen


def weather_tool(name: str = "get_weather") -> dict[str, Any]:
    """An OpenAI function tool with a small schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
            },
        },
    }


def text_of(parts: Sequence[Any]) -> str:
    return "".join(getattr(p, "text", "") for p in parts)
