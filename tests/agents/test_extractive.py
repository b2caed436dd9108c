"""The model-free `extractive` answerer: quotes the knowledge base, or offers a person."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.agents import factory
from helpline.agents.exceptions import ConfigurationError
from helpline.agents.extractive import (
    DONT_KNOW,
    ExtractiveAnswerer,
    best_excerpt,
    split_deltas,
)
from helpline.agents.schemas import (
    AnswerEvent,
    AnswerRequest,
    ChatMessage,
    SourcesFound,
    TextDelta,
    Usage,
)
from helpline.core.config import Settings
from helpline.knowledge import service as knowledge_service
from helpline.knowledge.search import KnowledgeBase
from tests.conftest import make_settings
from tests.knowledge.helpers import PASSWORDS, REFUNDS, ingest_json, sign_in


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url, tmp_path, embeddings_provider="none", llm_provider="extractive"
    )


@pytest.fixture
async def knowledge(app: FastAPI, tmp_path: Path) -> KnowledgeBase:
    """The app's knowledge base, with the refunds and passwords articles in it."""
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "refunds.md").write_text(REFUNDS)
    (tmp_path / "kb" / "passwords.md").write_text(PASSWORDS)
    base: KnowledgeBase = app.state.knowledge
    outcomes = await knowledge_service.ingest_paths(
        base.sessionmaker,
        base,
        knowledge_service.collect_files([tmp_path / "kb"]),
        max_bytes=1_000_000,
    )
    assert [outcome.status for outcome in outcomes] == ["added", "added"]
    return base


def ask(question: str, history: Sequence[ChatMessage] = ()) -> AnswerRequest:
    return AnswerRequest(
        conversation_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        assistant_message_id=uuid.uuid4(),
        question=question,
        history=tuple(history),
    )


async def collect(answerer: ExtractiveAnswerer, request: AnswerRequest) -> list[AnswerEvent]:
    return [event async for event in answerer.answer(request)]


def text_of(events: list[AnswerEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


async def test_answers_from_the_best_passage_with_its_source(knowledge: KnowledgeBase) -> None:
    answerer = ExtractiveAnswerer(knowledge)

    events = await collect(
        answerer, ask("How long do I have to ask for a refund on my annual plan?")
    )

    text = text_of(events)
    assert "Refunds for annual plans" in text
    assert "within 30 days" in text
    sources = [event for event in events if isinstance(event, SourcesFound)]
    assert len(sources) == 1
    [source] = sources[0].sources
    assert source.title == "Refunds for annual plans"
    hits = await knowledge.search(query="refund within 30 days of the purchase", k=3)
    assert source.chunk_id in {hit.chunk_id for hit in hits}
    assert isinstance(events[-1], Usage)
    assert events[-1].estimated
    assert events[-1].completion_tokens > 0
    assert events[-1].prompt_tokens > events[-1].completion_tokens // 2


async def test_streams_a_few_words_at_a_time(knowledge: KnowledgeBase) -> None:
    events = await collect(ExtractiveAnswerer(knowledge), ask("How do I reset my password?"))

    deltas = [event.text for event in events if isinstance(event, TextDelta)]
    assert len(deltas) > 5
    assert all(1 <= len(delta.split()) <= 3 for delta in deltas)
    assert "reset link" in "".join(deltas)


async def test_says_it_does_not_know_and_offers_a_person(knowledge: KnowledgeBase) -> None:
    events = await collect(
        ExtractiveAnswerer(knowledge), ask("What is the capital of Mongolia and its population?")
    )

    assert text_of(events) == DONT_KNOW
    assert "member of our support team" in DONT_KNOW
    assert not any(isinstance(event, SourcesFound) for event in events)
    assert isinstance(events[-1], Usage)


async def test_an_empty_knowledge_base_does_not_know(app: FastAPI) -> None:
    events = await collect(ExtractiveAnswerer(app.state.knowledge), ask("How do refunds work?"))

    assert text_of(events) == DONT_KNOW


async def test_the_threshold_applies_to_the_calibrated_relevance(
    knowledge: KnowledgeBase,
) -> None:
    question = "How long do I have to ask for a refund on my annual plan?"
    [best] = await knowledge.search(query=question, k=1)
    assert 0.0 <= best.relevance <= 1.0

    strict = await collect(
        ExtractiveAnswerer(knowledge, threshold=best.relevance + 0.001), ask(question)
    )
    lenient = await collect(ExtractiveAnswerer(knowledge, threshold=best.relevance), ask(question))

    assert text_of(strict) == DONT_KNOW
    assert text_of(lenient) != DONT_KNOW


async def test_a_short_follow_up_is_searched_with_the_previous_question(
    knowledge: KnowledgeBase,
) -> None:
    history = [
        ChatMessage(role="user", content="I forgot my password, how do I reset it?"),
        ChatMessage(role="assistant", content="Use Forgot password on the sign-in page."),
    ]

    events = await collect(ExtractiveAnswerer(knowledge), ask("how long does it work?", history))

    assert "60 minutes" in text_of(events)


def test_split_deltas_keeps_every_character() -> None:
    text = "From our help article:\n\n1. Go to Settings.  2. Select it. "

    pieces = split_deltas(text)

    assert "".join(pieces) == text
    assert all(len(piece.split()) <= 3 for piece in pieces)


def test_best_excerpt_picks_the_sentences_that_answer() -> None:
    content = " ".join(
        [f"Filler sentence number {index} talks about nothing in particular." for index in range(8)]
        + ["Backups are kept for 35 days.", "They cannot restore single files."]
        + [f"More filler {index} about other matters entirely." for index in range(8)]
    )

    excerpt = best_excerpt("how long are backups kept", content, max_words=25)

    assert "Backups are kept for 35 days." in excerpt
    assert len(excerpt.split()) <= 25


def test_a_numbered_procedure_is_kept_whole() -> None:
    content = "1. Go to Settings > Billing.\n2. Select Request refund.\n3. Confirm."

    assert best_excerpt("how do I request a refund", content) == content


async def test_the_factory_builds_it_with_the_knowledge_base(app: FastAPI) -> None:
    settings: Settings = app.state.settings

    answerer = factory.create_answerer(settings, None, knowledge=app.state.knowledge)

    assert isinstance(answerer, ExtractiveAnswerer)
    assert (answerer.name, answerer.model) == ("extractive", "extractive")
    with pytest.raises(ConfigurationError, match="knowledge base"):
        factory.create_answerer(settings, None)


async def test_conversation_answers_carry_their_sources(
    app: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    client: httpx.AsyncClient,
) -> None:
    del app
    agent = await sign_in(sessionmaker, client, "agent")
    customer = await sign_in(sessionmaker, client, "customer")
    document = await ingest_json(client, agent, title="Reset your password", content=PASSWORDS)
    conversation = (await client.post("/conversations", json={}, headers=customer.headers)).json()

    response = await client.post(
        f"/conversations/{conversation['id']}/messages",
        json={"content": "My account is locked after too many failed sign-in attempts"},
        headers=customer.headers,
    )

    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()["assistant_message"]
    assert answer["status"] == "complete"
    assert "15 minutes" in answer["content"]
    [source] = answer["sources"]
    assert source["document_id"] == document["id"]
    assert source["title"] == "Reset your password"
    assert uuid.UUID(source["chunk_id"])


async def test_an_unrelated_short_question_is_not_taken_for_a_follow_up(
    knowledge: KnowledgeBase,
) -> None:
    history = [ChatMessage(role="user", content="I forgot my password, how do I reset it?")]

    events = await collect(ExtractiveAnswerer(knowledge), ask("recommend a pizza place?", history))

    assert text_of(events) == DONT_KNOW
