"""Request and response bodies of the conversations API (SPEC.md: Conversations)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from helpline.conversations.models import (
    CLIENT_MESSAGE_ID_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    ConversationStatus,
    MessageRole,
    MessageStatus,
)
from helpline.kit.schemas import STORABLE, Page

MESSAGE_MAX_CHARS = 8000

MessageContent = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MESSAGE_MAX_CHARS),
    STORABLE,
]
ClientMessageId = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=CLIENT_MESSAGE_ID_MAX_LENGTH, pattern=r"^[A-Za-z0-9._:\-]+$"
    ),
]


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: (
        Annotated[
            str, StringConstraints(strip_whitespace=True, max_length=TITLE_MAX_LENGTH), STORABLE
        ]
        | None
    ) = None


class ConversationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    user_id: uuid.UUID
    title: str | None
    status: ConversationStatus
    created_at: datetime
    updated_at: datetime
    waiting_since: datetime | None
    assigned_agent_id: uuid.UUID | None


class SourceRead(BaseModel):
    document_id: uuid.UUID
    title: str
    chunk_id: uuid.UUID


class MessageRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    conversation_id: uuid.UUID
    role: MessageRole
    content: str
    author_id: uuid.UUID | None
    client_message_id: str | None
    status: MessageStatus
    token_count: int
    sources: list[SourceRead] = Field(default_factory=list)
    created_at: datetime


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: MessageContent
    client_message_id: ClientMessageId | None = None


class SendMessageResponse(BaseModel):
    user_message: MessageRead
    assistant_message: MessageRead | None


class HandoffRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: (
        Annotated[str, StringConstraints(strip_whitespace=True, max_length=500), STORABLE] | None
    ) = None


ConversationPage = Page[ConversationRead]
MessagePage = Page[MessageRead]
