"""Small typed factories shared by every domain's tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth.models import User, UserRole
from helpline.auth.security import hash_password
from helpline.core.config import Settings
from helpline.core.database import create_engine, create_sessionmaker

DEFAULT_PASSWORD = "correct-horse-battery"

# argon2 is slow on purpose; one hash per distinct password keeps the suite fast.
_password_hashes: dict[str, str] = {}


async def _hash(password: str) -> str:
    if password not in _password_hashes:
        _password_hashes[password] = await hash_password(password)
    return _password_hashes[password]


async def create_user(
    session: AsyncSession,
    *,
    role: UserRole | str = "customer",
    username: str | None = None,
    password: str | None = DEFAULT_PASSWORD,
    email: str | None = None,
    display_name: str | None = None,
    is_active: bool = True,
    is_guest: bool = False,
) -> User:
    """A committed user; `password=None` makes one without a password (like a guest)."""
    user = User(
        username=(username or f"user-{uuid.uuid4().hex[:12]}").lower(),
        role=UserRole(role),
        password_hash=await _hash(password) if password is not None else None,
        email=email,
        display_name=display_name,
        is_active=is_active,
        is_guest=is_guest,
    )
    session.add(user)
    await session.commit()
    return user


async def login(
    client: httpx.AsyncClient, username: str, password: str = DEFAULT_PASSWORD
) -> dict[str, Any]:
    """Sign in through `/auth/token`; the token pair."""
    response = await client.post("/auth/token", data={"username": username, "password": password})
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def open_session(settings: Settings) -> AsyncIterator[AsyncSession]:
    """A session on its own engine, in the caller's event loop (a live server has its own)."""
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            yield session
    finally:
        await engine.dispose()
