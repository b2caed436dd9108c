"""The job runner and the in-process queue: commit-then-enqueue, retries, recovery, drain."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core import metrics
from helpline.core.database import unit_of_work
from helpline.jobs import service as jobs_service
from helpline.jobs.exceptions import PermanentJobError
from helpline.jobs.models import Job, JobStatus
from helpline.jobs.queues import InProcessQueue
from helpline.jobs.registry import JobContext, JobRuntime
from tests.jobs.conftest import RegisterTask


class RecordingQueue:
    """A queue that only records what it was handed (to observe *when* enqueueing happens)."""

    kind = "recording"

    def __init__(self) -> None:
        self.enqueued: list[uuid.UUID] = []

    async def enqueue(self, job_id: uuid.UUID, *, delay_s: float = 0.0) -> None:
        del delay_s
        self.enqueued.append(job_id)

    async def start(self) -> None:
        return None

    async def drain(self, deadline: float) -> None:
        del deadline

    async def close(self) -> None:
        return None


def runtime_of(app: FastAPI, *, retry_base_s: float = 0.05) -> JobRuntime:
    return JobRuntime(
        settings=app.state.settings,
        sessionmaker=app.state.sessionmaker,
        knowledge=app.state.knowledge,
        retry_base_s=retry_base_s,
    )


async def load_job(sessionmaker: async_sessionmaker[AsyncSession], job_id: uuid.UUID) -> Job:
    async with sessionmaker() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job


async def create_job(
    sessionmaker: async_sessionmaker[AsyncSession], queue: Any, name: str, **args: Any
) -> uuid.UUID:
    async with unit_of_work(sessionmaker) as session:
        job = await jobs_service.enqueue(session, queue, name=name, args=args)
        return job.id


async def test_a_job_is_handed_to_the_queue_only_after_commit(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    queue = RecordingQueue()

    async with unit_of_work(sessionmaker) as session:
        job = await jobs_service.enqueue(session, queue, name="echo", args={"x": 1})
        await session.flush()
        assert queue.enqueued == []  # written, but not committed yet

    assert queue.enqueued == [job.id]
    stored = await load_job(sessionmaker, job.id)
    assert (stored.status, stored.args, stored.attempts) == (JobStatus.QUEUED, {"x": 1}, 0)


async def test_a_rolled_back_transaction_enqueues_nothing(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    queue = RecordingQueue()
    created: list[uuid.UUID] = []

    async def failing_request() -> None:
        async with unit_of_work(sessionmaker) as session:
            job = await jobs_service.enqueue(session, queue, name="echo", args={})
            created.append(job.id)
            raise RuntimeError("request failed")

    with pytest.raises(RuntimeError, match="request failed"):
        await failing_request()

    assert queue.enqueued == []
    async with sessionmaker() as session:
        assert await session.get(Job, created[0]) is None


async def test_the_in_process_queue_runs_a_job_and_records_its_result(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    seen: list[tuple[Mapping[str, Any], int]] = []

    async def echo(ctx: JobContext, args: Mapping[str, Any]) -> dict[str, Any]:
        seen.append((args, ctx.attempt))
        return {"echo": args["word"]}

    register_task("test_echo", echo)
    queue = InProcessQueue(runtime_of(app))
    before = metrics.sample_value(
        "helpline_jobs_total", {"name": "test_echo", "outcome": "complete"}
    )

    job_id = await create_job(sessionmaker, queue, "test_echo", word="hi")

    assert await queue.wait_idle(10)
    job = await load_job(sessionmaker, job_id)
    assert (job.status, job.result, job.error, job.attempts) == (
        JobStatus.COMPLETE,
        {"echo": "hi"},
        None,
        1,
    )
    assert job.started_at is not None
    assert job.finished_at is not None
    assert seen == [({"word": "hi"}, 1)]
    after = metrics.sample_value(
        "helpline_jobs_total", {"name": "test_echo", "outcome": "complete"}
    )
    assert after == before + 1
    await queue.close()


async def test_transient_failures_are_retried_with_backoff_then_recorded(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    attempts: list[float] = []

    async def flaky(ctx: JobContext, args: Mapping[str, Any]) -> None:
        del ctx, args
        attempts.append(time.monotonic())
        raise ConnectionError("upstream unavailable")

    failures: list[str] = []

    async def on_failure(ctx: JobContext, args: Mapping[str, Any], error: str) -> None:
        del ctx, args
        failures.append(error)

    register_task("test_flaky", flaky, max_attempts=3, on_failure=on_failure)
    queue = InProcessQueue(runtime_of(app, retry_base_s=0.2))

    job_id = await create_job(sessionmaker, queue, "test_flaky")

    assert await queue.wait_idle(20)
    job = await load_job(sessionmaker, job_id)
    assert job.status == JobStatus.FAILED
    assert job.attempts == 3
    assert job.error == "ConnectionError: upstream unavailable"
    assert failures == ["ConnectionError: upstream unavailable"]
    assert len(attempts) == 3
    first_gap, second_gap = attempts[1] - attempts[0], attempts[2] - attempts[1]
    # 0.2 s then 0.4 s, each ±20 %: the second wait is longer than the first can be.
    assert first_gap >= 0.16
    assert second_gap >= 0.32
    await queue.close()


async def test_a_job_that_recovers_completes_on_a_later_attempt(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    calls = 0

    async def recovers(ctx: JobContext, args: Mapping[str, Any]) -> str:
        del args
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TimeoutError("slow database")
        return f"done on attempt {ctx.attempt}"

    register_task("test_recovers", recovers)
    queue = InProcessQueue(runtime_of(app, retry_base_s=0.01))

    job_id = await create_job(sessionmaker, queue, "test_recovers")

    assert await queue.wait_idle(10)
    job = await load_job(sessionmaker, job_id)
    assert (job.status, job.result, job.attempts) == (JobStatus.COMPLETE, "done on attempt 3", 3)
    assert job.error is None
    await queue.close()


async def test_bad_input_fails_at_once_without_retry(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    async def refuses(ctx: JobContext, args: Mapping[str, Any]) -> None:
        del ctx, args
        raise PermanentJobError("The file is not a PDF")

    register_task("test_refuses", refuses)
    queue = InProcessQueue(runtime_of(app, retry_base_s=0.01))

    job_id = await create_job(sessionmaker, queue, "test_refuses")

    assert await queue.wait_idle(10)
    job = await load_job(sessionmaker, job_id)
    assert (job.status, job.attempts, job.error) == (
        JobStatus.FAILED,
        1,
        "The file is not a PDF",
    )
    await queue.close()


async def test_an_unknown_job_fails(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    queue = InProcessQueue(runtime_of(app))

    job_id = await create_job(sessionmaker, queue, "no_such_job")

    assert await queue.wait_idle(10)
    job = await load_job(sessionmaker, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == "Unknown job 'no_such_job'"
    await queue.close()


async def test_unfinished_jobs_are_run_again_at_start(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    async def echo(ctx: JobContext, args: Mapping[str, Any]) -> int:
        del args
        return ctx.attempt

    register_task("test_resumed", echo)
    async with unit_of_work(sessionmaker) as session:
        # As a crash leaves them: one never handed over, one interrupted while running.
        queued = await jobs_service.enqueue(session, None, name="test_resumed", args={})
        running = await jobs_service.enqueue(session, None, name="test_resumed", args={})
        running.status = JobStatus.RUNNING
        running.attempts = 1
    queue = InProcessQueue(runtime_of(app))

    await queue.start()

    assert await queue.wait_idle(10)
    assert (await load_job(sessionmaker, queued.id)).status == JobStatus.COMPLETE
    resumed = await load_job(sessionmaker, running.id)
    assert (resumed.status, resumed.result) == (JobStatus.COMPLETE, 2)
    await queue.close()


async def test_a_finished_job_is_not_run_twice(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    runs = 0

    async def count(ctx: JobContext, args: Mapping[str, Any]) -> None:
        del ctx, args
        nonlocal runs
        runs += 1

    register_task("test_once", count)
    queue = InProcessQueue(runtime_of(app))
    job_id = await create_job(sessionmaker, queue, "test_once")
    assert await queue.wait_idle(10)

    await queue.enqueue(job_id)  # delivered again, as a queue may do

    assert await queue.wait_idle(10)
    assert runs == 1
    await queue.close()


async def test_draining_lets_running_jobs_finish_and_takes_no_new_ones(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: JobContext, args: Mapping[str, Any]) -> str:
        del ctx, args
        started.set()
        await release.wait()
        return "finished"

    register_task("test_slow", slow)
    queue = InProcessQueue(runtime_of(app))
    running_id = await create_job(sessionmaker, queue, "test_slow")
    await asyncio.wait_for(started.wait(), 10)

    loop = asyncio.get_running_loop()
    drain = asyncio.create_task(queue.drain(loop.time() + 10))
    await asyncio.sleep(0)
    late_id = await create_job(sessionmaker, queue, "test_slow")
    release.set()
    await asyncio.wait_for(drain, 15)

    assert (await load_job(sessionmaker, running_id)).status == JobStatus.COMPLETE
    # Not taken while draining: it stays queued for the next start.
    assert (await load_job(sessionmaker, late_id)).status == JobStatus.QUEUED
    assert queue.pending == 0


async def test_drain_cancels_what_outlives_the_deadline(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession], register_task: RegisterTask
) -> None:
    started = asyncio.Event()

    async def hangs(ctx: JobContext, args: Mapping[str, Any]) -> None:
        del ctx, args
        started.set()
        await asyncio.Event().wait()

    register_task("test_hangs", hangs)
    queue = InProcessQueue(runtime_of(app))
    job_id = await create_job(sessionmaker, queue, "test_hangs")
    await asyncio.wait_for(started.wait(), 10)

    loop = asyncio.get_running_loop()
    begun = loop.time()
    await queue.drain(loop.time() + 0.3)

    assert loop.time() - begun < 5
    assert queue.pending == 0
    # Left `running`: the next start runs it again.
    assert (await load_job(sessionmaker, job_id)).status == JobStatus.RUNNING
