"""One-time work before the server's workers start (demo content, …).

`prepare()` runs once in `helpline serve`, after the migrations and before uvicorn starts its
workers, so that N workers do not race to do it N times:

- the demo knowledge base (`DEMO_KB`, on in development) is loaded into an empty knowledge
  base, so that a newcomer's first `make run` answers the demo company's questions;
- when the embeddings model changed since the chunks were embedded, a `reembed_all` job is
  queued; the server's queue (or `helpline worker`) picks it up once it runs.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import structlog

from helpline.core.config import Settings
from helpline.core.database import create_engine, create_sessionmaker, unit_of_work
from helpline.knowledge import service as knowledge_service

log = structlog.get_logger(__name__)

DEMO_EXCLUDED = ("README.md",)  # the folder's description, not an article


def find_demo_kb() -> Path | None:
    """The bundled demo articles: inside the installed package, else in the source tree."""
    packaged = Path(str(resources.files("helpline").joinpath("demo_kb")))
    if packaged.is_dir():
        return packaged
    # An editable install or a checkout: <repo>/examples/kb next to <repo>/src/helpline.
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "examples" / "kb"
        if candidate.is_dir():
            return candidate
    return None


async def load_demo_kb(settings: Settings) -> list[knowledge_service.IngestOutcome]:
    """Load the demo articles if the knowledge base is empty; what was loaded."""
    folder = find_demo_kb()
    if folder is None:
        log.warning("demo_kb.not_found")
        return []
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    try:
        async with sessionmaker() as session:
            if not await knowledge_service.is_empty(session):
                return []
        knowledge = await knowledge_service.start_knowledge_base(
            settings, sessionmaker, warm_up=False
        )
        try:
            started = time.perf_counter()
            files = knowledge_service.collect_files([folder], exclude_names=DEMO_EXCLUDED)
            outcomes = await knowledge_service.ingest_paths(
                sessionmaker, knowledge, files, max_bytes=settings.max_upload_bytes
            )
            log.info(
                "demo_kb.loaded",
                documents=sum(1 for outcome in outcomes if outcome.status != "failed"),
                chunks=sum(outcome.chunks for outcome in outcomes),
                embeddings=knowledge.embeddings.name,
                duration_s=round(time.perf_counter() - started, 1),
            )
            return outcomes
        finally:
            await knowledge_service.stop_knowledge_base(knowledge)
    finally:
        await engine.dispose()


async def schedule_reembedding(settings: Settings) -> bool:
    """Queue `reembed_all` when chunks lack vectors of the configured model."""
    engine = create_engine(settings)
    try:
        knowledge = await knowledge_service.start_knowledge_base(
            settings, create_sessionmaker(engine), warm_up=False
        )
        try:
            async with unit_of_work(knowledge.sessionmaker) as session:
                job = await knowledge_service.schedule_reembedding(
                    session, knowledge=knowledge, queue=None
                )
        finally:
            await knowledge_service.stop_knowledge_base(knowledge)
    finally:
        await engine.dispose()
    if job is not None:
        log.info("knowledge.reembedding_scheduled", job_id=str(job.id))
    return job is not None


async def prepare(settings: Settings) -> None:
    """Run the start-up tasks that must happen once, not once per worker."""
    if settings.should_load_demo_kb:
        await load_demo_kb(settings)
    await schedule_reembedding(settings)
