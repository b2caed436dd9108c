"""Following an answer: its replayed and live events, in order, without gap or duplicate.

Used by the SSE endpoints and the waiting REST send. The WebSocket endpoint does the same per
`resume` frame over its connection's queue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from helpline.auth.principal import Actor
from helpline.auth.revocation import RevocationNotice, Revocations
from helpline.conversations import service as conversations_service
from helpline.conversations.exceptions import TokenBudgetExceeded
from helpline.conversations.models import Message, MessageStatus
from helpline.core import metrics
from helpline.core.config import Settings
from helpline.core.database import lookup_session
from helpline.core.errors import RateLimited
from helpline.core.limiter import RateLimiter
from helpline.kit.models import utcnow
from helpline.realtime.connection import CLOSE_UNAUTHORIZED, FrameQueue
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.frames import Frame

if TYPE_CHECKING:
    from helpline.realtime.websocket import ChatConnection, ConnectionRegistry

ModelCallGuard = Callable[[Actor], Awaitable[None]]

# A follower keeps up with one answer; the bound only guards against a client that stalls.
FOLLOWER_QUEUE_FRAMES = 10_000


def stored_final_frame(message: Message) -> Frame:
    """The final event of a finished answer, rebuilt from the stored message."""
    message_json = conversations_service.message_json(message)
    data: dict[str, object] = {
        "type": message.status.value,
        "message_id": str(message.id),
        "reply_to": message.reply_to,
        "seq": message.last_seq,
        "message": message_json,
    }
    if message.status == MessageStatus.COMPLETE:
        data["usage"] = {
            "prompt_tokens": message.prompt_tokens or 0,
            "completion_tokens": message.completion_tokens or 0,
        }
    elif message.status == MessageStatus.FAILED:
        data["code"] = message.error_code
        data["detail"] = "The answer failed"
    return Frame(data=data, conversation_id=message.conversation_id)


async def replay_into(
    queue: FrameQueue,
    *,
    engine: GenerationEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    conversation_id: uuid.UUID,
    message_id: uuid.UUID,
    after_seq: int,
) -> bool:
    """Queue the answer's events after `after_seq`, joined to the live ones (already subscribed).

    From the event log while it has them; from the stored message once the log has expired. An
    answer stored `streaming` that runs nowhere any more is failed here, so nobody waits forever.
    Returns True when the answer ended at or before `after_seq`: nothing more will come.
    """
    key = str(message_id)
    queue.hold(key, after_seq)
    replayed: list[Frame] = []
    ended_before = False
    try:
        frames = await engine.replay(message_id, after_seq)
        if frames:
            replayed = frames
        else:
            async with lookup_session(sessionmaker) as session:
                message = await conversations_service.get_message(session, message_id)
            if message is None:
                ended_before = True
            elif message.status != MessageStatus.STREAMING:
                if message.last_seq > after_seq:
                    replayed = [stored_final_frame(message)]
                else:
                    ended_before = True
            elif frames is None and utcnow() - message.created_at > timedelta(
                seconds=engine.lease_s
            ):
                # Still streaming, no log, and long enough for a lease: its instance died.
                # (A younger one may not have taken its lease yet; the reaper watches it.)
                await engine.fail_if_orphaned(conversation_id, message_id)
    finally:
        queue.release(key, replayed)
    return ended_before


async def follow_answer(
    *,
    engine: GenerationEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    conversation_id: uuid.UUID,
    message_id: uuid.UUID,
    after_seq: int = 0,
) -> AsyncGenerator[Frame, None]:
    """The answer's events after `after_seq`, live until (and including) its final event."""
    key = str(message_id)
    queue = FrameQueue(FOLLOWER_QUEUE_FRAMES)

    def on_frame(frame: Frame) -> None:
        if frame.message_id == key:
            queue.put(frame)

    unsubscribe = await engine.subscribe(conversation_id, on_frame)
    try:
        ended_before = await replay_into(
            queue,
            engine=engine,
            sessionmaker=sessionmaker,
            conversation_id=conversation_id,
            message_id=message_id,
            after_seq=after_seq,
        )
        if ended_before:
            return
        while True:
            frame = await queue.get()
            yield frame
            if frame.is_final:
                return
    finally:
        unsubscribe()
        queue.close()


async def follow_reply(
    *,
    engine: GenerationEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    conversation_id: uuid.UUID,
    question: Message,
) -> AsyncGenerator[Frame, None]:
    """The answer to a queued question, once it starts, then as `follow_answer`."""
    reply_to = question.client_message_id or str(question.id)
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_frame(frame: Frame) -> None:
        if frame.is_answer_event and frame.data.get("reply_to") == reply_to:
            if not started.done() and frame.message_id is not None:
                started.set_result(frame.message_id)

    unsubscribe = await engine.subscribe(conversation_id, on_frame)
    try:
        async with lookup_session(sessionmaker) as session:
            reply = await conversations_service.get_reply(session, question.id)
        message_id = reply.id if reply is not None else uuid.UUID(await started)
    finally:
        unsubscribe()
    async for frame in follow_answer(
        engine=engine,
        sessionmaker=sessionmaker,
        conversation_id=conversation_id,
        message_id=message_id,
    ):
        yield frame


def model_call_guard(
    limiter: RateLimiter,
    settings: Settings,
    database: AsyncEngine,
) -> ModelCallGuard:
    """The check every model-running endpoint makes first (REST, SSE, WebSocket `chat`).

    One rate limit per user across all of them (`RATE_LIMIT_LLM`), then the daily token budget.
    """

    async def guard(user: Actor) -> None:
        try:
            await limiter.enforce(settings.rate_limit_llm, "llm", str(user.id))
            await conversations_service.check_token_budget(
                database, user=user, budget=settings.token_budget_daily
            )
        except TokenBudgetExceeded:
            metrics.RATE_LIMITED.labels(scope="budget").inc()
            raise
        except RateLimited:
            metrics.RATE_LIMITED.labels(scope="llm").inc()
            raise

    return guard


def close_revoked_sockets(
    revocations: Revocations, engine: GenerationEngine, registry: ConnectionRegistry
) -> None:
    """Close the sockets of revoked logins and deactivated users, on every instance."""

    async def on_revoked(notice: RevocationNotice) -> None:
        await engine.send_control(
            {
                "kind": "revoke",
                "user_id": str(notice.user_id),
                "login_ids": (
                    None if notice.login_ids is None else [str(i) for i in notice.login_ids]
                ),
            }
        )

    async def on_control(command: dict[str, Any]) -> None:
        if command.get("kind") != "revoke":
            return
        user_id = uuid.UUID(str(command["user_id"]))
        raw_ids = command.get("login_ids")
        login_ids = None if raw_ids is None else {uuid.UUID(str(i)) for i in raw_ids}

        def matches(connection: ChatConnection) -> bool:
            if connection.user.id != user_id:
                return False
            return login_ids is None or connection.login_id in login_ids

        registry.close_matching(matches, CLOSE_UNAUTHORIZED, "Unauthorized")

    revocations.subscribe(on_revoked)
    engine.on_control(on_control)
