"""Is this login revoked? Answered on every authenticated request, so it has to be cheap.

`Revocations` (on `app.state.revocations`) wraps one backend in a short in-process cache:

- `RedisRevocationBackend` when Redis is configured: one key per revoked login, kept as long as
  a refresh token could live, shared by every instance. If Redis cannot be reached, the lookup
  falls back to the database rather than letting a revoked token through.
- `DatabaseRevocationBackend` otherwise: the login row's `revoked_at` (a missing row — its user
  was deleted — counts as revoked).

The database row is always the record: the revoking transaction writes `revoked_at`, and once it
has committed the service calls `Revocations.revoke`, which marks the logins in the backend,
updates this process's cache at once and notifies the listeners (the realtime layer closes the
sockets of those logins). Other instances see the change within `REVOCATION_CACHE_S`.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from helpline.auth import repository
from helpline.core.config import Settings
from helpline.core.database import driver_connection

log = structlog.get_logger(__name__)

CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class RevocationNotice:
    """Logins that were just revoked; `login_ids` None means every login of the user."""

    user_id: uuid.UUID
    login_ids: frozenset[uuid.UUID] | None


RevocationListener = Callable[[RevocationNotice], Awaitable[None]]


class RevocationBackend(Protocol):
    async def is_revoked(self, login_id: uuid.UUID) -> bool: ...

    async def mark_revoked(self, login_ids: Collection[uuid.UUID]) -> None: ...


class DatabaseRevocationBackend:
    """Reads the login row; nothing to mark, the revoking transaction already wrote it."""

    def __init__(self, database: AsyncEngine) -> None:
        self.database = database

    async def is_revoked(self, login_id: uuid.UUID) -> bool:
        # A statement on the driver: an ORM session costs three times the CPU.
        async with driver_connection(self.database) as connection:
            return await repository.is_login_revoked(connection, login_id)

    async def mark_revoked(self, login_ids: Collection[uuid.UUID]) -> None:
        del login_ids


class RedisRevocationBackend:
    """A key per revoked login under `REDIS_KEY_PREFIX`, expiring with the longest token."""

    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str,
        ttl_s: int,
        fallback: DatabaseRevocationBackend,
    ) -> None:
        self.redis = redis
        self.key_prefix = f"{key_prefix}auth:revoked:"
        self.ttl_s = ttl_s
        self.fallback = fallback

    def key(self, login_id: uuid.UUID) -> str:
        return f"{self.key_prefix}{login_id}"

    async def is_revoked(self, login_id: uuid.UUID) -> bool:
        try:
            return bool(await self.redis.exists(self.key(login_id)))
        except RedisError as exc:
            log.warning("auth.revocation_redis_unavailable", error=type(exc).__name__)
            return await self.fallback.is_revoked(login_id)

    async def mark_revoked(self, login_ids: Collection[uuid.UUID]) -> None:
        if not login_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for login_id in login_ids:
                pipe.set(self.key(login_id), b"1", ex=self.ttl_s)
            await pipe.execute()


@dataclass(slots=True)
class _CacheEntry:
    revoked: bool
    fresh_until: float


class Revocations:
    """The revocation lookup every authenticated request and socket goes through."""

    def __init__(self, backend: RevocationBackend, *, cache_ttl_s: float) -> None:
        self.backend = backend
        self.cache_ttl_s = cache_ttl_s
        self._cache: OrderedDict[uuid.UUID, _CacheEntry] = OrderedDict()
        self._listeners: list[RevocationListener] = []

    async def is_revoked(self, login_id: uuid.UUID) -> bool:
        """Whether tokens of this login must be refused."""
        now = time.monotonic()
        entry = self._cache.get(login_id)
        # A revocation is final, so a cached "revoked" never goes stale.
        if entry is not None and (entry.revoked or entry.fresh_until > now):
            return entry.revoked
        revoked = await self.backend.is_revoked(login_id)
        if revoked or self.cache_ttl_s > 0:
            self._remember(login_id, revoked, now + self.cache_ttl_s)
        return revoked

    async def revoke(
        self,
        *,
        user_id: uuid.UUID,
        login_ids: Collection[uuid.UUID],
        all_logins: bool = False,
    ) -> None:
        """Publish revocations that are committed in the database; then tell the listeners.

        `all_logins` says the user lost every login at once (deactivation, deletion), so
        listeners should drop all of the user's connections, API-key ones included.
        """
        ids = frozenset(login_ids)
        for login_id in ids:
            self._remember(login_id, True, float("inf"))
        try:
            await self.backend.mark_revoked(ids)
        except Exception:
            # The rows are revoked; refresh is refused, but other instances may accept the
            # access tokens until they expire. Loud, because that needs an operator.
            log.exception("auth.revocation_publish_failed", login_count=len(ids))
        notice = RevocationNotice(user_id=user_id, login_ids=None if all_logins else ids)
        for listener in list(self._listeners):
            try:
                await listener(notice)
            except Exception:
                log.exception("auth.revocation_listener_failed")

    def subscribe(self, listener: RevocationListener) -> None:
        """Call `listener` after each committed revocation made by this process."""
        self._listeners.append(listener)

    def _remember(self, login_id: uuid.UUID, revoked: bool, fresh_until: float) -> None:
        self._cache[login_id] = _CacheEntry(revoked, fresh_until)
        self._cache.move_to_end(login_id)
        while len(self._cache) > CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)


def create_revocations(
    settings: Settings,
    *,
    redis: Redis | None,
    database: AsyncEngine,
) -> Revocations:
    """Redis-backed when a Redis client exists, database-backed otherwise; cached either way."""
    rows = DatabaseRevocationBackend(database)
    backend: RevocationBackend = rows
    if redis is not None:
        backend = RedisRevocationBackend(
            redis,
            key_prefix=settings.redis_key_prefix,
            ttl_s=settings.refresh_token_expire_days * 86_400,
            fallback=rows,
        )
    return Revocations(backend, cache_ttl_s=settings.revocation_cache_s)
