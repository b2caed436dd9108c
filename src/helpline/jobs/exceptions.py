"""Errors of background jobs."""

from __future__ import annotations

from helpline.core.errors import NotFound


class JobNotFound(NotFound):
    code = "JOB_NOT_FOUND"
    message = "Job not found"


class PermanentJobError(Exception):
    """A failure that retrying cannot fix (bad input): the job fails at once with this message.

    Any other exception counts as transient and is retried with backoff.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)
