"""Retrieval through the service: hybrid ranking, calibrated relevance, the index's freshness."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core.config import Settings
from helpline.core.database import unit_of_work
from helpline.knowledge import repository
from helpline.knowledge import service as knowledge_service
from helpline.knowledge.embeddings import LocalEmbeddings, NoEmbeddings, OpenAIEmbeddings
from helpline.knowledge.models import Chunk
from helpline.knowledge.search import KnowledgeBase, calibrate, rrf
from tests.knowledge.embeddings_server import EmbeddingsServer
from tests.knowledge.helpers import PASSWORDS, REFUNDS

SYNC = """# Fix desktop sync problems

## Conflicted copies

If the same file is changed on two devices before they sync, both versions are kept.

## Files that never sync

Temporary files such as .tmp and desktop.ini are ignored on purpose.
"""


def write(folder: Path, articles: dict[str, str]) -> None:
    folder.mkdir(exist_ok=True)
    for name, article in articles.items():
        (folder / f"{name}.md").write_text(article)


async def add(knowledge: KnowledgeBase, folder: Path, **articles: str) -> None:
    write(folder, articles)
    outcomes = await knowledge_service.ingest_paths(
        knowledge.sessionmaker,
        knowledge,
        knowledge_service.collect_files([folder]),
        max_bytes=1_000_000,
    )
    assert all(outcome.status != "failed" for outcome in outcomes), outcomes


async def test_a_write_by_another_process_is_seen_by_the_next_search(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    # Two knowledge bases on one database stand for two processes (a server and a worker).
    server: KnowledgeBase = app.state.knowledge
    worker = KnowledgeBase(sessionmaker, NoEmbeddings())
    await add(worker, tmp_path / "a", passwords=PASSWORDS)
    assert (await server.search(query="locked account", k=1))[0].title == "Reset your password"
    refreshes = server.refreshes

    await server.search(query="locked account", k=1)
    assert server.refreshes == refreshes  # nothing changed: the index is reused

    await add(worker, tmp_path / "b", refunds=REFUNDS)
    found = await server.search(query="annual refund window", k=1)

    assert found[0].title == "Refunds for annual plans"
    assert server.refreshes == refreshes + 1


async def test_a_deletion_elsewhere_removes_the_passages_from_search(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    server: KnowledgeBase = app.state.knowledge
    await add(server, tmp_path / "a", passwords=PASSWORDS, refunds=REFUNDS)
    [hit] = await server.search(query="locked account", k=1)

    async with unit_of_work(sessionmaker) as session:
        await knowledge_service.delete_document(session, document_id=hit.document_id)

    results = await server.search(query="locked account failed attempts", k=5)
    assert all(result.document_id != hit.document_id for result in results)


async def test_the_full_text_index_follows_the_chunks(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    server: KnowledgeBase = app.state.knowledge
    await add(server, tmp_path / "a", passwords=PASSWORDS)
    await add(server, tmp_path / "a", passwords=PASSWORDS.replace("60 minutes", "2 hours"))

    async with sessionmaker() as session:
        chunks = await session.scalar(select(func.count()).select_from(Chunk))
        if session.get_bind().dialect.name == "sqlite":
            indexed = await session.scalar(text("SELECT count(*) FROM knowledge_chunks_fts"))
            assert indexed == chunks
        old = await repository.fulltext_search(session, ["60"], limit=10)
        new = await repository.fulltext_search(session, ["hours"], limit=10)
    # Re-ingesting replaced the chunks: the old text is gone from the index too.
    assert chunks == 2
    assert old == []
    assert len(new) == 1


async def test_relevance_is_higher_for_an_answerable_question(app: FastAPI, tmp_path: Path) -> None:
    server: KnowledgeBase = app.state.knowledge
    await add(server, tmp_path / "a", passwords=PASSWORDS, refunds=REFUNDS, sync=SYNC)

    [good] = await server.search(query="my account got locked after failed sign-in attempts", k=1)
    [poor] = await server.search(query="which bakery near my account manager sells cakes", k=1)
    nothing = await server.search(query="what time does the bakery on main street open", k=1)

    assert 0.0 <= poor.relevance < 0.5 < good.relevance <= 1.0
    assert good.term_coverage > poor.term_coverage
    assert nothing == []  # full-text only, and no word in common


def test_rrf_rewards_agreement_between_rankings() -> None:
    import uuid

    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    fused = rrf([[a, b, c], [b, a]])

    assert fused[a] == fused[b] > fused[c]
    assert fused[c] == pytest.approx(1 / 63)


def test_calibration_is_monotonic_and_bounded() -> None:
    assert 0.0 < calibrate(0.1, 0.1) < calibrate(0.5, 0.1) < calibrate(0.5, 0.9) < 1.0
    assert 0.0 < calibrate(None, 0.0) < calibrate(None, 0.5) < calibrate(None, 1.0) < 1.0


@pytest.fixture
def local_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"embeddings_provider": "local"})


async def test_hybrid_search_finds_a_paraphrase_with_no_shared_words(
    sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    knowledge = KnowledgeBase(sessionmaker, LocalEmbeddings())
    await add(knowledge, tmp_path / "a", passwords=PASSWORDS, refunds=REFUNDS, sync=SYNC)

    results = await knowledge.search(query="I can't remember how to get into my login", k=3)

    assert results[0].title == "Reset your password"
    assert results[0].similarity is not None
    assert results[0].similarity > 0.3
    async with sessionmaker() as session:
        models = set((await session.execute(select(Chunk.embedding_model))).scalars())
    assert models == {"local:all-MiniLM-L6-v2"}


async def test_reembedding_gives_every_chunk_a_vector_of_the_new_model(
    sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    full_text = KnowledgeBase(sessionmaker, NoEmbeddings())
    await add(full_text, tmp_path / "a", passwords=PASSWORDS, refunds=REFUNDS)
    hybrid = KnowledgeBase(sessionmaker, LocalEmbeddings())
    before = await hybrid.search(query="money back for a yearly subscription", k=1)
    assert before[0].similarity is None  # no vectors of this model yet

    async with unit_of_work(sessionmaker) as session:
        job = await knowledge_service.schedule_reembedding(session, knowledge=hybrid, queue=None)
    assert job is not None
    result = await knowledge_service.reembed_all(sessionmaker, hybrid)

    async with sessionmaker() as session:
        chunks = await session.scalar(select(func.count()).select_from(Chunk))
        missing = await repository.count_chunks_to_embed(session, model_id="local:all-MiniLM-L6-v2")
    assert result["reembedded"] == chunks
    assert missing == 0
    after = await hybrid.search(query="money back for a yearly subscription", k=1)
    assert after[0].similarity is not None
    assert after[0].title == "Refunds for annual plans"
    async with unit_of_work(sessionmaker) as session:
        # Nothing left to do: no second job.
        assert (
            await knowledge_service.schedule_reembedding(session, knowledge=hybrid, queue=None)
            is None
        )


async def test_a_repeated_question_reuses_its_query_vector(
    sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    with EmbeddingsServer() as server:
        knowledge = KnowledgeBase(
            sessionmaker, OpenAIEmbeddings(base_url=server.base_url, max_retries=0)
        )
        await add(knowledge, tmp_path / "a", passwords=PASSWORDS, refunds=REFUNDS)
        before = len(server.requests)

        first = await knowledge.search(query="locked account attempts", k=2)
        second = await knowledge.search(query="locked account attempts", k=2)
        await knowledge.search(query="annual refund", k=2)

        assert first == second
        assert first[0].similarity is not None
        assert len(server.requests) == before + 2  # one per distinct question
        await knowledge.close()
