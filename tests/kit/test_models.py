"""`new_row`: rows built whole for a Core `INSERT`, as the ORM's constructor would build them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.conversations import repository
from helpline.conversations.models import Conversation, Message, MessageRole, MessageStatus
from helpline.kit.models import new_row, row_values
from tests.factories import create_user


def test_a_new_row_has_the_values_given_and_every_other_column_its_default() -> None:
    conversation_id = uuid.uuid4()
    before = datetime.now(UTC)
    message = new_row(
        Message, conversation_id=conversation_id, role=MessageRole.USER, content="Hello"
    )
    assert message.conversation_id == conversation_id
    assert message.role == MessageRole.USER
    assert message.content == "Hello"
    assert isinstance(message.id, uuid.UUID)
    assert message.created_at >= before
    assert message.status == MessageStatus.COMPLETE  # the column's scalar default
    assert message.sources == []  # a callable default, called
    assert message.author_id is None  # no default: NULL


def test_new_rows_get_their_own_ids_and_their_own_mutable_defaults() -> None:
    one = new_row(Message, conversation_id=uuid.uuid4(), role=MessageRole.USER, content="a")
    two = new_row(Message, conversation_id=uuid.uuid4(), role=MessageRole.USER, content="b")
    assert one.id != two.id
    one.sources.append({"title": "Refunds"})
    assert two.sources == []


def test_a_new_row_is_a_plain_detached_object_that_can_be_changed() -> None:
    message = new_row(Message, conversation_id=uuid.uuid4(), role=MessageRole.USER, content="a")
    assert inspect(message).transient
    message.prompt_tokens = 12
    assert message.prompt_tokens == 12


def test_row_values_are_every_column_in_table_order_as_changed_since() -> None:
    message = new_row(Message, conversation_id=uuid.uuid4(), role=MessageRole.USER, content="a")
    message.prompt_tokens = 12

    values = row_values(message)

    assert list(values) == [column.key for column in Message.__table__.columns]
    assert values == {key: getattr(message, key) for key in values}
    assert values["prompt_tokens"] == 12


def test_a_value_for_something_that_is_not_a_column_is_refused() -> None:
    with pytest.raises(TypeError, match="conversation: not columns of Message"):
        new_row(Message, content="a", conversation=None)


async def test_new_rows_are_inserted_as_built(session: AsyncSession) -> None:
    user = await create_user(session, password=None)
    conversation = Conversation(user_id=user.id)
    session.add(conversation)
    await session.flush()
    message = new_row(
        Message,
        conversation_id=conversation.id,
        role=MessageRole.USER,
        content="Where is my parcel?",
        author_id=user.id,
    )
    await repository.insert_messages(session, [message])
    stored = (await session.execute(select(Message).where(Message.id == message.id))).scalar_one()
    assert (stored.content, stored.status, stored.sources) == (message.content, "complete", [])
    assert stored.created_at == message.created_at
