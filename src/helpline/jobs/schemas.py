"""Job payloads (SPEC.md: `GET /jobs/{job_id}`)."""

from __future__ import annotations

import uuid
from typing import Any

from helpline.jobs.models import JobStatus
from helpline.kit.schemas import Schema


class JobRead(Schema):
    id: uuid.UUID
    status: JobStatus
    result: Any | None = None
    error: str | None = None
