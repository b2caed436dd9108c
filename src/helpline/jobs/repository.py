"""SQL for the `jobs` table."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.jobs.models import Job, JobStatus


async def get_job(session: AsyncSession, job_id: uuid.UUID) -> Job | None:
    return await session.get(Job, job_id)


async def lock_job(session: AsyncSession, job_id: uuid.UUID) -> Job | None:
    """Load a job for an update (row lock on PostgreSQL).

    SQLite has no row locks: the row is written first, which takes the database's write lock,
    so that no one changes the job between this read and this transaction's end.
    """
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(update(Job).where(Job.id == job_id).values(attempts=Job.attempts))
    statement = select(Job).where(Job.id == job_id).with_for_update()
    result = await session.execute(statement.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


async def add_job(session: AsyncSession, job: Job) -> Job:
    session.add(job)
    await session.flush()
    return job


async def unfinished_job_ids(
    session: AsyncSession,
    *,
    statuses: Sequence[JobStatus],
    created_before: datetime | None = None,
    limit: int = 500,
) -> list[uuid.UUID]:
    """Jobs in `statuses` (oldest first), e.g. to enqueue again after a restart."""
    statement = select(Job.id).where(Job.status.in_(list(statuses)))
    if created_before is not None:
        statement = statement.where(Job.created_at < created_before)
    statement = statement.order_by(Job.created_at).limit(limit)
    return list((await session.execute(statement)).scalars().all())


async def find_unfinished(session: AsyncSession, *, name: str) -> Job | None:
    statement = (
        select(Job)
        .where(Job.name == name, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .limit(1)
    )
    return (await session.execute(statement)).scalar_one_or_none()
