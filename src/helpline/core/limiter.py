"""Rate limiting on the `limits` library's async API.

Moving windows (a fixed window lets 2N through across its boundary), stored in Redis when
`REDIS_URL` is set so that a limit holds across every instance, in memory otherwise.
SlowAPI is not used: it calls its storage synchronously (a blocking Redis round trip on the
event loop per check) and skips WebSocket scopes.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helpline.core import metrics
from helpline.core.config import Settings
from helpline.core.errors import RateLimited, ServiceUnavailable, error_response

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LimitStatus:
    allowed: bool
    limit: int
    remaining: int
    reset_at: float  # epoch seconds when a slot frees up

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_at - time.time()))

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class InProcessStorage(MemoryStorage):
    """`limits`' in-process storage, sweeping expired entries on the loop at most once a second.

    Upstream starts a sweep on nearly every hit and runs each key's binary search in a thread
    (`asyncio.to_thread`): a thread round trip per key per check, which dominated the CPU of a
    check and took the GIL from the loop (`bench/realtime.py ratelimit`). The sweep only frees
    memory — a check reads the entries inside its own window — so once a second is enough.
    """

    SWEEP_INTERVAL_S = 1.0
    _next_sweep = 0.0

    # Replaces the base class's private scheduler (name-mangled), which its hits call.
    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_INTERVAL_S
            self.sweep_expired()

    def sweep_expired(self) -> None:
        """Drop expired window entries and counters (synchronous: no hit runs meanwhile)."""
        now = time.time()
        for key, entries in list(self.events.items()):
            # Newest first: the expired ones are a tail.
            del entries[bisect.bisect_left(entries, -now, key=lambda entry: -entry.expiry) :]
            if not entries:
                del self.events[key]
                self.locks.pop(key, None)
        for key, expires_at in list(self.expirations.items()):
            if expires_at <= now:
                self.storage.pop(key, None)
                del self.expirations[key]
                self.locks.pop(key, None)


def create_storage(settings: Settings) -> Storage:
    """Redis storage when `REDIS_URL` is set, in-process memory otherwise."""
    if settings.redis_url:
        url = settings.redis_url.replace("redis://", "async+redis://", 1).replace(
            "rediss://", "async+rediss://", 1
        )
        storage = storage_from_string(
            url,
            implementation="redispy",
            key_prefix=f"{settings.redis_key_prefix}limits",
            socket_connect_timeout=2.0,
            socket_timeout=2.0,
        )
        assert isinstance(storage, Storage)
        return storage
    return InProcessStorage()


class RateLimiter:
    """Checks and counts hits against limit strings such as `20/minute`."""

    def __init__(self, storage: Storage, *, fail_open: bool = True) -> None:
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)
        self.fail_open = fail_open

    @staticmethod
    def parse(limit: str) -> RateLimitItem:
        return parse(limit)

    async def hit(
        self, limit: str | RateLimitItem, *identifiers: str, cost: int = 1
    ) -> LimitStatus:
        """Count one hit (or `cost`) and say whether it was allowed."""
        item = parse(limit) if isinstance(limit, str) else limit
        try:
            allowed = await self.strategy.hit(item, *identifiers, cost=cost)
            stats = await self.strategy.get_window_stats(item, *identifiers)
        except Exception as exc:
            return self._storage_failed(item, exc)
        return LimitStatus(allowed, item.amount, stats.remaining, stats.reset_time)

    async def peek(self, limit: str | RateLimitItem, *identifiers: str) -> LimitStatus:
        """Whether one more hit would be allowed, without counting it."""
        item = parse(limit) if isinstance(limit, str) else limit
        try:
            allowed = await self.strategy.test(item, *identifiers)
            stats = await self.strategy.get_window_stats(item, *identifiers)
        except Exception as exc:
            return self._storage_failed(item, exc)
        return LimitStatus(allowed, item.amount, stats.remaining, stats.reset_time)

    async def clear(self, limit: str | RateLimitItem, *identifiers: str) -> None:
        item = parse(limit) if isinstance(limit, str) else limit
        try:
            await self.strategy.clear(item, *identifiers)
        except Exception:
            log.warning("ratelimit.clear_failed", exc_info=True)

    def _storage_failed(self, item: RateLimitItem, exc: Exception) -> LimitStatus:
        log.warning("ratelimit.storage_unavailable", error=str(exc), fail_open=self.fail_open)
        if self.fail_open:
            return LimitStatus(True, item.amount, item.amount, time.time() + item.get_expiry())
        raise ServiceUnavailable("Rate limiting is unavailable; try again shortly") from exc

    async def enforce(self, limit: str | RateLimitItem, *identifiers: str) -> LimitStatus:
        """`hit`, raising `429 RATE_LIMITED` (with the SPEC headers) when over the limit."""
        status = await self.hit(limit, *identifiers)
        if not status.allowed:
            raise RateLimited(
                f"Rate limit exceeded: {limit}; retry in {status.retry_after} s",
                headers=status.headers(),
            )
        return status


KeyFunc = Callable[[HTTPConnection], str]
EXEMPT_PREFIXES = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json")


class RateLimitMiddleware:
    """`RATE_LIMIT_DEFAULT` on every API request, keyed by `key_func` (user, else client IP).

    SlowAPI's conventions: `X-RateLimit-Limit/Remaining/Reset` on every limited response,
    `429 RATE_LIMITED` with `Retry-After` past the limit. Probes, metrics and docs are exempt;
    WebSocket frames have limits of their own.
    """

    def __init__(self, app: ASGIApp, key_func: KeyFunc) -> None:
        self.app = app
        self.key_func = key_func

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        limiter: RateLimiter = state.limiter
        limit: str = state.settings.rate_limit_default
        key = self.key_func(HTTPConnection(scope))
        try:
            status = await limiter.hit(limit, "api", key)
        except ServiceUnavailable as exc:  # storage down and RATE_LIMIT_FAIL_OPEN=false
            response = error_response(exc.status_code, exc.code, exc.message)
            await response(scope, receive, send)
            return
        headers = status.headers()
        if not status.allowed:
            metrics.RATE_LIMITED.labels(scope="api").inc()
            response = error_response(
                429,
                "RATE_LIMITED",
                f"Rate limit exceeded: {limit}; retry in {status.retry_after} s",
                headers=headers,
            )
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in headers.items():
                    response_headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
