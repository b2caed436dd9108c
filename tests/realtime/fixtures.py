"""Fixtures shared by the conversations and realtime tests (imported by their conftest)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.agents.providers.fake import FakeChatModel
from helpline.core.config import Settings
from helpline.core.database import create_engine, create_sessionmaker
from helpline.main import create_app
from tests.conftest import _empty_tables_for, make_settings
from tests.realtime.helpers import Party, sign_in
from tests.servers import LiveServer

PartyFactory = Callable[..., Awaitable[Party]]


@pytest.fixture
def settings(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The conftest settings, with a test's overrides (`helpers.with_settings`)."""
    overrides: dict[str, Any] = getattr(request, "param", None) or {}
    return make_settings(database_url, tmp_path, **overrides)


@contextmanager
def serve_with_send_buffer(settings: Settings, send_buffer: int) -> Iterator[LiveServer]:
    """The app under uvicorn, whose connections get a fixed kernel send buffer of `send_buffer`.

    Accepted sockets inherit the listening socket's buffer size (and lose the kernel's
    autotuning), so a client that stops reading holds the server's writes back after some
    hundred kilobytes instead of the megabytes an autotuned loopback buffer takes first.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    try:
        with LiveServer.serve(create_app(settings), listener=listener) as live:
            yield live
    finally:
        listener.close()


@pytest.fixture
def server_send_buffer(request: pytest.FixtureRequest) -> int | None:
    """The kernel send buffer of the live server's sockets (`helpers.with_send_buffer`)."""
    value = getattr(request, "param", None)
    return None if value is None else int(value)


@pytest.fixture
def live_server(settings: Settings, server_send_buffer: int | None) -> Iterator[LiveServer]:
    """The app served by uvicorn on 127.0.0.1 (the conftest's, with an optional send buffer)."""
    if server_send_buffer is None:
        starting = LiveServer.start(settings)
    else:
        starting = serve_with_send_buffer(settings, server_send_buffer)
    with starting as server:
        yield server
    asyncio.run(_empty_tables_for(settings))


@pytest.fixture
async def live_db(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A sessionmaker on the live server's database, in the test's own event loop."""
    engine = create_engine(settings)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def http(live_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """A real HTTP client of the live server."""
    async with httpx.AsyncClient(base_url=live_server.http_url, timeout=30.0) as client:
        yield client


@pytest.fixture
def live_app(live_server: LiveServer) -> FastAPI:
    """The application the live server runs (to read its fake model's counters)."""
    app = live_server.server.config.app
    assert isinstance(app, FastAPI)
    return app


@pytest.fixture
def fake_model(live_app: FastAPI) -> FakeChatModel:
    model = live_app.state.chat_model
    assert isinstance(model, FakeChatModel)
    return model


@pytest.fixture
def person(live_db: async_sessionmaker[AsyncSession], http: httpx.AsyncClient) -> PartyFactory:
    """Signs in a new user of the live server: `await person("agent")`."""

    async def make(role: str = "customer") -> Party:
        return await sign_in(live_db, http, role)

    return make
