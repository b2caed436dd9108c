"""Fixtures of the conversations tests: REST through `client`, users signed in through it."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.realtime.fixtures import PartyFactory, settings
from tests.realtime.helpers import Party, sign_in

__all__ = ["settings"]


@pytest.fixture
def person(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> PartyFactory:
    """Signs in a new user of the app under `client`: `await person("agent")`."""

    async def make(role: str = "customer") -> Party:
        return await sign_in(sessionmaker, client, role)

    return make
