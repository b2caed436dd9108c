"""Revocation through Redis: what several instances share when `REDIS_URL` is set."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth.revocation import RedisRevocationBackend, Revocations
from helpline.core.config import Settings
from tests.auth.conftest import ClientFactory
from tests.auth.helpers import assert_error, claims_of
from tests.factories import bearer, create_user, login


@pytest.fixture
def settings(redis_settings: Settings) -> Settings:
    """Every app of this module uses Redis (with a key prefix of its own)."""
    return redis_settings


@pytest.fixture
async def redis(redis_settings: Settings) -> AsyncIterator[Redis]:
    assert redis_settings.redis_url
    client: Redis = Redis.from_url(redis_settings.redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{redis_settings.redis_key_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def revoked_key(settings: Settings, login_id: uuid.UUID | str) -> str:
    return f"{settings.redis_key_prefix}auth:revoked:{login_id}"


async def test_factory_uses_redis_when_configured(app: FastAPI) -> None:
    revocations: Revocations = app.state.revocations
    assert isinstance(revocations.backend, RedisRevocationBackend)


async def test_logout_is_recorded_in_redis(
    client: httpx.AsyncClient, session: AsyncSession, redis: Redis, settings: Settings
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    sid = claims_of(tokens["access_token"])["sid"]
    assert await redis.exists(revoked_key(settings, sid)) == 0
    await client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    assert await redis.exists(revoked_key(settings, sid)) == 1
    ttl = await redis.ttl(revoked_key(settings, sid))
    # Kept as long as a refresh token of that login could live, then forgotten.
    assert 29 * 86_400 < ttl <= 30 * 86_400
    assert_error(
        await client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED"
    )


async def test_replayed_refresh_token_is_revoked_through_redis(
    client: httpx.AsyncClient, session: AsyncSession, redis: Redis, settings: Settings
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    sid = claims_of(tokens["access_token"])["sid"]
    body = {"refresh_token": tokens["refresh_token"]}
    assert (await client.post("/auth/refresh", json=body)).status_code == 200
    assert_error(await client.post("/auth/refresh", json=body), 401, "TOKEN_REVOKED")
    assert await redis.exists(revoked_key(settings, sid)) == 1
    assert_error(
        await client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED"
    )


async def test_other_instance_sees_the_revocation_in_redis(
    client: httpx.AsyncClient,
    session: AsyncSession,
    client_with: ClientFactory,
    redis: Redis,
    settings: Settings,
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    headers = bearer(tokens["access_token"])
    sid = claims_of(tokens["access_token"])["sid"]
    async with client_with(revocation_cache_s=0) as other:
        assert (await other.get("/auth/me", headers=headers)).status_code == 200
        await client.post("/auth/logout", headers=headers)
        assert await redis.exists(revoked_key(settings, sid)) == 1
        assert_error(await other.get("/auth/me", headers=headers), 401, "TOKEN_REVOKED")


async def test_password_change_revokes_the_other_logins_in_redis(
    client: httpx.AsyncClient, session: AsyncSession, redis: Redis, settings: Settings
) -> None:
    await create_user(session, username="alice")
    current = await login(client, "alice")
    other = await login(client, "alice")
    response = await client.post(
        "/auth/password",
        headers=bearer(current["access_token"]),
        json={"current_password": "correct-horse-battery", "new_password": "brand-new-secret"},
    )
    assert response.status_code == 204
    assert await redis.exists(revoked_key(settings, claims_of(other["access_token"])["sid"])) == 1
    assert await redis.exists(revoked_key(settings, claims_of(current["access_token"])["sid"])) == 0
    assert (
        await client.get("/auth/me", headers=bearer(current["access_token"]))
    ).status_code == 200
