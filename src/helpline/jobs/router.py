"""`GET /jobs/{job_id}` (SPEC.md: Knowledge base)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from helpline.auth.dependencies import CurrentUser
from helpline.core.database import DbSession
from helpline.core.errors import error_responses
from helpline.jobs import service
from helpline.jobs.schemas import JobRead

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}", response_model=JobRead, responses=error_responses(401, 403, 404))
async def get_job(job_id: uuid.UUID, session: DbSession, user: CurrentUser) -> JobRead:
    """A background job's status, and its result or error once it has finished."""
    job = await service.get_job(session, job_id=job_id, user=user)
    return JobRead.model_validate(job)
