"""Every setting of Helpline, read from the environment and `.env` (SPEC.md: Configuration)."""

from __future__ import annotations

import secrets
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Values that appear in tutorials and example files; refused outside development.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "please-change", "dev"})
MIN_SECRET_LENGTH = 32


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Configuration from the environment (upper-case names) and a `.env` file."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    environment: Environment = Environment.DEVELOPMENT
    app_name: str = "Helpline"
    data_dir: Path = Path(".helpline")

    # Persistence
    database_url: str = "sqlite+aiosqlite:///./helpline.db"
    # Connections are kept, not opened for a burst and closed after it (each new one costs
    # several round trips and milliseconds of CPU): the whole allowance is the pool. Sends and
    # stores of answers take at most a quarter of it each, in batches (`BatchedStatement`).
    database_pool_size: int = Field(40, ge=1)
    database_max_overflow: int = Field(0, ge=0)
    database_pool_timeout_s: float = Field(10.0, gt=0)
    database_echo: bool = False
    auto_migrate: bool | None = None  # None: on in development, off otherwise

    # Redis (unset: in-process equivalents, one process only)
    redis_url: str | None = None
    redis_key_prefix: str = "helpline:"

    # LLM
    llm_provider: Literal["extractive", "openai", "anthropic", "fake"] = "extractive"
    llm_model: str = ""
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_timeout_s: float = Field(60.0, gt=0)
    llm_connect_timeout_s: float = Field(5.0, gt=0)
    llm_max_retries: int = Field(2, ge=0)
    llm_max_tokens: int = Field(1024, ge=1)
    llm_temperature: float = Field(0.2, ge=0, le=2)

    # The support agent (LLM_PROVIDER openai, anthropic or fake)
    # false: the model alone answers, with the conversation's history but no knowledge base,
    # tools or handoff (a general assistant; also the least work per token)
    agent_enabled: bool = True
    assistant_name: str = "Helpline Assistant"
    company_name: str = "our company"
    agent_prompt_file: Path | None = None  # a Markdown system prompt replacing the bundled one
    memory_token_budget: int = Field(2000, ge=100)  # verbatim history before it is summarised

    # Auth
    auth_jwt_secret: str | None = None
    auth_jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    access_token_expire_minutes: int = Field(30, ge=1)
    refresh_token_expire_days: int = Field(30, ge=1)
    login_max_failures: int = Field(5, ge=1)
    login_failure_window_s: int = Field(900, ge=1)
    revocation_cache_s: float = Field(2.0, ge=0)
    identity_secret: str | None = None

    # HTTP
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_bytes: int = Field(1_048_576, ge=1024)
    max_upload_bytes: int = Field(20_971_520, ge=1024)

    # Logs, traces, metrics
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "helpline"
    metrics_token: str | None = None
    worker_metrics_port: int = Field(9101, ge=1, le=65535)

    # Limits
    rate_limit_default: str = "100/minute"
    rate_limit_llm: str = "20/minute"
    rate_limit_guest: str = "10/minute"
    rate_limit_fail_open: bool = True
    token_budget_daily: int = Field(0, ge=0)

    # Realtime
    ws_max_frame_bytes: int = Field(65_536, ge=256)
    ws_rate_limit: str = "10/second"
    ws_send_queue_size: int = Field(256, ge=8)
    ws_send_timeout_s: float = Field(10.0, gt=0)
    sse_keepalive_s: float = Field(15.0, gt=0)
    generation_policy: Literal["reject", "queue"] = "reject"
    generation_lease_s: float = Field(15.0, gt=1)
    event_log_ttl_s: int = Field(3600, ge=60)
    shutdown_grace_s: float = Field(30.0, ge=0)

    # Knowledge base
    demo_kb: bool | None = None  # None: on in development
    embeddings_provider: Literal["local", "openai", "none"] | None = None
    embeddings_model: str = ""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == Environment.PRODUCTION:
            secret = self.auth_jwt_secret or ""
            if secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
                raise ValueError(
                    "AUTH_JWT_SECRET must be set to a random value of at least "
                    f"{MIN_SECRET_LENGTH} characters in production "
                    '(e.g. python -c "import secrets; print(secrets.token_urlsafe(48))")'
                )
        return self

    @property
    def is_production(self) -> bool:
        return self.environment == Environment.PRODUCTION

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return self.environment == Environment.DEVELOPMENT

    @property
    def should_load_demo_kb(self) -> bool:
        if self.demo_kb is not None:
            return self.demo_kb
        return self.environment == Environment.DEVELOPMENT

    @property
    def jwt_secret_file(self) -> Path:
        return self.data_dir / "jwt_secret"

    def resolve_jwt_secret(self) -> str:
        """The signing secret: the configured one, or in development one kept in a local file."""
        if self.auth_jwt_secret:
            return self.auth_jwt_secret
        if self.is_production:  # pragma: no cover - the validator refuses this first
            raise RuntimeError("AUTH_JWT_SECRET is required in production")
        path = self.jwt_secret_file
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        path.write_text(secret)
        path.chmod(0o600)
        return secret


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own and pass them to `create_app`)."""
    return Settings()
