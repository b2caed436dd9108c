"""Fixtures of the knowledge-base tests.

Full-text only (`EMBEDDINGS_PROVIDER=none`) unless a test asks for the `local` model, which
is loaded once per test session and shared by every app.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpline.core.config import Settings
from tests.conftest import make_settings


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path, embeddings_provider="none")
