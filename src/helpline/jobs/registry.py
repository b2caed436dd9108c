"""The jobs there are: each domain declares its own in `<domain>/tasks.py` with `@task(...)`.

A task is `async def run(ctx: JobContext, args: Mapping[str, Any]) -> JSON-able result`. It
takes IDs only (`args` is stored in the `jobs` row), opens its own sessions from
`ctx.sessionmaker`, raises `PermanentJobError` for bad input (no retry) and anything else for a
transient failure (retried with exponential backoff up to `max_attempts`). `on_failure` runs
once the job has failed for good, e.g. to mark a document `failed` with the job's error.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core.config import Settings

if TYPE_CHECKING:
    from helpline.knowledge.search import KnowledgeBase

DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_RETRY_BASE_S = 2.0
DEFAULT_RETRY_MAX_S = 300.0


@dataclass
class JobRuntime:
    """What jobs run with in one process (the server's in-process queue or `helpline worker`)."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    knowledge: KnowledgeBase
    retry_base_s: float = DEFAULT_RETRY_BASE_S
    retry_max_s: float = DEFAULT_RETRY_MAX_S


@dataclass(frozen=True, slots=True)
class JobContext:
    job_id: uuid.UUID
    name: str
    attempt: int  # 1 for the first run
    runtime: JobRuntime

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        return self.runtime.sessionmaker

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def knowledge(self) -> KnowledgeBase:
        return self.runtime.knowledge


TaskFunction = Callable[[JobContext, Mapping[str, Any]], Awaitable[Any]]
FailureHook = Callable[[JobContext, Mapping[str, Any], str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TaskDefinition:
    name: str
    run: TaskFunction
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    on_failure: FailureHook | None = None


_TASKS: dict[str, TaskDefinition] = {}


def task(
    name: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, on_failure: FailureHook | None = None
) -> Callable[[TaskFunction], TaskFunction]:
    """Register a job function under `name` (the name stored in `jobs.name`)."""

    def register(function: TaskFunction) -> TaskFunction:
        _TASKS[name] = TaskDefinition(
            name=name, run=function, max_attempts=max_attempts, on_failure=on_failure
        )
        return function

    return register


def load_tasks() -> None:
    """Import every domain's `tasks` module, so that their `@task`s are registered."""
    import helpline.agents.tasks  # noqa: F401
    import helpline.knowledge.tasks  # noqa: F401


def get_task(name: str) -> TaskDefinition | None:
    load_tasks()
    return _TASKS.get(name)
