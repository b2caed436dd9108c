"""What the network providers share: bounded retries before the first token, and failures.

A provider implements one *attempt* — open the HTTP stream, yield `TextDelta`s (and, when
tools were offered, `ToolCall`s), then one `Usage` — and raises `ProviderFailure` (with a
client-safe message and whether another attempt could help) for anything that goes wrong.
`stream_with_retries` runs attempts: it retries a failed attempt with exponential backoff only
while no text or tool call has been yielded, because text already sent to clients cannot be
taken back, a tool may already be running, and a second attempt would answer differently.
Every failure that is not retried leaves as `LLMServiceError`.

The attempt generator is closed through `aclosing`, so cancelling the task that iterates the
stream (or closing the stream) closes the provider's HTTP response at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import overload

import structlog

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.schemas import ChatMessage, TextDelta, ToolCall, ToolSpec, Usage

log = structlog.get_logger(__name__)

# Statuses worth another attempt: timeouts, conflicts, rate limits and server-side failures.
# Other 4xx (bad key, unknown model, bad request) would fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def status_message(status: int) -> str:
    """A client-safe sentence for an HTTP error from the provider (the body may echo secrets)."""
    if status in (401, 403):
        return f"The AI model refused the credentials (HTTP {status})"
    if status == 404:
        return "The AI model or its endpoint was not found (HTTP 404)"
    if status == 429:
        return "The AI model is rate-limited or out of quota (HTTP 429)"
    if status >= 500:
        return f"The AI model failed (HTTP {status})"
    return f"The AI model rejected the request (HTTP {status})"


class ProviderFailure(Exception):
    """One attempt failed; `message` is safe for clients, `retryable` says if retrying helps."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries before the first token: `max_retries` more attempts, exponential backoff."""

    max_retries: int = 2
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based), with jitter against herds."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0**retry)
        return ceiling * random.uniform(0.5, 1.0)  # jitter, not security


StreamEvent = TextDelta | ToolCall | Usage
Attempt = Callable[[], AsyncGenerator[StreamEvent, None]]


async def stream_with_retries(
    attempt: Attempt, *, policy: RetryPolicy, provider: str, model: str
) -> AsyncGenerator[StreamEvent, None]:
    """Run `attempt` until it succeeds, retrying only failures before any text or tool call."""
    retry = 0
    while True:
        started = False
        try:
            async with aclosing(attempt()) as events:
                async for event in events:
                    if isinstance(event, TextDelta | ToolCall):
                        started = True
                    yield event
            return
        except ProviderFailure as failure:
            if started or not failure.retryable or retry >= policy.max_retries:
                log.warning(
                    "llm.stream_failed",
                    provider=provider,
                    model=model,
                    error=failure.message,
                    cause=type(failure.__cause__).__name__ if failure.__cause__ else None,
                    after_first_token=started,
                    attempts=retry + 1,
                )
                raise LLMServiceError(failure.message) from failure
            delay = policy.delay(retry)
            log.info(
                "llm.retry",
                provider=provider,
                model=model,
                error=failure.message,
                retry=retry + 1,
                delay_s=round(delay, 3),
            )
            await asyncio.sleep(delay)
            retry += 1


class RetryingChatModel:
    """The `stream` of a network provider: one attempt per try, retried before the first piece.

    Subclasses set `provider`, `model` and `_retry`, and implement `_attempt`.
    """

    provider: str
    model: str
    _retry: RetryPolicy

    @overload
    def stream(
        self, messages: Sequence[ChatMessage]
    ) -> AsyncGenerator[TextDelta | Usage, None]: ...

    @overload
    def stream(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]: ...

    def stream(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec] = ()
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]:
        """Stream the reply to `messages`: text pieces, tool calls, then exactly one `Usage`."""
        messages = tuple(messages)
        tools = tuple(tools)
        return stream_with_retries(
            lambda: self._attempt(messages, tools),
            policy=self._retry,
            provider=self.provider,
            model=self.model,
        )

    def _attempt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]:
        raise NotImplementedError
