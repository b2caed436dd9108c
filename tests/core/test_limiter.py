"""Rate limits (SPEC.md: Operations) and daily token budgets."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import websockets
from fastapi import FastAPI

from helpline.core.config import Settings
from helpline.core.database import driver_connection
from helpline.core.limiter import InProcessStorage, RateLimiter
from helpline.main import create_app
from helpline.realtime.frames import Frame
from tests.factories import bearer, create_user, login, open_session
from tests.servers import LiveServer


async def _serve(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield application, http


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async for pair in _serve(settings.model_copy(update={"rate_limit_default": "5/minute"})):
        yield pair


async def test_responses_carry_rate_limit_headers(
    limited: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, http = limited
    response = await http.get("/conversations")
    assert response.headers["x-ratelimit-limit"] == "5"
    assert response.headers["x-ratelimit-remaining"] == "4"
    assert int(response.headers["x-ratelimit-reset"]) > 0


async def test_past_the_limit_is_429_with_retry_after(
    limited: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, http = limited
    statuses = [(await http.get("/conversations")).status_code for _ in range(5)]
    assert statuses == [401] * 5
    refused = await http.get("/conversations")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining"] == "0"


async def test_probes_are_never_limited(limited: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, http = limited
    for _ in range(8):
        assert (await http.get("/health/live")).status_code == 200


async def test_limit_is_counted_per_user_not_per_ip(
    limited: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    application, http = limited
    async with application.state.sessionmaker() as session:
        alice = await create_user(session)
        bob = await create_user(session)
    # Logins count against the (shared) IP; use them up before the users' own budgets.
    alice_token = (await login(http, alice.username))["access_token"]
    bob_token = (await login(http, bob.username))["access_token"]
    for _ in range(5):
        assert (await http.get("/auth/me", headers=bearer(alice_token))).status_code == 200
    assert (await http.get("/auth/me", headers=bearer(alice_token))).status_code == 429
    assert (await http.get("/auth/me", headers=bearer(bob_token))).status_code == 200


async def test_limit_holds_across_instances_sharing_redis(redis_settings: Settings) -> None:
    """Two app instances on one Redis: at most N requests pass in the window."""
    shared = redis_settings.model_copy(update={"rate_limit_default": "6/minute"})
    passed = 0
    async for _, first in _serve(shared):
        async for _, second in _serve(shared):
            for index in range(10):
                http = first if index % 2 == 0 else second
                response = await http.get("/conversations")
                passed += response.status_code != 429
    assert passed == 6


async def test_unreachable_storage_fails_open_by_default(settings: Settings) -> None:
    broken = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "rate_limit_default": "1/minute"}
    )
    async for _, http in _serve(broken):
        statuses = [(await http.get("/conversations")).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]


async def test_unreachable_storage_fails_closed_when_configured(settings: Settings) -> None:
    broken = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "rate_limit_fail_open": False}
    )
    async for _, http in _serve(broken):
        response = await http.get("/conversations")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the work handed to it."""

    submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_in_process_limits_keep_their_work_on_the_event_loop() -> None:
    """Checks on the embedded storage (no Redis) never hop to a thread."""
    executor = CountingExecutor(max_workers=1)
    asyncio.get_running_loop().set_default_executor(executor)
    limiter = RateLimiter(InProcessStorage())
    allowed = []
    for index in range(200):
        status = await limiter.hit("5/minute", "api", f"user:{index % 20}")
        allowed.append(status.allowed)
        await asyncio.sleep(0)  # let any sweep the hit scheduled run
    executor.shutdown()
    assert executor.submitted == 0
    # Still a limit: each of the 20 users got 5 of its 10 hits.
    assert allowed.count(True) == 100


async def test_in_process_sweep_frees_expired_windows() -> None:
    storage = InProcessStorage()
    limiter = RateLimiter(storage)
    results = [(await limiter.hit("2/second", "api", "user:a")).allowed for _ in range(3)]
    assert results == [True, True, False]
    await asyncio.sleep(1.05)
    storage.sweep_expired()
    assert storage.events == {}
    assert (await limiter.hit("2/second", "api", "user:a")).allowed


async def _customer_with_conversation(
    application: FastAPI, http: httpx.AsyncClient
) -> tuple[str, str]:
    async with application.state.sessionmaker() as session:
        user = await create_user(session)
    token = str((await login(http, user.username))["access_token"])
    created = await http.post("/conversations", json={}, headers=bearer(token))
    return token, str(created.json()["id"])


async def test_model_limit_is_shared_by_rest_sse_and_websocket(settings: Settings) -> None:
    limited_settings = settings.model_copy(update={"rate_limit_llm": "3/minute"})
    with LiveServer.start(limited_settings) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            async with open_session(limited_settings) as session:
                user = await create_user(session)
            token = str((await login(http, user.username))["access_token"])
            conversation_id = (
                await http.post("/conversations", json={}, headers=bearer(token))
            ).json()["id"]
            rest = await http.post(
                f"/conversations/{conversation_id}/messages",
                json={"content": "one [[tokens=2]]"},
                headers=bearer(token),
            )
            assert rest.status_code == 201
            async with http.stream(
                "POST",
                f"/conversations/{conversation_id}/stream",
                json={"content": "two [[tokens=2]]"},
                headers=bearer(token),
            ) as sse:
                assert sse.status_code == 200
                body = b"".join([chunk async for chunk in sse.aiter_bytes()])
            assert b'"type":"complete"' in body
            url = f"{server.ws_url}/chat/ws/{conversation_id}?token={token}"
            async with websockets.connect(url) as socket:
                await socket.send(json.dumps({"type": "chat", "content": "three [[tokens=2]]"}))
                frames = []
                async with asyncio.timeout(10):
                    while not frames or frames[-1]["type"] != "complete":
                        frames.append(json.loads(await socket.recv()))
                await socket.send(
                    json.dumps({"type": "chat", "content": "four", "message_id": "m4"})
                )
                async with asyncio.timeout(10):
                    refused = json.loads(await socket.recv())
            assert refused["type"] == "error"
            assert refused["code"] == "RATE_LIMITED"
            assert refused["reply_to"] == "m4"
            again = await http.post(
                f"/conversations/{conversation_id}/messages",
                json={"content": "five"},
                headers=bearer(token),
            )
            assert again.status_code == 429
            assert again.json()["error"]["code"] == "RATE_LIMITED"


async def test_token_budget_refuses_once_used_up(settings: Settings) -> None:
    budget_settings = settings.model_copy(update={"token_budget_daily": 50})
    async for application, http in _serve(budget_settings):
        token, conversation_id = await _customer_with_conversation(application, http)
        first = await http.post(
            f"/conversations/{conversation_id}/messages",
            json={"content": "hello [[tokens=5]]"},
            headers=bearer(token),
        )
        assert first.status_code == 201
        refused = await http.post(
            f"/conversations/{conversation_id}/messages",
            json={"content": "again"},
            headers=bearer(token),
        )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "TOKEN_BUDGET_EXCEEDED"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["details"]["used"] >= 50


async def test_cancelled_answers_are_charged(settings: Settings) -> None:
    from helpline.conversations import repository
    from helpline.conversations.service import usage_day
    from helpline.kit.models import utcnow

    async for application, http in _serve(settings):
        token, conversation_id = await _customer_with_conversation(application, http)
        engine = application.state.generation_engine
        three_tokens = asyncio.Event()

        def on_frame(frame: Frame, seen: asyncio.Event = three_tokens) -> None:
            if (frame.seq or 0) >= 3:
                seen.set()

        await engine.subscribe(uuid.UUID(conversation_id), on_frame)
        send = asyncio.create_task(
            http.post(
                f"/conversations/{conversation_id}/messages",
                json={"content": "long [[tokens=500 delay_ms=5]]"},
                headers=bearer(token),
            )
        )
        async with asyncio.timeout(10):
            await three_tokens.wait()
        cancel = await http.post(f"/conversations/{conversation_id}/cancel", headers=bearer(token))
        assert cancel.status_code == 202
        response = await send
        assistant = response.json()["assistant_message"]
        assert assistant["status"] == "cancelled"
        user_id = uuid.UUID(response.json()["user_message"]["author_id"])
        async with driver_connection(application.state.engine) as connection:
            used = await repository.get_token_usage(
                connection, user_id=user_id, day=usage_day(utcnow())
            )
    assert assistant["token_count"] >= 3
    assert used >= assistant["token_count"]
