"""`GENERATION_POLICY=queue`: a send while an answer streams is answered after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from helpline.core.config import Settings
from helpline.main import create_app
from tests.conftest import _empty_tables
from tests.factories import bearer, create_user, login


@pytest.fixture
async def queue_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(settings.model_copy(update={"generation_policy": "queue"}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                async with application.state.sessionmaker() as session:
                    user = await create_user(session)
                token = (await login(http, user.username))["access_token"]
                http.headers.update(bearer(token))
                yield http
        finally:
            await _empty_tables(application)


async def test_a_queued_rest_send_waits_for_its_own_answer(
    queue_client: httpx.AsyncClient,
) -> None:
    conversation_id = (await queue_client.post("/conversations", json={})).json()["id"]
    url = f"/conversations/{conversation_id}/messages"
    first = asyncio.create_task(
        queue_client.post(url, json={"content": "[[tokens=20 delay_ms=20]] one"})
    )
    await asyncio.sleep(0.2)
    second = await queue_client.post(url, json={"content": '[[reply="Two."]] two'})
    assert second.status_code == 201
    assert second.json()["assistant_message"]["content"] == "Two."
    assert second.json()["assistant_message"]["status"] == "complete"
    assert (await first).json()["assistant_message"]["status"] == "complete"


async def test_a_queued_sse_send_streams_its_own_answer(
    queue_client: httpx.AsyncClient,
) -> None:
    conversation_id = (await queue_client.post("/conversations", json={})).json()["id"]
    first = asyncio.create_task(
        queue_client.post(
            f"/conversations/{conversation_id}/messages",
            json={"content": "[[tokens=20 delay_ms=20]] one"},
        )
    )
    await asyncio.sleep(0.2)
    response = await queue_client.post(
        f"/conversations/{conversation_id}/stream", json={"content": '[[reply="Two."]] two'}
    )
    await first
    assert response.status_code == 200
    assert '"type":"complete"' in response.text
    assert '"content":"Two."' in response.text
