"""Running one job: the same steps whichever queue delivered it.

`run_job(runtime, job_id)` claims the job (`running`, one more attempt), runs its task inside
a span linked to the request that enqueued it, and records the outcome:

- success → `complete` with the task's result;
- `PermanentJobError` (bad input) → `failed` at once, with its message;
- any other exception → back to `queued` with the error, and the delay before the next attempt
  is returned (exponential backoff with jitter) — until `max_attempts`, then `failed`.

A job already `complete` or `failed` is not run again (a queue may deliver twice). Cancellation
(shutdown) propagates and leaves the job `running`: the queue runs it again later (ARQ
re-delivers it; the in-process queue recovers it at the next start).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog

from helpline.core import metrics, telemetry
from helpline.core.database import unit_of_work
from helpline.jobs import registry, repository
from helpline.jobs.exceptions import PermanentJobError
from helpline.jobs.models import JobStatus
from helpline.jobs.registry import JobContext, JobRuntime, TaskDefinition
from helpline.jobs.service import truncate_error
from helpline.kit.models import utcnow

log = structlog.get_logger(__name__)


def backoff_s(runtime: JobRuntime, attempt: int) -> float:
    """The delay after failed attempt number `attempt`: doubling, capped, ±20 % jitter."""
    delay: float = min(runtime.retry_max_s, runtime.retry_base_s * 2.0 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.2)


async def run_job(runtime: JobRuntime, job_id: uuid.UUID) -> float | None:
    """Run job `job_id` once; the delay before retrying it, or None when it is finished."""
    claimed = await _claim(runtime, job_id)
    if claimed is None:
        return None
    definition, context, args, carrier = claimed
    started = time.perf_counter()
    error: str | None = None
    result: Any = None
    outcome = "complete"
    attributes: dict[str, str | int | float | bool] = {
        "helpline.job_id": str(job_id),
        "helpline.job_attempt": context.attempt,
    }
    with telemetry.linked_span(f"job {definition.name}", carrier, attributes=attributes) as span:
        try:
            result = await definition.run(context, args)
        except PermanentJobError as exc:
            outcome, error = "failed", exc.message
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            outcome = "retried" if context.attempt < definition.max_attempts else "failed"
            log.warning(
                "job.attempt_failed",
                job_id=str(job_id),
                job=definition.name,
                attempt=context.attempt,
                error=error,
            )
        span.set_attribute("helpline.job_outcome", outcome)
    duration = time.perf_counter() - started
    metrics.JOB_DURATION.labels(name=definition.name).observe(duration)
    metrics.JOBS.labels(name=definition.name, outcome=outcome).inc()

    if outcome == "failed" and definition.on_failure is not None:
        assert error is not None
        try:
            await definition.on_failure(context, args, error)
        except Exception:
            log.exception("job.failure_hook_failed", job_id=str(job_id), job=definition.name)
    await _record(runtime, job_id, outcome=outcome, result=result, error=error)
    log.info(
        "job.finished" if outcome != "retried" else "job.retry_scheduled",
        job_id=str(job_id),
        job=definition.name,
        outcome=outcome,
        attempt=context.attempt,
        duration_ms=round(duration * 1000, 1),
    )
    if outcome == "retried":
        return backoff_s(runtime, context.attempt)
    return None


async def _claim(
    runtime: JobRuntime, job_id: uuid.UUID
) -> tuple[TaskDefinition, JobContext, Mapping[str, Any], dict[str, str] | None] | None:
    async with unit_of_work(runtime.sessionmaker) as session:
        job = await repository.lock_job(session, job_id)
        if job is None:
            log.warning("job.missing", job_id=str(job_id))
            return None
        if job.status in (JobStatus.COMPLETE, JobStatus.FAILED):
            return None
        definition = registry.get_task(job.name)
        if definition is None:
            job.status = JobStatus.FAILED
            job.error = f"Unknown job {job.name!r}"
            job.finished_at = utcnow()
            metrics.JOBS.labels(name="unknown", outcome="failed").inc()
            return None
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.started_at = utcnow()
        context = JobContext(job_id=job.id, name=job.name, attempt=job.attempts, runtime=runtime)
        return definition, context, dict(job.args or {}), job.trace_context


async def _record(
    runtime: JobRuntime, job_id: uuid.UUID, *, outcome: str, result: Any, error: str | None
) -> None:
    async with unit_of_work(runtime.sessionmaker) as session:
        job = await repository.lock_job(session, job_id)
        if job is None:
            return
        if outcome == "complete":
            job.status = JobStatus.COMPLETE
            job.result = result
            job.error = None
            job.finished_at = utcnow()
        elif outcome == "failed":
            job.status = JobStatus.FAILED
            job.error = truncate_error(error or "failed")
            job.finished_at = utcnow()
        else:
            # Queued again; the last error stays visible while it waits for the next attempt.
            job.status = JobStatus.QUEUED
            job.error = truncate_error(error or "")
