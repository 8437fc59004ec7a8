"""`mmagent serve` in model mode under concurrent tool-calling clients: valid calls, and the HTTP layer's cost.

Starts the real CLI (`mmagent serve --model tiny-phi4 --mode model`) in a subprocess, then:

1. validity: `--requests` (200) chat completions from `--clients` (8) concurrent official `openai` clients, each
   with `tool_choice="required"` over generated Pydantic tool schemas (`agent.models._grammar._schemas`).
   Every returned call must name a tool of its request and validate against that tool's schema (jsonschema
   with format checking); the rate of requests whose every call does is `valid_rate`;
2. HTTP overhead: `--timed` (40) requests, one at a time, from one client. The server reports the time its
   backend took for each (`Server-Timing: model;dur=...`: the very request made in-process, through
   `TransformersModel.request`); the client measures the whole round trip. The overhead of a request is the
   difference: the client's serialization, HTTP, the server's parsing and checks, conversion, the response
   body and the client's parsing. `http_overhead_ms` is the median.

    python benchmarks/serve.py [--requests 200] [--clients 8] [--timed 40] [--max-tokens 256]

Last line: `valid_rate=<float> http_overhead_ms=<float>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import jsonschema
import openai

from agent.messages import ToolDefinition
from agent.models._grammar._schemas import random_tools

ROOT = Path(__file__).resolve().parents[1]
FORMATS = jsonschema.FormatChecker()
PROMPT = "Call one of the tools with arguments that fit its schema."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "agent.cli",
        "serve",
        "--model",
        "tiny-phi4",
        "--mode",
        "model",
        "--port",
        str(port),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 180 s")


def request_for(index: int) -> list[ToolDefinition]:
    return random_tools(random.Random(index))


def valid(reply: Any, tools: list[ToolDefinition]) -> tuple[bool, str]:
    choice = reply.choices[0]
    calls = choice.message.tool_calls or []
    if choice.finish_reason != "tool_calls" or not calls:
        return False, f"no call (finish_reason={choice.finish_reason})"
    schemas = {t.name: t.parameters for t in tools}
    for call in calls:
        if call.function.name not in schemas:
            return False, f"unknown tool {call.function.name!r}"
        try:
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, schemas[call.function.name], format_checker=FORMATS)
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            return False, f"{call.function.name}: {str(exc).splitlines()[0][:120]}"
    return True, ""


def validity(base_url: str, model: str, requests: int, clients: int, max_tokens: int) -> tuple[float, float, list[str]]:
    pool = [openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600) for _ in range(clients)]

    def one(index: int) -> tuple[bool, str, float]:
        tools = request_for(index)
        started = time.perf_counter()
        reply = pool[index % clients].chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            tools=[t.to_openai() for t in tools],  # type: ignore[misc]
            tool_choice="required",
            max_tokens=max_tokens,
        )
        ok, why = valid(reply, tools)
        return ok, why, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        results = list(executor.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    for client in pool:
        client.close()
    failures = [f"request {i}: {why}" for i, (ok, why, _) in enumerate(results) if not ok]
    return sum(ok for ok, _, _ in results) / requests, elapsed, failures


def overhead(base_url: str, model_name: str, timed: int, max_tokens: int) -> tuple[list[float], list[float]]:
    """(overhead ms, model ms) per request."""
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    added: list[float] = []
    model_ms: list[float] = []
    for index in range(timed):
        tools = [t.to_openai() for t in request_for(10_000 + index)]
        messages = [{"role": "user", "content": PROMPT}]
        for _attempt in range(2):  # the first builds the grammar for this tool set; the second is measured
            started = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=model_name,
                messages=messages,
                tools=tools,
                tool_choice="required",
                max_tokens=max_tokens,  # type: ignore[arg-type]
            )
            raw.parse()
            elapsed = (time.perf_counter() - started) * 1000
        timing = raw.headers.get("server-timing", "")
        dur = float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")
        added.append(elapsed - dur)
        model_ms.append(dur)
    client.close()
    return added, model_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--timed", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    port = free_port()
    server = start_server(port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        name = httpx.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"]
        rate, elapsed, failures = validity(base_url, name, args.requests, args.clients, args.max_tokens)
        print(f"validity: {args.requests} requests from {args.clients} concurrent clients in {elapsed:.1f} s")
        print(f"  valid (every call parses and validates): {rate * args.requests:.0f}/{args.requests}")
        for failure in failures[:10]:
            print(f"  invalid: {failure}")
        added, model_ms = overhead(base_url, name, args.timed, args.max_tokens)
    finally:
        server.terminate()
        server.wait(30)
    median = statistics.median(added)
    low, _, high = statistics.quantiles(added, n=4) if len(added) > 1 else (median, median, median)
    print(
        f"HTTP overhead over {len(added)} sequential requests (model time median {statistics.median(model_ms):.1f} ms):"
    )
    print(f"  median {median:.2f} ms, quartiles {low:.2f} / {high:.2f} ms")
    print(f"valid_rate={rate:.4f} http_overhead_ms={median:.3f}")


if __name__ == "__main__":
    main()
