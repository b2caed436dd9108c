"""The derived-value cache: TTLs, namespace invalidation, versioned keys, shared through Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from helpline.core.cache import Cache, MemoryCache, RedisCache, cached, make_key
from tests.conftest import REDIS_URL


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, redis: Redis) -> Cache:
    if request.param == "memory":
        return MemoryCache()
    return RedisCache(redis, f"helpline-test:{uuid.uuid4().hex[:8]}:")


async def test_set_then_get_round_trips_json(cache: Cache) -> None:
    await cache.set("embeddings", "k", {"vector": [0.5, 1.0], "model": "m"}, ttl_s=10)
    assert await cache.get("embeddings", "k") == {"vector": [0.5, 1.0], "model": "m"}
    assert await cache.get("embeddings", "other") is None


async def test_entries_expire(cache: Cache) -> None:
    await cache.set("ns", "k", 1, ttl_s=0.05)
    await asyncio.sleep(0.1)
    assert await cache.get("ns", "k") is None


async def test_invalidate_drops_only_that_namespace(cache: Cache) -> None:
    await cache.set("search", "q", [1], ttl_s=10)
    await cache.set("embeddings", "q", [2], ttl_s=10)
    await cache.invalidate("search")
    assert await cache.get("search", "q") is None
    assert await cache.get("embeddings", "q") == [2]
    await cache.set("search", "q", [3], ttl_s=10)
    assert await cache.get("search", "q") == [3]


async def test_invalidation_reaches_every_instance_on_redis(redis: Redis) -> None:
    prefix = f"helpline-test:{uuid.uuid4().hex[:8]}:"
    first, second = RedisCache(redis, prefix), RedisCache(redis, prefix)
    await first.set("search", "q", "old", ttl_s=10)
    assert await second.get("search", "q") == "old"
    await second.invalidate("search")
    assert await first.get("search", "q") is None


async def test_memory_cache_is_bounded() -> None:
    cache = MemoryCache(max_entries=3)
    for index in range(5):
        await cache.set("ns", str(index), index, ttl_s=10)
    assert await cache.get("ns", "0") is None
    assert await cache.get("ns", "4") == 4


async def test_unreachable_redis_is_a_miss_not_an_error() -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        cache = RedisCache(client, "x:")
        await cache.set("ns", "k", 1, ttl_s=10)
        assert await cache.get("ns", "k") is None
    finally:
        await client.aclose()


async def test_cached_calls_through_once_per_key_and_version(cache: Cache) -> None:
    calls: list[tuple[str, int]] = []

    @cached("search", ttl_s=10, cache=lambda: cache)
    async def search(query: str, version: int) -> list[str]:
        calls.append((query, version))
        return [f"{query}@{version}"]

    assert await search("refund", 1) == ["refund@1"]
    assert await search("refund", 1) == ["refund@1"]
    # A new knowledge-base version is a new key: never the stale result.
    assert await search("refund", 2) == ["refund@2"]
    assert calls == [("refund", 1), ("refund", 2)]


async def test_cached_without_a_cache_calls_through() -> None:
    calls = 0

    @cached("ns", ttl_s=10, cache=lambda: None)
    async def compute() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await compute() == 1
    assert await compute() == 2


def test_keys_are_stable_and_order_insensitive_for_keywords() -> None:
    assert make_key("f", (1,), {"a": 1, "b": 2}) == make_key("f", (1,), {"b": 2, "a": 1})
    assert make_key("f", (1,), {}) != make_key("f", (2,), {})
