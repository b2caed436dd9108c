"""One queue interface, two implementations, one factory (`create_queue`).

- `InProcessQueue` (no `REDIS_URL`, the embedded default): asyncio tasks in the server
  process, a few at a time. Retries wait in the same task. On shutdown it stops taking work,
  lets running jobs finish until the drain deadline and cancels the rest; whatever was not
  finished stays `queued`/`running` in the `jobs` table and is run again at the next start.
- `ArqQueue` (`REDIS_URL` set): jobs go to an ARQ queue on Redis, where `helpline worker`
  processes (`helpline.jobs.worker`) run them; the server only enqueues.

The `jobs` table is the source of truth. Both queues *sweep* it: at start and then
periodically, unfinished jobs that should be waiting in the queue are handed to it again, so
a job whose hand-over failed (Redis away at that moment, a crash between commit and enqueue)
still runs. Handing a job over twice is harmless: ARQ keys jobs by their id, the in-process
queue skips the ids it holds, and the runner never re-runs a finished job.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Protocol

import structlog

from helpline.core.config import Settings
from helpline.core.database import unit_of_work
from helpline.jobs import service
from helpline.jobs.models import JobStatus
from helpline.jobs.registry import JobRuntime
from helpline.jobs.runner import backoff_s, run_job

log = structlog.get_logger(__name__)

SWEEP_INTERVAL_S = 60.0
ARQ_FUNCTION = "run_job"


def arq_queue_name(settings: Settings) -> str:
    """The ARQ queue's Redis key: under `REDIS_KEY_PREFIX`, so installations can share Redis."""
    return f"{settings.redis_key_prefix}jobs"


class JobQueue(Protocol):
    """Where committed jobs go to be run."""

    kind: str

    async def enqueue(self, job_id: uuid.UUID, *, delay_s: float = 0.0) -> None:
        """Hand a committed job over to be run (after `delay_s`)."""
        ...

    async def start(self) -> None:
        """Start sweeping the `jobs` table (and, in-process, running jobs)."""
        ...

    async def drain(self, deadline: float) -> None:
        """Stop taking new work; in-process, let running jobs finish until `deadline`."""
        ...

    async def close(self) -> None: ...


class _Sweeper:
    """Hands unfinished jobs of the `jobs` table to a queue: at start, then every interval."""

    def __init__(
        self,
        queue: JobQueue,
        runtime: JobRuntime,
        *,
        statuses: tuple[JobStatus, ...],
        interval_s: float,
    ) -> None:
        self.queue = queue
        self.runtime = runtime
        self.statuses = statuses
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def sweep(self, *, older_than_s: float = 0.0) -> int:
        async with unit_of_work(self.runtime.sessionmaker) as session:
            job_ids = await service.jobs_to_recover(
                session, statuses=self.statuses, older_than_s=older_than_s
            )
        for job_id in job_ids:
            await self.queue.enqueue(job_id)
        if job_ids:
            log.info("jobs.recovered", count=len(job_ids), queue=self.queue.kind)
        return len(job_ids)

    async def start(self) -> None:
        try:
            await self.sweep()
        except Exception:
            log.exception("jobs.sweep_failed")
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                # Only jobs old enough that their own hand-over should have happened.
                await self.sweep(older_than_s=self.interval_s)
            except Exception:
                log.exception("jobs.sweep_failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class InProcessQueue:
    """Runs jobs as asyncio tasks of this process (one process only: no `REDIS_URL`)."""

    kind = "in-process"

    def __init__(
        self,
        runtime: JobRuntime,
        *,
        concurrency: int = 2,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self.runtime = runtime
        self._slots = asyncio.Semaphore(concurrency)
        self._held: set[uuid.UUID] = set()  # queued or running here
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = True
        # Without Redis this process is the only runner: a `running` row it does not hold was
        # interrupted (a crash, a kill) and is run again.
        self._sweeper = _Sweeper(
            self,
            runtime,
            statuses=(JobStatus.QUEUED, JobStatus.RUNNING),
            interval_s=sweep_interval_s,
        )

    @property
    def pending(self) -> int:
        return len(self._held)

    async def enqueue(self, job_id: uuid.UUID, *, delay_s: float = 0.0) -> None:
        if not self._accepting:
            log.info("jobs.not_accepting", job_id=str(job_id))  # runs at the next start
            return
        if job_id in self._held:
            return
        self._held.add(job_id)
        task = asyncio.create_task(self._run(job_id, delay_s), name=f"job-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job_id: uuid.UUID, delay_s: float) -> None:
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            attempt = 0
            while self._accepting:
                attempt += 1
                try:
                    async with self._slots:
                        retry_in = await run_job(self.runtime, job_id)
                except Exception:
                    # The runner itself failed (the database is away): try again later.
                    log.exception("jobs.run_failed", job_id=str(job_id))
                    retry_in = backoff_s(self.runtime, attempt)
                if retry_in is None:
                    return
                await asyncio.sleep(retry_in)
        finally:
            self._held.discard(job_id)

    async def start(self) -> None:
        await self._sweeper.start()

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until no job is queued or running here (tests, the CLI); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def drain(self, deadline: float) -> None:
        self._accepting = False
        await self._sweeper.stop()
        remaining = deadline - asyncio.get_running_loop().time()
        if self._tasks and remaining > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("jobs.cancelled_at_shutdown", count=len(tasks))

    async def close(self) -> None:
        self._accepting = False
        await self._sweeper.stop()
        await self._cancel_all()


class ArqQueue:
    """Enqueues jobs on Redis for `helpline worker` (ARQ); runs none itself."""

    kind = "arq"

    def __init__(
        self,
        settings: Settings,
        runtime: JobRuntime,
        *,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        from arq.connections import ArqRedis
        from redis.asyncio import ConnectionPool

        assert settings.redis_url, "ArqQueue needs REDIS_URL"
        self.queue_name = arq_queue_name(settings)
        # Lazy: no connection until the first enqueue, so a start with Redis away still works.
        self.redis = ArqRedis(
            ConnectionPool.from_url(settings.redis_url, socket_connect_timeout=2.0),
            default_queue_name=self.queue_name,
        )
        self._sweeper = _Sweeper(
            self, runtime, statuses=(JobStatus.QUEUED,), interval_s=sweep_interval_s
        )

    async def enqueue(self, job_id: uuid.UUID, *, delay_s: float = 0.0) -> None:
        await self.redis.enqueue_job(
            ARQ_FUNCTION,
            str(job_id),
            _job_id=str(job_id),
            _queue_name=self.queue_name,
            _defer_by=delay_s or None,
        )

    async def start(self) -> None:
        await self._sweeper.start()

    async def drain(self, deadline: float) -> None:
        del deadline
        await self._sweeper.stop()

    async def close(self) -> None:
        await self._sweeper.stop()
        await self.redis.aclose()


def create_queue(settings: Settings, runtime: JobRuntime) -> JobQueue:
    """ARQ on Redis when `REDIS_URL` is set, else in-process."""
    if settings.redis_url:
        return ArqQueue(settings, runtime)
    return InProcessQueue(runtime)
