"""Conversations, messages and the handoff between the AI and human agents.

Sending a message stores it (and, when the AI is to answer, a `streaming` assistant message) in
one transaction; once that commits, the message frame is published and the answer launched on
the generation engine. While a conversation is `waiting_for_agent` or `with_agent` the AI stays
silent: messages are stored and relayed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from helpline.agents.memory import SUMMARY_JOB
from helpline.agents.schemas import ChatMessage, Usage
from helpline.agents.tokens import (
    estimate_message_tokens,
    estimate_prompt_tokens,
    estimate_tokens,
)
from helpline.auth import service as auth_service
from helpline.auth.models import User, UserRole
from helpline.auth.principal import Actor
from helpline.conversations import repository
from helpline.conversations.exceptions import (
    ConversationForbidden,
    ConversationNotFound,
    GenerationInProgress,
    IdempotencyKeyReused,
    InvalidTransition,
    NotAssigned,
    NothingToCancel,
    TokenBudgetExceeded,
)
from helpline.conversations.models import (
    Conversation,
    ConversationStatus,
    Message,
    MessageRole,
    MessageStatus,
)
from helpline.conversations.repository import HistoryMessage
from helpline.conversations.schemas import ConversationRead, MessageRead
from helpline.core import metrics
from helpline.core.database import DriverRow, driver_connection, on_commit, unit_of_work
from helpline.jobs import service as jobs_service
from helpline.kit.models import new_row, utcnow
from helpline.realtime.engine import AnswerJob, AnswerResult, GenerationEngine, StoredAnswer
from helpline.realtime.frames import message_frame, status_frame

if TYPE_CHECKING:
    from helpline.jobs.queues import JobQueue

log = structlog.get_logger(__name__)

HISTORY_MESSAGES = 20
# An answer's result waits for a pooled connection this many times (the pool's timeout each),
# with a pause that doubles from STORE_RETRY_S between them.
STORE_ATTEMPTS = 4
STORE_RETRY_S = 0.25
HANDOFF_REASON_MAX_LENGTH = 500
SILENT_STATUSES = frozenset({ConversationStatus.WAITING_FOR_AGENT, ConversationStatus.WITH_AGENT})


def is_staff(user: Actor) -> bool:
    return user.role in (UserRole.AGENT, UserRole.ADMIN)


def message_json(message: Message | Row[Any]) -> dict[str, Any]:
    return MessageRead.model_validate(message).model_dump(mode="json")


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    return ConversationRead.model_validate(conversation).model_dump(mode="json")


# -- conversations ---------------------------------------------------------------------------


async def create_conversation(
    session: AsyncSession, *, user: User, title: str | None
) -> Conversation:
    """Start a conversation owned by `user`."""
    conversation = Conversation(user_id=user.id, title=title or None)
    session.add(conversation)
    await session.flush()
    return conversation


async def get_conversation(
    session: AsyncSession,
    *,
    user: Actor,
    conversation_id: uuid.UUID,
    lock: bool = False,
    touch: datetime | None = None,
) -> Conversation:
    """The conversation if `user` may see it: its owner, or any agent or admin.

    With `lock`, it is loaded for an update (row lock on PostgreSQL); with `touch` too, its
    `updated_at` is set to that moment in the same statement.
    """
    if lock:
        conversation = await repository.lock_conversation(session, conversation_id, touch=touch)
    else:
        conversation = await repository.get_conversation(session, conversation_id)
    if conversation is None:
        raise ConversationNotFound(conversation_id)
    _check_owner(conversation.user_id, user=user)
    return conversation


async def get_conversation_owner(
    database: AsyncEngine, *, user: Actor, conversation_id: uuid.UUID
) -> uuid.UUID:
    """`get_conversation` for a socket's handshake: only the id of the conversation's
    customer, read by a statement on the driver (an ORM session costs three times the CPU)."""
    async with driver_connection(database) as connection:
        owner_id = await repository.get_conversation_owner(connection, conversation_id)
    if owner_id is None:
        raise ConversationNotFound(conversation_id)
    _check_owner(owner_id, user=user)
    return owner_id


def _check_owner(owner_id: uuid.UUID, *, user: Actor) -> None:
    """A customer sees only their own conversations; agents and admins see all."""
    if owner_id != user.id and not is_staff(user):
        raise ConversationForbidden()


async def list_conversations(
    session: AsyncSession,
    *,
    user: User,
    status: ConversationStatus | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Conversation], str | None]:
    """A customer's own conversations, or every conversation for staff; latest activity first."""
    return await repository.list_conversations(
        session,
        user_id=None if is_staff(user) else user.id,
        status=status,
        limit=limit,
        cursor=cursor,
    )


async def delete_conversation(
    session: AsyncSession, *, engine: GenerationEngine, conversation: Conversation
) -> None:
    """Erase the conversation and its messages (an answer in flight is cancelled)."""
    streaming = await repository.get_streaming_answer(session, conversation.id)
    await repository.delete_conversation(session, conversation.id)
    if streaming is not None:
        message_id = streaming.id

        async def cancel() -> None:
            await engine.request_cancel(message_id)

        on_commit(session, cancel)


async def list_messages(
    session: AsyncSession, *, conversation: Conversation, limit: int, cursor: str | None
) -> tuple[list[Message], str | None]:
    """The conversation's messages, oldest first."""
    return await repository.list_messages(
        session, conversation_id=conversation.id, limit=limit, cursor=cursor
    )


async def agent_queue(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> tuple[list[Conversation], str | None]:
    """Conversations waiting for a human, longest waiting first."""
    return await repository.list_waiting(session, limit=limit, cursor=cursor)


# -- sending ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendResult:
    user_message: Message
    assistant_message: Message | None
    created: bool  # False when `client_message_id` replayed an earlier send
    queued: bool = False  # answered after the answer streaming now (GENERATION_POLICY=queue)

    @property
    def answer_id(self) -> uuid.UUID | None:
        return None if self.assistant_message is None else self.assistant_message.id


def _history(messages: Sequence[HistoryMessage | Message]) -> tuple[ChatMessage, ...]:
    history: list[ChatMessage] = []
    for message in messages:
        # The count stored with the message (0: not counted, e.g. an old row).
        counted = message.token_count or None
        if message.role == MessageRole.USER:
            history.append(ChatMessage(role="user", content=message.content, token_count=counted))
        elif message.role in (MessageRole.ASSISTANT, MessageRole.AGENT) and message.content:
            history.append(
                ChatMessage(role="assistant", content=message.content, token_count=counted)
            )
    return tuple(history)


async def _replay(session: AsyncSession, existing: Message, content: str) -> SendResult:
    if existing.content != content:
        raise IdempotencyKeyReused()
    reply = await repository.get_reply(session, existing.id)
    return SendResult(user_message=existing, assistant_message=reply, created=False)


def _new_question(
    *,
    conversation_id: uuid.UUID,
    author: Actor,
    role: MessageRole,
    content: str,
    client_message_id: str | None,
    now: datetime,
) -> Message:
    """The row of a message `author` sends, built whole (`new_row`), stored as of `now`."""
    return new_row(
        Message,
        conversation_id=conversation_id,
        role=role,
        content=content,
        author_id=author.id,
        client_message_id=client_message_id,
        status=MessageStatus.COMPLETE,
        token_count=estimate_tokens(content),
        created_at=now,
        updated_at=now,
    )


def _new_answer(*, model: str, question: Message, prompt_tokens: int | None) -> Message:
    """The `streaming` answer row to `question` (the caller checked, under the lock, that no
    other answer streams)."""
    # Strictly after the question, so "oldest first" never puts the answer before it.
    started_at = question.created_at + timedelta(microseconds=1)
    return new_row(
        Message,
        conversation_id=question.conversation_id,
        role=MessageRole.ASSISTANT,
        content="",
        status=MessageStatus.STREAMING,
        reply_to_message_id=question.id,
        reply_to=question.client_message_id or str(question.id),
        prompt_tokens=prompt_tokens,
        usage_estimated=True,
        model=model,
        created_at=started_at,
        updated_at=started_at,
    )


def _history_since(
    prior: Sequence[HistoryMessage | Message], summary_until: datetime | None
) -> tuple[ChatMessage, ...]:
    """The history an answer gets verbatim: what the running summary does not hold."""
    if summary_until is not None:
        prior = [message for message in prior if message.created_at > summary_until]
    return _history(prior)


def _answer_job(
    *,
    user_id: uuid.UUID,
    summary: str | None,
    question: Message,
    answer: Message,
    history: tuple[ChatMessage, ...],
) -> AnswerJob:
    return AnswerJob(
        conversation_id=question.conversation_id,
        user_id=user_id,
        user_message_id=question.id,
        assistant_message_id=answer.id,
        reply_to=answer.reply_to or str(question.id),
        question=question.content,
        history=history,
        summary=summary,
    )


def _question_prompt_tokens(question: Message) -> int:
    """The prompt an answer to `question` starts from: the question and the reply's priming."""
    return estimate_prompt_tokens(
        [
            ChatMessage(
                role="user", content=question.content, token_count=question.token_count or None
            )
        ]
    )


def _history_prompt_tokens(
    prior: Sequence[HistoryMessage | Message], summary_until: datetime | None
) -> int:
    """The part of an answer's prompt estimate that the history it gets makes."""
    return sum(estimate_message_tokens(message) for message in _history_since(prior, summary_until))


def _plan_answer(
    *,
    model: str,
    conversation: Conversation,
    question: Message,
    prior: Sequence[HistoryMessage | Message],
) -> tuple[Message, AnswerJob]:
    """The `streaming` answer row to insert and the job that answers."""
    history = _history_since(prior, conversation.summary_until)
    prompt_estimate = _question_prompt_tokens(question) + sum(
        estimate_message_tokens(message) for message in history
    )
    answer = _new_answer(model=model, question=question, prompt_tokens=prompt_estimate)
    job = _answer_job(
        user_id=conversation.user_id,
        summary=conversation.summary,
        question=question,
        answer=answer,
        history=history,
    )
    return answer, job


async def send_message(
    session: AsyncSession,
    *,
    engine: GenerationEngine,
    queue_when_busy: bool,
    author: Actor,
    conversation: Conversation,
    content: str,
    client_message_id: str | None,
    locked_at: datetime,
) -> SendResult:
    """Store a message; a customer's message in an `open` conversation starts an AI answer.

    Idempotent by `client_message_id`. A second send while an answer streams is refused
    (`GENERATION_IN_PROGRESS`) or, with `queue_when_busy`, stored and answered afterwards.
    The caller loaded `conversation` for an update, setting its `updated_at` to `locked_at`
    (`get_conversation(lock=True, touch=…)`): the message is stored at that moment.
    """
    now = locked_at
    # Read under the lock: the same send may have committed while we waited for it, and is
    # replayed rather than refused as a second send (GENERATION_IN_PROGRESS).
    context = await repository.send_context(
        session,
        conversation_id=conversation.id,
        client_message_id=client_message_id,
        recent_limit=HISTORY_MESSAGES,
    )
    if context.same_client_id is not None:
        existing = await repository.get_message(session, context.same_client_id)
        if existing is not None:
            return await _replay(session, existing, content)
    previous_status = conversation.status
    if author.id == conversation.user_id:
        role = MessageRole.USER
        if conversation.status == ConversationStatus.RESOLVED:
            conversation.status = ConversationStatus.OPEN
            conversation.resolved_at = None
        ai_answers = conversation.status == ConversationStatus.OPEN
    elif is_staff(author):
        if conversation.assigned_agent_id != author.id:
            raise NotAssigned()
        role, ai_answers = MessageRole.AGENT, False
    else:
        raise ConversationForbidden()

    if ai_answers:
        engine.ensure_accepting()
        if context.streaming_answer_id is not None:
            if not queue_when_busy:
                raise GenerationInProgress()
            ai_answers = False

    question = _new_question(
        conversation_id=conversation.id,
        author=author,
        role=role,
        content=content,
        client_message_id=client_message_id,
        now=now,
    )
    answer: Message | None = None
    job: AnswerJob | None = None
    if ai_answers:
        answer, job = _plan_answer(
            model=engine.answerer.model,
            conversation=conversation,
            question=question,
            prior=context.recent,
        )
    # Under the lock the constraints (client message id, one streaming answer) were checked,
    # so this cannot be refused: no savepoint, and both rows in one statement.
    await repository.insert_messages(session, [question] if answer is None else [question, answer])
    queued = (
        role == MessageRole.USER and conversation.status == ConversationStatus.OPEN and job is None
    )
    await session.flush()  # a reopened conversation's status

    frames = [message_frame(conversation.id, message_json(question))]
    if conversation.status != previous_status:
        frames.append(
            status_frame(conversation.id, conversation.status, conversation.assigned_agent_id)
        )

    async def announce() -> None:
        for frame in frames:
            await engine.publish(frame)
        if job is not None:
            engine.launch(job)
        elif queued:
            # The answer we waited behind may have ended before this commit.
            await engine.start_next_queued(conversation.id)

    on_commit(session, announce)
    return SendResult(user_message=question, assistant_message=answer, created=True, queued=queued)


async def post_message(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    engine: GenerationEngine,
    queue_when_busy: bool,
    author: Actor,
    conversation_id: uuid.UUID,
    content: str,
    client_message_id: str | None,
) -> SendResult:
    """`send_message` in a unit of work of its own, committed when this returns.

    For streaming callers (SSE, WebSocket, the waiting REST send), which follow the answer after
    the commit and must not hold a request's session while they do.
    """
    database: AsyncEngine = sessionmaker.kw["bind"]
    # Staff write in conversations of others (an agent's reply): never the common send.
    if engine.accepting and not is_staff(author):
        sent = await _send_at_once(
            database,
            engine=engine,
            author=author,
            conversation_id=conversation_id,
            content=content,
            client_message_id=client_message_id,
        )
        if sent is not None:
            return sent
    async with unit_of_work(sessionmaker) as session:
        now = utcnow()
        conversation = await get_conversation(
            session, user=author, conversation_id=conversation_id, lock=True, touch=now
        )
        return await send_message(
            session,
            engine=engine,
            queue_when_busy=queue_when_busy,
            author=author,
            conversation=conversation,
            content=content,
            client_message_id=client_message_id,
            locked_at=now,
        )


async def _send_at_once(
    database: AsyncEngine,
    *,
    engine: GenerationEngine,
    author: Actor,
    conversation_id: uuid.UUID,
    content: str,
    client_message_id: str | None,
) -> SendResult | None:
    """The common send in one round trip: on PostgreSQL one statement in autocommit (a
    transaction is four round trips: `bench/answer_db.py`), on SQLite one transaction in one
    trip to the connection's thread. None when it is not the common case (or a concurrent send
    got there first): nothing was stored, and `send_message` tells why."""
    question = _new_question(
        conversation_id=conversation_id,
        author=author,
        role=MessageRole.USER,
        content=content,
        client_message_id=client_message_id,
        now=utcnow(),
    )
    answer = _new_answer(model=engine.answerer.model, question=question, prompt_tokens=None)
    try:
        sent = await repository.send_at_once(
            database,
            conversation_id=conversation_id,
            author_id=author.id,
            client_message_id=client_message_id,
            question=question,
            answer=answer,
            recent_limit=HISTORY_MESSAGES,
            answer_prompt_base=_question_prompt_tokens(question),
            history_prompt_tokens=_history_prompt_tokens,
        )
    except IntegrityError:
        return None
    if sent is None:
        return None
    answer.prompt_tokens = sent.answer_prompt_tokens
    job = _answer_job(
        user_id=author.id,
        summary=sent.summary,
        question=question,
        answer=answer,
        history=_history_since(sent.recent, sent.summary_until),
    )
    await engine.publish(message_frame(conversation_id, message_json(question)))
    engine.launch(job)
    return SendResult(user_message=question, assistant_message=answer, created=True)


async def cancel_answer(
    session: AsyncSession, *, engine: GenerationEngine, conversation: Conversation
) -> uuid.UUID:
    """Stop the answer being generated (wherever it runs); `NOTHING_TO_CANCEL` when none is."""
    streaming = await repository.get_streaming_answer(session, conversation.id)
    if streaming is None:
        raise NothingToCancel()
    running = await engine.is_running_anywhere(streaming.id)
    if not running and utcnow() - streaming.created_at > timedelta(seconds=engine.lease_s):
        # Its instance died: store it as failed now rather than cancel nothing.
        await engine.fail_if_orphaned(conversation.id, streaming.id)
        raise NothingToCancel()
    # Running, or younger than a lease: committed and about to start (the cancel stops it as
    # it starts, on whichever instance).
    await engine.request_cancel(streaming.id)
    return streaming.id


async def get_message(session: AsyncSession, message_id: uuid.UUID) -> Message | None:
    return await repository.get_message(session, message_id)


async def get_reply(session: AsyncSession, question_id: uuid.UUID) -> Message | None:
    """The answer to a user message, once it has started."""
    return await repository.get_reply(session, question_id)


async def latest_answer(session: AsyncSession, conversation_id: uuid.UUID) -> Message | None:
    """The conversation's streaming answer if any, else its most recent one."""
    streaming = await repository.get_streaming_answer(session, conversation_id)
    if streaming is not None:
        return streaming
    return await repository.latest_answer(session, conversation_id)


# -- handoff ---------------------------------------------------------------------------------


async def _change_status(
    session: AsyncSession,
    *,
    engine: GenerationEngine,
    conversation: Conversation,
    status: ConversationStatus,
    note: str | None,
    actor: User,
) -> Conversation:
    conversation.status = status
    now = utcnow()
    conversation.updated_at = now
    frames = []
    if note:
        system_note = Message(
            conversation_id=conversation.id,
            role=MessageRole.SYSTEM,
            content=note,
            author_id=actor.id,
            status=MessageStatus.COMPLETE,
            created_at=now,
            updated_at=now,
        )
        session.add(system_note)
        await session.flush()
        frames.append(message_frame(conversation.id, message_json(system_note)))
    await session.flush()
    frames.append(status_frame(conversation.id, status, conversation.assigned_agent_id))

    async def announce() -> None:
        for frame in frames:
            await engine.publish(frame)

    on_commit(session, announce)
    return conversation


async def handoff(
    session: AsyncSession,
    *,
    engine: GenerationEngine,
    conversation: Conversation,
    actor: User,
    reason: str | None,
) -> Conversation:
    """Ask for a human: the conversation waits for an agent and the AI stays silent."""
    conversation = await repository.lock_conversation(session, conversation.id) or conversation
    if conversation.status == ConversationStatus.WAITING_FOR_AGENT:
        return conversation
    if conversation.status == ConversationStatus.WITH_AGENT:
        raise InvalidTransition("A human agent is already handling this conversation")
    conversation.waiting_since = utcnow()
    conversation.handoff_reason = reason
    conversation.was_handed_over = True
    conversation.resolved_at = None
    note = "A human agent has been asked to join the conversation."
    return await _change_status(
        session,
        engine=engine,
        conversation=conversation,
        status=ConversationStatus.WAITING_FOR_AGENT,
        note=note,
        actor=actor,
    )


async def escalate_to_human(
    session: AsyncSession,
    *,
    engine: GenerationEngine,
    conversation_id: uuid.UUID,
    user_id: uuid.UUID,
    reason: str | None,
) -> Conversation:
    """The assistant asks for a human on behalf of the customer it is answering.

    `conversation_id` and `user_id` come from the answer being generated, never from the model:
    the conversation must be that customer's own.
    """
    conversation = await repository.get_conversation(session, conversation_id)
    if conversation is None:
        raise ConversationNotFound(conversation_id)
    customer = await auth_service.get_user(session, user_id)
    if customer is None or conversation.user_id != customer.id:
        raise ConversationForbidden()
    if reason is not None:
        reason = reason.strip()[:HANDOFF_REASON_MAX_LENGTH] or None
    return await handoff(
        session, engine=engine, conversation=conversation, actor=customer, reason=reason
    )


async def assign(
    session: AsyncSession, *, engine: GenerationEngine, conversation: Conversation, agent: User
) -> Conversation:
    """An agent takes the conversation; a human answers from now on."""
    conversation = await repository.lock_conversation(session, conversation.id) or conversation
    if conversation.status == ConversationStatus.RESOLVED:
        raise InvalidTransition("The conversation is resolved")
    if (
        conversation.status == ConversationStatus.WITH_AGENT
        and conversation.assigned_agent_id == agent.id
    ):
        return conversation
    conversation.assigned_agent_id = agent.id
    conversation.waiting_since = None
    conversation.was_handed_over = True
    name = agent.display_name or agent.username
    return await _change_status(
        session,
        engine=engine,
        conversation=conversation,
        status=ConversationStatus.WITH_AGENT,
        note=f"{name} joined the conversation.",
        actor=agent,
    )


async def release(
    session: AsyncSession, *, engine: GenerationEngine, conversation: Conversation, agent: User
) -> Conversation:
    """Hand the conversation back to the AI."""
    conversation = await repository.lock_conversation(session, conversation.id) or conversation
    if conversation.status not in SILENT_STATUSES:
        raise InvalidTransition("The conversation is not with a human agent")
    conversation.assigned_agent_id = None
    conversation.waiting_since = None
    return await _change_status(
        session,
        engine=engine,
        conversation=conversation,
        status=ConversationStatus.OPEN,
        note="The assistant is back in the conversation.",
        actor=agent,
    )


async def complete(
    session: AsyncSession, *, engine: GenerationEngine, conversation: Conversation, actor: User
) -> Conversation:
    """Mark the conversation resolved."""
    conversation = await repository.lock_conversation(session, conversation.id) or conversation
    if conversation.status == ConversationStatus.RESOLVED:
        return conversation
    conversation.resolved_at = utcnow()
    conversation.waiting_since = None
    return await _change_status(
        session,
        engine=engine,
        conversation=conversation,
        status=ConversationStatus.RESOLVED,
        note=None,
        actor=actor,
    )


@dataclass(frozen=True, slots=True)
class ConversationOutcome:
    conversation_id: uuid.UUID
    messages: dict[str, int]
    seconds_to_first_answer: float | None
    outcome: str  # "ai_only" or "handed_over"


async def record_outcome(
    sessionmaker: async_sessionmaker[AsyncSession], conversation_id: uuid.UUID
) -> ConversationOutcome | None:
    """Analytics of a resolved conversation (run in the background after `complete`)."""
    async with unit_of_work(sessionmaker) as session:
        conversation = await repository.get_conversation(session, conversation_id)
        if conversation is None:
            return None
        counts = await repository.count_messages(session, conversation_id)
    first = conversation.first_answer_at
    outcome = ConversationOutcome(
        conversation_id=conversation_id,
        messages=counts,
        seconds_to_first_answer=(
            None if first is None else (first - conversation.created_at).total_seconds()
        ),
        outcome="handed_over" if conversation.was_handed_over else "ai_only",
    )
    log.info(
        "conversation.completed",
        conversation_id=str(conversation_id),
        messages=counts,
        seconds_to_first_answer=outcome.seconds_to_first_answer,
        outcome=outcome.outcome,
    )
    metrics.CONVERSATIONS_COMPLETED.labels(outcome=outcome.outcome).inc()
    return outcome


# -- agent memory ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryFold:
    """Messages of a conversation to fold into its running summary."""

    conversation_id: uuid.UUID
    summary: str | None  # the summary so far
    summary_until: datetime | None  # the boundary it was read with
    messages: tuple[tuple[str, str], ...]  # (role, content), oldest first
    fold_until: datetime  # `created_at` of the last message to fold


async def memory_to_fold(
    session: AsyncSession, *, conversation_id: uuid.UUID, budget: int, keep_tokens: int
) -> MemoryFold | None:
    """The older messages to summarise, or None while the verbatim part fits `budget`.

    The newest messages worth up to `keep_tokens` stay verbatim.
    """
    conversation = await repository.get_conversation(session, conversation_id)
    if conversation is None:
        return None
    messages = await repository.memory_messages(
        session, conversation_id=conversation_id, after=conversation.summary_until
    )
    if sum(message.token_count for message in messages) <= budget:
        return None
    kept = 0
    split = len(messages)
    while split > 0 and kept + messages[split - 1].token_count <= keep_tokens:
        split -= 1
        kept += messages[split].token_count
    folded = messages[:split]
    if not folded:
        return None
    return MemoryFold(
        conversation_id=conversation_id,
        summary=conversation.summary,
        summary_until=conversation.summary_until,
        messages=tuple((message.role.value, message.content) for message in folded),
        fold_until=folded[-1].created_at,
    )


async def save_summary(session: AsyncSession, *, fold: MemoryFold, summary: str) -> bool:
    """Store the summary `fold` produced; False when another one was stored meanwhile."""
    saved = await repository.save_summary(
        session,
        conversation_id=fold.conversation_id,
        summary=summary,
        until=fold.fold_until,
        expected_until=fold.summary_until,
    )
    log.info(
        "conversation.summarised",
        conversation_id=str(fold.conversation_id),
        messages=len(fold.messages),
        saved=saved,
    )
    return saved


# -- token budgets ---------------------------------------------------------------------------


def usage_day(moment: datetime) -> str:
    """`YYYY-MM-DD`: the day an answer's tokens are charged to (on every answer stored:
    `isoformat`, 0.4 µs where `strftime` takes 2.5)."""
    return moment.date().isoformat()


async def check_token_budget(database: AsyncEngine, *, user: Actor, budget: int) -> None:
    """`429 TOKEN_BUDGET_EXCEEDED` once today's answers used `budget` tokens (0: no budget).

    Checked before every model call, on the way to its first token: a statement on the driver.
    """
    if budget <= 0:
        return
    now = utcnow()
    async with driver_connection(database) as connection:
        used = await repository.get_token_usage(connection, user_id=user.id, day=usage_day(now))
    if used >= budget:
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        retry_after = max(1, int((midnight - now).total_seconds()))
        raise TokenBudgetExceeded(
            headers={"Retry-After": str(retry_after)},
            details={"budget": budget, "used": used},
        )


# -- the engine's store ----------------------------------------------------------------------


class ConversationAnswerStore:
    """Stores answers' results for the generation engine (`realtime.engine.AnswerStore`)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        queue_when_busy: bool,
        model: str,
        job_queue: JobQueue | None = None,
        memory_token_budget: int | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.database: AsyncEngine = sessionmaker.kw["bind"]
        self.queue_when_busy = queue_when_busy
        self.model = model
        # With a budget, a conversation whose verbatim messages pass it gets summarised.
        self.job_queue = job_queue
        self.memory_token_budget = memory_token_budget

    async def store_result(self, result: AnswerResult) -> StoredAnswer:
        """Store the result; waits its turn again when the pool had no connection for it.

        A burst of answers ending together can outlast the pool's timeout; given up, such an
        answer would be left to the reaper, which can only store it `failed` from its log.
        Other errors are not retried: a commit whose outcome is unknown must not run twice.
        """
        attempt = 1
        while True:
            try:
                return await self._store_result(result)
            except PoolTimeout:
                if attempt == STORE_ATTEMPTS:
                    raise
                log.warning(
                    "chat.answer_store_waiting",
                    message_id=str(result.message_id),
                    attempt=attempt,
                )
                await asyncio.sleep(STORE_RETRY_S * 2 ** (attempt - 1))
                attempt += 1

    async def _store_result(self, result: AnswerResult) -> StoredAnswer:
        now = utcnow()
        # Without the provider's usage, the prompt keeps the estimate stored at the start.
        completion_tokens = (
            result.usage.completion_tokens
            if result.usage is not None
            else estimate_tokens(result.content)
        )
        values: dict[str, object] = {
            "content": result.content,
            "status": MessageStatus(result.outcome),
            "token_count": completion_tokens,
            "completion_tokens": completion_tokens,
            "usage_estimated": result.usage is None or result.usage.estimated,
            "sources": [
                {
                    "document_id": str(source.document_id),
                    "title": source.title,
                    "chunk_id": str(source.chunk_id),
                }
                for source in result.sources
            ],
            "last_seq": result.last_seq,
            "error_code": result.error_code,
            "updated_at": now,
        }
        if result.usage is not None:
            values["prompt_tokens"] = result.usage.prompt_tokens
        if result.model:
            values["model"] = result.model
        stored = await repository.store_result_at_once(
            self.database,
            message_id=result.message_id,
            conversation_id=result.job_conversation_id,
            asked_by=result.asked_by,
            values=values,
            moment=now,
            answered=bool(result.content),
            day=usage_day(now),
        )
        if stored is None:
            # Stored as final already (e.g. by another instance), or deleted meanwhile.
            async with unit_of_work(self.sessionmaker) as session:
                return await self._already_stored(session, result)
        conversation = stored.conversation
        if conversation is not None and self._summary_due(conversation.memory_tokens):
            # Its own transaction: memory is best effort, and the next answer checks again.
            async with unit_of_work(self.sessionmaker) as session:
                await self._queue_summary(session, stored.message.conversation_id)
        return self._stored(stored.message)

    @staticmethod
    def _stored(message: Message | DriverRow, *, changed: bool = True) -> StoredAnswer:
        """The stored answer as the engine reports it (`changed`: stored by this call)."""
        usage = Usage(
            prompt_tokens=message.prompt_tokens or 0,
            completion_tokens=message.completion_tokens or 0,
            estimated=message.usage_estimated,
        )
        return StoredAnswer(
            message=message_json(message), usage=usage, reply_to=message.reply_to, changed=changed
        )

    @staticmethod
    async def _already_stored(session: AsyncSession, result: AnswerResult) -> StoredAnswer:
        message = await repository.get_message(session, result.message_id)
        if message is None:  # the conversation was deleted meanwhile
            usage = result.usage or Usage(0, estimate_tokens(result.content), estimated=True)
            return StoredAnswer(message={}, usage=usage, reply_to=None, changed=False)
        return ConversationAnswerStore._stored(message, changed=False)

    def _summary_due(self, memory_tokens: int) -> bool:
        """Whether the verbatim part of the conversation's memory passed the budget."""
        budget = self.memory_token_budget
        return budget is not None and budget > 0 and memory_tokens > budget

    async def _queue_summary(self, session: AsyncSession, conversation_id: uuid.UUID) -> None:
        """Queue the summary job (after this commit).

        Memory is best effort: a failure to queue it is logged and never loses the answer.
        """
        try:
            async with session.begin_nested():
                await jobs_service.enqueue(
                    session,
                    self.job_queue,
                    name=SUMMARY_JOB,
                    args={"conversation_id": str(conversation_id)},
                )
        except Exception:
            log.warning(
                "conversation.summary_not_queued",
                conversation_id=str(conversation_id),
                exc_info=True,
            )

    async def next_queued(self, conversation_id: uuid.UUID) -> AnswerJob | None:
        if not self.queue_when_busy:
            return None
        async with unit_of_work(self.sessionmaker) as session:
            conversation = await repository.lock_conversation(session, conversation_id)
            if conversation is None or conversation.status != ConversationStatus.OPEN:
                return None
            if await repository.get_streaming_answer(session, conversation_id) is not None:
                return None  # its end starts the next one
            waiting = await repository.unanswered_questions(session, conversation_id)
            if not waiting:
                return None
            # Oldest first: every queued question gets its own answer, in order.
            question = waiting[0]
            prior = [
                message
                for message in await repository.recent_messages(
                    session,
                    conversation_id=conversation_id,
                    limit=HISTORY_MESSAGES + len(waiting),
                )
                if message.created_at < question.created_at
            ][-HISTORY_MESSAGES:]
            answer, job = _plan_answer(
                model=self.model, conversation=conversation, question=question, prior=prior
            )
            await repository.insert_messages(session, [answer])
            return job

    async def streaming_answers(self, older_than_s: float) -> list[tuple[uuid.UUID, uuid.UUID]]:
        async with unit_of_work(self.sessionmaker) as session:
            return await repository.streaming_answers_before(
                session, utcnow() - timedelta(seconds=older_than_s)
            )


async def import_transcript(
    session: AsyncSession,
    *,
    user: User,
    title: str | None,
    transcript: Sequence[tuple[MessageRole, str]],
) -> Conversation:
    """A new conversation of `user` holding an earlier exchange (e.g. an API client's messages).

    The messages are stored in order and become the history of the next answer.
    """
    conversation = await create_conversation(session, user=user, title=title)
    moment = utcnow()
    for offset, (role, content) in enumerate(transcript):
        at = moment + timedelta(microseconds=offset)
        session.add(
            Message(
                conversation_id=conversation.id,
                role=role,
                content=content,
                author_id=user.id if role == MessageRole.USER else None,
                status=MessageStatus.COMPLETE,
                token_count=estimate_tokens(content),
                created_at=at,
                updated_at=at,
            )
        )
    await session.flush()
    return conversation
