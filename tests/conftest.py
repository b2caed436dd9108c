"""Test fixtures: real PostgreSQL and Redis, and the SQLite default.

Every test that takes `settings` (or anything built on it) runs twice: on SQLite and on
PostgreSQL. One database per backend per test run (per xdist worker), migrated with Alembic;
tables are emptied after each test, since streams and several sessions need real commits.

Point the tests elsewhere with `TEST_POSTGRES_URL` (a database the tests may create databases
from) and `TEST_REDIS_URL`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core import migrations
from helpline.core.config import Settings
from helpline.main import create_app
from helpline.models import metadata
from tests.servers import LiveServer

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = [b for b in os.environ.get("TEST_BACKENDS", "sqlite,postgres").split(",") if b]


def _worker_tag() -> str:
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'gw')}_{os.getpid()}"


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin_execute(statement: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"helpline_test_{_worker_tag()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    migrations.upgrade(url)
    yield url
    asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "helpline.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrations.upgrade(url)
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    name = "postgres_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def redis_prefix() -> str:
    return f"helpline-test:{uuid.uuid4().hex[:10]}:"


def make_settings(database_url: str, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "database_url": database_url,
        "data_dir": tmp_path / "data",
        "auth_jwt_secret": "test-secret-" + "x" * 40,
        "llm_provider": "fake",
        "log_level": "WARNING",
        "demo_kb": False,
        "auto_migrate": False,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path)


@pytest.fixture
def redis_settings(database_url: str, tmp_path: Path, redis_prefix: str) -> Settings:
    """Settings with Redis (for the backends that live there when it is configured)."""
    return make_settings(database_url, tmp_path, redis_url=REDIS_URL, redis_key_prefix=redis_prefix)


async def _empty_tables(app: FastAPI) -> None:
    engine = app.state.engine
    tables = [table.name for table in reversed(metadata.sorted_tables)]
    if not tables:
        return
    for attempt in range(3):
        try:
            async with engine.begin() as connection:
                if engine.dialect.name == "postgresql":
                    quoted = ", ".join(f'"{name}"' for name in tables)
                    await connection.execute(text(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE"))
                else:
                    for name in tables:
                        await connection.execute(text(f'DELETE FROM "{name}"'))
            return
        except DBAPIError as exc:
            # Work the app still has in flight (an answer being stored) may hold a row lock
            # that the truncation deadlocks with: PostgreSQL aborts one side; try again.
            if "deadlock" not in str(exc) or attempt == 2:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        try:
            yield application
        finally:
            await _empty_tables(application)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
def sessionmaker(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    return maker


@pytest.fixture
async def session(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as db:
        yield db


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    """The app served by uvicorn on 127.0.0.1 (for real WebSocket and SSE clients)."""
    with LiveServer.start(settings) as server:
        yield server
        asyncio.run(_empty_tables_for(settings))


async def _empty_tables_for(settings: Settings) -> None:
    application = create_app(settings)
    from helpline.core.database import create_engine

    application.state.engine = create_engine(settings)
    try:
        await _empty_tables(application)
    finally:
        await application.state.engine.dispose()
