"""Jobs on Redis: the server enqueues on ARQ; a real ARQ worker (`helpline worker`) runs them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core.config import Settings
from helpline.core.database import unit_of_work
from helpline.jobs import service as jobs_service
from helpline.jobs.models import Job, JobStatus
from helpline.jobs.queues import ArqQueue
from helpline.jobs.registry import JobContext, JobRuntime
from helpline.jobs.worker import build_worker
from helpline.main import create_app
from tests.jobs.conftest import RegisterTask
from tests.knowledge.helpers import PASSWORDS, sign_in, upload_json, wait_for_job
from tests.servers import free_port


@pytest.fixture
def settings(redis_settings: Settings) -> Settings:
    return redis_settings.model_copy(update={"embeddings_provider": "none"})


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    from tests.conftest import _empty_tables

    application = create_app(settings)
    async with application.router.lifespan_context(application):
        try:
            yield application
        finally:
            await _empty_tables(application)


async def run_worker_until(app: FastAPI, done: Any, *, retry_base_s: float = 0.05) -> None:
    """Run a real ARQ worker on this app's queue until `await done()` is true (at most 30 s)."""
    runtime = JobRuntime(
        settings=app.state.settings,
        sessionmaker=app.state.sessionmaker,
        knowledge=app.state.knowledge,
        retry_base_s=retry_base_s,
    )
    worker = build_worker(app.state.settings, runtime, handle_signals=False, poll_delay_s=0.05)
    task = asyncio.create_task(worker.async_run())
    try:
        deadline = time.monotonic() + 30
        while not await done():
            assert time.monotonic() < deadline, "the worker did not finish in 30 s"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
    finally:
        # arq's `close` gathers the job tasks it has just cancelled without
        # `return_exceptions`, so a retry still in flight surfaces as CancelledError.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def job_status(sessionmaker: async_sessionmaker[AsyncSession], job_id: Any) -> Job:
    async with sessionmaker() as session:
        job = await session.get(Job, uuid.UUID(str(job_id)))
        assert job is not None
        return job


async def test_with_redis_the_server_enqueues_and_a_worker_runs_the_ingestion(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> None:
    assert isinstance(app.state.job_queue, ArqQueue)
    agent = await sign_in(sessionmaker, client, "agent")
    response = await upload_json(client, agent, title="Reset your password", content=PASSWORDS)
    job_id = response.json()["job_id"]
    # No worker yet: the server runs nothing itself, the job waits on Redis.
    await asyncio.sleep(0.3)
    assert (await client.get(f"/jobs/{job_id}", headers=agent.headers)).json()["status"] == (
        "queued"
    )
    queued = await app.state.job_queue.redis.zcard(app.state.job_queue.queue_name)
    assert queued == 1

    async def finished() -> bool:
        return (await job_status(sessionmaker, job_id)).status == JobStatus.COMPLETE

    await run_worker_until(app, finished)

    job = await wait_for_job(client, agent, job_id)
    assert job["status"] == "complete"
    results = (
        await client.get("/knowledge/search", params={"q": "locked account"}, headers=agent.headers)
    ).json()["results"]
    assert results[0]["title"] == "Reset your password"


async def test_the_arq_worker_retries_with_backoff_then_records_the_failure(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    attempts: list[float] = []

    async def flaky(ctx: JobContext, args: Mapping[str, Any]) -> None:
        del ctx, args
        attempts.append(time.monotonic())
        raise ConnectionError("search index unavailable")

    register_task("test_arq_flaky", flaky, max_attempts=3)
    async with unit_of_work(sessionmaker) as session:
        job = await jobs_service.enqueue(
            session, app.state.job_queue, name="test_arq_flaky", args={}
        )

    async def finished() -> bool:
        return (await job_status(sessionmaker, job.id)).status == JobStatus.FAILED

    await run_worker_until(app, finished, retry_base_s=0.3)

    stored = await job_status(sessionmaker, job.id)
    assert stored.attempts == 3
    assert stored.error == "ConnectionError: search index unavailable"
    assert len(attempts) == 3
    # ARQ deferred each retry by the runner's backoff (0.3 s, then 0.6 s, ±20 %).
    assert attempts[1] - attempts[0] >= 0.24
    assert attempts[2] - attempts[1] >= 0.48


async def test_a_job_whose_enqueue_failed_is_swept_onto_the_queue(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    async def echo(ctx: JobContext, args: Mapping[str, Any]) -> str:
        del ctx, args
        return "ran"

    register_task("test_arq_swept", echo)
    async with unit_of_work(sessionmaker) as session:
        # As if Redis had been away at commit time: the row exists, the queue never heard.
        job = await jobs_service.enqueue(session, None, name="test_arq_swept", args={})
    queue: ArqQueue = app.state.job_queue

    assert await queue._sweeper.sweep() == 1
    assert await queue._sweeper.sweep() == 1  # handed over twice: ARQ keeps one

    assert await queue.redis.zcard(queue.queue_name) == 1

    async def finished() -> bool:
        return (await job_status(sessionmaker, job.id)).status == JobStatus.COMPLETE

    await run_worker_until(app, finished)
    assert (await job_status(sessionmaker, job.id)).result == "ran"


@pytest.mark.slow
async def test_helpline_worker_runs_jobs_exposes_metrics_and_stops_on_sigterm(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": str(settings.redis_url),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "EMBEDDINGS_PROVIDER": "none",
        "ENVIRONMENT": "test",
        "AUTH_JWT_SECRET": "x" * 48,
        "WORKER_METRICS_PORT": str(metrics_port),
        "SHUTDOWN_GRACE_S": "5",
        "LOG_LEVEL": "INFO",
    }
    log_path = tmp_path / "worker.log"

    def start() -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", "helpline.cli", "worker"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )

    process = await asyncio.to_thread(start)
    try:
        agent = await sign_in(sessionmaker, client, "agent")
        response = await upload_json(client, agent, title="Reset your password", content=PASSWORDS)

        job = await wait_for_job(client, agent, response.json()["job_id"], within_s=60)

        assert job["status"] == "complete", log_path.read_text()
        async with httpx.AsyncClient() as http:
            scrape = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert re.search(
            r'helpline_jobs_total\{name="ingest_document",outcome="complete"\} [1-9]', scrape.text
        ), [line for line in scrape.text.splitlines() if "helpline_jobs" in line]
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
        assert code == 0, log_path.read_text()
        assert "worker.stopped" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
