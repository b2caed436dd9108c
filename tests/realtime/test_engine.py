"""The generation engine with the in-process backends, the fake model and a real database."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from helpline.agents.chat import ChatAnswerer
from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.schemas import AnswerEvent, AnswerRequest, Usage
from helpline.agents.tokens import estimate_tokens
from helpline.auth.models import User
from helpline.conversations import service
from helpline.conversations.models import Conversation, Message, MessageRole, MessageStatus
from helpline.conversations.service import ConversationAnswerStore
from helpline.core.config import Settings
from helpline.core.database import create_engine, create_sessionmaker, unit_of_work
from helpline.core.errors import ShuttingDown
from helpline.kit.models import utcnow
from helpline.realtime import engine as engine_module
from helpline.realtime.backends import create_memory_backends
from helpline.realtime.engine import (
    COALESCE_MAX_CHARS,
    AnswerJob,
    AnswerResult,
    GenerationEngine,
    lease_key,
)
from helpline.realtime.frames import Frame, token_frame
from helpline.realtime.pressure import LoopLagMonitor
from tests.conftest import _empty_tables_for
from tests.factories import create_user
from tests.realtime.helpers import eventually


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The test database, with no app (and so no other engine) running on it."""
    engine = create_engine(settings)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()
        await _empty_tables_for(settings)


@dataclass
class Rig:
    """One engine over the in-process backends, its fake model, and what it published."""

    engine: GenerationEngine
    model: FakeChatModel
    sessionmaker: async_sessionmaker[AsyncSession]
    queue: bool
    frames: list[Frame] = field(default_factory=list)

    async def watch(self, conversation_id: uuid.UUID) -> None:
        await self.engine.subscribe(conversation_id, self.frames.append)

    def finals(self) -> list[Frame]:
        return [frame for frame in self.frames if frame.is_final]

    def last_token_seq(self, message_id: uuid.UUID) -> int:
        seqs = [
            f.seq or 0 for f in self.frames if f.type == "token" and f.message_id == str(message_id)
        ]
        return max(seqs, default=0)

    async def send(
        self, author: User, conversation_id: uuid.UUID, content: str, client_id: str | None = None
    ) -> service.SendResult:
        return await service.post_message(
            self.sessionmaker,
            engine=self.engine,
            queue_when_busy=self.queue,
            author=author,
            conversation_id=conversation_id,
            content=content,
            client_message_id=client_id,
        )

    async def send_unlaunched(
        self, author: User, conversation_id: uuid.UUID, content: str
    ) -> tuple[service.SendResult, Callable[[], None]]:
        """Send, committed, with the answer's launch held back: returns the launch."""
        jobs: list[AnswerJob] = []
        launch = self.engine.launch
        self.engine.launch = jobs.append  # type: ignore[method-assign]
        try:
            sent = await self.send(author, conversation_id, content)
        finally:
            self.engine.launch = launch  # type: ignore[method-assign]
        assert sent.answer_id is not None
        (job,) = jobs
        return sent, lambda: launch(job)

    async def conversation(self, owner: User) -> uuid.UUID:
        async with unit_of_work(self.sessionmaker) as session:
            conversation = await service.create_conversation(session, user=owner, title=None)
        await self.watch(conversation.id)
        return conversation.id

    async def message(self, message_id: uuid.UUID) -> Message:
        async with self.sessionmaker() as session:
            message = await session.get(Message, message_id)
            assert message is not None
            return message

    async def answer_ended(self, message_id: uuid.UUID) -> Frame:
        async def final() -> Frame | None:
            return next((f for f in self.finals() if f.message_id == str(message_id)), None)

        return await eventually(final)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(db: async_sessionmaker[AsyncSession]) -> AsyncIterator[RigFactory]:
    engines: list[GenerationEngine] = []

    async def make(*, queue: bool = False, lease_s: float = 15.0, start: bool = True) -> Rig:
        model = FakeChatModel()
        answerer = ChatAnswerer(model)
        engine = GenerationEngine(
            backends=create_memory_backends(3600),
            answerer=answerer,
            store=ConversationAnswerStore(db, queue_when_busy=queue, model=answerer.model),
            lease_s=lease_s,
            provider="fake",
        )
        if start:
            await engine.start()
        engines.append(engine)
        return Rig(engine=engine, model=model, sessionmaker=db, queue=queue)

    yield make
    for engine in engines:
        await engine.drain(asyncio.get_running_loop().time())
        await engine.close()


@pytest.fixture
async def rig(make_rig: RigFactory) -> Rig:
    return await make_rig()


@pytest.fixture
async def customer(db: async_sessionmaker[AsyncSession]) -> User:
    async with db() as session:
        return await create_user(session)


async def test_an_answer_is_numbered_from_seq_1_and_logged(rig: Rig, customer: User) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, '[[reply="one two three"]] q', "q1")
    assert sent.answer_id is not None
    final = await rig.answer_ended(sent.answer_id)

    answer = [f for f in rig.frames if f.message_id == str(sent.answer_id)]
    # A piece per event while the process keeps up; a busy one joins pieces into fewer events.
    count = len(answer) - 1
    assert [(f.type, f.seq) for f in answer] == [
        *(("token", seq) for seq in range(1, count + 1)),
        ("complete", count + 1),
    ]
    assert all(f.data["reply_to"] == "q1" for f in answer)
    assert "".join(str(f.data["content"]) for f in answer[:-1]) == "one two three"
    assert final.data["message"]["content"] == "one two three"
    logged = await rig.engine.replay(sent.answer_id, 0)
    assert logged is not None
    assert [f.data for f in logged] == [f.data for f in answer]
    after_one = await rig.engine.replay(sent.answer_id, 1)
    assert after_one is not None
    assert [f.seq for f in after_one] == list(range(2, count + 2))


async def test_usage_is_stored_on_the_assistant_message(rig: Rig, customer: User) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, '[[reply="alpha beta gamma"]] q')
    assert sent.answer_id is not None
    final = await rig.answer_ended(sent.answer_id)

    stored = await rig.message(sent.answer_id)
    assert stored.status == MessageStatus.COMPLETE
    assert stored.completion_tokens == 3  # the fake provider reports one token per piece
    assert stored.prompt_tokens is not None
    assert stored.prompt_tokens > 0
    assert stored.usage_estimated is False
    assert stored.token_count == 3
    assert final.data["usage"] == {
        "prompt_tokens": stored.prompt_tokens,
        "completion_tokens": 3,
    }


async def test_usage_is_estimated_when_the_provider_reports_none(rig: Rig, customer: User) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(
        customer, conversation_id, '[[reply="a rather longer answer text" usage=off]] q'
    )
    assert sent.answer_id is not None
    await rig.answer_ended(sent.answer_id)
    stored = await rig.message(sent.answer_id)
    assert stored.usage_estimated is True
    assert stored.completion_tokens == estimate_tokens("a rather longer answer text")
    assert stored.prompt_tokens is not None
    assert stored.prompt_tokens > 0


class CheckingAnswerer:
    """The chat answerer, noting whether the question was committed when the model was called."""

    name = "checking"

    def __init__(self, inner: ChatAnswerer, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.inner = inner
        self.model = inner.model
        self.sessionmaker = sessionmaker
        self.committed: list[bool] = []

    async def answer(self, request: AnswerRequest) -> AsyncGenerator[AnswerEvent, None]:
        # A separate session sees only committed rows.
        async with self.sessionmaker() as session:
            questions = await session.scalars(
                select(Message).where(
                    Message.conversation_id == request.conversation_id,
                    Message.role == MessageRole.USER,
                    Message.content == request.question,
                )
            )
            answer = await session.get(Message, request.assistant_message_id)
        self.committed.append(len(questions.all()) == 1 and answer is not None)
        async for event in self.inner.answer(request):
            yield event


async def test_the_question_is_committed_before_the_model_is_called(
    rig: Rig, customer: User
) -> None:
    checking = CheckingAnswerer(ChatAnswerer(rig.model), rig.sessionmaker)
    rig.engine.answerer = checking
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, '[[reply="ok"]] q')
    assert sent.answer_id is not None
    await rig.answer_ended(sent.answer_id)
    assert checking.committed == [True]


async def test_a_model_failure_stores_the_partial_answer_as_failed(
    rig: Rig, customer: User
) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, '[[reply="a b c d" fail_after=2]] q')
    assert sent.answer_id is not None
    final = await rig.answer_ended(sent.answer_id)
    assert final.type == "failed"
    assert final.data["code"] == "LLM_SERVICE_ERROR"
    assert final.seq == rig.last_token_seq(sent.answer_id) + 1
    stored = await rig.message(sent.answer_id)
    assert stored.status == MessageStatus.FAILED
    assert stored.content == "a b"
    assert final.data["message"]["content"] == "a b"


async def test_cancel_stops_the_provider_stream_and_keeps_the_partial_text(
    rig: Rig, customer: User
) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, '[[reply="x y z" hang_after=2]] q')
    assert sent.answer_id is not None
    await eventually(lambda: len([f for f in rig.frames if f.type == "token"]) == 2)
    await rig.engine.request_cancel(sent.answer_id)
    final = await rig.answer_ended(sent.answer_id)
    assert final.type == "cancelled"
    assert final.data["message"]["content"] == "x y"
    assert (await rig.message(sent.answer_id)).status == MessageStatus.CANCELLED
    assert rig.model.cancelled_streams == 1
    assert rig.model.active_streams == 0


async def test_a_cancel_right_after_the_send_stores_the_answer_cancelled_without_the_model(
    rig: Rig, customer: User
) -> None:
    """The stop arrives before the answer's task first ran: it is stored, never left
    `streaming`, and the model is not called."""
    conversation_id = await rig.conversation(customer)
    sent, launch = await rig.send_unlaunched(customer, conversation_id, '[[reply="never said"]] q')
    assert sent.answer_id is not None
    launch()
    await rig.engine.request_cancel(sent.answer_id)  # no await in between: the task is new
    final = await rig.answer_ended(sent.answer_id)
    assert final.type == "cancelled"
    stored = await rig.message(sent.answer_id)
    assert (stored.status, stored.content) == (MessageStatus.CANCELLED, "")
    assert rig.model.requests == deque()


async def test_a_cancel_between_the_commit_and_the_launch_stops_the_answer_as_it_starts(
    rig: Rig, customer: User
) -> None:
    """The answer is committed `streaming` but not running yet (another instance's, or this
    one's a moment before its launch): a cancel neither fails it as orphaned nor is lost."""
    conversation_id = await rig.conversation(customer)
    sent, launch = await rig.send_unlaunched(customer, conversation_id, '[[reply="never said"]] q')
    assert sent.answer_id is not None

    async with unit_of_work(rig.sessionmaker) as session:
        conversation = await session.get(Conversation, conversation_id)
        assert conversation is not None
        cancelled = await service.cancel_answer(
            session, engine=rig.engine, conversation=conversation
        )
    assert cancelled == sent.answer_id
    assert (await rig.message(sent.answer_id)).status == MessageStatus.STREAMING  # not failed

    launch()
    final = await rig.answer_ended(sent.answer_id)
    assert final.type == "cancelled"
    assert (await rig.message(sent.answer_id)).status == MessageStatus.CANCELLED
    assert rig.model.requests == deque()


async def test_queue_policy_answers_the_queued_question_after_the_current_one(
    make_rig: RigFactory, customer: User
) -> None:
    rig = await make_rig(queue=True)
    conversation_id = await rig.conversation(customer)
    first = await rig.send(customer, conversation_id, "[[tokens=8 delay_ms=20]] first", "q1")
    queued = await rig.send(customer, conversation_id, '[[reply="second answer"]] second', "q2")
    assert first.answer_id is not None
    assert queued.created
    assert queued.assistant_message is None  # stored now, answered once the first ends

    await rig.answer_ended(first.answer_id)
    await eventually(lambda: len(rig.finals()) == 2)
    first_final, second_final = rig.finals()
    assert first_final.message_id == str(first.answer_id)
    assert first_final.type == "complete"
    assert second_final.type == "complete"
    assert second_final.data["reply_to"] == "q2"
    assert second_final.data["message"]["content"] == "second answer"
    # The second answer started only after the first one's final event.
    second_tokens = [i for i, f in enumerate(rig.frames) if f.message_id == second_final.message_id]
    assert min(second_tokens) > rig.frames.index(first_final)
    assert rig.model.completed_streams == 2


async def add_orphan(
    rig: Rig, owner: User, *, age: timedelta, pieces: list[str]
) -> tuple[uuid.UUID, uuid.UUID]:
    """An answer stored `streaming` `age` ago whose instance is gone, with `pieces` logged."""
    started = utcnow() - age
    async with unit_of_work(rig.sessionmaker) as session:
        conversation = Conversation(user_id=owner.id, created_at=started, updated_at=started)
        session.add(conversation)
        await session.flush()
        question = Message(
            conversation_id=conversation.id,
            role=MessageRole.USER,
            content="q",
            author_id=owner.id,
            client_message_id="orphan-q",
            created_at=started,
            updated_at=started,
        )
        session.add(question)
        await session.flush()
        answer = Message(
            conversation_id=conversation.id,
            role=MessageRole.ASSISTANT,
            status=MessageStatus.STREAMING,
            reply_to_message_id=question.id,
            reply_to="orphan-q",
            created_at=started + timedelta(microseconds=1),
            updated_at=started + timedelta(microseconds=1),
        )
        session.add(answer)
        await session.flush()
        conversation_id, answer_id = conversation.id, answer.id
    for seq, piece in enumerate(pieces, start=1):
        frame = token_frame(conversation_id, answer_id, "orphan-q", seq, piece)
        await rig.engine.backends.event_log.append(answer_id, frame)
    await rig.watch(conversation_id)
    return conversation_id, answer_id


async def test_reap_orphans_fails_an_old_answer_without_a_lease_with_its_logged_text(
    make_rig: RigFactory, customer: User
) -> None:
    rig = await make_rig(start=False)  # no background reaper: this test runs the pass
    _, answer_id = await add_orphan(
        rig, customer, age=timedelta(minutes=5), pieces=["Hello", " there", ","]
    )
    assert await rig.engine.reap_orphans() == 1

    stored = await rig.message(answer_id)
    assert stored.status == MessageStatus.FAILED
    assert stored.content == "Hello there,"
    final = await rig.answer_ended(answer_id)
    assert final.type == "failed"
    assert final.seq == 4
    assert final.data["message"]["content"] == "Hello there,"
    assert await rig.engine.reap_orphans() == 0  # once


async def test_reap_orphans_leaves_an_answer_whose_lease_is_held(
    make_rig: RigFactory, customer: User
) -> None:
    rig = await make_rig(start=False)
    _, answer_id = await add_orphan(rig, customer, age=timedelta(minutes=5), pieces=["Hi"])
    await rig.engine.backends.leases.acquire(lease_key(answer_id), "another-instance", 30)
    assert await rig.engine.reap_orphans() == 0
    assert (await rig.message(answer_id)).status == MessageStatus.STREAMING


async def test_reap_orphans_leaves_an_answer_younger_than_a_lease(
    make_rig: RigFactory, customer: User
) -> None:
    rig = await make_rig(start=False)
    _, answer_id = await add_orphan(rig, customer, age=timedelta(seconds=1), pieces=["Hi"])
    assert await rig.engine.reap_orphans() == 0
    assert (await rig.message(answer_id)).status == MessageStatus.STREAMING


async def test_drain_lets_a_short_answer_finish_and_cuts_a_long_one(
    rig: Rig, db: async_sessionmaker[AsyncSession]
) -> None:
    async with db() as session:
        alice, bob = await create_user(session), await create_user(session)
    short_conversation = await rig.conversation(alice)
    long_conversation = await rig.conversation(bob)
    short = await rig.send(alice, short_conversation, "[[tokens=5 delay_ms=20]] short")
    long = await rig.send(bob, long_conversation, "[[tokens=2000 delay_ms=20]] long")
    assert short.answer_id is not None
    assert long.answer_id is not None
    await eventually(lambda: any(f.message_id == str(long.answer_id) for f in rig.frames))

    loop = asyncio.get_running_loop()
    await rig.engine.drain(loop.time() + 1.0)

    assert (await rig.message(short.answer_id)).status == MessageStatus.COMPLETE
    cut = await rig.message(long.answer_id)
    assert cut.status == MessageStatus.FAILED
    assert cut.error_code == "SHUTTING_DOWN"
    streamed = "".join(
        str(f.data["content"])
        for f in rig.frames
        if f.type == "token" and f.message_id == str(long.answer_id)
    )
    assert cut.content == streamed
    assert 0 < len(cut.content.split()) < 2000
    final = await rig.answer_ended(long.answer_id)
    assert final.type == "failed"
    assert final.data["code"] == "SHUTTING_DOWN"
    assert not rig.engine.running


async def test_ensure_accepting_refuses_new_answers_once_draining(rig: Rig, customer: User) -> None:
    rig.engine.ensure_accepting()  # accepting before the drain
    conversation_id = await rig.conversation(customer)
    await rig.engine.drain(asyncio.get_running_loop().time())

    with pytest.raises(ShuttingDown) as refused:
        rig.engine.ensure_accepting()
    assert (refused.value.status_code, refused.value.code) == (503, "SHUTTING_DOWN")
    with pytest.raises(ShuttingDown):
        await rig.send(customer, conversation_id, "anyone there?")
    async with rig.sessionmaker() as session:
        stored = (
            await session.scalars(select(Message).where(Message.conversation_id == conversation_id))
        ).all()
    assert stored == []  # refused as a whole: the question is not kept without its answer


async def test_queue_policy_answers_every_queued_question_in_order(
    make_rig: RigFactory, customer: User
) -> None:
    rig = await make_rig(queue=True)
    conversation_id = await rig.conversation(customer)
    first = await rig.send(customer, conversation_id, "[[tokens=8 delay_ms=20]] first", "q1")
    await rig.send(customer, conversation_id, '[[reply="second answer"]] second', "q2")
    await rig.send(customer, conversation_id, '[[reply="third answer"]] third', "q3")
    assert first.answer_id is not None
    await eventually(lambda: len(rig.finals()) == 3)
    finals = rig.finals()
    assert [final.data["reply_to"] for final in finals] == ["q1", "q2", "q3"]
    assert [final.data["message"]["content"] for final in finals[1:]] == [
        "second answer",
        "third answer",
    ]


# -- a busy process ----------------------------------------------------------------------------


async def test_a_busy_process_joins_pieces_but_sends_the_first_at_once(
    rig: Rig, customer: User
) -> None:
    rig.engine.loop_lag = LoopLagMonitor(behind_after_s=-1.0)  # always behind
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, "q [[tokens=60 delay_ms=2]]")
    assert sent.answer_id is not None

    final = await rig.answer_ended(sent.answer_id)

    tokens = [f for f in rig.frames if f.type == "token" and f.message_id == str(sent.answer_id)]
    assert len(str(tokens[0].data["content"]).split()) == 1  # the first piece alone, at once
    assert 1 < len(tokens) < 60  # the others joined into fewer events
    assert [f.seq for f in tokens] == list(range(1, len(tokens) + 1))
    assert final.seq == len(tokens) + 1
    text = "".join(str(f.data["content"]) for f in tokens)
    assert len(text.split()) == 60
    assert (await rig.message(sent.answer_id)).content == text


async def test_a_busy_process_publishes_a_whole_event_of_gathered_text_at_once(
    rig: Rig, customer: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gathering longer would only make a burst of events (and fill slow sockets' queues)."""
    monkeypatch.setattr(engine_module, "COALESCE_PIECES_S", 60.0)  # the timer never fires
    rig.engine.loop_lag = LoopLagMonitor(behind_after_s=-1.0)
    conversation_id = await rig.conversation(customer)
    word = "w" * 199
    sent = await rig.send(
        customer, conversation_id, f'[[reply="{word}" tokens=30 hang_after=30]] q'
    )
    assert sent.answer_id is not None

    def text_out() -> str:
        return "".join(str(f.data["content"]) for f in rig.frames if f.type == "token")

    await eventually(lambda: len(text_out()) >= COALESCE_MAX_CHARS, within=5.0)
    assert len(text_out()) < 30 * 200  # the rest waits for more, or for the timer
    await rig.engine.request_cancel(sent.answer_id)
    final = await rig.answer_ended(sent.answer_id)
    assert final.data["message"]["content"] == text_out()
    assert len(text_out().split()) == 30


async def test_held_pieces_go_out_when_the_model_pauses(rig: Rig, customer: User) -> None:
    rig.engine.loop_lag = LoopLagMonitor(behind_after_s=-1.0)
    conversation_id = await rig.conversation(customer)
    # Three quick pieces, then the model stalls: the held ones must not wait for it.
    sent = await rig.send(customer, conversation_id, '[[reply="a b c" hang_after=3]] q')
    assert sent.answer_id is not None

    async def all_text_out() -> bool:
        tokens = [f for f in rig.frames if f.type == "token"]
        return "".join(str(f.data["content"]) for f in tokens) == "a b c"

    await eventually(all_text_out, within=2.0)
    await rig.engine.request_cancel(sent.answer_id)
    final = await rig.answer_ended(sent.answer_id)
    assert final.type == "cancelled"
    assert final.data["message"]["content"] == "a b c"


# -- storing results ---------------------------------------------------------------------------


async def test_an_answer_stored_as_final_is_not_stored_again(rig: Rig, customer: User) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, "[[hang]] q")
    assert sent.answer_id is not None
    answer_id = sent.answer_id
    store = rig.engine.store

    # E.g. another instance judged it orphaned and stored it failed...
    first = await store.store_result(
        AnswerResult(
            job_conversation_id=conversation_id,
            message_id=answer_id,
            outcome="failed",
            content="",
            last_seq=1,
            usage=None,
            error_code="SERVICE_UNAVAILABLE",
        )
    )
    assert first.changed
    assert first.message["status"] == "failed"
    # ...then a late result for it changes nothing, and says what is stored.
    late = await store.store_result(
        AnswerResult(
            job_conversation_id=conversation_id,
            message_id=answer_id,
            outcome="complete",
            content="late text",
            last_seq=3,
            usage=Usage(prompt_tokens=10, completion_tokens=2),
        )
    )
    assert not late.changed
    assert late.message["status"] == "failed"
    assert late.message["content"] == ""

    # The engine's own end of that answer (cancelled here) does not overwrite it either.
    await rig.engine.request_cancel(answer_id)
    await eventually(lambda: answer_id not in rig.engine.running)
    stored = await rig.message(answer_id)
    assert stored.status == MessageStatus.FAILED
    assert stored.content == ""


async def test_a_result_waits_its_turn_again_when_the_pool_is_exhausted(
    rig: Rig, customer: User, settings: Settings
) -> None:
    conversation_id = await rig.conversation(customer)
    sent = await rig.send(customer, conversation_id, "[[hang]] q")
    assert sent.answer_id is not None
    # One connection, taken by someone else for longer than the pool's timeout.
    tight = create_async_engine(
        settings.database_url, pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    store = ConversationAnswerStore(
        create_sessionmaker(tight), queue_when_busy=False, model="fake-1"
    )
    taken = asyncio.Event()

    async def take_the_connection(seconds: float) -> None:
        async with tight.connect():
            taken.set()
            await asyncio.sleep(seconds)

    try:
        holder = asyncio.create_task(take_the_connection(0.6))
        await taken.wait()
        stored = await store.store_result(
            AnswerResult(
                job_conversation_id=conversation_id,
                message_id=sent.answer_id,
                outcome="complete",
                content="It is on its way.",
                last_seq=5,
                usage=Usage(prompt_tokens=10, completion_tokens=5),
            )
        )
        await holder
    finally:
        await tight.dispose()
    assert stored.changed
    assert stored.message["status"] == "complete"
    assert (await rig.message(sent.answer_id)).content == "It is on its way."
    await rig.engine.request_cancel(sent.answer_id)
    await eventually(lambda: sent.answer_id not in rig.engine.running)


async def test_the_result_of_an_answer_that_is_gone_is_not_stored(rig: Rig) -> None:
    stored = await rig.engine.store.store_result(
        AnswerResult(
            job_conversation_id=uuid.uuid4(),
            message_id=uuid.uuid4(),
            outcome="complete",
            content="a b",
            last_seq=3,
            usage=None,
        )
    )

    assert not stored.changed
    assert stored.message == {}
    assert stored.usage.completion_tokens == estimate_tokens("a b")
