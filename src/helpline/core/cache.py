"""A cache for values that are derived and versioned (query embeddings, search results, …).

Keys carry what the value was derived from (e.g. the knowledge base's version), so a cache can
never serve something stale: a new version is a new key, and the old entries simply expire.
Namespaces can also be invalidated at once: each namespace has a generation number that is part
of every key, and invalidating bumps it (O(1), no key scan, atomic across instances on Redis).

`create_cache` picks Redis when `REDIS_URL` is set (shared by every instance), memory otherwise.
Values are JSON-encodable; a cache failure is logged and treated as a miss, never an error.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar

import orjson
import structlog
from redis.asyncio import Redis

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MEMORY_MAX_ENTRIES = 10_000


class Cache(Protocol):
    async def get(self, namespace: str, key: str) -> Any | None: ...

    async def set(self, namespace: str, key: str, value: Any, ttl_s: float) -> None: ...

    async def invalidate(self, namespace: str) -> None:
        """Drop every entry of `namespace` (on every instance sharing the cache)."""
        ...


class MemoryCache:
    """Per process, bounded (least recently used entries go first)."""

    def __init__(self, max_entries: int = MEMORY_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int, str], tuple[float, bytes]] = OrderedDict()
        self._generations: dict[str, int] = {}

    async def get(self, namespace: str, key: str) -> Any | None:
        entry_key = (namespace, self._generations.get(namespace, 0), key)
        entry = self._entries.get(entry_key)
        if entry is None:
            return None
        expires, raw = entry
        if expires <= time.monotonic():
            del self._entries[entry_key]
            return None
        self._entries.move_to_end(entry_key)
        return orjson.loads(raw)

    async def set(self, namespace: str, key: str, value: Any, ttl_s: float) -> None:
        entry_key = (namespace, self._generations.get(namespace, 0), key)
        self._entries[entry_key] = (time.monotonic() + ttl_s, orjson.dumps(value))
        self._entries.move_to_end(entry_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def invalidate(self, namespace: str) -> None:
        self._generations[namespace] = self._generations.get(namespace, 0) + 1
        for entry_key in [k for k in self._entries if k[0] == namespace]:
            del self._entries[entry_key]


class RedisCache:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{prefix}cache:"

    async def _generation(self, namespace: str) -> int:
        value = await self.redis.get(f"{self.prefix}{namespace}:gen")
        return int(value or 0)

    async def get(self, namespace: str, key: str) -> Any | None:
        try:
            generation = await self._generation(namespace)
            raw = await self.redis.get(f"{self.prefix}{namespace}:{generation}:{key}")
        except Exception as exc:
            log.warning("cache.unavailable", operation="get", error=str(exc))
            return None
        return None if raw is None else orjson.loads(raw)

    async def set(self, namespace: str, key: str, value: Any, ttl_s: float) -> None:
        try:
            generation = await self._generation(namespace)
            await self.redis.set(
                f"{self.prefix}{namespace}:{generation}:{key}",
                orjson.dumps(value),
                px=max(1, int(ttl_s * 1000)),
            )
        except Exception as exc:
            log.warning("cache.unavailable", operation="set", error=str(exc))

    async def invalidate(self, namespace: str) -> None:
        # Entries of older generations are never read again and expire by their TTL.
        await self.redis.incr(f"{self.prefix}{namespace}:gen")


def create_cache(redis: Redis | None, prefix: str) -> Cache:
    return RedisCache(redis, prefix) if redis is not None else MemoryCache()


def make_key(*parts: object) -> str:
    """A short, stable key for arbitrary (JSON-encodable) arguments."""
    raw = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(raw).hexdigest()[:32]


def cached(
    namespace: str,
    *,
    ttl_s: float,
    cache: Callable[[], Cache | None],
    encode: Callable[[R], Any] | None = None,
    decode: Callable[[Any], R] | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Cache an async function's result under a key made of all its arguments.

    Put what the value derives from (a version, a model name) among the arguments, so the key
    changes whenever the value would. `cache` is called at each use, so the cache can be the
    one of whichever app is running (`None`: call through).
    """

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            store = cache()
            if store is None:
                return await function(*args, **kwargs)
            key = make_key(function.__qualname__, args, kwargs)
            hit = await store.get(namespace, key)
            if hit is not None:
                return decode(hit) if decode is not None else hit
            value = await function(*args, **kwargs)
            await store.set(namespace, key, encode(value) if encode else value, ttl_s)
            return value

        return wrapper

    return decorate
