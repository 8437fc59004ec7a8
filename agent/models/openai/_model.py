"""`OpenAIModel`: requests, streaming and retries against a chat-completions endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from agent.exceptions import ModelHTTPError, UserError
from agent.messages import Message, ToolDefinition
from agent.models import Model, ModelResponse, ModelSettings, TextDelta, ToolCallDelta
from agent.models.openai._wire import (
    LORA_KEYS,
    SSEDecoder,
    StreamAccumulator,
    WireFormatError,
    build_body,
    error_detail,
    excerpt,
    parse_completion,
    retry_after,
    route_model,
)

__all__ = ["OpenAIModel"]

_RETRY_STATUS = frozenset({408, 409, 429})
_MAX_WAIT = 60.0


class OpenAIModel(Model):
    """A model served behind an OpenAI-compatible `/chat/completions` endpoint.

    The constructor only stores its arguments; the HTTP client is created on the first request (and again
    if a later request runs in another event loop, as consecutive `Agent.run_sync` calls do).

    Args:
        base_url: the API root, as the `openai` client takes it, e.g. `http://localhost:8000/v1`.
        model: the served model name (vLLM: the model id or its `--served-model-name`).
        api_key: sent as `Authorization: Bearer ...` when given.
        lora_models: per-modality adapter names as served by vLLM's `--lora-modules`: `{"vision": ...,
            "speech": ...}`. A request with any image goes to the vision adapter, one with audio but no image to
            the speech adapter, text-only requests to the base model.
        timeout: seconds for one HTTP attempt (connecting is capped at 10 s), or an `httpx.Timeout`.
        max_retries: further attempts after a retryable failure (408/409/429/5xx, timeout, connection error).
        retry_backoff: the first backoff in seconds; it doubles per attempt, with jitter, up to `max_backoff`.
        max_backoff: the longest wait between attempts (a server's `Retry-After` is honoured up to 60 s).
        http_client: an `httpx.AsyncClient` to use (proxies, TLS, a `MockTransport` in tests); the caller
            keeps ownership and closes it.
        context_length: the served context window in tokens, when known (used by context policies).
        headers: extra HTTP headers for every request.
        extra_body: extra JSON fields for every request (server-specific sampling options, e.g. `top_k`).
        stream: stream responses (SSE) in `request_stream`; False sends plain requests there too, for servers
            whose streamed tool calls are unreliable (vLLM's `phi4_mini_json` parser, see docs/vllm.md).

    Raises:
        UserError: a malformed `base_url`, an unknown `lora_models` key, or a negative retry setting.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        lora_models: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout = 600.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        max_backoff: float = 20.0,
        http_client: httpx.AsyncClient | None = None,
        context_length: int | None = None,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        stream: bool = True,
    ) -> None:
        url = base_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise UserError(f"base_url must be an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        if not model:
            raise UserError("model must name the served model")
        unknown = set(lora_models or {}) - LORA_KEYS
        if unknown:
            raise UserError(f"lora_models keys must be 'vision' and/or 'speech', got {sorted(unknown)}")
        if max_retries < 0 or retry_backoff < 0 or max_backoff < 0:
            raise UserError("max_retries, retry_backoff and max_backoff cannot be negative")
        self.base_url = url
        self.model = model
        self.lora_models = dict(lora_models) if lora_models else None
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.context_length = context_length
        self.extra_body = dict(extra_body) if extra_body else None
        self.stream = stream
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=10.0)
        self._headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = http_client
        self._owns_client = http_client is None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return f"{self.model} via {self.base_url}"

    @property
    def endpoint(self) -> str:
        """The URL requests are posted to."""
        return f"{self.base_url}/chat/completions"

    def model_for(self, messages: Sequence[Message]) -> str:
        """The served model name a request with these messages goes to (LoRA routing by modality)."""
        return route_model(messages, self.model, self.lora_models)

    # ------------------------------------------------------------------ the seam

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> ModelResponse:
        model = self.model_for(messages)
        body = build_body(model, messages, tools, settings, stream=False, extra=self.extra_body)
        response = await self._send(body, stream=False)
        try:
            text = response.text
            data = json.loads(text)
            return parse_completion(data, model)
        except (ValueError, WireFormatError) as exc:
            raise ModelHTTPError(
                f"the model server at {self.endpoint} answered {response.status_code} with something that is not "
                f"a chat completion: {exc}",
                status_code=response.status_code,
                body=excerpt(response.text),
            ) from exc

    async def request_stream(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ToolCallDelta | ModelResponse]:
        if not self.stream:
            async for item in super().request_stream(messages, tools, settings):
                yield item
            return
        model = self.model_for(messages)
        body = build_body(model, messages, tools, settings, stream=True, extra=self.extra_body)
        response = await self._send(body, stream=True)
        try:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                # A server that ignored `stream: true` and answered with one completion.
                await response.aread()
                completion = parse_completion(json.loads(response.text), model)
                if completion.message.text:
                    yield TextDelta(completion.message.text)
                yield completion
                return
            accumulator = StreamAccumulator(requested_model=model)
            async for data in self._events(response):
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    raise ModelHTTPError(
                        f"the model server at {self.endpoint} reported an error mid-stream: {error_detail(data)}",
                        status_code=response.status_code,
                        body=excerpt(data),
                    )
                text = accumulator.add(chunk)
                if text:
                    yield TextDelta(text)
            yield accumulator.response()
        except (ValueError, WireFormatError) as exc:
            raise ModelHTTPError(
                f"the model server at {self.endpoint} sent a stream that is not chat-completion chunks: {exc}",
                status_code=response.status_code,
            ) from exc
        finally:
            await response.aclose()

    async def _events(self, response: httpx.Response) -> AsyncIterator[str]:
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                data = decoder.feed(line)
                if data is not None:
                    yield data
        except httpx.TimeoutException as exc:
            raise ModelHTTPError(
                f"the stream from {self.endpoint} stalled for longer than the timeout: {_reason(exc)}"
            ) from exc
        except httpx.TransportError as exc:
            raise ModelHTTPError(f"the stream from {self.endpoint} broke off: {_reason(exc)}") from exc
        tail = decoder.flush()
        if tail is not None:
            yield tail

    # ------------------------------------------------------------------ HTTP with retries

    async def _send(self, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        client = await self._client_for_this_loop()
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            wait: float | None = None
            status: int | None = None
            text: str | None = None
            try:
                request = client.build_request(
                    "POST", self.endpoint, json=body, headers=self._headers, timeout=self._timeout
                )
                response = await client.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                message = f"the model server at {self.endpoint} did not answer in time ({_reason(exc)})"
            except httpx.TransportError as exc:
                message = (
                    f"cannot reach the model server at {self.endpoint}: {_reason(exc)}. "
                    "Is it running, and is base_url right?"
                )
            else:
                if response.status_code < 400:
                    return response
                status = response.status_code
                text = (await response.aread()).decode("utf-8", errors="replace")
                await response.aclose()
                message = self._status_message(status, text)
                if not _retryable(status):
                    raise ModelHTTPError(message, status_code=status, body=excerpt(text))
                wait = retry_after(response.headers)
            if attempt == attempts:
                if attempts > 1:
                    message += f" (gave up after {attempts} attempts)"
                raise ModelHTTPError(message, status_code=status, body=None if text is None else excerpt(text))
            await asyncio.sleep(self._backoff(attempt - 1, wait))
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int, server_wait: float | None) -> float:
        if server_wait is not None:
            return min(server_wait, _MAX_WAIT)
        delay: float = min(self.retry_backoff * 2.0**attempt, self.max_backoff)
        return delay * random.uniform(0.5, 1.0)

    def _status_message(self, status: int, text: str) -> str:
        detail = error_detail(text) or "(empty body)"
        hint = ""
        if status in (401, 403):
            hint = " Check api_key."
        elif status == 404:
            hint = f" Check base_url (it should end in /v1) and the model name {self.model!r}."
        elif status == 413:
            hint = " The request (images, audio) is larger than the server accepts."
        return f"the model server at {self.endpoint} answered HTTP {status}: {detail}.{hint}".rstrip()

    # ------------------------------------------------------------------ client lifetime

    async def _client_for_this_loop(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is not None and (not self._owns_client or self._loop is loop):
            return self._client
        if self._client is not None:  # created in an event loop that has since ended: its pool is unusable
            with contextlib.suppress(RuntimeError, httpx.HTTPError):
                await self._client.aclose()
        self._client = httpx.AsyncClient(timeout=self._timeout)
        self._loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client this model created (a client passed in stays open)."""
        if self._client is not None and self._owns_client:
            client, self._client, self._loop = self._client, None, None
            await client.aclose()

    async def __aenter__(self) -> OpenAIModel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"OpenAIModel({self.base_url!r}, {self.model!r})"


def _retryable(status: int) -> bool:
    return status in _RETRY_STATUS or status >= 500


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
