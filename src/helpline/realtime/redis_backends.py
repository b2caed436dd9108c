"""Redis implementations of the engine's backends, for several workers and instances.

- Broker: Redis pub/sub, one channel per conversation; an instance subscribes to a conversation's
  channel while it has local subscribers. Frames go to local subscribers first, so the clients of
  the instance running an answer keep getting it while Redis is away.
- Event log: a Redis Stream per answer (entry id `<seq>-0`) with a TTL, so `resume` works on
  any instance, also after the instance that generated the answer died.
- Leases: `SET NX PX`, renewed and released only by their owner (Lua compare-and-set).
- Control bus: one pub/sub channel; commands are handled locally at once and then published.

The subscriber loops reconnect with backoff after Redis restarts and resubscribe every channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from helpline.core.config import Settings
from helpline.realtime.backends import (
    Backends,
    ControlHandler,
    FrameListener,
    LocalSubscribers,
    Unsubscribe,
)
from helpline.realtime.frames import Frame

log = structlog.get_logger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# An answer's event in one round trip: appended to its log stream, then published to the
# conversation's channel (KEYS: stream, channel; ARGV: entry id, frame, publisher prefix, TTL or
# "" to leave the stream's TTL as it is).
_LOG_AND_PUBLISH = """
redis.call('XADD', KEYS[1], ARGV[1], 'f', ARGV[2])
if ARGV[4] ~= '' then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return redis.call('PUBLISH', KEYS[2], ARGV[3] .. ARGV[2])
"""
# The log's TTL is set with its first event and refreshed every so many after (and at the end).
TTL_REFRESH_EVERY = 256
RECONNECT_MAX_S = 2.0
# How long a new subscriber waits for Redis to confirm its conversation's subscription.
SUBSCRIBED_WAIT_S = 2.0
BREAKER_COOLDOWN_S = 1.0


class Breaker:
    """After a Redis failure, skip shared writes for a moment.

    Otherwise every token would wait out the client's retries while Redis is away; local
    delivery goes on regardless, and the log and fan-out resume once Redis answers again.
    """

    def __init__(self, cooldown_s: float = BREAKER_COOLDOWN_S) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self._open_until

    def trip(self, what: str, exc: Exception) -> None:
        if self.allows():
            log.warning("redis.unavailable", operation=what, error=str(exc))
        self._open_until = time.monotonic() + self.cooldown_s


class _Subscriber:
    """A pub/sub connection whose reader survives Redis restarts.

    It reads Redis's confirmations of its `SUBSCRIBE`s too: `subscribed` waits for the one of a
    channel, after which every message published to the channel reaches `on_message`.
    """

    def __init__(self, redis: Redis, name: str, on_message: Any) -> None:
        self.redis = redis
        self.name = name
        self.on_message = on_message
        self.pubsub: PubSub = redis.pubsub()
        self.channels: set[bytes] = set()
        self.connected = False
        self.failing = False  # Redis was lost and is not back yet (not: still connecting)
        # On the current connection: the `SUBSCRIBE`s of each channel not confirmed yet, and
        # the channels whose every `SUBSCRIBE` is.
        self._unconfirmed: Counter[bytes] = Counter()
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, set[asyncio.Future[None]]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self, *channels: bytes) -> None:
        self.channels.update(channels)
        self._task = asyncio.create_task(self._read_forever(), name=f"redis-{self.name}")

    def subscribe(self, channel: bytes) -> None:
        self.channels.add(channel)
        if self.connected:
            self._spawn(self._send_subscribe, channel)

    def unsubscribe(self, channel: bytes) -> None:
        # At once, not in the task: a `subscribed` right after must wait for the next SUBSCRIBE.
        self.channels.discard(channel)
        self._confirmed.discard(channel)
        if self.connected:
            self._spawn(self.pubsub.unsubscribe, channel)

    def _spawn(self, command: Callable[[bytes], Awaitable[Any]], channel: bytes) -> None:
        """Send a command in a task of its own (they start, and so are sent, in order); a
        failure is the reader's to see, and it resubscribes what `channels` holds."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await command(channel)

        task = asyncio.get_running_loop().create_task(send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def subscribed(self, channel: bytes, within_s: float = SUBSCRIBED_WAIT_S) -> None:
        """Return once Redis confirmed the channel's subscription; at once while Redis is
        away (the reader resubscribes when it is back), after `within_s` at most."""
        if channel in self._confirmed or self.failing:
            return
        confirmed = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(confirmed)
        try:
            done, _ = await asyncio.wait([confirmed], timeout=within_s)
            if not done:
                log.warning("redis.subscribe_unconfirmed", subscriber=self.name)
        finally:
            waiters.discard(confirmed)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    async def _send_subscribe(self, *channels: bytes) -> None:
        self._unconfirmed.update(channels)
        await self.pubsub.subscribe(*channels)

    def _on_confirmed(self, channel: bytes) -> None:
        left = self._unconfirmed[channel] - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return
        self._unconfirmed.pop(channel, None)
        if channel not in self.channels:  # unsubscribed meanwhile
            return
        self._confirmed.add(channel)
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _disconnected(self, *, failing: bool) -> None:
        self.connected = False
        self.failing = failing
        self._unconfirmed.clear()
        self._confirmed.clear()
        # Nobody waits out an outage: local delivery goes on meanwhile.
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _read_forever(self) -> None:
        delay = 0.05
        while True:
            try:
                if not self.connected:
                    await self.pubsub.aclose()  # type: ignore[no-untyped-call]
                    self.pubsub = self.redis.pubsub()
                    channels = set(self.channels)
                    if channels:
                        await self._send_subscribe(*channels)
                    else:
                        await self.pubsub.ping()
                    self.connected, self.failing = True, False
                    # `subscribe()` left channels added while we connected to us.
                    if missed := self.channels - channels:
                        await self._send_subscribe(*missed)
                    delay = 0.05
                    log.info("redis.subscriber_connected", subscriber=self.name)
                message = await self.pubsub.get_message(timeout=1.0)
                if message is None:
                    if not self.channels:
                        await asyncio.sleep(0.5)
                elif message["type"] == "message":
                    self.on_message(message["data"])
                elif message["type"] == "subscribe":
                    self._on_confirmed(message["channel"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("redis.subscriber_lost", subscriber=self.name, error=str(exc))
                self._disconnected(failing=True)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)

    async def close(self) -> None:
        for task in [*self._sending, *([self._task] if self._task is not None else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._disconnected(failing=False)
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisBroker:
    def __init__(self, redis: Redis, prefix: str, instance_id: bytes, breaker: Breaker) -> None:
        self.redis = redis
        self.breaker = breaker
        self.prefix = prefix
        self.instance_id = instance_id
        self.local = LocalSubscribers()
        self._subscriber = _Subscriber(redis, "broker", self._on_message)

    def channel(self, conversation_id: uuid.UUID) -> bytes:
        return f"{self.prefix}conv:{conversation_id}".encode()

    def subscribe(self, conversation_id: uuid.UUID, listener: FrameListener) -> Unsubscribe:
        first = self.local.count(conversation_id) == 0
        remove = self.local.add(conversation_id, listener)
        if first:
            self._subscriber.subscribe(self.channel(conversation_id))

        def unsubscribe() -> None:
            remove()
            if self.local.count(conversation_id) == 0:
                self._subscriber.unsubscribe(self.channel(conversation_id))

        return unsubscribe

    async def subscribed(self, conversation_id: uuid.UUID) -> None:
        await self._subscriber.subscribed(self.channel(conversation_id))

    async def publish(self, frame: Frame) -> None:
        self.local.deliver(frame)
        if not self.breaker.allows():
            return
        try:
            await self.redis.publish(
                self.channel(frame.conversation_id), self.instance_id + b"|" + frame.to_wire()
            )
        except Exception as exc:
            self.breaker.trip("publish", exc)

    def _on_message(self, data: bytes) -> None:
        origin, _, wire = data.partition(b"|")
        if origin == self.instance_id:
            return
        self.local.deliver(Frame.from_wire(wire))

    def local_subscriber_count(self, conversation_id: uuid.UUID) -> int:
        return self.local.count(conversation_id)

    async def start(self) -> None:
        await self._subscriber.start()

    async def close(self) -> None:
        await self._subscriber.close()

    async def healthy(self) -> bool:
        return self._subscriber.connected


class RedisEventLog:
    def __init__(self, redis: Redis, prefix: str, retention_s: int, breaker: Breaker) -> None:
        self.redis = redis
        self.breaker = breaker
        self.prefix = prefix
        self.retention_s = retention_s

    def key(self, message_id: uuid.UUID) -> str:
        return f"{self.prefix}log:{message_id}"

    async def append(self, message_id: uuid.UUID, frame: Frame) -> None:
        if not self.breaker.allows():
            return
        key = self.key(message_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {b"f": frame.to_wire()}, id=f"{frame.seq}-0")
                pipe.expire(key, self.retention_s)
                await pipe.execute()
        except Exception as exc:
            self.breaker.trip("event_log", exc)

    async def read_after(self, message_id: uuid.UUID, after_seq: int) -> list[Frame] | None:
        key = self.key(message_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.xrange(key, min=f"{after_seq + 1}-0", max="+")
            exists, entries = await pipe.execute()
        if not exists:
            return None
        return [Frame.from_wire(fields[b"f"]) for _, fields in entries]

    async def seal(self, message_id: uuid.UUID) -> None:
        await self.redis.expire(self.key(message_id), self.retention_s)

    async def close(self) -> None:
        return None


class RedisLeaseStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        return f"{self.prefix}lease:{key}"

    async def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(await self.redis.set(self._key(key), owner, nx=True, px=int(ttl_s * 1000)))

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(await self._renew(keys=[self._key(key)], args=[owner, int(ttl_s * 1000)]))

    async def release(self, key: str, owner: str) -> None:
        await self._release(keys=[self._key(key)], args=[owner])

    async def holder(self, key: str) -> str | None:
        value = await self.redis.get(self._key(key))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)


class RedisControlBus:
    def __init__(self, redis: Redis, prefix: str, instance_id: bytes, breaker: Breaker) -> None:
        self.redis = redis
        self.breaker = breaker
        self.channel = f"{prefix}control".encode()
        self.instance_id = instance_id
        self._handlers: list[ControlHandler] = []
        self._subscriber = _Subscriber(redis, "control", self._on_message)
        self._pending: set[asyncio.Task[None]] = set()

    async def send(self, command: dict[str, Any]) -> None:
        await self._dispatch(command)
        if not self.breaker.allows():
            return
        try:
            await self.redis.publish(self.channel, self.instance_id + b"|" + orjson.dumps(command))
        except Exception as exc:
            self.breaker.trip("control", exc)

    def listen(self, handler: ControlHandler) -> None:
        self._handlers.append(handler)

    def _on_message(self, data: bytes) -> None:
        origin, _, payload = data.partition(b"|")
        if origin == self.instance_id:
            return
        task = asyncio.get_running_loop().create_task(self._dispatch(orjson.loads(payload)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _dispatch(self, command: dict[str, Any]) -> None:
        for handler in self._handlers:
            try:
                await handler(command)
            except Exception:
                log.exception("realtime.control_handler_failed", command=command.get("kind"))

    async def start(self) -> None:
        await self._subscriber.start(self.channel)

    async def close(self) -> None:
        await self._subscriber.close()


class RedisBackends(Backends):
    """The Redis backends; an answer's event is logged and published in one round trip."""

    def __init__(
        self,
        redis: Redis,
        *,
        broker: RedisBroker,
        event_log: RedisEventLog,
        leases: RedisLeaseStore,
        control: RedisControlBus,
        breaker: Breaker,
    ) -> None:
        super().__init__(
            broker=broker, event_log=event_log, leases=leases, control=control, shared=True
        )
        self.redis_broker = broker
        self.redis_log = event_log
        self.breaker = breaker
        self._log_and_publish = redis.register_script(_LOG_AND_PUBLISH)

    async def log_and_publish(self, message_id: uuid.UUID, frame: Frame) -> None:
        if self.breaker.allows():
            seq = frame.seq or 0
            refresh_ttl = seq % TTL_REFRESH_EVERY == 1 or frame.is_final
            try:
                await self._log_and_publish(
                    keys=[
                        self.redis_log.key(message_id),
                        self.redis_broker.channel(frame.conversation_id),
                    ],
                    args=[
                        f"{seq}-0",
                        frame.to_wire(),
                        self.redis_broker.instance_id + b"|",
                        self.redis_log.retention_s if refresh_ttl else "",
                    ],
                )
            except Exception as exc:
                self.breaker.trip("log_and_publish", exc)
        # Local clients get it in any case: an answer keeps streaming while Redis is away.
        self.redis_broker.local.deliver(frame)


def create_redis_backends(redis: Redis, settings: Settings) -> Backends:
    prefix = f"{settings.redis_key_prefix}rt:"
    instance_id = uuid.uuid4().hex.encode()
    breaker = Breaker()
    return RedisBackends(
        redis,
        broker=RedisBroker(redis, prefix, instance_id, breaker),
        event_log=RedisEventLog(redis, prefix, settings.event_log_ttl_s, breaker),
        leases=RedisLeaseStore(redis, prefix),
        control=RedisControlBus(redis, prefix, instance_id, breaker),
        breaker=breaker,
    )
