"""The generation engine's shared state, behind four small interfaces.

- `Broker`: fan-out of a conversation's frames to every subscriber on every instance.
- `EventLog`: the per-answer log of events, so `resume` / `Last-Event-ID` replay what was missed.
- `LeaseStore`: who runs an answer; a lease that stops being renewed expires, so another instance
  can see that the answer died.
- `ControlBus`: commands addressed to whichever instance can act on them (cancel an answer,
  close a user's sockets).

`create_backends` is the one place that chooses the implementation: in-process here, Redis
(`helpline.realtime.redis_backends`) when `REDIS_URL` is set. Nothing above these interfaces
assumes one process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis

from helpline.core.config import Settings
from helpline.realtime.frames import Frame

log = structlog.get_logger(__name__)

FrameListener = Callable[[Frame], None]
ControlHandler = Callable[[dict[str, Any]], Awaitable[None]]
Unsubscribe = Callable[[], None]


class Broker(Protocol):
    def subscribe(self, conversation_id: uuid.UUID, listener: FrameListener) -> Unsubscribe:
        """Call `listener` (synchronously, it must not block) for each frame of the conversation."""
        ...

    async def subscribed(self, conversation_id: uuid.UUID) -> None:
        """Return once a frame of the conversation published on any instance from now on
        reaches this instance's subscribers (call after `subscribe`). Bounded: while the
        shared backend is away it returns at once, as local delivery goes on without it."""
        ...

    async def publish(self, frame: Frame) -> None:
        """Deliver to local subscribers at once, then to the other instances."""
        ...

    def local_subscriber_count(self, conversation_id: uuid.UUID) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def healthy(self) -> bool: ...


class EventLog(Protocol):
    async def append(self, message_id: uuid.UUID, frame: Frame) -> None: ...

    async def read_after(self, message_id: uuid.UUID, after_seq: int) -> list[Frame] | None:
        """The answer's events with `seq > after_seq`; None when the log is unknown or expired."""
        ...

    async def seal(self, message_id: uuid.UUID) -> None:
        """The answer ended: keep its log for the retention time, then drop it."""
        ...

    async def close(self) -> None: ...


class LeaseStore(Protocol):
    async def acquire(self, key: str, owner: str, ttl_s: float) -> bool: ...

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool: ...

    async def release(self, key: str, owner: str) -> None: ...

    async def holder(self, key: str) -> str | None: ...


class ControlBus(Protocol):
    async def send(self, command: dict[str, Any]) -> None:
        """Deliver `command` to the handlers of every instance (this one included)."""
        ...

    def listen(self, handler: ControlHandler) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalSubscribers:
    """This process's listeners per conversation (used by every broker for local delivery)."""

    def __init__(self) -> None:
        self._listeners: dict[uuid.UUID, dict[int, FrameListener]] = {}
        self._next = 0

    def add(self, conversation_id: uuid.UUID, listener: FrameListener) -> Unsubscribe:
        token = self._next
        self._next += 1
        self._listeners.setdefault(conversation_id, {})[token] = listener

        def remove() -> None:
            listeners = self._listeners.get(conversation_id)
            if listeners is not None:
                listeners.pop(token, None)
                if not listeners:
                    del self._listeners[conversation_id]

        return remove

    def deliver(self, frame: Frame) -> None:
        listeners = self._listeners.get(frame.conversation_id)
        if not listeners:
            return
        for listener in tuple(listeners.values()):
            try:
                listener(frame)
            except Exception:
                log.exception(
                    "realtime.listener_failed", conversation_id=str(frame.conversation_id)
                )

    def count(self, conversation_id: uuid.UUID) -> int:
        return len(self._listeners.get(conversation_id, ()))

    def conversations(self) -> list[uuid.UUID]:
        return list(self._listeners)


class MemoryBroker:
    """One process: publishing is delivering."""

    def __init__(self) -> None:
        self.local = LocalSubscribers()

    def subscribe(self, conversation_id: uuid.UUID, listener: FrameListener) -> Unsubscribe:
        return self.local.add(conversation_id, listener)

    async def subscribed(self, conversation_id: uuid.UUID) -> None:
        del conversation_id  # subscribing here is done once `subscribe` returns

    async def publish(self, frame: Frame) -> None:
        self.local.deliver(frame)

    def publish_now(self, frame: Frame) -> None:
        self.local.deliver(frame)

    def local_subscriber_count(self, conversation_id: uuid.UUID) -> int:
        return self.local.count(conversation_id)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def healthy(self) -> bool:
        return True


class MemoryEventLog:
    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self._events: dict[uuid.UUID, list[Frame]] = {}
        self._expires: dict[uuid.UUID, float] = {}

    async def append(self, message_id: uuid.UUID, frame: Frame) -> None:
        self.append_now(message_id, frame)

    def append_now(self, message_id: uuid.UUID, frame: Frame) -> None:
        self._events.setdefault(message_id, []).append(frame)

    async def read_after(self, message_id: uuid.UUID, after_seq: int) -> list[Frame] | None:
        self._purge()
        events = self._events.get(message_id)
        if events is None:
            return None
        return [frame for frame in events if (frame.seq or 0) > after_seq]

    async def seal(self, message_id: uuid.UUID) -> None:
        # Re-inserted, so `_expires` stays in expiry order (one retention for all).
        self._expires.pop(message_id, None)
        self._expires[message_id] = time.monotonic() + self.retention_s
        self._purge()

    def _purge(self) -> None:
        """Drop the expired logs: the oldest first, stopping at the first one still kept (a
        scan of every sealed log per seal grew with the hour of answers kept)."""
        now = time.monotonic()
        expired: list[uuid.UUID] = []
        for message_id, at in self._expires.items():
            if at > now:
                break
            expired.append(message_id)
        for message_id in expired:
            del self._expires[message_id]
            self._events.pop(message_id, None)

    async def close(self) -> None:
        self._events.clear()
        self._expires.clear()


class MemoryLeaseStore:
    def __init__(self) -> None:
        self._leases: dict[str, tuple[str, float]] = {}

    def _current(self, key: str) -> str | None:
        lease = self._leases.get(key)
        if lease is None:
            return None
        owner, expires = lease
        if expires <= time.monotonic():
            del self._leases[key]
            return None
        return owner

    async def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        if self._current(key) is not None:
            return False
        self._leases[key] = (owner, time.monotonic() + ttl_s)
        return True

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        if self._current(key) != owner:
            return False
        self._leases[key] = (owner, time.monotonic() + ttl_s)
        return True

    async def release(self, key: str, owner: str) -> None:
        if self._current(key) == owner:
            del self._leases[key]

    async def holder(self, key: str) -> str | None:
        return self._current(key)


class MemoryControlBus:
    def __init__(self) -> None:
        self._handlers: list[ControlHandler] = []

    async def send(self, command: dict[str, Any]) -> None:
        for handler in self._handlers:
            try:
                await handler(command)
            except Exception:
                log.exception("realtime.control_handler_failed", command=command.get("kind"))

    def listen(self, handler: ControlHandler) -> None:
        self._handlers.append(handler)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class Backends:
    broker: Broker
    event_log: EventLog
    leases: LeaseStore
    control: ControlBus
    shared: bool  # True when several instances share them (Redis)

    async def log_and_publish(self, message_id: uuid.UUID, frame: Frame) -> None:
        """Append an answer's event to its log, then deliver it to every subscriber.

        In that order, so that a client that saw the frame finds it in the log when it resumes.
        A log that cannot be written is logged, not raised: the live clients still get the frame.
        """
        try:
            await self.event_log.append(message_id, frame)
        except Exception:
            log.warning("realtime.event_log_append_failed", message_id=str(message_id))
        await self.broker.publish(frame)

    @property
    def in_process(self) -> bool:
        """Whether the log and the broker live in this process (`log_and_publish_now` works)."""
        return isinstance(self.event_log, MemoryEventLog) and isinstance(self.broker, MemoryBroker)

    def log_and_publish_now(self, message_id: uuid.UUID, frame: Frame) -> None:
        """`log_and_publish` with nothing to wait for, when `in_process`: no task, no await."""
        assert isinstance(self.event_log, MemoryEventLog)
        assert isinstance(self.broker, MemoryBroker)
        self.event_log.append_now(message_id, frame)
        self.broker.publish_now(frame)

    async def start(self) -> None:
        await self.broker.start()
        await self.control.start()

    async def close(self) -> None:
        await self.control.close()
        await self.broker.close()
        await self.event_log.close()


def create_memory_backends(retention_s: float) -> Backends:
    return Backends(
        broker=MemoryBroker(),
        event_log=MemoryEventLog(retention_s),
        leases=MemoryLeaseStore(),
        control=MemoryControlBus(),
        shared=False,
    )


def create_backends(settings: Settings, redis: Redis | None) -> Backends:
    """The one place that picks the backends: Redis when configured, in-process otherwise."""
    if redis is not None:
        from helpline.realtime.redis_backends import create_redis_backends

        return create_redis_backends(redis, settings)
    return create_memory_backends(settings.event_log_ttl_s)
