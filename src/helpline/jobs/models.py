"""The `jobs` table: one row per background job, the source of truth for `GET /jobs/{id}`."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from helpline.kit.models import Base, IdMixin, TimestampMixin, enum_column

JOB_NAME_MAX_LENGTH = 100
JOB_ERROR_MAX_LENGTH = 2000


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class Job(IdMixin, TimestampMixin, Base):
    """A unit of background work; its arguments are IDs, never objects."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)

    name: Mapped[str] = mapped_column(String(JOB_NAME_MAX_LENGTH))
    status: Mapped[JobStatus] = mapped_column(
        enum_column(JobStatus, 16),
        default=JobStatus.QUEUED,
    )
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    # The enqueuing request's trace context, so the job's span links back to it.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
