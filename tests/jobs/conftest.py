"""Fixtures of the jobs tests: test tasks registered for the duration of a test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpline.core.config import Settings
from helpline.jobs import registry
from tests.conftest import make_settings


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path, embeddings_provider="none")


RegisterTask = Callable[..., None]


@pytest.fixture
def register_task() -> Iterator[RegisterTask]:
    """`register_task(name, function, **options)`; removed again after the test."""
    added: list[str] = []

    def register(name: str, function: registry.TaskFunction, **options: Any) -> None:
        registry.task(name, **options)(function)
        added.append(name)

    yield register
    for name in added:
        registry._TASKS.pop(name, None)
