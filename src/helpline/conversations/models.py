"""Conversations and their messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from helpline.kit.models import Base, IdMixin, TimestampMixin, enum_column

TITLE_MAX_LENGTH = 200
CLIENT_MESSAGE_ID_MAX_LENGTH = 100


class ConversationStatus(StrEnum):
    OPEN = "open"  # the AI answers
    WAITING_FOR_AGENT = "waiting_for_agent"
    WITH_AGENT = "with_agent"  # a human answers; the AI stays silent
    RESOLVED = "resolved"


class MessageRole(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    AGENT = "agent"
    SYSTEM = "system"


class MessageStatus(StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Conversation(IdMixin, TimestampMixin, Base):
    """A customer's conversation; `updated_at` is its last activity (listing order)."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_user_activity", "user_id", "updated_at", "id"),
        Index("ix_conversations_status_waiting", "status", "waiting_since", "id"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(TITLE_MAX_LENGTH))
    status: Mapped[ConversationStatus] = mapped_column(
        enum_column(ConversationStatus, 32), default=ConversationStatus.OPEN
    )
    waiting_since: Mapped[datetime | None]
    assigned_agent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    handoff_reason: Mapped[str | None] = mapped_column(String(500))
    first_answer_at: Mapped[datetime | None]
    was_handed_over: Mapped[bool] = mapped_column(default=False)
    resolved_at: Mapped[datetime | None]
    # Agent memory: a running summary of the messages created up to `summary_until`; the
    # messages after it are sent to the model verbatim.
    summary: Mapped[str | None] = mapped_column(Text)
    summary_until: Mapped[datetime | None]


class Message(IdMixin, TimestampMixin, Base):
    """A message; an assistant message is created `streaming` and completed when its answer ends."""

    __tablename__ = "messages"
    __table_args__ = (
        # Idempotent sends: one message per client id in a conversation (NULLs never collide).
        UniqueConstraint("conversation_id", "client_message_id"),
        # At most one answer streams in a conversation at a time (a constraint, not a check).
        Index(
            "uq_messages_one_streaming_answer",
            "conversation_id",
            unique=True,
            sqlite_where=text("status = 'streaming'"),
            postgresql_where=text("status = 'streaming'"),
        ),
        Index("ix_messages_conversation_created", "conversation_id", "created_at", "id"),
    )

    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[MessageRole] = mapped_column(enum_column(MessageRole, 16))
    content: Mapped[str] = mapped_column(Text, default="")
    author_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    client_message_id: Mapped[str | None] = mapped_column(String(CLIENT_MESSAGE_ID_MAX_LENGTH))
    status: Mapped[MessageStatus] = mapped_column(
        enum_column(MessageStatus, 16), default=MessageStatus.COMPLETE
    )
    token_count: Mapped[int] = mapped_column(default=0)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    usage_estimated: Mapped[bool] = mapped_column(default=False)
    sources: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # For an answer: the user message it answers, and the `seq` of its last event.
    reply_to_message_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL")
    )
    reply_to: Mapped[str | None] = mapped_column(String(CLIENT_MESSAGE_ID_MAX_LENGTH))
    last_seq: Mapped[int] = mapped_column(default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200))


class TokenUsage(Base):
    """Tokens a user's answers used on one UTC day (for `TOKEN_BUDGET_DAILY`)."""

    __tablename__ = "token_usage"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    tokens: Mapped[int] = mapped_column(default=0)
