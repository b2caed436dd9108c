"""`LLM_PROVIDER=openai`: any OpenAI-compatible chat-completions server.

OpenAI itself, vLLM, Ollama (`/v1`), llama.cpp's server, LiteLLM and the like, through the
official `openai` SDK. The stream is `POST {LLM_BASE_URL}/chat/completions` with `stream: true`
and `stream_options.include_usage`, read as server-sent `chat.completion.chunk` objects:

- `choices[0].delta.content` — a piece of text, yielded as one `TextDelta`;
- `choices[0].delta.tool_calls` — when `tools` were offered: pieces of the tool calls the model
  makes, keyed by `index` (the first piece of a call has its `id` and function `name`, the rest
  add to its `arguments` text); each call is yielded whole as one `ToolCall` once the stream
  has finished, in `index` order, before the `Usage`;
- `choices[0].finish_reason` — set on the last content chunk; a stream that ends without it
  broke off (a proxy cut it, the server died) and fails rather than passing as complete;
- a last chunk with `choices: []` and `usage` — the provider's token counts. OpenAI sends none
  for an interrupted stream and some servers never send it: the usage is then estimated
  offline (`helpline.agents.tokens`) and marked `estimated`.

The SDK's own retries are off: they would also retry after text was streamed. Retries happen in
`stream_with_retries`, only before the first token. Timeouts are httpx's: `LLM_CONNECT_TIMEOUT_S`
to connect, `LLM_TIMEOUT_S` for any single read, so a server that stops sending mid-answer fails
after that long.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx2
import openai

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.providers import OPENAI_DEFAULT_MODEL
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
    from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam

DEFAULT_MODEL = OPENAI_DEFAULT_MODEL
# Self-hosted servers (vLLM, Ollama, llama.cpp) need no key, but the SDK insists on one;
# OpenAI itself answers this with a 401, reported as refused credentials.
NO_API_KEY = "no-key-required"
CHECK_TIMEOUT_S = 2.0


def to_openai_message(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "assistant":
        if message.tool_calls:
            return {
                "role": "assistant",
                # `null` rather than "" beside tool calls: some compatible servers refuse both.
                "content": message.content or None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in message.tool_calls
                ],
            }
        return {"role": "assistant", "content": message.content}
    if message.role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id or "",
            "content": message.content,
        }
    return {"role": "user", "content": message.content}


def to_openai_tool(spec: ToolSpec) -> ChatCompletionToolUnionParam:
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": dict(spec.parameters),
        },
    }


@dataclass
class _PartialCall:
    """A tool call being streamed: its id and name come first, its arguments in pieces."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def finished(self, index: int) -> ToolCall:
        return ToolCall(
            id=self.id or f"call_{index}",
            name=self.name,
            arguments="".join(self.arguments) or "{}",
        )


class OpenAIChatModel(RetryingChatModel):
    """Streams chat completions from an OpenAI-compatible server."""

    provider = "openai"

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
        temperature: float = 0.2,
        check_timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._check_timeout_s = check_timeout_s
        self._retry = RetryPolicy(max_retries=max_retries, backoff_s=retry_backoff_s)
        # OpenAI replaced `max_tokens` by `max_completion_tokens` (its reasoning models refuse
        # the old name); compatible servers do not all know the new one yet.
        self.uses_max_completion_tokens = (
            base_url is None or httpx2.URL(base_url).host == "api.openai.com"
        )
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or NO_API_KEY,
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=0,
        )

    async def _attempt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]:
        payload = [to_openai_message(message) for message in messages]
        try:
            stream = await self._client.chat.completions.create(
                model=self.model,
                messages=payload,
                tools=[to_openai_tool(spec) for spec in tools] if tools else openai.omit,
                stream=True,
                stream_options={"include_usage": True},
                max_completion_tokens=self.max_tokens
                if self.uses_max_completion_tokens
                else openai.omit,
                max_tokens=openai.omit if self.uses_max_completion_tokens else self.max_tokens,
                temperature=self.temperature,
            )
        except Exception as exc:
            raise self._failure(exc, streaming=False) from exc

        parts: list[str] = []
        calls: dict[int, _PartialCall] = {}
        usage: Usage | None = None
        finished = False
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens,
                        completion_tokens=chunk.usage.completion_tokens,
                    )
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    delta = choice.delta
                    text = delta.content if delta is not None else None
                    if text:
                        parts.append(text)
                        yield TextDelta(text)
                    for piece in (delta.tool_calls if delta is not None else None) or ():
                        partial = calls.setdefault(piece.index, _PartialCall())
                        if piece.id:
                            partial.id = piece.id
                        if piece.function is not None:
                            # Sent once by OpenAI; some compatible servers repeat it.
                            if piece.function.name and not partial.name:
                                partial.name = piece.function.name
                            if piece.function.arguments:
                                partial.arguments.append(piece.function.arguments)
                    if choice.finish_reason is not None:
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
        requested = [calls[index].finished(index) for index in sorted(calls)]
        for call in requested:
            yield call
        yield usage or Usage(
            prompt_tokens=estimate_prompt_tokens(messages),
            completion_tokens=estimate_tokens("".join(parts))
            + sum(estimate_tokens(call.name + call.arguments) for call in requested),
            estimated=True,
        )

    def _failure(
        self, exc: Exception, *, streaming: bool, timeout_s: float | None = None
    ) -> ProviderFailure:
        if isinstance(exc, openai.APITimeoutError):
            if isinstance(exc.__cause__, httpx2.ConnectTimeout):
                return ProviderFailure(
                    f"The AI model could not be reached within {self._connect_timeout_s:g} s",
                    retryable=True,
                )
            return ProviderFailure(
                f"The AI model did not respond within {timeout_s or self._timeout_s:g} s",
                retryable=True,
            )
        if isinstance(exc, openai.APIConnectionError):
            if streaming:
                return ProviderFailure(
                    "The connection to the AI model broke off mid-answer", retryable=True
                )
            return ProviderFailure("The AI model could not be reached", retryable=True)
        if isinstance(exc, openai.APIStatusError):
            return ProviderFailure(
                status_message(exc.status_code),
                retryable=is_retryable_status(exc.status_code),
                status=exc.status_code,
            )
        if isinstance(exc, openai.APIError):
            # An `{"error": …}` object inside the stream: the server gave up mid-answer.
            return ProviderFailure("The AI model reported an error mid-answer", retryable=True)
        return ProviderFailure(
            "The AI model sent a response that could not be read", retryable=False
        )

    async def check(self) -> None:
        """List the server's models (`GET /models`) with a short timeout; raise if that fails."""
        client = self._client.with_options(timeout=self._check_timeout_s, max_retries=0)
        try:
            await client.models.list()
        except Exception as exc:
            failure = self._failure(exc, streaming=False, timeout_s=self._check_timeout_s)
            raise LLMServiceError(failure.message) from exc

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()
