"""What an answerer consumes and produces.

An *answerer* turns a conversation into an async stream of `AnswerEvent`s. The generation
engine (`helpline.realtime`) runs it, numbers the text pieces, stores and fans them out. A
plain chat answerer wraps a `ChatModel` provider; the knowledge-base answerers (LangGraph agent,
extractive) produce the same events, adding sources and tool activity.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

ChatRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True, slots=True)
class Source:
    document_id: uuid.UUID
    title: str
    chunk_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer's text, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class SourcesFound:
    """Knowledge-base passages the answer draws on (replaces any earlier list)."""

    sources: Sequence[Source]


@dataclass(frozen=True, slots=True)
class ToolActivity:
    """A tool the answerer called (for logs, traces and an agent's console)."""

    name: str
    status: Literal["started", "finished", "failed"]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage: the provider's figure when it reports one, an estimate otherwise."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


AnswerEvent = TextDelta | SourcesFound | ToolActivity | Usage


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """Everything an answerer may use; identity comes from here, never from model output."""

    conversation_id: uuid.UUID
    user_id: uuid.UUID
    assistant_message_id: uuid.UUID
    question: str
    history: Sequence[ChatMessage] = field(default_factory=tuple)


class Answerer(Protocol):
    """Anything that answers a conversation as a stream of events.

    Cancelling the task that iterates `answer()` must stop the work, including the HTTP stream
    to a model provider (close it in a `finally`/`async with`).
    """

    name: str
    model: str

    def answer(self, request: AnswerRequest) -> AsyncIterator[AnswerEvent]: ...


class ChatModel(Protocol):
    """A model provider that streams a chat completion as text pieces and, last, its usage."""

    provider: str
    model: str

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[TextDelta | Usage]: ...

    async def check(self) -> None:
        """Raise if the provider cannot be reached (for `/health`)."""
        ...

    async def aclose(self) -> None: ...
