"""The conversations service on a real database: ownership, races, handoff rules, outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import aiosqlite
import pytest
from fastapi import FastAPI
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.schemas import ChatMessage, Usage
from helpline.agents.tokens import estimate_prompt_tokens
from helpline.auth.models import User
from helpline.conversations import repository, service
from helpline.conversations.exceptions import (
    ConversationForbidden,
    ConversationNotFound,
    GenerationInProgress,
    InvalidTransition,
)
from helpline.conversations.models import (
    Conversation,
    ConversationStatus,
    Message,
    MessageRole,
    MessageStatus,
)
from helpline.core.database import driver_connection, unit_of_work
from helpline.kit.models import utcnow
from helpline.realtime.engine import AnswerResult, GenerationEngine
from tests.factories import create_user
from tests.realtime.helpers import eventually


@pytest.fixture
def engine(app: FastAPI) -> GenerationEngine:
    generation_engine: GenerationEngine = app.state.generation_engine
    return generation_engine


@pytest.fixture
def model(app: FastAPI) -> FakeChatModel:
    chat_model = app.state.chat_model
    assert isinstance(chat_model, FakeChatModel)
    return chat_model


async def new_conversation(
    sessionmaker: async_sessionmaker[AsyncSession], owner: User
) -> Conversation:
    async with unit_of_work(sessionmaker) as session:
        return await service.create_conversation(session, user=owner, title="t")


async def messages_of(
    sessionmaker: async_sessionmaker[AsyncSession], conversation_id: uuid.UUID
) -> list[Message]:
    async with sessionmaker() as session:
        rows = await session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation_id)
            .order_by(Message.created_at, Message.id)
        )
        return list(rows.all())


async def post(
    sessionmaker: async_sessionmaker[AsyncSession],
    engine: GenerationEngine,
    author: User,
    conversation_id: uuid.UUID,
    content: str,
    client_message_id: str | None = None,
) -> service.SendResult:
    return await service.post_message(
        sessionmaker,
        engine=engine,
        queue_when_busy=False,
        author=author,
        conversation_id=conversation_id,
        content=content,
        client_message_id=client_message_id,
    )


async def finished(
    sessionmaker: async_sessionmaker[AsyncSession], conversation_id: uuid.UUID
) -> bool:
    answers = [m for m in await messages_of(sessionmaker, conversation_id) if m.role == "assistant"]
    return bool(answers) and all(m.status != MessageStatus.STREAMING for m in answers)


async def stop(
    sessionmaker: async_sessionmaker[AsyncSession],
    engine: GenerationEngine,
    sent: service.SendResult,
) -> None:
    """Cancel the (hanging) answer of `sent` and wait until it is stored."""
    assert sent.answer_id is not None
    await engine.request_cancel(sent.answer_id)
    await eventually(lambda: finished(sessionmaker, sent.user_message.conversation_id))


async def test_get_conversation_lets_the_owner_and_staff_in(session: AsyncSession) -> None:
    owner = await create_user(session)
    agent = await create_user(session, role="agent")
    admin = await create_user(session, role="admin")
    conversation = await service.create_conversation(session, user=owner, title=None)
    await session.commit()
    for user in (owner, agent, admin):
        found = await service.get_conversation(session, user=user, conversation_id=conversation.id)
        assert found.id == conversation.id


async def test_get_conversation_refuses_another_customer(session: AsyncSession) -> None:
    owner, other = await create_user(session), await create_user(session)
    conversation = await service.create_conversation(session, user=owner, title=None)
    await session.commit()
    with pytest.raises(ConversationForbidden) as refused:
        await service.get_conversation(session, user=other, conversation_id=conversation.id)
    assert (refused.value.status_code, refused.value.code) == (403, "FORBIDDEN")


async def test_get_conversation_of_an_unknown_id_is_not_found(session: AsyncSession) -> None:
    user = await create_user(session)
    with pytest.raises(ConversationNotFound) as missing:
        await service.get_conversation(session, user=user, conversation_id=uuid.uuid4())
    assert (missing.value.status_code, missing.value.code) == (404, "CONVERSATION_NOT_FOUND")


async def test_listing_walks_conversations_with_equal_activity_times_once(
    session: AsyncSession,
) -> None:
    owner = await create_user(session)
    moment = utcnow() - timedelta(minutes=5)
    created = []
    for _ in range(5):
        conversation = Conversation(user_id=owner.id, created_at=moment, updated_at=moment)
        session.add(conversation)
        created.append(conversation)
    await session.commit()

    seen: list[uuid.UUID] = []
    cursor: str | None = None
    while True:
        items, cursor = await service.list_conversations(
            session, user=owner, status=None, limit=2, cursor=cursor
        )
        seen.extend(item.id for item in items)
        if cursor is None:
            break
    assert len(seen) == 5
    assert set(seen) == {c.id for c in created}
    # Ties on the activity time are ordered by id, descending.
    assert seen == sorted(seen, reverse=True)


async def test_concurrent_sends_with_one_client_message_id_store_one_message_and_answer(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
    model: FakeChatModel,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    content = '[[reply="Only once." delay_ms=5]] hello'
    results = await asyncio.gather(
        *(post(sessionmaker, engine, owner, conversation.id, content, "same-id") for _ in range(3))
    )
    assert sorted(result.created for result in results) == [False, False, True]
    assert len({result.user_message.id for result in results}) == 1

    await eventually(lambda: finished(sessionmaker, conversation.id))
    messages = await messages_of(sessionmaker, conversation.id)
    assert [(m.role, m.content) for m in messages] == [
        (MessageRole.USER, content),
        (MessageRole.ASSISTANT, "Only once."),
    ]
    assert model.completed_streams == 1


async def test_concurrent_sends_of_different_messages_start_one_answer(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
    model: FakeChatModel,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    outcomes = await asyncio.gather(
        *(post(sessionmaker, engine, owner, conversation.id, f"[[hang]] q{n}") for n in range(3)),
        return_exceptions=True,
    )
    sent = [o for o in outcomes if isinstance(o, service.SendResult)]
    refused = [o for o in outcomes if isinstance(o, GenerationInProgress)]
    assert len(sent) == 1
    assert len(refused) == 2
    streaming = [
        m
        for m in await messages_of(sessionmaker, conversation.id)
        if m.status == MessageStatus.STREAMING
    ]
    assert len(streaming) == 1

    # Cancel once the one answer's model stream runs, so that cancelling has a stream to stop.
    await eventually(lambda: model.active_streams == 1)
    async with unit_of_work(sessionmaker) as db:
        fresh = await service.get_conversation(db, user=owner, conversation_id=conversation.id)
        await service.cancel_answer(db, engine=engine, conversation=fresh)
    await eventually(lambda: finished(sessionmaker, conversation.id))
    assert (model.cancelled_streams, model.active_streams) == (1, 0)


async def test_handoff_of_a_conversation_with_an_agent_is_a_conflict(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    agent = await create_user(session, role="agent")
    conversation = await new_conversation(sessionmaker, owner)
    async with unit_of_work(sessionmaker) as db:
        await service.handoff(
            db, engine=engine, conversation=conversation, actor=owner, reason=None
        )
    async with unit_of_work(sessionmaker) as db:
        await service.assign(db, engine=engine, conversation=conversation, agent=agent)
    with pytest.raises(InvalidTransition) as conflict:
        async with unit_of_work(sessionmaker) as db:
            await service.handoff(
                db, engine=engine, conversation=conversation, actor=owner, reason=None
            )
    assert (conflict.value.status_code, conflict.value.code) == (409, "CONFLICT")


async def test_release_of_an_open_conversation_is_a_conflict(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    agent = await create_user(session, role="agent")
    conversation = await new_conversation(sessionmaker, owner)
    with pytest.raises(InvalidTransition):
        async with unit_of_work(sessionmaker) as db:
            await service.release(db, engine=engine, conversation=conversation, agent=agent)


async def test_a_resolved_conversation_reopens_on_a_customer_message(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    async with unit_of_work(sessionmaker) as db:
        await service.complete(db, engine=engine, conversation=conversation, actor=owner)
    result = await post(sessionmaker, engine, owner, conversation.id, '[[reply="hi"]] back')
    assert result.assistant_message is not None
    async with sessionmaker() as db:
        stored = await db.get(Conversation, conversation.id)
        assert stored is not None
        assert stored.status == ConversationStatus.OPEN
        assert stored.resolved_at is None


async def test_record_outcome_of_a_conversation_the_ai_answered_alone(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    await post(sessionmaker, engine, owner, conversation.id, '[[reply="Sure."]] q')
    await eventually(lambda: finished(sessionmaker, conversation.id))
    async with unit_of_work(sessionmaker) as db:
        await service.complete(db, engine=engine, conversation=conversation, actor=owner)

    outcome = await service.record_outcome(sessionmaker, conversation.id)
    assert outcome is not None
    assert outcome.outcome == "ai_only"
    assert outcome.messages == {"user": 1, "assistant": 1}
    assert outcome.seconds_to_first_answer is not None
    assert 0 <= outcome.seconds_to_first_answer < 60


async def test_record_outcome_of_a_handed_over_conversation(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    agent = await create_user(session, role="agent")
    conversation = await new_conversation(sessionmaker, owner)
    async with unit_of_work(sessionmaker) as db:
        await service.handoff(
            db, engine=engine, conversation=conversation, actor=owner, reason="human please"
        )
    async with unit_of_work(sessionmaker) as db:
        await service.assign(db, engine=engine, conversation=conversation, agent=agent)
    await post(sessionmaker, engine, agent, conversation.id, "Hello, how can I help?")
    async with unit_of_work(sessionmaker) as db:
        await service.complete(db, engine=engine, conversation=conversation, actor=agent)

    outcome = await service.record_outcome(sessionmaker, conversation.id)
    assert outcome is not None
    assert outcome.outcome == "handed_over"
    assert outcome.messages["agent"] == 1
    assert "assistant" not in outcome.messages
    assert outcome.seconds_to_first_answer is None


async def test_latest_answer_is_the_one_streaming(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    assert await service.latest_answer(session, conversation.id) is None
    first = await post(sessionmaker, engine, owner, conversation.id, '[[reply="one"]] q1')
    await eventually(lambda: finished(sessionmaker, conversation.id))
    async with sessionmaker() as db:
        latest = await service.latest_answer(db, conversation.id)
        assert latest is not None
        assert latest.id == first.answer_id

    second = await post(sessionmaker, engine, owner, conversation.id, "[[hang]] q2")
    async with sessionmaker() as db:
        latest = await service.latest_answer(db, conversation.id)
        assert latest is not None
        assert latest.id == second.answer_id
        assert latest.status == MessageStatus.STREAMING
    await stop(sessionmaker, engine, second)


async def test_deleting_a_conversation_stops_its_answer(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
    model: FakeChatModel,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    await post(sessionmaker, engine, owner, conversation.id, "[[hang_after=2]] q")
    await eventually(lambda: model.active_streams == 1)
    async with unit_of_work(sessionmaker) as db:
        await service.delete_conversation(db, engine=engine, conversation=conversation)
    await eventually(lambda: model.cancelled_streams == 1 and not engine.running)
    assert await messages_of(sessionmaker, conversation.id) == []


async def test_an_answer_starts_with_the_prompt_estimate_of_the_history_it_gets(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    for number in range(3):
        await post(
            sessionmaker, engine, owner, conversation.id, f'[[reply="Answer {number}."]] q{number}'
        )
        await eventually(lambda: finished(sessionmaker, conversation.id))
    before = await messages_of(sessionmaker, conversation.id)
    # The first exchange is folded into the running summary: it is not sent verbatim.
    async with unit_of_work(sessionmaker) as db:
        stored = await db.get(Conversation, conversation.id)
        assert stored is not None
        stored.summary = "They said hello."
        stored.summary_until = before[1].created_at

    question = "[[hang]] and now?"
    sent = await post(sessionmaker, engine, owner, conversation.id, question)

    # At the token counts stored with the messages (an answer's: what its provider reported).
    verbatim = [
        ChatMessage(
            role="user" if m.role == "user" else "assistant",
            content=m.content,
            token_count=m.token_count,
        )
        for m in before[2:]
    ]
    expected = estimate_prompt_tokens([*verbatim, ChatMessage(role="user", content=question)])
    assert sent.assistant_message is not None
    assert sent.assistant_message.prompt_tokens == expected
    async with sessionmaker() as db:
        row = await db.get(Message, sent.assistant_message.id)
        assert row is not None
        assert (row.status, row.prompt_tokens) == (MessageStatus.STREAMING, expected)
    await stop(sessionmaker, engine, sent)


async def test_a_burst_of_sends_to_many_conversations_gives_each_answer_its_own_history(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
    model: FakeChatModel,
) -> None:
    """Sends at once to many conversations (on PostgreSQL they go to the database in batches,
    `BatchedStatement`): each is stored, and each answer gets its own conversation's history."""
    owner = await create_user(session)
    conversations = [await new_conversation(sessionmaker, owner) for _ in range(12)]
    for number, conversation in enumerate(conversations):
        await post(
            sessionmaker, engine, owner, conversation.id, f'[[reply="A{number}."]] q{number}'
        )
    for conversation in conversations:
        await eventually(lambda c=conversation: finished(sessionmaker, c.id))

    sends = await asyncio.gather(
        *(
            post(sessionmaker, engine, owner, conversation.id, f'[[reply="B{number}."]] again')
            for number, conversation in enumerate(conversations)
        )
    )
    assert all(sent.created for sent in sends)
    for conversation in conversations:
        await eventually(lambda c=conversation: finished(sessionmaker, c.id))
    histories = {
        messages[-1].content: [m.content for m in messages[1:-1] if m.role != "system"]
        for messages in list(model.requests)[-len(conversations) :]
    }
    for number, conversation in enumerate(conversations):
        question = f'[[reply="B{number}."]] again'
        assert histories[question] == [f'[[reply="A{number}."]] q{number}', f"A{number}."]
        stored = [m.content for m in await messages_of(sessionmaker, conversation.id)]
        assert stored[2:] == [question, f"B{number}."]


@contextlib.asynccontextmanager
async def statements_run(database: AsyncEngine) -> AsyncIterator[list[str]]:
    """The statements this task sends `database` meanwhile (not the app's background tasks'):
    through SQLAlchemy, and those run on asyncpg's own connection (`DriverStatement`)."""
    statements: list[str] = []
    drivers: list[tuple[Any, Any]] = []
    this_task = asyncio.current_task()

    def through_sqlalchemy(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if asyncio.current_task() is this_task:
            statements.append(statement)

    def on_the_driver(query: Any) -> None:
        statements.append(query.query)

    def checked_out(dbapi_connection: Any, *_: object) -> None:
        driver = dbapi_connection.driver_connection
        if asyncio.current_task() is this_task and hasattr(driver, "add_query_logger"):
            driver.add_query_logger(on_the_driver)
            drivers.append(driver)

    engine = database.sync_engine
    event.listen(engine, "before_cursor_execute", through_sqlalchemy)
    event.listen(engine, "checkout", checked_out)
    try:
        yield statements
        await asyncio.sleep(0)  # asyncpg calls its query loggers soon after, not at once
    finally:
        event.remove(engine, "before_cursor_execute", through_sqlalchemy)
        event.remove(engine, "checkout", checked_out)
        for driver in drivers:
            driver.remove_query_logger(on_the_driver)


@contextlib.contextmanager
def trips_to_sqlite(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """The calls this task queues to aiosqlite connections' threads meanwhile (each a trip
    there and back: SQLite's cost that matters on the way to the first token)."""
    trips: list[object] = []
    run = aiosqlite.Connection._execute
    this_task = asyncio.current_task()

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if asyncio.current_task() is this_task:
            trips.append(fn)
        return await run(self, fn, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(aiosqlite.Connection, "_execute", counted)
        yield trips


async def test_a_customer_send_is_one_round_trip(
    app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Touch, question, answer row and history: one statement on PostgreSQL, one transaction
    in one trip to the connection's thread on SQLite."""
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    async with statements_run(app.state.engine) as statements:
        with trips_to_sqlite(monkeypatch) as trips:
            sent = await post(sessionmaker, engine, owner, conversation.id, "[[hang]] hi", "c-1")
    assert sent.created
    if app.state.engine.dialect.name == "postgresql":
        assert len(statements) == 1, statements
    else:
        assert (len(statements), len(trips)) == (0, 1)
    await stop(sessionmaker, engine, sent)


async def test_storing_an_answer_is_one_round_trip_and_charges_its_usage(
    app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer's final state, the conversation's activity and the usage charge: one
    statement on PostgreSQL, one transaction in one trip to the connection's thread on SQLite."""
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    sent = await post(sessionmaker, engine, owner, conversation.id, "[[hang]] hi", "c-1")
    assert sent.answer_id is not None
    result = AnswerResult(
        job_conversation_id=conversation.id,
        message_id=sent.answer_id,
        outcome="complete",
        content="It is on its way.",
        last_seq=5,
        usage=Usage(prompt_tokens=40, completion_tokens=4),
    )
    async with statements_run(app.state.engine) as statements:
        with trips_to_sqlite(monkeypatch) as trips:
            stored = await engine.store.store_result(result)
    assert stored.changed
    assert (stored.message["status"], stored.message["content"]) == ("complete", result.content)
    if app.state.engine.dialect.name == "postgresql":
        assert len(statements) == 1, statements
    else:
        assert (len(statements), len(trips)) == (0, 1)
    async with driver_connection(app.state.engine) as connection:
        charged = await repository.get_token_usage(
            connection, user_id=owner.id, day=service.usage_day(utcnow())
        )
    async with sessionmaker() as check:
        touched = await check.get(Conversation, conversation.id)
    assert charged == 44
    assert touched is not None
    assert touched.first_answer_at is not None
    await stop(sessionmaker, engine, sent)  # its task finds it stored already


async def test_answers_of_several_customers_stored_at_once_are_each_stored_and_charged(
    app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    """Results stored at the same time (on PostgreSQL in batches, `BatchedStatement`, which
    share each customer's usage row): each stored with its own text, each charged once."""
    customers = [await create_user(session) for _ in range(3)]
    sends = []
    for number in range(12):
        customer = customers[number % 3]
        conversation = await new_conversation(sessionmaker, customer)
        sends.append(await post(sessionmaker, engine, customer, conversation.id, "[[hang]] hi"))
    results = []
    for number, sent in enumerate(sends):
        assert sent.answer_id is not None
        results.append(
            AnswerResult(
                job_conversation_id=sent.user_message.conversation_id,
                message_id=sent.answer_id,
                outcome="complete",
                content=f"Answer {number}.",
                last_seq=2,
                usage=Usage(prompt_tokens=10, completion_tokens=number),
                asked_by=sent.user_message.author_id,
            )
        )
    stored = await asyncio.gather(*(engine.store.store_result(result) for result in results))
    assert [answer.message["content"] for answer in stored] == [r.content for r in results]
    assert all(answer.changed for answer in stored)
    async with driver_connection(app.state.engine) as connection:
        for index, customer in enumerate(customers):
            charged = await repository.get_token_usage(
                connection, user_id=customer.id, day=service.usage_day(utcnow())
            )
            assert charged == sum(10 + number for number in range(index, 12, 3))
    for sent in sends:
        await stop(sessionmaker, engine, sent)  # its task finds it stored already


async def test_a_send_that_waited_for_another_sends_lock_is_refused_and_stores_nothing(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    engine: GenerationEngine,
) -> None:
    """The other send commits its streaming answer while this one waits for the lock: this one
    must see it (on PostgreSQL its one statement fails on the one-streaming-answer constraint
    and the transactional send tells why), and nothing of it is stored."""
    owner = await create_user(session)
    conversation = await new_conversation(sessionmaker, owner)
    async with sessionmaker() as other:
        now = utcnow()
        await repository.lock_conversation(other, conversation.id, touch=now)
        question = Message(
            conversation_id=conversation.id, role=MessageRole.USER, content="first", created_at=now
        )
        other.add(question)
        await other.flush()
        other.add(
            Message(
                conversation_id=conversation.id,
                role=MessageRole.ASSISTANT,
                status=MessageStatus.STREAMING,
                reply_to_message_id=question.id,
                created_at=now + timedelta(microseconds=1),
            )
        )
        await other.flush()
        sending = asyncio.create_task(post(sessionmaker, engine, owner, conversation.id, "second"))
        await asyncio.sleep(0.3)
        assert not sending.done()  # waiting for the lock
        await other.commit()
    with pytest.raises(GenerationInProgress):
        await sending
    stored = await messages_of(sessionmaker, conversation.id)
    assert [(m.role, m.content) for m in stored] == [
        (MessageRole.USER, "first"),
        (MessageRole.ASSISTANT, ""),
    ]
