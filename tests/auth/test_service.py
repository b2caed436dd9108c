"""Service helpers other domains rely on, and the auth service's own mechanics."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import httpx
import pytest
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.auth import repository, security
from helpline.auth import service as auth_service
from helpline.auth.exceptions import UsernameTaken
from helpline.auth.models import Login, UserRole
from helpline.kit.models import utcnow
from tests.auth.helpers import claims_of
from tests.factories import bearer, create_user, login


async def test_create_and_get_user(session: AsyncSession) -> None:
    user = await auth_service.create_user(
        session,
        username="Agent.One",
        password="long-enough-pw",
        role="agent",
        display_name="Agent One",
    )
    await session.commit()
    assert user.username == "agent.one"
    assert user.role is UserRole.AGENT
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$")
    loaded = await auth_service.get_user(session, user.id)
    assert loaded is not None
    assert loaded.display_name == "Agent One"
    assert await auth_service.get_user(session, uuid.uuid4()) is None


async def test_create_user_refuses_a_taken_name_in_any_case(session: AsyncSession) -> None:
    await create_user(session, username="dup")
    with pytest.raises(UsernameTaken):
        await auth_service.create_user(
            session, username="DUP", password="long-enough-pw", role="customer"
        )


async def test_password_hashing_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real_hash = security._password_hash.hash

    def recording_hash(password: str) -> str:
        threads.append(threading.current_thread())
        return real_hash(password)

    monkeypatch.setattr(security._password_hash, "hash", recording_hash)
    hashed = await security.hash_password("long-enough-pw")
    assert (await security.verify_password("long-enough-pw", hashed))[0] is True
    assert threads
    assert threads[0] is not threading.current_thread()


async def test_login_upgrades_a_hash_made_with_old_parameters(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, username="legacy")
    user.password_hash = Argon2Hasher(time_cost=1, memory_cost=8192, parallelism=1).hash(
        "correct-horse-battery"
    )
    await session.commit()
    user_id = user.id
    await login(client, "legacy")
    session.expire_all()
    refreshed = await auth_service.get_user(session, user_id)
    assert refreshed is not None
    assert refreshed.password_hash is not None
    assert "m=65536,t=3,p=4" in refreshed.password_hash


async def test_login_activity_is_written_at_most_once_a_minute(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    user = await create_user(session)
    started = utcnow() - timedelta(minutes=5)
    login_row = Login(
        user_id=user.id,
        created_at=started,
        last_activity_at=started,
        refresh_jti="jti",
        expires_at=started + timedelta(days=30),
    )
    session.add(login_row)
    await session.commit()

    async def touch_and_read(moment_offset: timedelta) -> object:
        async with sessionmaker() as work:
            await repository.touch_login(
                work, login_row.id, now=utcnow() + moment_offset, interval=timedelta(minutes=1)
            )
            await work.commit()
            reread = await repository.get_login(work, login_row.id)
            assert reread is not None
            return reread.last_activity_at

    first = await touch_and_read(timedelta(0))
    assert first != started
    assert await touch_and_read(timedelta(seconds=30)) == first  # too soon: unchanged
    assert await touch_and_read(timedelta(minutes=2)) != first


async def test_recently_touched_memo_skips_repeat_writes() -> None:
    memo = auth_service._RecentlyTouched(timedelta(minutes=1), max_entries=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert memo.due(first) is True
    assert memo.due(first) is False
    assert memo.due(second) is True
    assert memo.due(third) is True  # evicts the oldest entry
    assert memo.due(first) is True


async def test_sessions_show_refresh_activity(
    client: httpx.AsyncClient, session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await create_user(session, username="active")
    tokens = await login(client, "active")
    sid = uuid.UUID(claims_of(tokens["access_token"])["sid"])
    async with sessionmaker() as work:
        before = await repository.get_login(work, sid)
        assert before is not None
        opened = before.last_activity_at
    renewed = (
        await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    ).json()
    listed = (await client.get("/auth/sessions", headers=bearer(renewed["access_token"]))).json()
    (item,) = listed["items"]
    assert item["last_activity_at"] >= opened.isoformat().replace("+00:00", "Z")
    async with sessionmaker() as work:
        after = await repository.get_login(work, sid)
        assert after is not None
        assert after.last_activity_at > opened
