"""What an answerer consumes and produces.

An *answerer* turns a conversation into an async stream of `AnswerEvent`s. The generation
engine (`helpline.realtime`) runs it, numbers the text pieces, stores and fans them out. A
plain chat answerer wraps a `ChatModel` provider; the knowledge-base answerers (LangGraph agent,
extractive) produce the same events, adding sources and tool activity.

Tool calling is an extension of the same stream: a `ToolCallingChatModel` given `tools` may end
its answer with `ToolCall`s (before its `Usage`) instead of, or after, text. The conversation
then goes on with an assistant `ChatMessage` carrying those `tool_calls` and one `tool` message
per call holding its result (`tool_call_id`). Without `tools` the stream is text and usage only,
so a plain chat answerer never sees a tool call.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, overload

ChatRole = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool offered to the model: its name, what it does, and its arguments' JSON Schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asks for a tool to be run; `arguments` is the JSON object text it wrote.

    The text is passed on as the model sent it: it may be invalid JSON or carry arguments the
    tool does not take, and the tool's caller decides what to make of it.
    """

    id: str
    name: str
    arguments: str = "{}"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a prompt.

    An `assistant` message may carry the `tool_calls` the model made; a `tool` message is the
    result of one of them (`tool_call_id`), in plain text.
    """

    role: ChatRole
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    # The content's tokens when already counted (a stored message carries its count), so a
    # conversation's history is not estimated again for every answer. Not part of equality.
    token_count: int | None = field(default=None, compare=False)


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
    # The running summary of the conversation's messages older than `history` (agent memory).
    summary: str | None = None


# Hands a conversation over to a human: `escalate(conversation_id, user_id, reason)`. Built by
# the application around the conversations service; the agent's `escalate_to_human` tool calls
# it with the identity of the answer it is generating.
Escalate = Callable[[uuid.UUID, uuid.UUID, str], Awaitable[None]]


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


class ToolCallingChatModel(ChatModel, Protocol):
    """A `ChatModel` that can also be offered tools (see the module docstring)."""

    @overload
    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[TextDelta | Usage]: ...

    @overload
    def stream(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec]
    ) -> AsyncIterator[TextDelta | ToolCall | Usage]: ...
