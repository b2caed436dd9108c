"""Settings: documentation, parsing and the refusal of unsafe production defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from helpline.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
def test_every_setting_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in text]
    assert missing == []


def test_production_refuses_a_missing_secret() -> None:
    with pytest.raises(ValidationError, match="AUTH_JWT_SECRET"):
        Settings(_env_file=None, environment="production")  # type: ignore[call-arg]


@pytest.mark.parametrize("secret", ["changeme", "short-secret"])
def test_production_refuses_a_weak_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="AUTH_JWT_SECRET"):
        Settings(_env_file=None, environment="production", auth_jwt_secret=secret)  # type: ignore[call-arg]


def test_development_generates_and_keeps_a_secret(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    first = settings.resolve_jwt_secret()
    assert len(first) >= 32
    assert settings.resolve_jwt_secret() == first
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o077 == 0


def test_cors_origins_accept_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "https://a.test, https://b.test")
    assert Settings(_env_file=None).cors_origins == ["https://a.test", "https://b.test"]  # type: ignore[call-arg]


def test_defaults_follow_the_environment() -> None:
    development = Settings(_env_file=None)  # type: ignore[call-arg]
    production = Settings(_env_file=None, environment="production", auth_jwt_secret="s" * 40)  # type: ignore[call-arg]
    assert development.should_auto_migrate
    assert development.should_load_demo_kb
    assert not production.should_auto_migrate
    assert not production.should_load_demo_kb
