"""SQL for conversations and messages."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from helpline.agents.tokens import TOKENS_PER_MESSAGE
from helpline.conversations.models import (
    Conversation,
    ConversationStatus,
    Message,
    MessageRole,
    MessageStatus,
    TokenUsage,
)
from helpline.core.database import (
    BatchedStatement,
    DriverConnection,
    DriverRow,
    DriverStatement,
    SqliteWork,
    driver_connection,
    in_sqlite_transaction,
)
from helpline.kit.models import row_values
from helpline.kit.pagination import paginate, split_page

# The statements a send and an answer's result run (on the way to every first token) are built
# once, on the tables: built per call, and through the ORM's bulk paths, they cost several
# times the CPU of their round trips (`bench/answer_db.py`).
_messages: Table = Message.__table__  # type: ignore[assignment]
_conversations: Table = Conversation.__table__  # type: ignore[assignment]
_token_usage: Table = TokenUsage.__table__  # type: ignore[assignment]
_NEWEST_FIRST = (_messages.c.created_at.desc(), _messages.c.id.desc())
_IN_CONVERSATION = _messages.c.conversation_id == bindparam("conversation_id")

# What the agent's memory is made of: the exchange, not system notes or answers in flight.
_MEMORY_ROLES = (MessageRole.USER, MessageRole.ASSISTANT, MessageRole.AGENT)


def _one_of(column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
    """`column IN (…)` with a parameter per value: SQLAlchemy renders an `in_()` of a list
    anew at every execution (an "expanding" parameter), ~0.1 ms of CPU for a hot statement."""
    return column.in_([literal(value, column.type) for value in values])


def _memory_conditions(conversation_id: Any, after: Any | None) -> list[ColumnElement[bool]]:
    """A conversation's exchanged messages (created after `after`, unless None)."""
    conditions = [
        _messages.c.conversation_id == conversation_id,
        _one_of(_messages.c.role, _MEMORY_ROLES),
        _messages.c.status != MessageStatus.STREAMING,
    ]
    if after is not None:
        conditions.append(_messages.c.created_at > after)
    return conditions


async def get_conversation(
    session: AsyncSession, conversation_id: uuid.UUID
) -> Conversation | None:
    return await session.get(Conversation, conversation_id)


_CONVERSATION_OWNER = DriverStatement(
    select(_conversations.c.user_id).where(_conversations.c.id == bindparam("conversation_id"))
)


async def get_conversation_owner(
    connection: DriverConnection, conversation_id: uuid.UUID
) -> uuid.UUID | None:
    """The id of the conversation's customer; None when there is no such conversation."""
    rows = await _CONVERSATION_OWNER.fetch(connection, {"conversation_id": conversation_id})
    return rows[0].user_id if rows else None


_TOUCH_AND_LOCK = (
    select(Conversation)
    .from_statement(
        update(_conversations)
        .where(_conversations.c.id == bindparam("conversation_id"))
        .values(updated_at=bindparam("touch"))
        .returning(*_conversations.c)
    )
    .execution_options(populate_existing=True)
)


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
    statement: Any
    if touch is not None:
        result = await session.execute(
            _TOUCH_AND_LOCK, {"conversation_id": conversation_id, "touch": touch}
        )
        return result.scalar_one_or_none()
    if session.get_bind().dialect.name != "postgresql":
        statement = (
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(updated_at=Conversation.updated_at)
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
class HistoryMessage:
    """What an answer's history needs of a message."""

    role: MessageRole
    content: str
    token_count: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SendContext:
    """What a send must know of its conversation, read under its lock in one query."""

    recent: Sequence[HistoryMessage]  # the last messages, oldest first
    streaming_answer_id: uuid.UUID | None
    same_client_id: uuid.UUID | None  # an earlier send with this `client_message_id`


_CONTEXT_COLUMNS = (
    _messages.c.id,
    _messages.c.role,
    _messages.c.status,
    _messages.c.content,
    _messages.c.token_count,
    _messages.c.client_message_id,
    _messages.c.created_at,
)
# What an answer's history needs of a message (a send reads the recent ones on its way to the
# first token).
_HISTORY_COLUMNS = (
    _messages.c.id,
    _messages.c.role,
    _messages.c.content,
    _messages.c.token_count,
    _messages.c.created_at,
)
_RECENT = (
    select(*_CONTEXT_COLUMNS)
    .where(_IN_CONVERSATION)
    .order_by(*_NEWEST_FIRST)
    .limit(bindparam("recent_limit"))
    .subquery()
)
_RECENT_PART, _STREAMING_PART, _SAME_CLIENT_ID_PART = 0, 1, 2
# Three lookups, each on an index of its own (one `OR` of them filtered every message of the
# conversation: a send got slower as the conversation grew).
_SEND_CONTEXT = union_all(
    select(literal_column(str(_RECENT_PART)).label("part"), *_RECENT.c),
    select(literal_column(str(_STREAMING_PART)).label("part"), *_CONTEXT_COLUMNS).where(
        _IN_CONVERSATION,
        # Inline, not bound: a prepared plan uses the partial index only for its very predicate.
        _messages.c.status == literal_column(f"'{MessageStatus.STREAMING.value}'"),
        _messages.c.role == MessageRole.ASSISTANT,
    ),
    select(literal_column(str(_SAME_CLIENT_ID_PART)).label("part"), *_CONTEXT_COLUMNS).where(
        # NULL (no client id) matches nothing.
        _IN_CONVERSATION,
        _messages.c.client_message_id == bindparam("client_message_id"),
    ),
)


async def send_context(
    session: AsyncSession,
    *,
    conversation_id: uuid.UUID,
    client_message_id: str | None,
    recent_limit: int,
) -> SendContext:
    """The last `recent_limit` messages, the streaming answer and the earlier send by
    `client_message_id`, in one round trip (each is also looked up on its own index)."""
    rows = (
        await session.execute(
            _SEND_CONTEXT,
            {
                "conversation_id": conversation_id,
                "recent_limit": recent_limit,
                "client_message_id": client_message_id,
            },
        )
    ).all()

    def first_id(part: int) -> uuid.UUID | None:
        return next((row.id for row in rows if row.part == part), None)

    return SendContext(
        recent=_oldest_first(row for row in rows if row.part == _RECENT_PART),
        streaming_answer_id=first_id(_STREAMING_PART),
        same_client_id=first_id(_SAME_CLIENT_ID_PART),
    )


_INSERT_MESSAGE = insert(_messages)


async def insert_messages(session: AsyncSession, messages: Sequence[Message]) -> None:
    """Insert messages built whole (`new_row`) in one statement; they stay detached, as built."""
    await session.execute(_INSERT_MESSAGE, [row_values(message) for message in messages])


_CLAIMED_PART = 3  # beside `_RECENT_PART`, as in `_SEND_CONTEXT`


def _claim_statement() -> Any:
    """The common send's claim on its conversation: touched if it is the author's, `open`, with
    no answer streaming and no message of the same client id (`RETURNING` its summary)."""
    conversation_id = bindparam("conversation_id", type_=_conversations.c.id.type)
    in_conversation = _messages.c.conversation_id == conversation_id
    return (
        update(_conversations)
        .where(
            _conversations.c.id == conversation_id,
            _conversations.c.user_id == bindparam("author_id", type_=_conversations.c.user_id.type),
            _conversations.c.status == ConversationStatus.OPEN,
            ~exists().where(
                in_conversation,
                _messages.c.status == literal_column(f"'{MessageStatus.STREAMING.value}'"),
                _messages.c.role == MessageRole.ASSISTANT,
            ),
            ~exists().where(
                in_conversation,
                _messages.c.client_message_id == bindparam("client_message_id"),
            ),
        )
        .values(updated_at=bindparam("touch"))
        .returning(_conversations.c.summary, _conversations.c.summary_until)
    )


def _send_at_once_statement() -> Any:
    """PostgreSQL: the common send (a customer's message in an `open` conversation with no answer
    streaming and a new client id) as one statement of data-modifying `WITH` clauses, run in
    autocommit: the conversation touched, the question and the `streaming` answer inserted, and
    the history the answer needs read, in one round trip.

    `claimed` is the lock (`UPDATE`, which waits for a concurrent send and then checks its
    conditions against the row as that send left it). The `NOT EXISTS` checks see the rows as
    they were when the statement began: a send that committed while this one waited for the
    lock is caught by the unique constraints instead (client id, one streaming answer), which
    fail the whole statement. Nothing matched or a constraint failed: nothing was written, and
    the caller takes the transactional path, which tells why.
    """
    conversation_id = bindparam("conversation_id", type_=_conversations.c.id.type)
    in_conversation = _messages.c.conversation_id == conversation_id
    claimed = _claim_statement().cte("claimed")
    recent = (
        select(*_HISTORY_COLUMNS)
        .where(in_conversation)
        .order_by(*_NEWEST_FIRST)
        .limit(bindparam("recent_limit"))
        .cte("recent")
    )
    # The answer's prompt estimate, as `_history` and `estimate_prompt_tokens` count it: the
    # recent exchange after the summary, at its stored token counts (the question's and the
    # reply's priming come in `answer_prompt_base`).
    history_tokens = (
        select(func.coalesce(func.sum(recent.c.token_count + TOKENS_PER_MESSAGE), 0))
        .where(
            or_(
                recent.c.role == MessageRole.USER,
                and_(
                    _one_of(recent.c.role, (MessageRole.ASSISTANT, MessageRole.AGENT)),
                    recent.c.content != "",
                ),
            ),
            or_(claimed.c.summary_until.is_(None), recent.c.created_at > claimed.c.summary_until),
        )
        .scalar_subquery()
    )
    # The two rows come as one JSON parameter, read as `messages` records: two parameters
    # for each column of each row cost more CPU than the rest of the statement.
    records = (
        func.json_populate_recordset(
            literal_column(f"NULL::{_messages.name}"), cast(bindparam("rows", type_=Text), JSON)
        )
        .table_valued(*(column(c.key, c.type) for c in _messages.columns))
        .alias("record")
    )
    answer_id = bindparam("answer_id", type_=_messages.c.id.type)
    inserted = (
        insert(_messages)
        .from_select(
            [c.key for c in _messages.columns],
            select(
                *(
                    case(
                        (
                            records.c.id == answer_id,
                            bindparam("answer_prompt_base") + history_tokens,
                        )
                    )
                    if c.key == "prompt_tokens"
                    else records.c[c.key]
                    for c in _messages.columns
                )
            ).select_from(claimed.join(records, true())),
        )
        .returning(_messages.c.id, _messages.c.prompt_tokens)
        .cte("inserted")
    )
    answer_prompt = (
        select(inserted.c.prompt_tokens).where(inserted.c.id == answer_id).scalar_subquery()
    )
    # The conversation's row (its summary once, not on each message's row), then the messages,
    # each row with the answer's id: a batch of sends (`BatchedStatement`) shares them out by it.
    return union_all(
        select(
            answer_id.label("batch_key"),
            literal_column(str(_CLAIMED_PART)).label("part"),
            claimed.c.summary,
            claimed.c.summary_until,
            answer_prompt.label("answer_prompt_tokens"),
            *(cast(null(), c.type).label(c.name) for c in recent.c),
        ),
        select(
            answer_id,
            literal_column(str(_RECENT_PART)).label("part"),
            cast(null(), _conversations.c.summary.type),
            cast(null(), _conversations.c.summary_until.type),
            cast(null(), _messages.c.prompt_tokens.type),
            *recent.c,
        ),
    )


# Sends to different conversations batch together; by conversation, so that two batches lock
# conversations in the same order.
_SEND_AT_ONCE = BatchedStatement(
    _send_at_once_statement(), key="answer_id", lock_order="conversation_id"
)


@dataclass(frozen=True, slots=True)
class SentAtOnce:
    """What `send_at_once` read and stored."""

    summary: str | None
    summary_until: datetime | None
    recent: Sequence[HistoryMessage]  # the last messages before the question, oldest first
    answer_prompt_tokens: int


_CLAIM = DriverStatement(_claim_statement())
_RECENT_MESSAGES = DriverStatement(select(*(_RECENT.c[c.name] for c in _HISTORY_COLUMNS)))
_INSERT_MESSAGE_ROW = DriverStatement(_INSERT_MESSAGE)


async def send_at_once(
    database: AsyncEngine,
    *,
    conversation_id: uuid.UUID,
    author_id: uuid.UUID,
    client_message_id: str | None,
    question: Message,
    answer: Message,
    recent_limit: int,
    answer_prompt_base: int,
    history_prompt_tokens: Callable[[Sequence[HistoryMessage], datetime | None], int],
) -> SentAtOnce | None:
    """The common send in one round trip, which commits by itself: on PostgreSQL one statement
    (`_send_at_once_statement`, batched with the sends queued at the same time), on SQLite one
    transaction (the claim, the history, the two rows) in one trip to the connection's thread.

    The answer row's prompt estimate is `answer_prompt_base` (the question's part) plus
    `history_prompt_tokens(recent, summary_until)`, the part of the history the answer gets
    (computed in the statement on PostgreSQL: a test checks the two agree). None when nothing
    was stored because the send is not the common case; a unique constraint's `IntegrityError`
    when a concurrent send got there first.
    """
    claim: dict[str, object] = {
        "conversation_id": conversation_id,
        "author_id": author_id,
        "client_message_id": client_message_id,
        "touch": question.created_at,
        "recent_limit": recent_limit,
    }
    rows = [row_values(question), row_values(answer)]
    if database.dialect.name == "postgresql":
        params = {
            **claim,
            "answer_prompt_base": answer_prompt_base,
            "answer_id": answer.id,
            # asyncpg's own UUIDs, in ids read from the database, as text.
            "rows": orjson.dumps(rows, default=str).decode(),
        }
        found = await _SEND_AT_ONCE.fetch(database, params)
        claimed = next((row for row in found if row.part == _CLAIMED_PART), None)
        if claimed is None:
            return None
        return SentAtOnce(
            summary=claimed.summary,
            summary_until=claimed.summary_until,
            recent=_oldest_first(row for row in found if row.part == _RECENT_PART),
            answer_prompt_tokens=claimed.answer_prompt_tokens,
        )

    def send(work: SqliteWork) -> SentAtOnce | None:
        claimed = work.fetch(_CLAIM, claim)
        if not claimed:
            return None
        summary, summary_until = claimed[0]
        recent = _oldest_first(work.fetch(_RECENT_MESSAGES, claim))
        prompt_tokens = answer_prompt_base + history_prompt_tokens(recent, summary_until)
        rows[1]["prompt_tokens"] = prompt_tokens
        for row in rows:
            work.fetch(_INSERT_MESSAGE_ROW, row)
        return SentAtOnce(summary, summary_until, recent, prompt_tokens)

    async with driver_connection(database) as connection:
        return await in_sqlite_transaction(connection, send)


def _oldest_first(rows: Iterable[Any]) -> list[HistoryMessage]:
    """Rows of `_HISTORY_COLUMNS` (at least) as history, oldest first."""
    return [
        HistoryMessage(row.role, row.content, row.token_count, row.created_at)
        for row in sorted(rows, key=lambda row: (row.created_at, row.id))
    ]


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


async def count_messages(session: AsyncSession, conversation_id: uuid.UUID) -> dict[str, int]:
    statement = (
        select(Message.role, func.count())
        .where(Message.conversation_id == conversation_id)
        .group_by(Message.role)
    )
    return {str(role): int(count) for role, count in (await session.execute(statement)).all()}


_TOKENS_USED = DriverStatement(
    select(TokenUsage.tokens).where(
        TokenUsage.user_id == bindparam("user_id"), TokenUsage.day == bindparam("day")
    )
)


async def get_token_usage(connection: DriverConnection, *, user_id: uuid.UUID, day: str) -> int:
    """The tokens the user's answers used on `day` (0 before the first)."""
    rows = await _TOKENS_USED.fetch(connection, {"user_id": user_id, "day": day})
    return int(rows[0].tokens) if rows else 0


async def memory_messages(
    session: AsyncSession, *, conversation_id: uuid.UUID, after: datetime | None
) -> Sequence[Message]:
    """The exchanged messages created after `after`, oldest first."""
    statement = (
        select(Message)
        .where(*_memory_conditions(conversation_id, after))
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


# -- an answer's result in one statement (PostgreSQL) -----------------------------------------

# The columns a result sets, each from a parameter of the same name with `new_` before it.
_RESULT_COLUMNS = (
    "content",
    "status",
    "token_count",
    "completion_tokens",
    "usage_estimated",
    "sources",
    "last_seq",
    "error_code",
    "updated_at",
)


def _finish_values() -> dict[str, Any]:
    """An answer's final state, from `new_<column>` parameters (the prompt tokens and the
    model kept unless the provider reported them)."""
    values: dict[str, Any] = {
        name: bindparam(f"new_{name}", type_=_messages.c[name].type) for name in _RESULT_COLUMNS
    }
    values["prompt_tokens"] = func.coalesce(
        bindparam("new_prompt_tokens", type_=_messages.c.prompt_tokens.type),
        _messages.c.prompt_tokens,
    )
    values["model"] = func.coalesce(
        bindparam("new_model", type_=_messages.c.model.type), _messages.c.model
    )
    return values


def _finish_statement() -> Any:
    """The answer's final state, if it is still `streaming` (so exactly once)."""
    return (
        update(_messages)
        .where(
            _messages.c.id == bindparam("message_id"),
            _messages.c.status == MessageStatus.STREAMING,
        )
        .values(_finish_values())
        .returning(*_messages.c)
    )


def _store_result_statement() -> Any:
    """The message's final state, the conversation's activity and the usage charge, as one
    statement of data-modifying `WITH` clauses: one round trip, no transaction around it.

    Each clause sees the rows as they were before the statement: the memory sum leaves the
    answer out (still `streaming` there) and adds its tokens itself.
    """
    finished = _finish_statement().cte("finished")
    memory_tokens = (
        select(func.coalesce(func.sum(_messages.c.token_count), 0))
        .where(
            *_memory_conditions(_conversations.c.id, None),
            or_(
                _conversations.c.summary_until.is_(None),
                _messages.c.created_at > _conversations.c.summary_until,
            ),
        )
        .correlate(_conversations)
        .scalar_subquery()
    )
    touched = (
        update(_conversations)
        .where(_conversations.c.id == select(finished.c.conversation_id).scalar_subquery())
        .values(
            updated_at=bindparam("touched_at"),
            first_answer_at=case(
                (
                    bindparam("answered", type_=Boolean),
                    func.coalesce(_conversations.c.first_answer_at, bindparam("touched_at")),
                ),
                else_=_conversations.c.first_answer_at,
            ),
        )
        .returning(_conversations.c.user_id, memory_tokens.label("memory_tokens"))
        .cte("touched")
    )
    charge = postgresql_insert(_token_usage).from_select(
        ["user_id", "day", "tokens"],
        select(
            touched.c.user_id,
            bindparam("day", type_=_token_usage.c.day.type),
            func.coalesce(finished.c.prompt_tokens, 0) + finished.c.completion_tokens,
        ).select_from(finished.join(touched, true())),
    )
    charged = charge.on_conflict_do_update(
        index_elements=[_token_usage.c.user_id, _token_usage.c.day],
        set_={"tokens": _token_usage.c.tokens + charge.excluded.tokens},
    ).cte("charged")
    return (
        select(
            finished.c.id.label("batch_key"),
            *finished.c,
            touched.c.user_id.label("owner_id"),
            (touched.c.memory_tokens + finished.c.token_count).label("memory_tokens"),
        )
        .select_from(finished.outerjoin(touched, true()))
        .add_cte(charged)
    )


# Results stored at once batch together; by customer, then conversation, so that two batches
# take the rows they share (a customer's usage of the day) in the same order.
_STORE_RESULT = BatchedStatement(
    _store_result_statement(), key="message_id", lock_order="lock_order"
)


@dataclass(frozen=True, slots=True)
class TouchedConversation:
    user_id: uuid.UUID
    # The tokens of the messages exchanged after its running summary (all, without one).
    memory_tokens: int


@dataclass(frozen=True, slots=True)
class StoredAtOnce:
    message: DriverRow  # the answer's stored row
    conversation: TouchedConversation | None  # None when the conversation is gone


# SQLite: the three parts of `_STORE_RESULT`, run in one transaction.
_FINISH = DriverStatement(_finish_statement())
_SUMMARY_UNTIL = (
    select(_conversations.c.summary_until)
    .where(_conversations.c.id == bindparam("conversation_id"))
    .scalar_subquery()
)
# Not correlated with the updated row: SQLite renders a RETURNING clause's columns without
# their table, and `id` in a subquery on messages would then be the message's.
_MEMORY_TOKENS = (
    select(func.coalesce(func.sum(_messages.c.token_count), 0))
    .where(
        *_memory_conditions(bindparam("conversation_id"), None),
        or_(_SUMMARY_UNTIL.is_(None), _messages.c.created_at > _SUMMARY_UNTIL),
    )
    .scalar_subquery()
)
_TOUCH = (
    update(_conversations)
    .where(_conversations.c.id == bindparam("conversation_id"))
    .values(updated_at=bindparam("touched_at"))
    .returning(_conversations.c.user_id, _MEMORY_TOKENS.label("memory_tokens"))
)
_TOUCH_AT = {
    False: DriverStatement(_TOUCH),
    True: DriverStatement(
        _TOUCH.values(
            first_answer_at=func.coalesce(_conversations.c.first_answer_at, bindparam("touched_at"))
        )
    ),
}
_charge = sqlite_insert(_token_usage).values(
    user_id=bindparam("user_id"), day=bindparam("day"), tokens=bindparam("tokens")
)
_CHARGE = DriverStatement(
    _charge.on_conflict_do_update(
        index_elements=[_token_usage.c.user_id, _token_usage.c.day],
        set_={"tokens": _token_usage.c.tokens + _charge.excluded.tokens},
    )
)


async def store_result_at_once(
    database: AsyncEngine,
    *,
    message_id: uuid.UUID,
    conversation_id: uuid.UUID,
    asked_by: uuid.UUID | None,
    values: dict[str, object],
    moment: datetime,
    answered: bool,
    day: str,
) -> StoredAtOnce | None:
    """An answer's final state (`values` by column), the conversation's activity and the usage
    charge (the stored usage: cancelled and failed answers pay for what they streamed), all or
    nothing and in one round trip: one statement on PostgreSQL (`_store_result_statement`,
    batched with the results stored at the same time), one transaction in one trip to the
    connection's thread on SQLite. None when the answer was final already (or is gone).

    `asked_by`, the question's author when known (the conversation's customer, whose usage
    row the store charges, in all but a staff member's question), orders the batch's row locks."""
    params: dict[str, object] = {f"new_{name}": values.get(name) for name in _RESULT_COLUMNS}
    params["new_prompt_tokens"] = values.get("prompt_tokens")
    params["new_model"] = values.get("model")
    params["message_id"] = message_id
    if database.dialect.name == "postgresql":
        params.update(
            touched_at=moment,
            answered=answered,
            day=day,
            lock_order=f"{asked_by or ''}/{conversation_id}",
        )
        rows = await _STORE_RESULT.fetch(database, params)
        if not rows:
            return None
        row = rows[0]
        if row.owner_id is None:
            return StoredAtOnce(row, None)
        return StoredAtOnce(row, TouchedConversation(row.owner_id, row.memory_tokens))

    def store(work: SqliteWork) -> StoredAtOnce | None:
        finished = work.fetch(_FINISH, params)
        if not finished:
            return None
        message = finished[0]
        touch = {"conversation_id": message.conversation_id, "touched_at": moment}
        touched = work.fetch(_TOUCH_AT[answered], touch)
        if not touched:
            return StoredAtOnce(message, None)
        owner_id, memory_tokens = touched[0]
        charge = (message.prompt_tokens or 0) + message.completion_tokens
        work.fetch(_CHARGE, {"user_id": owner_id, "day": day, "tokens": charge})
        return StoredAtOnce(message, TouchedConversation(owner_id, int(memory_tokens)))

    async with driver_connection(database) as connection:
        return await in_sqlite_transaction(connection, store)
