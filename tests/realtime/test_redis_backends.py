"""The Redis backends of the generation engine, against the real Redis (a key prefix per test)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from helpline.agents.chat import ChatAnswerer
from helpline.agents.providers.fake import FakeChatModel
from helpline.conversations.service import ConversationAnswerStore
from helpline.core.config import Settings
from helpline.core.redis import SOCKET_TIMEOUT_S as REDIS_SOCKET_TIMEOUT_S
from helpline.core.redis import create_redis
from helpline.realtime.backends import Backends
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.frames import Frame, message_frame, token_frame
from helpline.realtime.redis_backends import (
    RedisBroker,
    RedisControlBus,
    RedisEventLog,
    create_redis_backends,
)
from tests.conftest import REDIS_URL, make_settings
from tests.realtime.helpers import eventually

BackendsFactory = Callable[..., Awaitable[Backends]]


@pytest.fixture
async def redis(redis_prefix: str) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def redis_only_settings(tmp_path: Path, redis_prefix: str) -> Settings:
    """Settings for the backends alone (no database is opened)."""
    return make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
        tmp_path,
        redis_url=REDIS_URL,
        redis_key_prefix=redis_prefix,
    )


@pytest.fixture
async def make_backends(
    redis: Redis, redis_only_settings: Settings
) -> AsyncIterator[BackendsFactory]:
    """Backends of one more instance on the same Redis (each with its own instance id)."""
    made: list[Backends] = []

    async def make(**overrides: Any) -> Backends:
        settings = redis_only_settings.model_copy(update=overrides)
        backends = create_redis_backends(redis, settings)
        await backends.start()
        made.append(backends)
        return backends

    yield make
    for backends in made:
        await backends.close()


@pytest.fixture
async def backends(make_backends: BackendsFactory) -> Backends:
    return await make_backends()


async def subscribers_of(redis: Redis, channel: bytes) -> int:
    ((_, count),) = await redis.pubsub_numsub(channel)
    return int(count)


def broker_of(backends: Backends) -> RedisBroker:
    assert isinstance(backends.broker, RedisBroker)
    return backends.broker


def control_of(backends: Backends) -> RedisControlBus:
    assert isinstance(backends.control, RedisControlBus)
    return backends.control


# -- leases ------------------------------------------------------------------------------------


async def test_a_lease_has_one_owner_at_a_time(backends: Backends) -> None:
    leases = backends.leases
    assert await leases.acquire("answer:1", "instance-a", 10)
    assert not await leases.acquire("answer:1", "instance-b", 10)
    assert not await leases.acquire("answer:1", "instance-a", 10)
    assert await leases.holder("answer:1") == "instance-a"
    assert await leases.holder("answer:2") is None


async def test_only_the_owner_renews_a_lease(
    backends: Backends, redis: Redis, redis_prefix: str
) -> None:
    leases = backends.leases
    await leases.acquire("answer:1", "instance-a", 1)
    assert not await leases.renew("answer:1", "instance-b", 30)
    assert await leases.renew("answer:1", "instance-a", 30)
    # This test's own key: tests running beside it use the same names under other prefixes.
    key = next(iter([k async for k in redis.scan_iter(match=f"{redis_prefix}*lease:answer:1")]))
    assert 10_000 < await redis.pttl(key) <= 30_000
    assert not await leases.renew("answer:unknown", "instance-a", 30)


async def test_only_the_owner_releases_a_lease(backends: Backends) -> None:
    leases = backends.leases
    await leases.acquire("answer:1", "instance-a", 10)
    await leases.release("answer:1", "instance-b")
    assert await leases.holder("answer:1") == "instance-a"
    await leases.release("answer:1", "instance-a")
    assert await leases.holder("answer:1") is None
    assert await leases.acquire("answer:1", "instance-b", 10)


async def test_a_lease_that_is_not_renewed_expires(backends: Backends) -> None:
    leases = backends.leases
    assert await leases.acquire("answer:1", "instance-a", 0.2)
    assert await eventually(lambda: _is_free(backends, "answer:1"), within=5)
    assert not await leases.renew("answer:1", "instance-a", 10)
    assert await leases.acquire("answer:1", "instance-b", 10)


async def _is_free(backends: Backends, key: str) -> bool:
    return await backends.leases.holder(key) is None


# -- event log ---------------------------------------------------------------------------------


def tokens(conversation_id: uuid.UUID, message_id: uuid.UUID, count: int) -> list[Frame]:
    return [
        token_frame(conversation_id, message_id, "q1", seq, f" piece{seq}")
        for seq in range(1, count + 1)
    ]


async def test_the_event_log_reads_the_events_after_a_seq(backends: Backends) -> None:
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()
    frames = tokens(conversation_id, message_id, 4)
    for frame in frames:
        await backends.event_log.append(message_id, frame)

    everything = await backends.event_log.read_after(message_id, 0)
    assert everything is not None
    assert [f.data for f in everything] == [f.data for f in frames]
    assert all(f.conversation_id == conversation_id for f in everything)
    rest = await backends.event_log.read_after(message_id, 2)
    assert rest is not None
    assert [f.seq for f in rest] == [3, 4]
    assert await backends.event_log.read_after(message_id, 4) == []


async def test_the_event_log_of_an_unknown_answer_is_none(backends: Backends) -> None:
    assert await backends.event_log.read_after(uuid.uuid4(), 0) is None


async def test_the_event_log_is_shared_by_every_instance(make_backends: BackendsFactory) -> None:
    one, two = await make_backends(), await make_backends()
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()
    for frame in tokens(conversation_id, message_id, 3):
        await one.event_log.append(message_id, frame)
    seen = await two.event_log.read_after(message_id, 1)
    assert seen is not None
    assert [f.data["content"] for f in seen] == [" piece2", " piece3"]


async def test_a_sealed_event_log_is_kept_for_the_retention_time(
    backends: Backends, redis: Redis, redis_only_settings: Settings
) -> None:
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()
    for frame in tokens(conversation_id, message_id, 2):
        await backends.event_log.append(message_id, frame)
    await backends.event_log.seal(message_id)
    (key,) = [k async for k in redis.scan_iter(match=f"*log:{message_id}")]
    retention = redis_only_settings.event_log_ttl_s
    assert retention - 5 <= await redis.ttl(key) <= retention


async def test_a_sealed_event_log_is_gone_after_the_retention_time(
    make_backends: BackendsFactory,
) -> None:
    backends = await make_backends(event_log_ttl_s=1)
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()
    for frame in tokens(conversation_id, message_id, 2):
        await backends.event_log.append(message_id, frame)
    await backends.event_log.seal(message_id)
    assert await backends.event_log.read_after(message_id, 0) is not None

    async def expired() -> bool:
        return await backends.event_log.read_after(message_id, 0) is None

    assert await eventually(expired, within=5)


# -- broker and control bus --------------------------------------------------------------------


async def test_the_broker_delivers_frames_between_instances_without_echo(
    make_backends: BackendsFactory, redis: Redis
) -> None:
    one, two = await make_backends(), await make_backends()
    conversation_id = uuid.uuid4()
    on_one: list[Frame] = []
    on_two: list[Frame] = []
    one.broker.subscribe(conversation_id, on_one.append)
    two.broker.subscribe(conversation_id, on_two.append)
    channel = broker_of(one).channel(conversation_id)
    await eventually(lambda: _subscribed(redis, channel, 2))

    first = token_frame(conversation_id, uuid.uuid4(), "q1", 1, "Hello")
    await one.broker.publish(first)
    assert [f.data for f in on_one] == [first.data]  # local delivery is immediate
    await eventually(lambda: len(on_two) == 1)
    assert on_two[0].data == first.data
    assert on_two[0].conversation_id == conversation_id

    second = message_frame(conversation_id, {"id": "m2", "content": "from two"})
    await two.broker.publish(second)
    await eventually(lambda: len(on_one) == 2)
    # Channel order: instance one had its own first frame back before the second; it skipped it.
    assert [f.data for f in on_one] == [first.data, second.data]
    assert [f.data for f in on_two] == [first.data, second.data]


async def test_a_frame_published_once_subscribed_returns_reaches_the_subscriber(
    make_backends: BackendsFactory,
) -> None:
    """`subscribed` waits for Redis to confirm the channel: a frame another instance publishes
    right after it (a resume's replay joined to the live frames) is never lost."""
    one, two = await make_backends(), await make_backends()
    conversations = [uuid.uuid4() for _ in range(20)]
    received: list[Frame] = []
    for conversation_id in conversations:
        two.broker.subscribe(conversation_id, received.append)
        await two.broker.subscribed(conversation_id)
        await one.broker.publish(message_frame(conversation_id, {"id": str(conversation_id)}))
    await eventually(lambda: len(received) == len(conversations))
    assert [f.conversation_id for f in received] == conversations
    # Confirmed already: no wait for another round trip.
    await asyncio.wait_for(two.broker.subscribed(conversations[0]), 0.05)


async def test_a_subscription_redis_never_confirms_is_waited_for_a_bounded_time(
    backends: Backends,
) -> None:
    """Say a confirmation is lost: the socket still opens, after the bound."""
    subscriber = broker_of(backends)._subscriber
    await eventually(lambda: subscriber.connected)  # connected: confirmations are waited for
    never_subscribed = b"no-subscribe-sent"  # so no confirmation can come
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(subscriber.subscribed(never_subscribed, within_s=0.2), 2)
    assert loop.time() - started >= 0.2


async def test_a_subscriber_back_right_after_the_last_one_left_waits_for_the_new_subscription(
    make_backends: BackendsFactory,
) -> None:
    """The last subscriber of a conversation leaves (its channel is unsubscribed) and a new one
    comes at once: `subscribed` waits for the new `SUBSCRIBE`, not the old confirmation."""
    one, two = await make_backends(), await make_backends()
    conversations = [uuid.uuid4() for _ in range(20)]
    left: list[Frame] = []
    received: list[Frame] = []
    for conversation_id in conversations:
        leaving = two.broker.subscribe(conversation_id, left.append)
        await two.broker.subscribed(conversation_id)
        leaving()
        two.broker.subscribe(conversation_id, received.append)
        await two.broker.subscribed(conversation_id)
        await one.broker.publish(message_frame(conversation_id, {"id": str(conversation_id)}))
    await eventually(lambda: len(received) == len(conversations))
    assert [f.conversation_id for f in received] == conversations
    assert left == []


async def test_a_subscriber_cancelled_while_redis_confirms_is_not_left_listening(
    make_backends: BackendsFactory, tmp_path: Path
) -> None:
    backends = await make_backends()
    database = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    answerer = ChatAnswerer(FakeChatModel())
    engine = GenerationEngine(
        backends=backends,
        answerer=answerer,
        store=ConversationAnswerStore(
            async_sessionmaker(database), queue_when_busy=False, model=answerer.model
        ),
        lease_s=15,
    )
    await eventually(lambda: broker_of(backends)._subscriber.connected)
    conversation_id = uuid.uuid4()
    received: list[Frame] = []
    subscribing = asyncio.create_task(engine.subscribe(conversation_id, received.append))
    await asyncio.sleep(0)  # listening here, waiting for Redis's confirmation
    assert not subscribing.done()
    assert backends.broker.local_subscriber_count(conversation_id) == 1
    subscribing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await subscribing
    assert backends.broker.local_subscriber_count(conversation_id) == 0
    await database.dispose()


async def _subscribed(redis: Redis, channel: bytes, count: int) -> bool:
    return await subscribers_of(redis, channel) >= count


async def test_the_broker_delivers_only_the_subscribed_conversation(
    make_backends: BackendsFactory, redis: Redis
) -> None:
    one, two = await make_backends(), await make_backends()
    watched, other = uuid.uuid4(), uuid.uuid4()
    received: list[Frame] = []
    two.broker.subscribe(watched, received.append)
    await eventually(lambda: _subscribed(redis, broker_of(two).channel(watched), 1))

    await one.broker.publish(message_frame(other, {"id": "x"}))
    await one.broker.publish(message_frame(watched, {"id": "y"}))
    await eventually(lambda: len(received) == 1)
    assert received[0].data["message"] == {"id": "y"}


async def test_the_broker_stops_delivering_after_unsubscribe(
    make_backends: BackendsFactory, redis: Redis
) -> None:
    one, two = await make_backends(), await make_backends()
    conversation_id = uuid.uuid4()
    received: list[Frame] = []
    unsubscribe = two.broker.subscribe(conversation_id, received.append)
    channel = broker_of(two).channel(conversation_id)
    await eventually(lambda: _subscribed(redis, channel, 1))
    unsubscribe()
    assert two.broker.local_subscriber_count(conversation_id) == 0

    async def unsubscribed() -> bool:
        return await subscribers_of(redis, channel) == 0

    await eventually(unsubscribed)
    await one.broker.publish(message_frame(conversation_id, {"id": "late"}))
    assert received == []


async def test_the_control_bus_reaches_the_other_instance(
    make_backends: BackendsFactory, redis: Redis
) -> None:
    one, two = await make_backends(), await make_backends()
    on_one: list[dict[str, Any]] = []
    on_two: list[dict[str, Any]] = []

    async def handle_one(command: dict[str, Any]) -> None:
        on_one.append(command)

    async def handle_two(command: dict[str, Any]) -> None:
        on_two.append(command)

    one.control.listen(handle_one)
    two.control.listen(handle_two)
    await eventually(lambda: _subscribed(redis, control_of(one).channel, 2))

    cancel = {"kind": "cancel", "message_id": str(uuid.uuid4())}
    await one.control.send(cancel)
    assert on_one == [cancel]  # handled here at once
    await eventually(lambda: on_two == [cancel])

    revoke = {"kind": "revoke", "user_id": str(uuid.uuid4()), "login_ids": None}
    await two.control.send(revoke)
    await eventually(lambda: len(on_one) == 2)
    assert on_one == [cancel, revoke]  # its own `cancel` did not come back a second time
    assert on_two == [cancel, revoke]


async def test_an_idle_subscriber_keeps_its_subscription_past_the_socket_timeout(
    redis: Redis, redis_only_settings: Settings
) -> None:
    """Pub/sub keeps nothing: a subscriber that reconnected after a quiet spell would lose
    what was published meanwhile (e.g. a `cancel` for an answer it runs)."""
    client = create_redis(redis_only_settings)  # the app's client, with its socket timeout
    assert client is not None
    one = create_redis_backends(client, redis_only_settings)
    two = create_redis_backends(client, redis_only_settings)
    on_two: list[dict[str, Any]] = []

    async def handle_two(command: dict[str, Any]) -> None:
        on_two.append(command)

    two.control.listen(handle_two)
    try:
        await one.start()
        await two.start()
        await eventually(lambda: _subscribed(redis, control_of(one).channel, 2))
        subscriber = control_of(two)._subscriber
        pubsub = subscriber.pubsub
        await asyncio.sleep(REDIS_SOCKET_TIMEOUT_S + 1)  # nothing published
        assert subscriber.connected
        assert subscriber.pubsub is pubsub  # the same subscription, never re-made
        cancel = {"kind": "cancel", "message_id": str(uuid.uuid4())}
        await one.control.send(cancel)
        await eventually(lambda: on_two == [cancel])
    finally:
        await one.close()
        await two.close()
        await client.aclose()


@pytest.fixture
async def unreachable_backends(redis_only_settings: Settings) -> AsyncIterator[Backends]:
    """Redis backends whose Redis never answers."""
    unreachable: Redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    backends = create_redis_backends(unreachable, redis_only_settings)
    await backends.start()
    try:
        yield backends
    finally:
        await backends.close()
        await unreachable.aclose()


async def test_local_subscribers_get_frames_while_redis_is_unreachable(
    unreachable_backends: Backends,
) -> None:
    backends = unreachable_backends
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()
    received: list[Frame] = []
    backends.broker.subscribe(conversation_id, received.append)
    first = token_frame(conversation_id, message_id, "q1", 1, "Hello")
    await backends.event_log.append(message_id, first)  # best effort: no error
    await backends.broker.publish(first)
    # An answer's event, logged and published in one go: best effort too.
    second = token_frame(conversation_id, message_id, "q1", 2, " there")
    await backends.log_and_publish(message_id, second)
    await backends.broker.publish(message_frame(conversation_id, {"id": "m"}))
    assert [(f.type, f.seq) for f in received] == [("token", 1), ("token", 2), ("message", None)]
    assert not await backends.broker.healthy()
    # Nobody waits for a subscription Redis cannot confirm now.
    await asyncio.wait_for(backends.broker.subscribed(conversation_id), 0.5)


# -- an answer's events --------------------------------------------------------------------------


async def test_an_answer_event_is_logged_then_published_to_every_instance(
    make_backends: BackendsFactory, redis: Redis, redis_only_settings: Settings
) -> None:
    one, two = await make_backends(), await make_backends()
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()
    on_one: list[Frame] = []
    on_two: list[Frame] = []
    one.broker.subscribe(conversation_id, on_one.append)
    two.broker.subscribe(conversation_id, on_two.append)
    await eventually(lambda: _subscribed(redis, broker_of(one).channel(conversation_id), 2))

    for seq in (1, 2):
        await one.log_and_publish(
            message_id, token_frame(conversation_id, message_id, "q1", seq, f" piece{seq}")
        )

    assert [f.seq for f in on_one] == [1, 2]  # local delivery, without an echo from Redis
    await eventually(lambda: len(on_two) == 2)
    assert [f.data["content"] for f in on_two] == [" piece1", " piece2"]
    logged = await two.event_log.read_after(message_id, 1)
    assert logged is not None
    assert [f.seq for f in logged] == [2]
    assert isinstance(one.event_log, RedisEventLog)
    ttl = await redis.ttl(one.event_log.key(message_id))
    assert 0 < ttl <= redis_only_settings.event_log_ttl_s
