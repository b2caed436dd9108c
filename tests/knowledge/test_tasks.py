"""The ingestion job: transient failures are retried, and a document never stays `processing`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core.database import unit_of_work
from helpline.jobs.models import Job, JobStatus
from helpline.jobs.queues import InProcessQueue
from helpline.jobs.registry import DEFAULT_MAX_ATTEMPTS, JobRuntime
from helpline.knowledge import service as knowledge_service
from helpline.knowledge.embeddings import OpenAIEmbeddings
from helpline.knowledge.models import Document, DocumentStatus
from helpline.knowledge.schemas import DocumentUpload
from helpline.knowledge.search import KnowledgeBase
from tests.knowledge.embeddings_server import EmbeddingsServer
from tests.knowledge.helpers import PASSWORDS


@pytest.fixture
def server() -> Iterator[EmbeddingsServer]:
    with EmbeddingsServer() as running:
        yield running


async def upload_and_run(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], server: EmbeddingsServer
) -> tuple[Document, Job]:
    knowledge = KnowledgeBase(
        sessionmaker, OpenAIEmbeddings(base_url=server.base_url, max_retries=0)
    )
    runtime = JobRuntime(
        settings=app.state.settings,
        sessionmaker=sessionmaker,
        knowledge=knowledge,
        retry_base_s=0.01,
    )
    queue = InProcessQueue(runtime)
    async with unit_of_work(sessionmaker) as session:
        document, job = await knowledge_service.upload_document(
            session,
            queue=queue,
            upload=DocumentUpload(title="Reset your password", source_url=None, text=PASSWORDS),
            created_by=None,
            max_bytes=1_000_000,
        )
    assert await queue.wait_idle(20)
    await queue.close()
    async with sessionmaker() as session:
        stored_document = await session.get(Document, document.id)
        stored_job = await session.get(Job, job.id)
    assert stored_document is not None
    assert stored_job is not None
    return stored_document, stored_job


async def test_a_transient_failure_is_retried_and_the_document_becomes_ready(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], server: EmbeddingsServer
) -> None:
    server.fail_next(2)

    document, job = await upload_and_run(app, sessionmaker, server)

    assert (job.status, job.attempts, job.error) == (JobStatus.COMPLETE, 3, None)
    assert document.status == DocumentStatus.READY
    assert document.chunk_count == job.result["chunks"]


async def test_an_ingestion_that_keeps_failing_fails_the_document_with_its_error(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], server: EmbeddingsServer
) -> None:
    server.fail_next(100)

    document, job = await upload_and_run(app, sessionmaker, server)

    assert job.status == JobStatus.FAILED
    assert job.attempts == DEFAULT_MAX_ATTEMPTS
    assert job.error is not None
    assert "embeddings server failed" in job.error
    assert document.status == DocumentStatus.FAILED
    assert document.error == job.error
    assert document.chunk_count == 0
