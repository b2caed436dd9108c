"""Dependencies of the jobs domain."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from helpline.jobs.queues import JobQueue


def get_job_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.job_queue
    return queue


Queue = Annotated[JobQueue, Depends(get_job_queue)]
