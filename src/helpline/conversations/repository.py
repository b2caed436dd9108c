"""SQL for conversations and messages."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.conversations.models import (
    Conversation,
    ConversationStatus,
    Message,
    MessageRole,
    MessageStatus,
    TokenUsage,
)
from helpline.kit.pagination import paginate, split_page


async def get_conversation(
    session: AsyncSession, conversation_id: uuid.UUID
) -> Conversation | None:
    return await session.get(Conversation, conversation_id)


async def lock_conversation(
    session: AsyncSession, conversation_id: uuid.UUID, *, touch: datetime | None = None
) -> Conversation | None:
    """Load the conversation for an update, holding it until the transaction ends.

    PostgreSQL: a row lock (`SELECT … FOR UPDATE`). SQLite locks the whole database for
    writing, and only from a transaction's first write: a no-op `UPDATE … RETURNING` takes that
    lock here, so what the caller reads next cannot change before it commits. With `touch`,
    both set `updated_at` to it instead (`UPDATE … RETURNING`, which locks the row as well):
    one round trip rather than a lock now and an update at the flush.
    """
    if touch is not None or session.get_bind().dialect.name != "postgresql":
        statement: Any = (
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(updated_at=Conversation.updated_at if touch is None else touch)
            .returning(Conversation)
        )
    else:
        statement = select(Conversation).where(Conversation.id == conversation_id).with_for_update()
    result = await session.execute(statement.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


async def list_conversations(
    session: AsyncSession,
    *,
    user_id: uuid.UUID | None,
    status: ConversationStatus | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Conversation], str | None]:
    statement = select(Conversation)
    if user_id is not None:
        statement = statement.where(Conversation.user_id == user_id)
    if status is not None:
        statement = statement.where(Conversation.status == status)
    statement = paginate(
        statement,
        sort_column=Conversation.updated_at,
        id_column=Conversation.id,
        cursor=cursor,
        limit=limit,
        direction="desc",
    )
    rows = list((await session.scalars(statement)).all())
    return split_page(rows, limit=limit, sort_attr="updated_at")


async def list_waiting(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> tuple[list[Conversation], str | None]:
    statement = paginate(
        select(Conversation).where(Conversation.status == ConversationStatus.WAITING_FOR_AGENT),
        sort_column=Conversation.waiting_since,
        id_column=Conversation.id,
        cursor=cursor,
        limit=limit,
        direction="asc",
    )
    rows = list((await session.scalars(statement)).all())
    return split_page(rows, limit=limit, sort_attr="waiting_since")


async def delete_conversation(session: AsyncSession, conversation_id: uuid.UUID) -> None:
    await session.execute(delete(Message).where(Message.conversation_id == conversation_id))
    await session.execute(delete(Conversation).where(Conversation.id == conversation_id))


async def list_messages(
    session: AsyncSession, *, conversation_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[Message], str | None]:
    statement = paginate(
        select(Message).where(Message.conversation_id == conversation_id),
        sort_column=Message.created_at,
        id_column=Message.id,
        cursor=cursor,
        limit=limit,
        direction="asc",
    )
    rows = list((await session.scalars(statement)).all())
    return split_page(rows, limit=limit, sort_attr="created_at")


async def recent_messages(
    session: AsyncSession, *, conversation_id: uuid.UUID, limit: int
) -> Sequence[Message]:
    """The last `limit` messages, oldest first."""
    statement = (
        select(Message)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(limit)
    )
    rows = list((await session.scalars(statement)).all())
    rows.reverse()
    return rows


async def get_message(session: AsyncSession, message_id: uuid.UUID) -> Message | None:
    return await session.get(Message, message_id)


async def get_reply(session: AsyncSession, user_message_id: uuid.UUID) -> Message | None:
    statement = (
        select(Message)
        .where(Message.reply_to_message_id == user_message_id)
        .order_by(Message.created_at.desc())
        .limit(1)
    )
    return (await session.scalars(statement)).one_or_none()


@dataclass(frozen=True, slots=True)
class SendContext:
    """What a send must know of its conversation, read under its lock in one query."""

    recent: Sequence[Message]  # the last messages, oldest first
    streaming_answer: Message | None
    same_client_id: Message | None  # an earlier send with this `client_message_id`


async def send_context(
    session: AsyncSession,
    *,
    conversation_id: uuid.UUID,
    client_message_id: str | None,
    recent_limit: int,
) -> SendContext:
    """The last `recent_limit` messages, the streaming answer and the earlier send by
    `client_message_id`, in one round trip (each is also looked up on its own index)."""
    in_conversation = Message.conversation_id == conversation_id
    recent_ids = (
        select(Message.id)
        .where(in_conversation)
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(recent_limit)
    )
    wanted: list[ColumnElement[bool]] = [
        Message.id.in_(recent_ids.scalar_subquery()),
        (Message.role == MessageRole.ASSISTANT) & (Message.status == MessageStatus.STREAMING),
    ]
    if client_message_id is not None:
        wanted.append(Message.client_message_id == client_message_id)
    statement = (
        select(Message)
        .where(in_conversation, or_(*wanted))
        .order_by(Message.created_at.desc(), Message.id.desc())
    )
    rows = list((await session.scalars(statement)).all())
    streaming = next(
        (
            m
            for m in rows
            if m.role == MessageRole.ASSISTANT and m.status == MessageStatus.STREAMING
        ),
        None,
    )
    same_client_id = (
        None
        if client_message_id is None
        else next((m for m in rows if m.client_message_id == client_message_id), None)
    )
    # Newest first: the recent ones lead; older rows here are the streaming answer or the
    # earlier send, which are not part of the history unless they are recent.
    recent = rows[:recent_limit]
    recent.reverse()
    return SendContext(recent=recent, streaming_answer=streaming, same_client_id=same_client_id)


async def get_streaming_answer(session: AsyncSession, conversation_id: uuid.UUID) -> Message | None:
    statement = select(Message).where(
        Message.conversation_id == conversation_id,
        Message.role == MessageRole.ASSISTANT,
        Message.status == MessageStatus.STREAMING,
    )
    return (await session.scalars(statement)).first()


async def latest_answer(session: AsyncSession, conversation_id: uuid.UUID) -> Message | None:
    statement = (
        select(Message)
        .where(Message.conversation_id == conversation_id, Message.role == MessageRole.ASSISTANT)
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(1)
    )
    return (await session.scalars(statement)).one_or_none()


async def unanswered_questions(
    session: AsyncSession, conversation_id: uuid.UUID
) -> Sequence[Message]:
    """User messages sent after the latest answer started (oldest first)."""
    last_answer = await latest_answer(session, conversation_id)
    statement = select(Message).where(
        Message.conversation_id == conversation_id, Message.role == MessageRole.USER
    )
    if last_answer is not None:
        statement = statement.where(Message.created_at > last_answer.created_at)
    statement = statement.order_by(Message.created_at.asc(), Message.id.asc())
    return list((await session.scalars(statement)).all())


async def streaming_answers_before(
    session: AsyncSession, moment: datetime
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    statement = select(Message.conversation_id, Message.id).where(
        Message.role == MessageRole.ASSISTANT,
        Message.status == MessageStatus.STREAMING,
        Message.created_at < moment,
    )
    return [(row[0], row[1]) for row in (await session.execute(statement)).all()]


async def finish_answer(
    session: AsyncSession,
    *,
    message_id: uuid.UUID,
    values: dict[str, object],
) -> Message | None:
    """Store an answer's final state, only if it is still `streaming` (exactly once).

    The stored message, or None when it was final already (or is gone).
    """
    statement = (
        update(Message)
        .where(Message.id == message_id, Message.status == MessageStatus.STREAMING)
        .values(**values)
        .returning(Message)
        .execution_options(populate_existing=True)
    )
    return (await session.scalars(statement)).one_or_none()


async def count_messages(session: AsyncSession, conversation_id: uuid.UUID) -> dict[str, int]:
    statement = (
        select(Message.role, func.count())
        .where(Message.conversation_id == conversation_id)
        .group_by(Message.role)
    )
    return {str(role): int(count) for role, count in (await session.execute(statement)).all()}


async def touch_conversation(
    session: AsyncSession, conversation_id: uuid.UUID, moment: datetime, *, answered: bool
) -> tuple[uuid.UUID, datetime | None] | None:
    """Mark the conversation active at `moment` (and first answered, if it had no answer yet).

    Its owner and the end of its running summary, or None when it is gone.
    """
    values: dict[str, object] = {"updated_at": moment}
    if answered:
        values["first_answer_at"] = func.coalesce(Conversation.first_answer_at, moment)
    statement = (
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(**values)
        .returning(Conversation.user_id, Conversation.summary_until)
        .execution_options(synchronize_session=False)
    )
    row = (await session.execute(statement)).one_or_none()
    return None if row is None else (row[0], row[1])


async def add_token_usage(
    session: AsyncSession, *, user_id: uuid.UUID, day: str, tokens: int
) -> None:
    """Add to the day's usage in one upsert: concurrent answers never lose a charge."""
    values = {"user_id": user_id, "day": day, "tokens": tokens}
    is_postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    insert = postgresql_insert if is_postgres else sqlite_insert
    pending = insert(TokenUsage).values(**values)
    statement = pending.on_conflict_do_update(
        index_elements=[TokenUsage.user_id, TokenUsage.day],
        set_={"tokens": TokenUsage.tokens + pending.excluded.tokens},
    )
    await session.execute(statement)


async def get_token_usage(session: AsyncSession, *, user_id: uuid.UUID, day: str) -> int:
    value = await session.scalar(
        select(TokenUsage.tokens).where(TokenUsage.user_id == user_id, TokenUsage.day == day)
    )
    return int(value or 0)


# What the agent's memory is made of: the exchange, not system notes or answers in flight.
_MEMORY_ROLES = (MessageRole.USER, MessageRole.ASSISTANT, MessageRole.AGENT)


def _memory_filter(conversation_id: uuid.UUID, after: datetime | None) -> list[ColumnElement[bool]]:
    conditions = [
        Message.conversation_id == conversation_id,
        Message.role.in_(_MEMORY_ROLES),
        Message.status != MessageStatus.STREAMING,
    ]
    if after is not None:
        conditions.append(Message.created_at > after)
    return conditions


async def memory_tokens(
    session: AsyncSession, *, conversation_id: uuid.UUID, after: datetime | None
) -> int:
    """Tokens of the exchanged messages created after `after` (all of them for None)."""
    value = await session.scalar(
        select(func.coalesce(func.sum(Message.token_count), 0)).where(
            *_memory_filter(conversation_id, after)
        )
    )
    return int(value or 0)


async def memory_messages(
    session: AsyncSession, *, conversation_id: uuid.UUID, after: datetime | None
) -> Sequence[Message]:
    """The exchanged messages created after `after`, oldest first."""
    statement = (
        select(Message)
        .where(*_memory_filter(conversation_id, after))
        .order_by(Message.created_at.asc(), Message.id.asc())
    )
    return list((await session.scalars(statement)).all())


async def save_summary(
    session: AsyncSession,
    *,
    conversation_id: uuid.UUID,
    summary: str,
    until: datetime,
    expected_until: datetime | None,
) -> bool:
    """Store a running summary, only if no other one was stored since `expected_until` was read."""
    boundary = (
        Conversation.summary_until.is_(None)
        if expected_until is None
        else Conversation.summary_until == expected_until
    )
    result = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, boundary)
        .values(summary=summary, summary_until=until)
    )
    return bool(getattr(result, "rowcount", 0))
