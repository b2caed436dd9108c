"""The shared Redis client (only when `REDIS_URL` is set)."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from helpline.core.config import Settings

# A reply slower than this is a dead connection (pub/sub readers wait in shorter reads).
SOCKET_TIMEOUT_S = 5.0


def create_redis(settings: Settings) -> Redis | None:
    """A pooled client that retries briefly and reconnects after Redis restarts."""
    if not settings.redis_url:
        return None
    client: Redis = Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return client


async def ping(redis: Redis) -> float:
    """Round-trip a PING; returns the latency in milliseconds."""
    started = time.perf_counter()
    await redis.ping()
    return (time.perf_counter() - started) * 1000
