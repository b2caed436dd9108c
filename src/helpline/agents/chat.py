"""The plain chat answerer: the conversation goes to a `ChatModel`, its text comes back.

Events of `ChatAnswerer.answer`, in order:

- `TextDelta` — one per piece the model streams, in order; concatenated they are the answer;
- `Usage` — exactly one, last, once the model has finished: the provider's figure, or an
  offline estimate (`estimated=True`) when the provider reported none.

When the answer is cancelled or the model fails (`LLMServiceError`), no `Usage` comes: the
engine then estimates it with `estimate_prompt_tokens(request)` for the prompt and
`helpline.agents.tokens.estimate_tokens(text_so_far)` for the completion.

The prompt is the system prompt, then the conversation's history (oldest first; the newest
messages that fit `history_token_budget`), then the question.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from helpline.agents.prompts import load_prompt
from helpline.agents.schemas import (
    AnswerEvent,
    AnswerRequest,
    ChatMessage,
    ChatModel,
    TextDelta,
    Usage,
)
from helpline.agents.tokens import (
    estimate_fixed_tokens,
    estimate_message_tokens,
    estimate_prompt_tokens,
    estimate_tokens,
)

# Estimated tokens of history sent with a question. Small enough for the 4k–8k contexts that
# self-hosted models often run with, next to the system prompt, the question and the reply.
DEFAULT_HISTORY_TOKEN_BUDGET = 3000

T = TypeVar("T")


@asynccontextmanager
async def closing_stream(stream: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """Close `stream` (an async generator) on leaving, also on cancellation or an early break.

    A generator abandoned mid-way is otherwise only closed by the garbage collector, which
    would leave its provider HTTP stream open until then.
    """
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def build_messages(
    request: AnswerRequest,
    system_prompt: str,
    *,
    history_token_budget: int = DEFAULT_HISTORY_TOKEN_BUDGET,
) -> list[ChatMessage]:
    """The prompt for `request`: system prompt, the newest history that fits, the question."""
    kept: list[ChatMessage] = []
    used = 0
    for message in reversed(request.history):
        cost = estimate_message_tokens(message)
        if used + cost > history_token_budget:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append(
            ChatMessage(
                role="system",
                content=system_prompt,
                token_count=estimate_fixed_tokens(system_prompt),
            )
        )
    messages.extend(kept)
    messages.append(ChatMessage(role="user", content=request.question))
    return messages


def estimate_request_tokens(
    request: AnswerRequest,
    system_prompt: str,
    *,
    history_token_budget: int = DEFAULT_HISTORY_TOKEN_BUDGET,
) -> int:
    """Estimated prompt tokens of `request` as a chat answerer would send it."""
    return estimate_prompt_tokens(
        build_messages(request, system_prompt, history_token_budget=history_token_budget)
    )


def default_system_prompt() -> str:
    """The bundled system prompt of the plain chat answerer (`prompts/chat.md`)."""
    return load_prompt("chat")


class ChatAnswerer:
    """Answers with a chat model alone: no knowledge base, no tools."""

    name = "chat"

    def __init__(
        self,
        model: ChatModel,
        system_prompt: str | None = None,
        *,
        history_token_budget: int = DEFAULT_HISTORY_TOKEN_BUDGET,
    ) -> None:
        self.chat_model = model
        self.model = model.model
        self.system_prompt = default_system_prompt() if system_prompt is None else system_prompt
        self.history_token_budget = history_token_budget

    def build_messages(self, request: AnswerRequest) -> Sequence[ChatMessage]:
        """The messages sent to the model for `request`."""
        return build_messages(
            request, self.system_prompt, history_token_budget=self.history_token_budget
        )

    def estimate_prompt_tokens(self, request: AnswerRequest) -> int:
        """Estimated prompt tokens of `request` (for answers that end without a `Usage`)."""
        return estimate_prompt_tokens(self.build_messages(request))

    async def answer(self, request: AnswerRequest) -> AsyncGenerator[AnswerEvent, None]:
        """Stream the model's answer to `request`: `TextDelta`s, then one `Usage`."""
        messages = self.build_messages(request)
        parts: list[str] = []
        usage: Usage | None = None
        async with closing_stream(self.chat_model.stream(messages)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    if event.text:
                        parts.append(event.text)
                        yield event
                else:
                    usage = event
        yield usage or Usage(
            prompt_tokens=estimate_prompt_tokens(messages),
            completion_tokens=estimate_tokens("".join(parts)),
            estimated=True,
        )
