"""`LLM_PROVIDER=anthropic`: Claude models through the official `anthropic` SDK.

The stream is `POST {LLM_BASE_URL}/v1/messages` with `stream: true`; the system prompt goes in
the request's `system` field (the Messages API takes no `system` role in `messages`), and
consecutive messages of one role are merged into one turn. Tools, when offered, go in `tools`
(`input_schema`); an assistant message's tool calls become `tool_use` blocks and a `tool`
message a `tool_result` block of the next user turn. Server-sent events, in order:

- `message_start` — `message.usage.input_tokens` (plus cache reads and writes): the prompt;
- `content_block_delta` with a `text_delta` — a piece of text, yielded as one `TextDelta`;
- `content_block_start` of a `tool_use` block (its `id` and `name`), then `input_json_delta`s
  with the pieces of its input: a tool call, yielded whole as one `ToolCall` once the stream
  has finished, in block order, before the `Usage`;
- `message_delta` — `usage.output_tokens`, cumulative: the completion;
- `message_stop` — the end; a stream that ends without it broke off and fails;
- `error` (e.g. `overloaded_error`) — the provider gave up mid-stream; `ping`s are skipped.

No sampling temperature is sent: API version 2026-10-21, which this SDK speaks, refuses
`temperature`, `top_p` and `top_k` for every model (`LLM_TEMPERATURE` applies to `openai` only).

Retries (only before the first token), timeouts, cancellation and the usage estimate behave as
in `helpline.agents.providers.openai`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anthropic
import anyio
import httpx2

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.providers import ANTHROPIC_DEFAULT_MODEL
from helpline.agents.providers.streaming import (
    ProviderFailure,
    RetryingChatModel,
    RetryPolicy,
    is_retryable_status,
    status_message,
)
from helpline.agents.schemas import ChatMessage, TextDelta, ToolCall, ToolSpec, Usage
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens

if TYPE_CHECKING:
    from anthropic.types import ContentBlockParam, MessageParam, ToolParam

DEFAULT_MODEL = ANTHROPIC_DEFAULT_MODEL
# A compatible gateway may need no key, but the SDK refuses to send a request without one;
# Anthropic itself answers this with a 401, reported as refused credentials.
NO_API_KEY = "no-key-required"
CHECK_TIMEOUT_S = 2.0


def _tool_input(arguments: str) -> dict[str, object]:
    """A tool call's arguments as the object the API wants back (`{}` if they were not one)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _blocks(run: Sequence[ChatMessage]) -> list[ContentBlockParam]:
    blocks: list[ContentBlockParam] = []
    for message in run:
        if message.role == "tool":
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id or "",
                    "content": message.content,
                }
            )
            continue
        if message.content:
            blocks.append({"type": "text", "text": message.content})
        for call in message.tool_calls:
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": _tool_input(call.arguments),
                }
            )
    return blocks


def split_system(messages: Sequence[ChatMessage]) -> tuple[str, list[MessageParam]]:
    """The system prompt (all system messages joined) and the turns, same-role runs merged.

    Tool results are user turns for the Messages API. A turn of plain text is sent as one
    string; one with tool calls or results as content blocks.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    runs: list[tuple[str, list[ChatMessage]]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        if runs and runs[-1][0] == role:
            runs[-1][1].append(message)
        else:
            runs.append((role, [message]))
    turns: list[MessageParam] = []
    for role, run in runs:
        plain = all(m.role != "tool" and not m.tool_calls for m in run)
        if plain:
            text = "\n\n".join(m.content for m in run)
            if role == "assistant":
                turns.append({"role": "assistant", "content": text})
            else:
                turns.append({"role": "user", "content": text})
        elif role == "assistant":
            turns.append({"role": "assistant", "content": _blocks(run)})
        else:
            turns.append({"role": "user", "content": _blocks(run)})
    return system, turns


def to_anthropic_tool(spec: ToolSpec) -> ToolParam:
    return {
        "name": spec.name,
        "description": spec.description,
        "input_schema": dict(spec.parameters),
    }


@dataclass
class _PartialCall:
    """A `tool_use` block being streamed: its id and name first, its input JSON in pieces."""

    id: str
    name: str
    arguments: list[str] = field(default_factory=list)

    def finished(self) -> ToolCall:
        return ToolCall(id=self.id, name=self.name, arguments="".join(self.arguments) or "{}")


class AnthropicChatModel(RetryingChatModel):
    """Streams messages from the Anthropic Messages API (or a compatible server)."""

    provider = "anthropic"

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 2,
        retry_backoff_s: float = 0.5,
        max_tokens: int = 1024,
        check_timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._check_timeout_s = check_timeout_s
        self._retry = RetryPolicy(max_retries=max_retries, backoff_s=retry_backoff_s)
        self._client = anthropic.AsyncAnthropic(
            base_url=base_url,
            api_key=api_key or NO_API_KEY,
            timeout=anthropic.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=0,
        )

    async def _attempt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]:
        system, turns = split_system(messages)
        try:
            stream = await self._client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                messages=turns,
                stream=True,
                system=system or anthropic.omit,
                tools=[to_anthropic_tool(spec) for spec in tools] if tools else anthropic.omit,
            )
        except Exception as exc:
            raise self._failure(exc, streaming=False) from exc

        parts: list[str] = []
        calls: dict[int, _PartialCall] = {}
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        finished = False
        try:
            async for event in stream:
                # Compatible servers may leave usage out; the SDK does not validate events.
                if event.type == "message_start":
                    usage = getattr(event.message, "usage", None)
                    if usage is not None:
                        prompt_tokens = (
                            (usage.input_tokens or 0)
                            + (usage.cache_creation_input_tokens or 0)
                            + (usage.cache_read_input_tokens or 0)
                        )
                elif event.type == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        calls[event.index] = _PartialCall(id=block.id, name=block.name)
                elif event.type == "content_block_delta":
                    if event.delta.type == "text_delta" and event.delta.text:
                        parts.append(event.delta.text)
                        yield TextDelta(event.delta.text)
                    elif event.delta.type == "input_json_delta" and event.index in calls:
                        calls[event.index].arguments.append(event.delta.partial_json)
                elif event.type == "message_delta":
                    delta_usage = getattr(event, "usage", None)
                    if delta_usage is not None:
                        completion_tokens = delta_usage.output_tokens
                elif event.type == "message_stop":
                    finished = True
        except Exception as exc:
            raise self._failure(exc, streaming=True) from exc
        finally:
            # Also on cancellation: the provider must stop generating for a reader that left.
            await stream.close()

        if not finished:
            raise ProviderFailure(
                "The AI model's answer broke off before it finished", retryable=True
            )
        requested = [calls[index].finished() for index in sorted(calls)]
        for call in requested:
            yield call
        if prompt_tokens is not None and completion_tokens is not None:
            yield Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        else:
            yield Usage(
                prompt_tokens=estimate_prompt_tokens(messages),
                completion_tokens=estimate_tokens("".join(parts))
                + sum(estimate_tokens(call.name + call.arguments) for call in requested),
                estimated=True,
            )

    def _failure(
        self, exc: Exception, *, streaming: bool, timeout_s: float | None = None
    ) -> ProviderFailure:
        # While a stream is read the SDK passes httpx's own errors through unwrapped.
        cause = exc.__cause__ if isinstance(exc, anthropic.APIConnectionError) else exc
        if isinstance(cause, httpx2.ConnectTimeout):
            return ProviderFailure(
                f"The AI model could not be reached within {self._connect_timeout_s:g} s",
                retryable=True,
            )
        if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
            return ProviderFailure(
                f"The AI model did not respond within {timeout_s or self._timeout_s:g} s",
                retryable=True,
            )
        if isinstance(
            exc, anthropic.APIConnectionError | httpx2.TransportError | anyio.EndOfStream
        ):
            if streaming:
                return ProviderFailure(
                    "The connection to the AI model broke off mid-answer", retryable=True
                )
            return ProviderFailure("The AI model could not be reached", retryable=True)
        if isinstance(exc, anthropic.APIStatusError):
            if exc.status_code < 400:
                # An `error` event inside a 200 stream, e.g. `overloaded_error`.
                return ProviderFailure("The AI model reported an error mid-answer", retryable=True)
            return ProviderFailure(
                status_message(exc.status_code),
                retryable=is_retryable_status(exc.status_code),
                status=exc.status_code,
            )
        return ProviderFailure(
            "The AI model sent a response that could not be read", retryable=False
        )

    async def check(self) -> None:
        """List the models (`GET /v1/models`) with a short timeout; raise if that fails."""
        client = self._client.with_options(timeout=self._check_timeout_s, max_retries=0)
        try:
            await client.models.list(limit=1)
        except Exception as exc:
            failure = self._failure(exc, streaming=False, timeout_s=self._check_timeout_s)
            raise LLMServiceError(failure.message) from exc

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()
