"""The LangGraph support agent: retrieval, prompt, tools, identity, cancellation, memory, usage.

Most tests drive the agent with the `fake` model (steered by `[[...]]` directives) over a small
stub knowledge base, and need no database. Those about real effects — a hand-over stored in
the conversation with its `status` frame, the knowledge base searched, the running summary —
run against the app on SQLite and PostgreSQL. Cancellation and summed usage are also checked
against the OpenAI provider talking to the scripted model server, from the server's side.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.agents import factory
from helpline.agents.chat import closing_stream
from helpline.agents.exceptions import ConfigurationError, LLMServiceError
from helpline.agents.graph import HANDOFF_NOTICE, NO_PASSAGES, SupportAgent
from helpline.agents.memory import SUMMARY_JOB, SUMMARY_REQUEST, summary_messages
from helpline.agents.providers.fake import FakeChatModel, default_answer
from helpline.agents.providers.openai import OpenAIChatModel
from helpline.agents.schemas import (
    AnswerEvent,
    AnswerRequest,
    ChatMessage,
    Source,
    SourcesFound,
    TextDelta,
    ToolActivity,
    Usage,
)
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens
from helpline.auth.models import User
from helpline.conversations import service as conversations_service
from helpline.conversations.models import Conversation, ConversationStatus, Message, MessageRole
from helpline.core import migrations
from helpline.core.config import Settings
from helpline.jobs.models import Job, JobStatus
from helpline.knowledge import service as knowledge_service
from helpline.knowledge.embeddings import NoEmbeddings
from helpline.knowledge.search import KnowledgeBase, SearchResult
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.frames import Frame
from tests.conftest import make_settings
from tests.factories import create_user
from tests.knowledge.helpers import PASSWORDS, REFUNDS, sign_in
from tests.llm_server import LLMTestServer, Script, ScriptedToolCall
from tests.realtime.helpers import eventually

REFUND_QUESTION = "How long do I have to ask for a refund on my annual plan?"


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    overrides: dict[str, Any] = getattr(request, "param", None) or {}
    return make_settings(database_url, tmp_path, embeddings_provider="none", **overrides)


def found(title: str, heading: str, content: str, *, relevance: float = 0.9) -> SearchResult:
    return SearchResult(
        document_id=uuid.uuid4(),
        title=title,
        chunk_id=uuid.uuid4(),
        content=content,
        score=0.03,
        relevance=relevance,
        heading_path=f"{title} > {heading}",
    )


REFUND_WINDOW = found(
    "Refunds for annual plans",
    "The 30-day window",
    "You can get a full refund of an annual charge if you ask within 30 days of the purchase. "
    "After 30 days, annual payments are non-refundable.",
)
RESET_LINK = found(
    "Reset your password",
    "Forgotten password",
    "On the sign-in page, select Forgot password and enter your email address. We send a "
    "reset link that works for 60 minutes.",
)


class StubKnowledge(KnowledgeBase):
    """A knowledge base answering from a table of queries; one query may block until cancelled."""

    def __init__(
        self,
        results: Sequence[SearchResult] = (),
        *,
        by_query: dict[str, Sequence[SearchResult]] | None = None,
        blocking_query: str | None = None,
    ) -> None:
        super().__init__(async_sessionmaker(), NoEmbeddings())
        self.results = list(results)
        self.by_query = by_query or {}
        self.blocking_query = blocking_query
        self.queries: list[str] = []
        self.blocked = asyncio.Event()
        self.cancelled = False

    async def search(
        self,
        session_or_sessionmaker: Any = None,
        *,
        query: str,
        k: int = 5,
    ) -> list[SearchResult]:
        del session_or_sessionmaker
        self.queries.append(query)
        if query == self.blocking_query:
            self.blocked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return list(self.by_query.get(query, self.results))[:k]


class Handoffs:
    """An `escalate` callable that records its calls (or fails, when told to)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[uuid.UUID, uuid.UUID, str]] = []
        self.error = error

    async def __call__(self, conversation_id: uuid.UUID, user_id: uuid.UUID, reason: str) -> None:
        self.calls.append((conversation_id, user_id, reason))
        if self.error is not None:
            raise self.error


def ask(
    question: str,
    *,
    history: Sequence[ChatMessage] = (),
    summary: str | None = None,
    conversation_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
) -> AnswerRequest:
    return AnswerRequest(
        conversation_id=conversation_id or uuid.uuid4(),
        user_id=user_id or uuid.uuid4(),
        assistant_message_id=uuid.uuid4(),
        question=question,
        history=tuple(history),
        summary=summary,
    )


async def run(agent: SupportAgent, request: AnswerRequest) -> list[AnswerEvent]:
    """The answer's events, read the way the generation engine reads them."""
    async with closing_stream(agent.answer(request)) as events:
        return [event async for event in events]


def text_of(events: Sequence[AnswerEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def sources_of(events: Sequence[AnswerEvent]) -> list[Source]:
    found_lists = [event for event in events if isinstance(event, SourcesFound)]
    assert len(found_lists) <= 1
    return list(found_lists[0].sources) if found_lists else []


def tools_of(events: Sequence[AnswerEvent]) -> list[tuple[str, str]]:
    return [(e.name, e.status) for e in events if isinstance(e, ToolActivity)]


def source(result: SearchResult) -> Source:
    return Source(document_id=result.document_id, title=result.title, chunk_id=result.chunk_id)


def make_agent(
    knowledge: KnowledgeBase,
    model: Any = None,
    escalate: Handoffs | None = None,
    **options: Any,
) -> SupportAgent:
    return SupportAgent(model or FakeChatModel(), knowledge, escalate=escalate, **options)


# -- answering from the knowledge base -----------------------------------------------------------


async def test_streams_the_model_answer_piece_by_piece_with_its_sources() -> None:
    model = FakeChatModel()
    agent = make_agent(StubKnowledge([REFUND_WINDOW]), model)
    reply = "Annual plans are refundable within 30 days of the purchase [1]."

    events = await run(agent, ask(f'{REFUND_QUESTION} [[reply="{reply}"]]'))

    deltas = [event.text for event in events if isinstance(event, TextDelta)]
    assert "".join(deltas) == reply
    assert len(deltas) == len(reply.split())  # as the model streamed them, not at the end
    assert sources_of(events) == [source(REFUND_WINDOW)]
    [request] = model.requests
    assert events[-1] == Usage(
        prompt_tokens=estimate_prompt_tokens(request), completion_tokens=len(deltas)
    )


async def test_the_retrieved_passages_are_in_the_prompt_before_the_question() -> None:
    model = FakeChatModel()
    knowledge = StubKnowledge([REFUND_WINDOW])
    history = [
        ChatMessage(role="user", content="Hi, I bought the annual plan last week."),
        ChatMessage(role="assistant", content="Thanks! How can I help?"),
    ]

    await run(make_agent(knowledge, model), ask(REFUND_QUESTION, history=history))

    [request] = model.requests
    system, *middle, question = request
    assert system.role == "system"
    assert "[1] Refunds for annual plans > The 30-day window" in system.content
    assert "within 30 days of the purchase" in system.content
    assert middle == history
    assert question == ChatMessage(role="user", content=REFUND_QUESTION)
    assert knowledge.queries == [REFUND_QUESTION]


async def test_a_short_follow_up_is_searched_with_the_previous_question() -> None:
    knowledge = StubKnowledge([RESET_LINK])
    history = [
        ChatMessage(role="user", content="I forgot my password, how do I reset it?"),
        ChatMessage(role="assistant", content="Use Forgot password on the sign-in page."),
    ]

    await run(make_agent(knowledge), ask("how long does it work?", history=history))

    assert knowledge.queries == ["I forgot my password, how do I reset it?\nhow long does it work?"]


async def test_irrelevant_passages_stay_out_of_the_prompt() -> None:
    model = FakeChatModel()
    weak = found("Desktop app", "Sync", "The desktop app syncs every minute.", relevance=0.05)

    events = await run(make_agent(StubKnowledge([weak]), model), ask("Can I pay in bitcoin?"))

    system = model.requests[0][0].content
    assert NO_PASSAGES in system
    assert "desktop app syncs" not in system
    assert sources_of(events) == []


async def test_an_answer_that_cites_nothing_has_the_passages_it_reuses_as_sources() -> None:
    reply = "We send a reset link that works for 60 minutes after you select Forgot password."
    agent = make_agent(StubKnowledge([REFUND_WINDOW, RESET_LINK]))

    events = await run(agent, ask(f'How do I reset my password? [[reply="{reply}"]]'))

    assert sources_of(events) == [source(RESET_LINK)]


async def test_an_answer_that_uses_no_passage_has_no_sources() -> None:
    events = await run(
        make_agent(StubKnowledge([REFUND_WINDOW])),
        ask('Refund? [[reply="I am not sure, let me get a person for you."]]'),
    )

    assert sources_of(events) == []
    assert isinstance(events[-1], Usage)


async def test_grounded_in_the_real_knowledge_base(app: FastAPI, tmp_path: Path) -> None:
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "refunds.md").write_text(REFUNDS)
    (tmp_path / "kb" / "passwords.md").write_text(PASSWORDS)
    knowledge: KnowledgeBase = app.state.knowledge
    await knowledge_service.ingest_paths(
        knowledge.sessionmaker,
        knowledge,
        knowledge_service.collect_files([tmp_path / "kb"]),
        max_bytes=1_000_000,
    )
    model = FakeChatModel()
    reply = "You can get a full refund within 30 days of the purchase [1]."

    events = await run(make_agent(knowledge, model), ask(f'{REFUND_QUESTION} [[reply="{reply}"]]'))

    [cited] = sources_of(events)
    assert cited.title == "Refunds for annual plans"
    hits = await knowledge.search(query="full refund annual charge within 30 days", k=3)
    assert cited.chunk_id in {hit.chunk_id for hit in hits}
    assert "[1] Refunds for annual plans" in model.requests[0][0].content
    assert text_of(events) == reply


# -- the system prompt ---------------------------------------------------------------------------


def agent_from_settings(**values: Any) -> SupportAgent:
    settings = Settings(_env_file=None, llm_provider="fake", **values)
    answerer = factory.create_answerer(
        settings, factory.create_chat_model(settings), knowledge=StubKnowledge()
    )
    assert isinstance(answerer, SupportAgent)
    return answerer


def test_the_bundled_prompt_names_the_assistant_and_the_company() -> None:
    agent = agent_from_settings(company_name="Northwind Cloud")

    assert agent.system_prompt.startswith(
        "You are Helpline Assistant, the customer-support assistant of Northwind Cloud"
    )
    assert "{{" not in agent.system_prompt
    assert "escalate_to_human" in agent.system_prompt


def test_a_prompt_file_replaces_the_bundled_prompt(tmp_path: Path) -> None:
    path = tmp_path / "prompt.md"
    path.write_text("# Rules\n\nYou are {{assistant_name}} for {{company_name}}. Be terse.\n")

    agent = agent_from_settings(
        agent_prompt_file=path, assistant_name="Ava", company_name="Northwind Cloud"
    )

    assert agent.system_prompt == "# Rules\n\nYou are Ava for Northwind Cloud. Be terse."


def test_a_missing_prompt_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="AGENT_PROMPT_FILE"):
        agent_from_settings(agent_prompt_file=tmp_path / "nowhere.md")


async def test_the_summary_of_older_messages_and_the_recent_ones_are_in_the_prompt() -> None:
    model = FakeChatModel()
    recent = [
        ChatMessage(role="user", content="And can I move to monthly billing?"),
        ChatMessage(role="assistant", content="Yes, from the billing settings."),
    ]

    await run(
        make_agent(StubKnowledge(), model),
        ask(
            "Will I lose my files?",
            history=recent,
            summary="The customer is on the annual Pro plan and asked about refunds.",
        ),
    )

    system, *middle, _ = model.requests[0]
    assert "## Earlier in this conversation" in system.content
    assert "annual Pro plan and asked about refunds" in system.content
    assert middle == recent


# -- tools ---------------------------------------------------------------------------------------


async def test_the_search_tool_gives_the_model_passages_to_cite() -> None:
    model = FakeChatModel()
    knowledge = StubKnowledge(by_query={"reset link": [RESET_LINK]})
    question = (
        'Help me get back in [[tool=search_knowledge_base query="reset link"]] '
        '[[reply="Select Forgot password; the link works for 60 minutes [1]."]]'
    )

    events = await run(make_agent(knowledge, model, Handoffs()), ask(question))

    assert model.offered_tools[0] == ("search_knowledge_base", "escalate_to_human")
    assert knowledge.queries[1:] == ["reset link"]
    tool_result = model.requests[1][-1]
    assert tool_result.role == "tool"
    assert tool_result.tool_call_id == "call_1"
    assert "[1] Reset your password > Forgotten password" in tool_result.content
    assert "works for 60 minutes" in tool_result.content
    assert tools_of(events) == [
        ("search_knowledge_base", "started"),
        ("search_knowledge_base", "finished"),
    ]
    assert text_of(events) == "Select Forgot password; the link works for 60 minutes [1]."
    assert sources_of(events) == [source(RESET_LINK)]


async def test_passages_found_by_a_search_are_numbered_after_the_context() -> None:
    model = FakeChatModel()
    knowledge = StubKnowledge([REFUND_WINDOW], by_query={"password": [RESET_LINK, REFUND_WINDOW]})
    question = (
        f'{REFUND_QUESTION} [[tool=search_knowledge_base query="password"]] '
        '[[reply="Within 30 days [1]; the reset link lasts 60 minutes [2]."]]'
    )

    events = await run(make_agent(knowledge, model), ask(question))

    tool_result = model.requests[1][-1].content
    assert "[2] Reset your password" in tool_result
    assert "[1] Refunds for annual plans" in tool_result  # already known: the same number
    assert sources_of(events) == [source(REFUND_WINDOW), source(RESET_LINK)]


async def test_a_failing_tool_is_logged_and_reported_to_the_model() -> None:
    model = FakeChatModel()
    handoffs = Handoffs(error=RuntimeError("connection pool exhausted at 10.0.0.3"))
    question = (
        'I want a person [[tool=escalate_to_human reason="Asks for a person"]] '
        '[[reply="Sorry, I could not reach the team just now."]]'
    )

    events = await run(make_agent(StubKnowledge(), model, handoffs), ask(question))

    assert len(handoffs.calls) == 1
    assert tools_of(events) == [("escalate_to_human", "started"), ("escalate_to_human", "failed")]
    tool_result = model.requests[1][-1]
    assert tool_result.role == "tool"
    assert tool_result.content.startswith("The escalate_to_human tool failed because of a")
    assert "10.0.0.3" not in tool_result.content
    assert text_of(events) == "Sorry, I could not reach the team just now."
    assert HANDOFF_NOTICE not in text_of(events)


async def test_bad_tool_calls_are_reported_to_the_model() -> None:
    model = FakeChatModel()
    question = (
        "Hi [[tool=search_knowledge_base]] [[tool=reboot_server now=yes]] "
        '[[tool=search_knowledge_base query=" "]] [[reply="Done."]]'
    )

    events = await run(make_agent(StubKnowledge(), model), ask(question))

    results = [message.content for message in model.requests[1] if message.role == "tool"]
    assert results[0].startswith("The search_knowledge_base tool was not run: query:")
    assert "required" in results[0].lower()
    assert results[1] == (
        "There is no tool called 'reboot_server'. The tools are: search_knowledge_base."
    )
    assert results[2].startswith("The search_knowledge_base tool was not run: query:")
    assert [status for _, status in tools_of(events)] == ["started", "failed"] * 3
    assert text_of(events) == "Done."


async def test_tools_act_for_the_answer_not_for_whoever_the_model_names() -> None:
    handoffs = Handoffs()
    request = ask(
        f'Get me a human [[tool=escalate_to_human reason="Wants a person" '
        f'conversation_id="{uuid.uuid4()}" user_id="{uuid.uuid4()}"]]'
    )

    await run(make_agent(StubKnowledge(), FakeChatModel(), handoffs), request)

    assert handoffs.calls == [(request.conversation_id, request.user_id, "Wants a person")]


async def test_tool_rounds_are_bounded() -> None:
    model = FakeChatModel()
    question = '[[tool=search_knowledge_base query="x"]] [[reply="Plain answer."]]'

    events = await run(make_agent(StubKnowledge(), model, max_tool_rounds=0), ask(question))

    assert model.offered_tools[0] == ()
    assert text_of(events) == "Plain answer."
    assert tools_of(events) == []


async def test_a_model_failure_ends_the_answer_with_llm_service_error() -> None:
    agent = make_agent(StubKnowledge(), FakeChatModel())
    received: list[str] = []

    async def read() -> None:
        async with closing_stream(agent.answer(ask("[[fail_after=2]] Hello"))) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    received.append(event.text)

    with pytest.raises(LLMServiceError, match="failed as scripted"):
        await read()

    assert len(received) == 2


# -- hand-over with real effects -------------------------------------------------------------------


async def start_conversation(
    sessionmaker: async_sessionmaker[AsyncSession], owner: User | None = None
) -> tuple[User, Conversation]:
    async with sessionmaker() as session:
        if owner is None:
            owner = await create_user(session)
        conversation = await conversations_service.create_conversation(
            session, user=owner, title="Billing"
        )
        await session.commit()
    return owner, conversation


async def load(
    sessionmaker: async_sessionmaker[AsyncSession], conversation_id: uuid.UUID
) -> Conversation:
    async with sessionmaker() as session:
        conversation = await session.get(Conversation, conversation_id)
        assert conversation is not None
        return conversation


def app_agent(app: FastAPI) -> tuple[SupportAgent, FakeChatModel, GenerationEngine]:
    engine: GenerationEngine = app.state.generation_engine
    assert isinstance(engine.answerer, SupportAgent)
    assert isinstance(app.state.chat_model, FakeChatModel)
    return engine.answerer, app.state.chat_model, engine


async def test_escalation_hands_the_conversation_to_a_person(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent, model, engine = app_agent(app)
    customer, conversation = await start_conversation(sessionmaker)
    frames: list[Frame] = []
    unsubscribe = await engine.subscribe(conversation.id, frames.append)
    question = (
        "I need to change the card on file "
        '[[tool=escalate_to_human reason="Wants to change the card on file"]]'
    )

    events = await run(agent, ask(question, conversation_id=conversation.id, user_id=customer.id))

    stored = await load(sessionmaker, conversation.id)
    assert stored.status == ConversationStatus.WAITING_FOR_AGENT
    assert stored.handoff_reason == "Wants to change the card on file"
    assert stored.waiting_since is not None
    status = await eventually(lambda: [f for f in frames if f.type == "status"])
    unsubscribe()
    assert status[0].data == {
        "type": "status",
        "status": "waiting_for_agent",
        "assigned_agent_id": None,
    }
    async with sessionmaker() as session:
        notes = (
            await session.scalars(
                select(Message).where(
                    Message.conversation_id == conversation.id, Message.role == MessageRole.SYSTEM
                )
            )
        ).all()
    assert [note.content for note in notes] == [
        "A human agent has been asked to join the conversation."
    ]
    # The answer tells the customer, and the model is not called again after the hand-over.
    assert text_of(events) == HANDOFF_NOTICE
    assert len(model.requests) == 1
    assert tools_of(events) == [("escalate_to_human", "started"), ("escalate_to_human", "finished")]


async def test_escalation_ignores_another_conversation_named_by_the_model(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent, _, _ = app_agent(app)
    customer, own = await start_conversation(sessionmaker)
    victim, other = await start_conversation(sessionmaker)
    question = (
        f'Escalate [[tool=escalate_to_human reason="Wants a person" '
        f'conversation_id="{other.id}" user_id="{victim.id}"]]'
    )

    await run(agent, ask(question, conversation_id=own.id, user_id=customer.id))

    assert (await load(sessionmaker, own.id)).status == ConversationStatus.WAITING_FOR_AGENT
    assert (await load(sessionmaker, other.id)).status == ConversationStatus.OPEN


async def test_escalation_refuses_a_conversation_of_someone_else(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent, model, _ = app_agent(app)
    customer, _ = await start_conversation(sessionmaker)
    _, other = await start_conversation(sessionmaker)
    question = '[[tool=escalate_to_human reason="x"]] [[reply="Ok."]]'

    # An answer never runs for a conversation its user does not own; if it did, no hand-over.
    events = await run(agent, ask(question, conversation_id=other.id, user_id=customer.id))

    assert (await load(sessionmaker, other.id)).status == ConversationStatus.OPEN
    assert tools_of(events)[-1] == ("escalate_to_human", "failed")
    assert model.requests[-1][-1].content.startswith("The escalate_to_human tool failed:")


async def test_a_refused_escalation_tells_the_model_why(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent, model, engine = app_agent(app)
    customer, conversation = await start_conversation(sessionmaker)
    async with sessionmaker() as session:
        staff = await create_user(session, role="agent")
        loaded = await session.get(Conversation, conversation.id)
        assert loaded is not None
        await conversations_service.assign(session, engine=engine, conversation=loaded, agent=staff)
        await session.commit()
    question = (
        'Get me someone [[tool=escalate_to_human reason="Wants a person"]] '
        '[[reply="A colleague is already with you."]]'
    )

    events = await run(agent, ask(question, conversation_id=conversation.id, user_id=customer.id))

    assert model.requests[1][-1].content == (
        "The escalate_to_human tool failed: A human agent is already handling this conversation."
    )
    assert text_of(events) == "A colleague is already with you."
    assert (await load(sessionmaker, conversation.id)).status == ConversationStatus.WITH_AGENT


# -- cancellation --------------------------------------------------------------------------------


async def consume_until(
    agent: SupportAgent, request: AnswerRequest, pieces: int
) -> tuple[asyncio.Task[None], list[str]]:
    """Read the answer in a task, as the engine does; return once `pieces` texts arrived."""
    received: list[str] = []
    enough = asyncio.Event()

    async def consume() -> None:
        async with closing_stream(agent.answer(request)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    received.append(event.text)
                    if len(received) >= pieces:
                        enough.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(enough.wait(), timeout=10)
    return task, received


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_mid_stream_closes_the_model_stream() -> None:
    model = FakeChatModel()
    agent = make_agent(StubKnowledge(), model)

    task, received = await consume_until(agent, ask("[[hang_after=3]] Tell me more"), 3)
    await cancel(task)

    # Closed by the time the cancellation completes, not left to the garbage collector.
    assert (model.cancelled_streams, model.active_streams, model.completed_streams) == (1, 0, 0)
    assert len(received) == 3


async def test_closing_the_answer_early_closes_the_model_stream() -> None:
    model = FakeChatModel()
    stream = make_agent(StubKnowledge(), model).answer(ask("[[tokens=50 delay_ms=5]] Go"))

    first = await anext(stream)
    await stream.aclose()

    assert isinstance(first, TextDelta)
    assert (model.cancelled_streams, model.active_streams) == (1, 0)


@pytest.fixture
async def openai_model(llm_server: LLMTestServer) -> Any:
    model = OpenAIChatModel(
        base_url=llm_server.openai_base_url, api_key="sk-test", timeout_s=10.0, max_retries=0
    )
    yield model
    await model.aclose()


async def test_cancel_mid_stream_closes_the_upstream_http_stream(
    llm_server: LLMTestServer, openai_model: OpenAIChatModel
) -> None:
    llm_server.enqueue(Script(chunks=[f" word{i}" for i in range(500)], delay_s=0.02))
    agent = make_agent(StubKnowledge(), openai_model)

    task, _ = await consume_until(agent, ask("Tell me everything"), 2)
    await cancel(task)

    # The script would stream for 10 s more; the server sees the client leave at once.
    assert await llm_server.async_wait_for_closed_early(1, within_s=3.0)
    [request] = llm_server.completion_requests
    assert request.outcome == "closed_early"


async def test_cancel_while_a_tool_runs_stops_the_tool_and_calls_no_model(
    llm_server: LLMTestServer, openai_model: OpenAIChatModel
) -> None:
    search = ScriptedToolCall("call_1", "search_knowledge_base", ['{"query": "slow lookup"}'])
    llm_server.enqueue(Script(chunks=["Let me look."], tool_calls=[search]), Script())
    knowledge = StubKnowledge(blocking_query="slow lookup")
    agent = make_agent(knowledge, openai_model)

    task, received = await consume_until(agent, ask("Where is my invoice?"), 1)
    await asyncio.wait_for(knowledge.blocked.wait(), timeout=10)
    await cancel(task)

    assert knowledge.cancelled
    assert received == ["Let me look."]
    # The first model call had finished; the graph stopped before a second one. (The server
    # notes a request complete just after its last chunk went out.)
    await eventually(lambda: [r.outcome for r in llm_server.completion_requests] == ["complete"])


async def test_a_server_that_refuses_tools_is_asked_again_without_them(
    llm_server: LLMTestServer, openai_model: OpenAIChatModel
) -> None:
    llm_server.enqueue(
        Script(status=400, error_message="this model does not support tools"),
        Script(chunks=["Hello", " there."]),
    )

    events = await run(make_agent(StubKnowledge(), openai_model), ask("Hi"))

    assert text_of(events) == "Hello there."
    offered, plain = llm_server.completion_requests
    assert [tool["function"]["name"] for tool in offered.body["tools"]] == ["search_knowledge_base"]
    assert "tools" not in plain.body


async def test_other_model_failures_are_not_retried(
    llm_server: LLMTestServer, openai_model: OpenAIChatModel
) -> None:
    llm_server.enqueue(Script(status=401), Script())

    with pytest.raises(LLMServiceError, match="HTTP 401"):
        await run(make_agent(StubKnowledge(), openai_model), ask("Hi"))

    assert len(llm_server.completion_requests) == 1


# -- usage ---------------------------------------------------------------------------------------


async def test_usage_is_the_sum_over_the_model_calls() -> None:
    model = FakeChatModel()
    question = '[[tool=search_knowledge_base query="refund"]] [[reply="Two words"]]'

    events = await run(make_agent(StubKnowledge([REFUND_WINDOW]), model), ask(question))

    first, second = model.requests
    call = '{"query": "refund"}'
    assert events[-1] == Usage(
        prompt_tokens=estimate_prompt_tokens(first) + estimate_prompt_tokens(second),
        completion_tokens=estimate_tokens("search_knowledge_base" + call) + 2,
    )


async def test_usage_sums_the_provider_figures(
    llm_server: LLMTestServer, openai_model: OpenAIChatModel
) -> None:
    search = ScriptedToolCall("call_1", "search_knowledge_base", ['{"query": "refund"}'])
    llm_server.enqueue(
        Script(chunks=[], tool_calls=[search], prompt_tokens=100, completion_tokens=5),
        Script(chunks=["Within", " 30 days [1]."], prompt_tokens=150, completion_tokens=7),
    )
    agent = make_agent(StubKnowledge(by_query={"refund": [REFUND_WINDOW]}), openai_model)

    events = await run(agent, ask("Can I get my money back?"))

    assert events[-1] == Usage(prompt_tokens=250, completion_tokens=12)
    assert text_of(events) == "Within 30 days [1]."
    assert sources_of(events) == [source(REFUND_WINDOW)]
    second = llm_server.completion_requests[1].body["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "search_knowledge_base"
    assert second[-1]["role"] == "tool"
    assert "[1] Refunds for annual plans" in second[-1]["content"]


async def test_usage_is_an_estimate_when_a_provider_reports_none() -> None:
    model = FakeChatModel()

    events = await run(make_agent(StubKnowledge(), model), ask("[[usage=off]] Hello there"))

    [request] = model.requests
    assert events[-1] == Usage(
        prompt_tokens=estimate_prompt_tokens(request),
        completion_tokens=estimate_tokens(text_of(events)),
        estimated=True,
    )


class SilentUsageModel:
    """A model that streams text and never says what it used."""

    provider = "test"
    model = "silent"

    def __init__(self) -> None:
        self.requests: list[Sequence[ChatMessage]] = []

    async def stream(self, messages: Sequence[ChatMessage], **_: Any) -> Any:
        self.requests.append(messages)
        for piece in ("Plain", " text"):
            yield TextDelta(piece)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_usage_is_estimated_when_the_model_reports_none_at_all() -> None:
    model = SilentUsageModel()

    events = await run(make_agent(StubKnowledge(), model), ask("Hello there"))

    [request] = model.requests
    assert events[-1] == Usage(
        prompt_tokens=estimate_prompt_tokens(request),
        completion_tokens=estimate_tokens("Plain text"),
        estimated=True,
    )


# -- memory ----------------------------------------------------------------------------------------


async def send(
    client: httpx.AsyncClient, headers: dict[str, str], conversation_id: str, text: str
) -> None:
    response = await client.post(
        f"/conversations/{conversation_id}/messages", json={"content": text}, headers=headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["assistant_message"]["status"] == "complete"


async def summary_jobs(sessionmaker: async_sessionmaker[AsyncSession]) -> list[Job]:
    async with sessionmaker() as session:
        return list((await session.scalars(select(Job).where(Job.name == SUMMARY_JOB))).all())


@pytest.mark.parametrize("settings", [{"memory_token_budget": 150}], indirect=True)
async def test_a_long_conversation_is_summarised_and_the_prompt_uses_the_summary(
    app: FastAPI, client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    caller = await sign_in(sessionmaker, client, "customer")
    created = await client.post("/conversations", json={}, headers=caller.headers)
    conversation_id = created.json()["id"]
    model: FakeChatModel = app.state.chat_model
    first = "My first question is about invoices " + "and billing details " * 6

    await send(client, caller.headers, conversation_id, first)
    assert await summary_jobs(sessionmaker) == []  # within the budget: nothing to fold
    await send(client, caller.headers, conversation_id, "A second question " + "on plans " * 8)
    await send(client, caller.headers, conversation_id, "A third one " + "about exports " * 8)

    async def saved() -> list[Job]:
        jobs = await summary_jobs(sessionmaker)
        return [job for job in jobs if job.status == JobStatus.COMPLETE and job.result["saved"]]

    # Another job queued meanwhile finds the conversation within budget, or loses the race.
    [job] = await eventually(saved, within=15)
    assert job.result["folded"] >= 2
    stored = await load(sessionmaker, uuid.UUID(conversation_id))
    # Written by the chat model (the fake one answers the summary request with its sentence).
    assert stored.summary == default_answer(SUMMARY_REQUEST)
    assert stored.summary_until is not None

    await send(client, caller.headers, conversation_id, "One more: can I export my data?")

    last = model.requests[-1]
    assert stored.summary in last[0].content
    assert not any(first.strip() in message.content for message in last[1:])
    assert last[-1].content == "One more: can I export my data?"
    kept = sum(estimate_tokens(message.content) for message in last[1:-1])
    assert kept <= 150


def test_the_summary_prompt_holds_the_summary_so_far_and_the_messages_to_fold() -> None:
    system, request = summary_messages(
        "The customer is on the Pro plan.",
        [("user", "Can I export my files?"), ("assistant", "Yes [1]."), ("agent", "I'll check.")],
    )

    assert system.role == "system"
    assert "The customer is on the Pro plan." in system.content
    assert (
        "Customer: Can I export my files?\n\nAssistant: Yes [1].\n\nSupport agent: I'll check."
        in (system.content)
    )
    # The customer's words are material to summarise; the request itself is fixed.
    assert request == ChatMessage(role="user", content=SUMMARY_REQUEST)


async def test_a_summary_is_kept_only_if_no_newer_one_was_stored(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    del app
    async with sessionmaker() as session:
        customer = await create_user(session)
        with_messages = await conversations_service.import_transcript(
            session,
            user=customer,
            title=None,
            transcript=[(MessageRole.USER, "word " * 80), (MessageRole.ASSISTANT, "reply " * 80)]
            * 3,
        )
        await session.commit()

    async with sessionmaker() as session:
        fold = await conversations_service.memory_to_fold(
            session, conversation_id=with_messages.id, budget=200, keep_tokens=150
        )
    assert fold is not None
    assert [role for role, _ in fold.messages] == ["user", "assistant", "user", "assistant", "user"]

    async with sessionmaker() as session:
        assert await conversations_service.save_summary(session, fold=fold, summary="First.")
        await session.commit()
    async with sessionmaker() as session:
        assert not await conversations_service.save_summary(session, fold=fold, summary="Late.")
        await session.commit()
        refold = await conversations_service.memory_to_fold(
            session, conversation_id=with_messages.id, budget=200, keep_tokens=150
        )
    assert (await load(sessionmaker, with_messages.id)).summary == "First."
    assert refold is None  # what is left verbatim fits the budget


def test_migration_0004_adds_and_removes_the_summary_columns(tmp_path: Path) -> None:
    path = tmp_path / "migrations.db"
    url = f"sqlite+aiosqlite:///{path}"

    def columns() -> dict[str, tuple[str, bool]]:
        with sqlite3.connect(path) as connection:
            rows = connection.execute("PRAGMA table_info(conversations)").fetchall()
        return {row[1]: (row[2], not row[3]) for row in rows}

    migrations.upgrade(url, "0004")
    after = columns()
    command.downgrade(migrations.alembic_config(url), "0003")
    before = columns()
    migrations.upgrade(url, "0004")

    assert after["summary"] == ("TEXT", True)  # nullable
    assert after["summary_until"][1]
    assert "summary" not in before
    assert "summary_until" not in before
    assert set(columns()) == set(after)
