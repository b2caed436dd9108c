"""`helpline worker`: an ARQ worker that runs the jobs the servers put on Redis.

One ARQ function, `run_job(job_id)`, delegates to `helpline.jobs.runner.run_job`; retries are
ARQ's `Retry(defer=…)` with the runner's backoff, so a job waiting for its next attempt sits in
Redis rather than in a worker's memory. ARQ's own try counter is set out of the way: the
`jobs` row counts attempts.

On SIGTERM/SIGINT the worker stops taking jobs, lets the running ones finish within
`SHUTDOWN_GRACE_S`, then cancels the rest (ARQ hands a cancelled job out again later).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.worker import Retry, Worker, func
from redis.asyncio import ConnectionPool

from helpline.core.config import Settings
from helpline.core.database import create_engine, create_sessionmaker
from helpline.jobs.queues import ARQ_FUNCTION, arq_queue_name
from helpline.jobs.registry import DEFAULT_RETRY_BASE_S, JobRuntime, load_tasks
from helpline.jobs.runner import backoff_s, run_job
from helpline.knowledge import service as knowledge_service

log = structlog.get_logger(__name__)

# The runner decides when a job has failed for good; ARQ must never give up before it does.
ARQ_MAX_TRIES = 10_000
JOB_TIMEOUT_S = 3600


async def arq_run_job(ctx: dict[str, Any], job_id: str) -> None:
    """The ARQ entry point: run one job, or ask ARQ to deliver it again later."""
    runtime: JobRuntime = ctx["runtime"]
    try:
        retry_in = await run_job(runtime, uuid.UUID(job_id))
    except Exception as exc:
        # The runner could not even record the outcome (the database is away): later.
        log.exception("jobs.run_failed", job_id=job_id)
        raise Retry(defer=backoff_s(runtime, int(ctx.get("job_try", 1)))) from exc
    if retry_in is not None:
        raise Retry(defer=retry_in)


def build_worker(
    settings: Settings,
    runtime: JobRuntime,
    *,
    handle_signals: bool = True,
    poll_delay_s: float = 0.5,
    max_jobs: int = 4,
    burst: bool = False,
) -> Worker:
    """An ARQ worker for `settings`' queue (create it inside a running event loop)."""
    assert settings.redis_url, "the job worker needs REDIS_URL"
    load_tasks()
    queue_name = arq_queue_name(settings)
    pool = ArqRedis(
        ConnectionPool.from_url(settings.redis_url, socket_connect_timeout=2.0),
        default_queue_name=queue_name,
    )
    return Worker(
        functions=[func(arq_run_job, name=ARQ_FUNCTION, max_tries=ARQ_MAX_TRIES)],
        queue_name=queue_name,
        redis_pool=pool,
        ctx={"runtime": runtime},
        handle_signals=handle_signals,
        job_completion_wait=max(1, int(settings.shutdown_grace_s)),
        max_jobs=max_jobs,
        job_timeout=JOB_TIMEOUT_S,
        keep_result=60,
        poll_delay=poll_delay_s,
        burst=burst,
        log_results=False,
    )


async def run_worker(
    settings: Settings,
    *,
    handle_signals: bool = True,
    retry_base_s: float = DEFAULT_RETRY_BASE_S,
    poll_delay_s: float = 0.5,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the worker until a signal (or cancellation); closes everything it opened."""
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    knowledge = await knowledge_service.start_knowledge_base(settings, sessionmaker)
    runtime = JobRuntime(
        settings=settings,
        sessionmaker=sessionmaker,
        knowledge=knowledge,
        retry_base_s=retry_base_s,
    )
    worker = build_worker(
        settings, runtime, handle_signals=handle_signals, poll_delay_s=poll_delay_s
    )
    log.info("worker.started", queue=worker.queue_name, embeddings=knowledge.embeddings.name)
    if ready is not None:
        ready.set()
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        # ARQ cancels its main task once a signal's grace period is over: a normal stop.
        log.info("worker.stopping")
    finally:
        # ARQ's close() gathers the job tasks and would re-raise their cancellation.
        for task in worker.tasks.values():
            task.cancel()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        worker.tasks.clear()
        await worker.close()
        await knowledge_service.stop_knowledge_base(knowledge)
        await engine.dispose()
        log.info("worker.stopped")
