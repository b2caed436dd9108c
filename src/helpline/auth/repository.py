"""SQL of the auth domain: users, logins and API keys."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth.models import ApiKey, Login, User, UserRole
from helpline.core.database import DriverConnection, DriverStatement
from helpline.kit.pagination import paginate, split_page

# --- users -------------------------------------------------------------------------------


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


@dataclass(frozen=True, slots=True)
class UserStanding:
    """What a credential's check needs of its user, read without an ORM row."""

    id: uuid.UUID
    role: UserRole
    is_active: bool


_USER_STANDING = DriverStatement(
    select(User.id, User.role, User.is_active).where(User.id == bindparam("user_id"))
)


async def get_user_standing(
    connection: DriverConnection, user_id: uuid.UUID
) -> UserStanding | None:
    rows = await _USER_STANDING.fetch(connection, {"user_id": user_id})
    return UserStanding(*rows[0]) if rows else None


async def get_user_by_username(session: AsyncSession, username: str) -> User | None:
    result = await session.execute(select(User).where(User.username == username))
    return result.scalar_one_or_none()


async def get_user_by_external_id(session: AsyncSession, external_id: str) -> User | None:
    result = await session.execute(select(User).where(User.external_id == external_id))
    return result.scalar_one_or_none()


async def username_exists(session: AsyncSession, username: str) -> bool:
    result = await session.execute(select(exists().where(User.username == username)))
    return bool(result.scalar())


async def add_user(session: AsyncSession, user: User) -> User:
    session.add(user)
    await session.flush()
    return user


async def delete_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    # A bulk DELETE lets the database's ON DELETE CASCADE remove everything the user owns.
    await session.execute(delete(User).where(User.id == user_id))


async def list_users(
    session: AsyncSession, *, role: UserRole | None, limit: int, cursor: str | None
) -> tuple[list[User], str | None]:
    statement = select(User)
    if role is not None:
        statement = statement.where(User.role == role)
    statement = paginate(
        statement, sort_column=User.created_at, id_column=User.id, cursor=cursor, limit=limit
    )
    rows = list((await session.execute(statement)).scalars())
    return split_page(rows, limit=limit, sort_attr="created_at")


# --- logins ------------------------------------------------------------------------------


async def add_login(session: AsyncSession, login: Login) -> Login:
    session.add(login)
    await session.flush()
    return login


async def get_login(session: AsyncSession, login_id: uuid.UUID) -> Login | None:
    return await session.get(Login, login_id)


async def rotate_refresh_jti(
    session: AsyncSession,
    *,
    login_id: uuid.UUID,
    old_jti: str,
    new_jti: str,
    now: datetime,
    expires_at: datetime,
) -> bool:
    """Swap the login's refresh `jti` if `old_jti` is still the current one (atomic).

    Two requests racing with the same refresh token cannot both win: the second one's
    UPDATE matches no row once the first has changed `refresh_jti`.
    """
    result = await session.execute(
        update(Login)
        .where(
            Login.id == login_id,
            Login.refresh_jti == old_jti,
            Login.revoked_at.is_(None),
            Login.expires_at > now,
        )
        .values(refresh_jti=new_jti, last_activity_at=now, expires_at=expires_at)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def revoke_logins(
    session: AsyncSession, login_ids: Collection[uuid.UUID], *, now: datetime
) -> None:
    if not login_ids:
        return
    await session.execute(
        update(Login)
        .where(Login.id.in_(list(login_ids)), Login.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )


async def revoke_user_logins(
    session: AsyncSession, user_id: uuid.UUID, *, now: datetime, keep: uuid.UUID | None = None
) -> list[uuid.UUID]:
    """Revoke every live login of the user (except `keep`); returns the ids revoked."""
    statement = (
        update(Login)
        .where(Login.user_id == user_id, Login.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(Login.id)
        .execution_options(synchronize_session=False)
    )
    if keep is not None:
        statement = statement.where(Login.id != keep)
    result = await session.execute(statement)
    return list(result.scalars())


async def live_login_ids(session: AsyncSession, user_id: uuid.UUID) -> list[uuid.UUID]:
    result = await session.execute(
        select(Login.id).where(Login.user_id == user_id, Login.revoked_at.is_(None))
    )
    return list(result.scalars())


async def list_active_logins(
    session: AsyncSession, user_id: uuid.UUID, *, now: datetime
) -> Sequence[Login]:
    result = await session.execute(
        select(Login)
        .where(Login.user_id == user_id, Login.revoked_at.is_(None), Login.expires_at > now)
        .order_by(Login.last_activity_at.desc(), Login.id.desc())
    )
    return result.scalars().all()


_LOGIN_REVOKED_AT = DriverStatement(
    select(Login.revoked_at).where(Login.id == bindparam("login_id"))
)


async def is_login_revoked(connection: DriverConnection, login_id: uuid.UUID) -> bool:
    """True when the login was revoked or no longer exists (its user was deleted)."""
    rows = await _LOGIN_REVOKED_AT.fetch(connection, {"login_id": login_id})
    return not rows or rows[0].revoked_at is not None


# Activity is written only when the stored time is older than the interval.
_TOUCH_LOGIN = (
    update(Login)
    .where(Login.id == bindparam("login_id"), Login.last_activity_at < bindparam("stale_before"))
    .values(last_activity_at=bindparam("now"))
)
_TOUCH_LOGIN_ON_DRIVER = DriverStatement(_TOUCH_LOGIN)


def _touch_login_params(
    login_id: uuid.UUID, now: datetime, interval: timedelta
) -> dict[str, object]:
    return {"login_id": login_id, "stale_before": now - interval, "now": now}


async def touch_login(
    session: AsyncSession, login_id: uuid.UUID, *, now: datetime, interval: timedelta
) -> None:
    """Record activity, writing only when the stored time is older than `interval`."""
    await session.execute(
        _TOUCH_LOGIN.execution_options(synchronize_session=False),
        _touch_login_params(login_id, now, interval),
    )


async def touch_login_on(
    connection: DriverConnection, login_id: uuid.UUID, *, now: datetime, interval: timedelta
) -> None:
    """`touch_login` on a pooled connection, committed by itself."""
    await _TOUCH_LOGIN_ON_DRIVER.fetch(connection, _touch_login_params(login_id, now, interval))


# --- API keys ----------------------------------------------------------------------------


async def add_api_key(session: AsyncSession, api_key: ApiKey) -> ApiKey:
    session.add(api_key)
    await session.flush()
    return api_key


async def get_api_key_by_hash(session: AsyncSession, key_hash: str) -> ApiKey | None:
    result = await session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))
    return result.scalar_one_or_none()


async def get_user_api_key(
    session: AsyncSession, user_id: uuid.UUID, api_key_id: uuid.UUID
) -> ApiKey | None:
    result = await session.execute(
        select(ApiKey).where(
            ApiKey.id == api_key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)
        )
    )
    return result.scalar_one_or_none()


async def list_active_api_keys(session: AsyncSession, user_id: uuid.UUID) -> Sequence[ApiKey]:
    result = await session.execute(
        select(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    )
    return result.scalars().all()


async def touch_api_key(
    session: AsyncSession, api_key_id: uuid.UUID, *, now: datetime, interval: timedelta
) -> None:
    """Record use, writing only when the stored time is unset or older than `interval`."""
    await session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == api_key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - interval),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
