"""Several instances on one PostgreSQL and one Redis (`helpline serve` processes).

What must hold: every socket of a conversation gets the same frames whichever instance it is on;
an answer survives its client's instance; cancel reaches the instance that runs the answer; an
answer whose instance died is stored `failed` (never left `streaming`) and resumable elsewhere;
`--workers 2` behaves like two instances.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from helpline.core.config import Settings
from tests.conftest import REDIS_URL, make_settings
from tests.factories import bearer, create_user, login, open_session
from tests.servers import ProcessServer

pytestmark = pytest.mark.slow

Frame = dict[str, Any]


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": settings.database_url,
        "AUTH_JWT_SECRET": str(settings.auth_jwt_secret),
        "LLM_PROVIDER": "fake",
        "DEMO_KB": "false",
        "AUTO_MIGRATE": "false",
        "LOG_LEVEL": "WARNING",
        "DATA_DIR": str(settings.data_dir),
        "GENERATION_LEASE_S": "2",
        "RATE_LIMIT_DEFAULT": "1000/minute",
        "RATE_LIMIT_LLM": "1000/minute",
    }
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
        env["REDIS_KEY_PREFIX"] = settings.redis_key_prefix
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster_settings(postgres_url: str, cluster_dir: Path) -> Settings:
    prefix = f"helpline-test:{uuid.uuid4().hex[:10]}:"
    return make_settings(postgres_url, cluster_dir, redis_url=REDIS_URL, redis_key_prefix=prefix)


@pytest.fixture(scope="module")
def two_instances(
    cluster_settings: Settings, cluster_dir: Path
) -> Iterator[tuple[ProcessServer, ProcessServer]]:
    """Started once for the module; `instances` restarts one that a test killed."""
    env = server_env(cluster_settings)
    first = ProcessServer.start(env, cluster_dir)
    try:
        second = ProcessServer.start(env, cluster_dir)
        try:
            yield first, second
        finally:
            second.kill()
    finally:
        first.kill()


@pytest.fixture
def instances(
    two_instances: tuple[ProcessServer, ProcessServer], cluster_settings: Settings
) -> tuple[ProcessServer, ProcessServer]:
    first, second = two_instances
    for server in (first, second):
        if server.process.poll() is not None:
            server.restart(server_env(cluster_settings))
    return first, second


async def recv_until(
    socket: websockets.ClientConnection, frame_type: str, limit_s: float = 15.0
) -> list[Frame]:
    """Frames up to and including the first of `frame_type`."""
    frames: list[Frame] = []
    async with asyncio.timeout(limit_s):
        while True:
            frame = json.loads(await socket.recv())
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames


async def live(socket: websockets.ClientConnection) -> None:
    """Wait for the `pong` to a `ping`: the server reads a socket's frames once it gets the
    conversation's frames from every instance."""
    await socket.send(json.dumps({"type": "ping"}))
    await recv_until(socket, "pong")


async def chat_until_tokens(
    socket: websockets.ClientConnection, content: str, count: int
) -> list[Frame]:
    """Send a chat and read until `count` token frames came: those token frames."""
    await socket.send(json.dumps({"type": "chat", "content": content}))
    tokens: list[Frame] = []
    async with asyncio.timeout(15):
        while len(tokens) < count:
            frame = json.loads(await socket.recv())
            if frame["type"] == "token":
                tokens.append(frame)
    return tokens


async def send_resume(socket: websockets.ClientConnection, message_id: str, after_seq: int) -> None:
    await socket.send(
        json.dumps({"type": "resume", "message_id": message_id, "after_seq": after_seq})
    )


def answer_text(frames: list[Frame]) -> str:
    return "".join(frame["content"] for frame in frames if frame["type"] == "token")


async def customer(settings: Settings, http: httpx.AsyncClient) -> tuple[str, str]:
    """A customer's token and a conversation of theirs."""
    async with open_session(settings) as session:
        user = await create_user(session)
    token = str((await login(http, user.username))["access_token"])
    created = await http.post("/conversations", json={}, headers=bearer(token))
    assert created.status_code == 201, created.text
    return token, str(created.json()["id"])


def socket_url(server: ProcessServer, conversation_id: str, token: str) -> str:
    return f"{server.ws_url}/chat/ws/{conversation_id}?token={token}"


async def test_sockets_on_two_instances_get_the_same_frames(
    cluster_settings: Settings, instances: tuple[ProcessServer, ProcessServer]
) -> None:
    first, second = instances
    async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
        token, conversation_id = await customer(cluster_settings, http)
    async with (
        websockets.connect(socket_url(first, conversation_id, token)) as on_first,
        websockets.connect(socket_url(second, conversation_id, token)) as on_second,
    ):
        await live(on_second)
        await on_first.send(
            json.dumps({"type": "chat", "content": "hi [[tokens=30]]", "message_id": "a1"})
        )
        seen_first = await recv_until(on_first, "complete")
        seen_second = await recv_until(on_second, "complete")
    assert answer_text(seen_first) == answer_text(seen_second)
    assert seen_first[-1]["message"]["content"] == answer_text(seen_second)
    assert seen_second[0]["type"] == "message"
    assert seen_second[0]["message"]["client_message_id"] == "a1"


async def test_cancel_on_one_instance_stops_the_answer_running_on_the_other(
    cluster_settings: Settings, instances: tuple[ProcessServer, ProcessServer]
) -> None:
    first, second = instances
    async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
        token, conversation_id = await customer(cluster_settings, http)
    async with websockets.connect(socket_url(first, conversation_id, token)) as on_first:
        await chat_until_tokens(on_first, "long [[tokens=2000 delay_ms=10]]", 1)
        async with httpx.AsyncClient(base_url=second.http_url, timeout=15) as http:
            cancel = await http.post(
                f"/conversations/{conversation_id}/cancel", headers=bearer(token)
            )
        assert cancel.status_code == 202
        frames = await recv_until(on_first, "cancelled")
    stored = frames[-1]["message"]
    assert stored["status"] == "cancelled"
    assert 0 < stored["token_count"] < 2000


async def test_a_resume_on_the_other_instance_joins_the_live_answer_without_a_gap(
    cluster_settings: Settings, instances: tuple[ProcessServer, ProcessServer]
) -> None:
    """A client that moved to another instance mid-answer resumes at once: the replay from the
    shared log and the live frames from the instance running the answer join exactly."""
    first, second = instances
    async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
        token, conversation_id = await customer(cluster_settings, http)
    async with websockets.connect(socket_url(first, conversation_id, token)) as on_first:
        tokens = await chat_until_tokens(on_first, "long [[tokens=300 delay_ms=5]]", 3)
        async with websockets.connect(socket_url(second, conversation_id, token)) as on_second:
            await send_resume(on_second, tokens[0]["message_id"], tokens[-1]["seq"])
            resumed = await recv_until(on_second, "complete")
    seqs = [frame["seq"] for frame in resumed]
    assert seqs == sorted(set(seqs))  # no frame twice
    assert seqs[0] > tokens[-1]["seq"]
    stored = resumed[-1]["message"]["content"]
    assert answer_text(tokens) + answer_text(resumed) == stored
    assert len(stored.split()) == 300


async def test_answer_of_a_killed_instance_fails_and_resumes_elsewhere(
    cluster_settings: Settings, instances: tuple[ProcessServer, ProcessServer]
) -> None:
    first, second = instances
    async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
        token, conversation_id = await customer(cluster_settings, http)
    async with websockets.connect(socket_url(first, conversation_id, token)) as on_first:
        tokens = await chat_until_tokens(on_first, "long [[tokens=2000 delay_ms=20]]", 5)
        first.kill()
    async with websockets.connect(socket_url(second, conversation_id, token)) as on_second:
        await send_resume(on_second, tokens[0]["message_id"], tokens[1]["seq"])
        resumed = await recv_until(on_second, "failed", limit_s=30)
    failed = resumed[-1]
    stored = failed["message"]
    assert stored["status"] == "failed"
    assert failed["code"] == "SERVICE_UNAVAILABLE"
    # No gap, no duplicate: what was seen up to seq 2 plus the resumed text is the stored text.
    prefix = "".join(t["content"] for t in tokens[:2])
    assert prefix + answer_text(resumed) == stored["content"]
    assert len(stored["content"]) >= len(answer_text(tokens))


async def test_rate_limit_holds_across_two_instances(
    cluster_settings: Settings, tmp_path: Path
) -> None:
    env = server_env(cluster_settings, RATE_LIMIT_DEFAULT="5/minute")
    first = ProcessServer.start(env, tmp_path)
    second = ProcessServer.start(env, tmp_path)
    try:
        passed = 0
        async with (
            httpx.AsyncClient(base_url=first.http_url) as one,
            httpx.AsyncClient(base_url=second.http_url) as two,
        ):
            for index in range(12):
                response = await (one if index % 2 else two).get("/conversations")
                passed += response.status_code != 429
        assert passed == 5
    finally:
        first.kill()
        second.kill()


async def test_two_workers_fan_out_to_every_socket(
    cluster_settings: Settings, tmp_path: Path
) -> None:
    server = ProcessServer.start(server_env(cluster_settings), tmp_path, workers=2)
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=15) as http:
            token, conversation_id = await customer(cluster_settings, http)
        url = socket_url(server, conversation_id, token)
        sockets = [await websockets.connect(url) for _ in range(6)]
        try:
            for socket in sockets:
                await live(socket)
            await sockets[0].send(json.dumps({"type": "chat", "content": "x [[tokens=10]]"}))
            results = [await recv_until(socket, "complete") for socket in sockets]
        finally:
            for socket in sockets:
                await socket.close()
        texts = {answer_text(frames) for frames in results}
        assert len(texts) == 1
        assert texts.pop() == results[0][-1]["message"]["content"]
    finally:
        server.kill()


async def test_redis_restart_keeps_local_delivery_and_recovers(
    postgres_url: str, tmp_path: Path, redis_prefix: str
) -> None:
    """Redis stops mid-test: the local clients keep streaming; it returns: fan-out resumes."""
    from tests.redis_server import RedisServer

    with RedisServer.start(tmp_path) as redis_server:
        settings = make_settings(
            postgres_url, tmp_path, redis_url=redis_server.url, redis_key_prefix=redis_prefix
        )
        env = server_env(settings)
        first = ProcessServer.start(env, tmp_path)
        second = ProcessServer.start(env, tmp_path)
        try:
            async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
                token, conversation_id = await customer(settings, http)
                async with (
                    websockets.connect(socket_url(first, conversation_id, token)) as on_first,
                    websockets.connect(socket_url(second, conversation_id, token)) as on_second,
                ):
                    redis_server.stop()
                    health = (await http.get("/health")).json()
                    assert health["status"] == "degraded"
                    assert health["components"]["redis"]["status"] == "degraded"
                    await on_first.send(
                        json.dumps({"type": "chat", "content": "during [[tokens=8]]"})
                    )
                    local = await recv_until(on_first, "complete")
                    assert local[-1]["message"]["content"] == answer_text(local)

                    redis_server.restart()
                    await _wait_healthy(http)
                    await asyncio.sleep(2.5)  # the subscribers reconnect with backoff
                    await on_first.send(
                        json.dumps({"type": "chat", "content": "after [[tokens=8]]"})
                    )
                    mine = await recv_until(on_first, "complete")
                    frames = await _recv_answer_for(on_second, mine[-1]["message_id"])
                    assert answer_text(frames) == mine[-1]["message"]["content"]
        finally:
            first.kill()
            second.kill()


async def _wait_healthy(http: httpx.AsyncClient) -> None:
    """Health is polled: nothing announces that Redis is back."""
    for _ in range(75):
        if (await http.get("/health")).json()["status"] == "healthy":
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the service did not report healthy again")


async def _recv_answer_for(
    socket: websockets.ClientConnection, message_id: str, limit_s: float = 15.0
) -> list[Frame]:
    frames: list[Frame] = []
    async with asyncio.timeout(limit_s):
        while True:
            frame = json.loads(await socket.recv())
            if frame.get("message_id") != message_id:
                continue
            frames.append(frame)
            if frame["type"] == "complete":
                return frames
