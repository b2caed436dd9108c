"""Creating jobs, reading them, and recording how they run.

`enqueue` writes the `jobs` row in the caller's unit of work and hands the job to the queue
only once that transaction has committed (`on_commit`): a rolled-back request leaves neither a
row nor a queued job, and a worker never picks up a job whose data is not visible yet.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth.models import User, UserRole
from helpline.core import telemetry
from helpline.core.database import on_commit
from helpline.jobs import repository
from helpline.jobs.exceptions import JobNotFound
from helpline.jobs.models import JOB_ERROR_MAX_LENGTH, Job, JobStatus
from helpline.kit.models import utcnow

if TYPE_CHECKING:
    from helpline.jobs.queues import JobQueue

log = structlog.get_logger(__name__)


async def enqueue(
    session: AsyncSession,
    queue: JobQueue | None,
    *,
    name: str,
    args: Mapping[str, Any],
    created_by: uuid.UUID | None = None,
) -> Job:
    """Create a job; it is queued once `session` commits (without a queue, at the next sweep)."""
    job = await repository.add_job(
        session,
        Job(
            name=name,
            status=JobStatus.QUEUED,
            args=dict(args),
            attempts=0,
            trace_context=telemetry.inject_trace_context() or None,
            created_by=created_by,
        ),
    )
    if queue is not None:
        job_id = job.id

        async def hand_over() -> None:
            await queue.enqueue(job_id)

        on_commit(session, hand_over)
    log.info("job.created", job_id=str(job.id), job=name)
    return job


async def get_job(session: AsyncSession, *, job_id: uuid.UUID, user: User) -> Job:
    """A job as its creator, an agent or an admin may see it; `JobNotFound` otherwise."""
    job = await repository.get_job(session, job_id)
    if job is None:
        raise JobNotFound(f"Job {job_id} not found")
    if user.role == UserRole.CUSTOMER and job.created_by != user.id:
        # Not 403: a customer must not learn which job ids exist.
        raise JobNotFound(f"Job {job_id} not found")
    return job


async def has_unfinished(session: AsyncSession, *, name: str) -> bool:
    """Whether a job called `name` is queued or running."""
    return await repository.find_unfinished(session, name=name) is not None


async def jobs_to_recover(
    session: AsyncSession, *, statuses: tuple[JobStatus, ...], older_than_s: float = 0.0
) -> list[uuid.UUID]:
    """Unfinished jobs to hand to the queue again (after a restart, or an enqueue that failed)."""
    before = utcnow() - timedelta(seconds=older_than_s) if older_than_s else None
    return await repository.unfinished_job_ids(session, statuses=statuses, created_before=before)


def truncate_error(message: str) -> str:
    if len(message) <= JOB_ERROR_MAX_LENGTH:
        return message
    return message[: JOB_ERROR_MAX_LENGTH - 1] + "…"
