"""The OpenAI-compatible API on top of conversations and the generation engine.

Each completion request becomes a conversation of the caller's: the earlier messages are stored
as its history, the last user message is sent as usual, and the support agent answers it through
the generation engine (knowledge base, tools, limits and budgets included). The conversation is
kept, so the exchange is visible like any other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.agents.exceptions import LLMServiceError
from helpline.auth.models import User
from helpline.conversations import service as conversations_service
from helpline.conversations.models import MessageRole
from helpline.conversations.service import SendResult
from helpline.core.database import unit_of_work
from helpline.core.errors import error_payload
from helpline.openai_compat.exceptions import ModelNotFound, NoQuestion
from helpline.openai_compat.schemas import (
    MODEL_ID,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    ModelCard,
    ModelList,
    ResponseMessage,
)
from helpline.realtime import service as realtime_service
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.frames import Frame

_ROLES = {
    "user": MessageRole.USER,
    "assistant": MessageRole.ASSISTANT,
    "system": MessageRole.SYSTEM,
    "developer": MessageRole.SYSTEM,
    "tool": MessageRole.SYSTEM,
}
STARTED_AT = int(time.time())


def list_models() -> ModelList:
    """The one model served: the support agent."""
    return ModelList(data=[ModelCard(id=MODEL_ID, created=STARTED_AT)])


async def start_completion(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    engine: GenerationEngine,
    user: User,
    request: ChatCompletionRequest,
) -> SendResult:
    """Store the request's messages as a conversation and start the answer to the last one."""
    if request.model != MODEL_ID:
        raise ModelNotFound(request.model)
    *earlier, last = request.messages
    question = last.text.strip()
    if last.role != "user" or not question:
        raise NoQuestion()
    transcript = [(_ROLES[message.role], message.text) for message in earlier if message.text]
    async with unit_of_work(sessionmaker) as session:
        conversation = await conversations_service.import_transcript(
            session, user=user, title=question[:80], transcript=transcript
        )
    return await conversations_service.post_message(
        sessionmaker,
        engine=engine,
        queue_when_busy=False,
        author=user,
        conversation_id=conversation.id,
        content=question,
        client_message_id=None,
    )


def completion_id(answer_id: uuid.UUID) -> str:
    return f"chatcmpl-{answer_id.hex}"


async def complete(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    engine: GenerationEngine,
    result: SendResult,
) -> ChatCompletion:
    """Wait for the whole answer (`stream: false`)."""
    answer_id = result.answer_id
    if answer_id is None:
        raise LLMServiceError("No answer was started")
    final: Frame | None = None
    async for frame in realtime_service.follow_answer(
        engine=engine,
        sessionmaker=sessionmaker,
        conversation_id=result.user_message.conversation_id,
        message_id=answer_id,
    ):
        final = frame
    if final is None or final.type == "failed":
        detail = None if final is None else final.data.get("detail")
        raise LLMServiceError(str(detail) if detail else None)
    message = final.data["message"]
    usage = final.data.get("usage") or {
        "prompt_tokens": 0,
        "completion_tokens": message.get("token_count", 0),
    }
    return ChatCompletion(
        id=completion_id(answer_id),
        created=int(time.time()),
        model=MODEL_ID,
        choices=[Choice(message=ResponseMessage(content=message["content"]))],
        usage=CompletionUsage(
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            total_tokens=usage["prompt_tokens"] + usage["completion_tokens"],
        ),
    )


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def stream_chunks(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    engine: GenerationEngine,
    result: SendResult,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events, a last chunk with `finish_reason`, then `[DONE]`.

    A client that goes away stops the answer: an OpenAI stream cannot be re-attached.
    """
    answer_id = result.answer_id
    if answer_id is None:
        raise LLMServiceError("No answer was started")
    base = {
        "id": completion_id(answer_id),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL_ID,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _event({**base, "choices": [choice]})

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for frame in realtime_service.follow_answer(
            engine=engine,
            sessionmaker=sessionmaker,
            conversation_id=result.user_message.conversation_id,
            message_id=answer_id,
        ):
            if frame.type == "token":
                yield chunk({"content": frame.data["content"]})
                continue
            finished = True
            if frame.type == "failed":
                error = error_payload(
                    str(frame.data.get("code") or "LLM_SERVICE_ERROR"),
                    str(frame.data.get("detail") or "The AI model failed"),
                )
                yield _event(error)
                break
            yield chunk({}, "stop")
            usage = frame.data.get("usage")
            if include_usage and usage:
                total = usage["prompt_tokens"] + usage["completion_tokens"]
                yield _event({**base, "choices": [], "usage": {**usage, "total_tokens": total}})
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            await engine.request_cancel(answer_id)
