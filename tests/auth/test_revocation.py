"""The revocation lookup: cache, listeners, and the database backend."""

from __future__ import annotations

import uuid
from collections.abc import Collection

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth import service as auth_service
from helpline.auth.dependencies import auth_environment
from helpline.auth.revocation import (
    DatabaseRevocationBackend,
    RevocationNotice,
    Revocations,
    create_revocations,
)
from helpline.core.database import unit_of_work
from helpline.core.redis import create_redis
from tests.auth.conftest import ClientFactory
from tests.auth.helpers import assert_error, claims_of
from tests.factories import bearer, create_user, login


class CountingBackend:
    def __init__(self, revoked: set[uuid.UUID] | None = None, *, fail_marks: bool = False) -> None:
        self.revoked = revoked or set()
        self.lookups = 0
        self.marked: list[frozenset[uuid.UUID]] = []
        self.fail_marks = fail_marks

    async def is_revoked(self, login_id: uuid.UUID) -> bool:
        self.lookups += 1
        return login_id in self.revoked

    async def mark_revoked(self, login_ids: Collection[uuid.UUID]) -> None:
        if self.fail_marks:
            raise ConnectionError("backend down")
        self.marked.append(frozenset(login_ids))
        self.revoked |= set(login_ids)


async def test_cache_answers_repeated_lookups() -> None:
    backend = CountingBackend()
    revocations = Revocations(backend, cache_ttl_s=60)
    login_id = uuid.uuid4()
    assert await revocations.is_revoked(login_id) is False
    assert await revocations.is_revoked(login_id) is False
    assert backend.lookups == 1


async def test_without_cache_every_lookup_reaches_the_backend() -> None:
    backend = CountingBackend()
    revocations = Revocations(backend, cache_ttl_s=0)
    login_id = uuid.uuid4()
    await revocations.is_revoked(login_id)
    await revocations.is_revoked(login_id)
    assert backend.lookups == 2


async def test_revoke_overrides_a_cached_answer_at_once() -> None:
    backend = CountingBackend()
    revocations = Revocations(backend, cache_ttl_s=60)
    login_id = uuid.uuid4()
    user_id = uuid.uuid4()
    assert await revocations.is_revoked(login_id) is False
    await revocations.revoke(user_id=user_id, login_ids=[login_id])
    assert await revocations.is_revoked(login_id) is True
    assert backend.lookups == 1  # answered from the local cache
    assert backend.marked == [frozenset({login_id})]


async def test_listeners_are_notified_and_isolated_from_each_other() -> None:
    revocations = Revocations(CountingBackend(), cache_ttl_s=1)
    received: list[RevocationNotice] = []

    async def broken(notice: RevocationNotice) -> None:
        raise RuntimeError(f"listener bug on {notice.user_id}")

    async def recorder(notice: RevocationNotice) -> None:
        received.append(notice)

    revocations.subscribe(broken)
    revocations.subscribe(recorder)
    user_id, login_id = uuid.uuid4(), uuid.uuid4()
    await revocations.revoke(user_id=user_id, login_ids=[login_id])
    await revocations.revoke(user_id=user_id, login_ids=[login_id], all_logins=True)
    assert received == [
        RevocationNotice(user_id=user_id, login_ids=frozenset({login_id})),
        RevocationNotice(user_id=user_id, login_ids=None),
    ]


async def test_backend_failure_still_revokes_locally_and_notifies() -> None:
    revocations = Revocations(CountingBackend(fail_marks=True), cache_ttl_s=1)
    received: list[RevocationNotice] = []

    async def recorder(notice: RevocationNotice) -> None:
        received.append(notice)

    revocations.subscribe(recorder)
    login_id = uuid.uuid4()
    await revocations.revoke(user_id=uuid.uuid4(), login_ids=[login_id])
    assert await revocations.is_revoked(login_id) is True
    assert len(received) == 1


async def test_factory_uses_the_database_without_redis(app: FastAPI) -> None:
    revocations: Revocations = app.state.revocations
    assert isinstance(revocations.backend, DatabaseRevocationBackend)


async def test_database_backend_reads_the_login_row(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    sid = uuid.UUID(claims_of(tokens["access_token"])["sid"])
    backend = DatabaseRevocationBackend(app.state.engine)
    assert await backend.is_revoked(sid) is False
    await client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    assert await backend.is_revoked(sid) is True
    # A login that no longer exists (its user was deleted) is revoked too.
    assert await backend.is_revoked(uuid.uuid4()) is True


async def test_listener_hears_about_a_deleted_session_after_commit(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, username="alice")
    received: list[RevocationNotice] = []

    async def recorder(notice: RevocationNotice) -> None:
        received.append(notice)

    app.state.revocations.subscribe(recorder)
    first = await login(client, "alice")
    second = await login(client, "alice")
    second_sid = uuid.UUID(claims_of(second["access_token"])["sid"])
    response = await client.delete(
        f"/auth/sessions/{second_sid}", headers=bearer(first["access_token"])
    )
    assert response.status_code == 204
    assert received == [RevocationNotice(user_id=user.id, login_ids=frozenset({second_sid}))]


async def test_listener_is_not_called_when_the_transaction_rolls_back(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, username="alice")
    tokens = await login(client, "alice")
    sid = uuid.UUID(claims_of(tokens["access_token"])["sid"])
    received: list[RevocationNotice] = []

    async def recorder(notice: RevocationNotice) -> None:
        received.append(notice)

    app.state.revocations.subscribe(recorder)
    env = auth_environment(app)

    async def revoke_then_fail() -> None:
        async with unit_of_work(app.state.sessionmaker) as work:
            await auth_service.revoke_session(work, env=env, user=user, login_id=sid)
            raise RuntimeError("something failed after the revocation")

    with pytest.raises(RuntimeError, match="after the revocation"):
        await revoke_then_fail()
    assert received == []
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200


async def test_deactivation_notice_covers_every_login(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="root", role="admin")
    user = await create_user(session, username="alice")
    admin = bearer((await login(client, "root"))["access_token"])
    await login(client, "alice")
    received: list[RevocationNotice] = []

    async def recorder(notice: RevocationNotice) -> None:
        received.append(notice)

    app.state.revocations.subscribe(recorder)
    await client.patch(f"/admin/users/{user.id}", headers=admin, json={"is_active": False})
    assert received == [RevocationNotice(user_id=user.id, login_ids=None)]


async def test_revocation_reaches_another_instance_through_the_database(
    client: httpx.AsyncClient, session: AsyncSession, client_with: ClientFactory
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    headers = bearer(tokens["access_token"])
    async with client_with(revocation_cache_s=0) as other:
        assert (await other.get("/auth/me", headers=headers)).status_code == 200
        await client.post("/auth/logout", headers=headers)
        assert_error(await other.get("/auth/me", headers=headers), 401, "TOKEN_REVOKED")


async def test_redis_outage_falls_back_to_the_database(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    sid = uuid.UUID(claims_of(tokens["access_token"])["sid"])
    await client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    unreachable = app.state.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    redis = create_redis(unreachable)
    try:
        revocations = create_revocations(unreachable, redis=redis, database=app.state.engine)
        assert await revocations.is_revoked(sid) is True
    finally:
        assert redis is not None
        await redis.aclose()
