"""The conversations REST API, from SPEC.md (Conversations), through `client` (no streaming)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY

from helpline.agents.providers.fake import FakeChatModel
from tests.realtime.fixtures import PartyFactory
from tests.realtime.helpers import (
    Party,
    assert_error,
    eventually,
    list_all_messages,
    new_conversation,
    take_every_connection,
    with_settings,
)

CONVERSATION_FIELDS = {
    "id",
    "user_id",
    "title",
    "status",
    "created_at",
    "updated_at",
    "waiting_since",
    "assigned_agent_id",
}
MESSAGE_FIELDS = {
    "id",
    "conversation_id",
    "role",
    "content",
    "author_id",
    "client_message_id",
    "status",
    "token_count",
    "sources",
    "created_at",
}


def completed_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "helpline_conversations_completed_total", {"outcome": outcome}
    )
    return value or 0.0


def fake_model_of(app: FastAPI) -> FakeChatModel:
    model = app.state.chat_model
    assert isinstance(model, FakeChatModel)
    return model


async def send(
    client: httpx.AsyncClient,
    party: Party,
    conversation_id: str,
    content: str,
    client_message_id: str | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"content": content}
    if client_message_id is not None:
        body["client_message_id"] = client_message_id
    return await client.post(
        f"/conversations/{conversation_id}/messages", json=body, headers=party.headers
    )


async def conversation_of(
    client: httpx.AsyncClient, party: Party, conversation_id: str
) -> dict[str, Any]:
    response = await client.get(f"/conversations/{conversation_id}", headers=party.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def walk(
    client: httpx.AsyncClient, party: Party, path: str, limit: int, **params: Any
) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following `next_cursor`."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        query = {"limit": limit, **params}
        if cursor is not None:
            query["cursor"] = cursor
        response = await client.get(path, params=query, headers=party.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "the walk does not end"


# -- conversations -----------------------------------------------------------------------------


async def test_create_conversation_returns_201_with_the_conversation(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    response = await client.post(
        "/conversations", json={"title": "Billing question"}, headers=alice.headers
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == CONVERSATION_FIELDS
    assert body["title"] == "Billing question"
    assert body["user_id"] == alice.id
    assert body["status"] == "open"
    assert body["waiting_since"] is None
    assert body["assigned_agent_id"] is None
    uuid.UUID(body["id"])
    assert datetime.fromisoformat(body["created_at"]).utcoffset() is not None


async def test_create_conversation_without_a_title(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    response = await client.post("/conversations", json={}, headers=alice.headers)
    assert response.status_code == 201, response.text
    assert response.json()["title"] is None


async def test_create_conversation_refuses_unknown_fields(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    response = await client.post(
        "/conversations", json={"title": "x", "status": "resolved"}, headers=alice.headers
    )
    assert_error(response, 422, "VALIDATION_ERROR")


async def test_conversations_need_authentication(client: httpx.AsyncClient) -> None:
    response = await client.get("/conversations")
    assert_error(response, 401, "NOT_AUTHENTICATED")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_get_conversation_returns_it(client: httpx.AsyncClient, person: PartyFactory) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice, "Shipping")
    body = await conversation_of(client, alice, conversation_id)
    assert body["id"] == conversation_id
    assert body["title"] == "Shipping"


async def test_delete_conversation_erases_it_and_its_messages(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    assert (await send(client, alice, conversation_id, '[[reply="ok"]] hi')).status_code == 201

    response = await client.delete(f"/conversations/{conversation_id}", headers=alice.headers)
    assert response.status_code == 204
    assert response.content == b""

    gone = await client.get(f"/conversations/{conversation_id}", headers=alice.headers)
    assert_error(gone, 404, "CONVERSATION_NOT_FOUND")
    messages = await client.get(f"/conversations/{conversation_id}/messages", headers=alice.headers)
    assert_error(messages, 404, "CONVERSATION_NOT_FOUND")


async def test_unknown_conversation_is_404_conversation_not_found(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    unknown = uuid.uuid4()
    for method, path in [
        ("GET", f"/conversations/{unknown}"),
        ("DELETE", f"/conversations/{unknown}"),
        ("GET", f"/conversations/{unknown}/messages"),
    ]:
        response = await client.request(method, path, headers=alice.headers)
        error = assert_error(response, 404, "CONVERSATION_NOT_FOUND")
        assert str(unknown) in error["message"]
    response = await send(client, alice, str(unknown), "hello")
    assert_error(response, 404, "CONVERSATION_NOT_FOUND")


async def test_another_customers_conversation_is_403_forbidden(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, mallory = await person(), await person()
    conversation_id = await new_conversation(client, alice)
    base = f"/conversations/{conversation_id}"
    for method, path in [
        ("GET", base),
        ("GET", f"{base}/messages"),
        ("DELETE", base),
        ("POST", f"{base}/handoff"),
        ("POST", f"{base}/complete"),
        ("POST", f"{base}/cancel"),
    ]:
        response = await client.request(method, path, headers=mallory.headers)
        assert_error(response, 403, "FORBIDDEN")
    assert_error(await send(client, mallory, conversation_id, "let me in"), 403, "FORBIDDEN")
    # Nothing changed for the owner.
    assert (await conversation_of(client, alice, conversation_id))["status"] == "open"
    assert await list_all_messages(client, alice, conversation_id) == []


async def test_a_customer_lists_only_their_own_conversations(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, bob = await person(), await person()
    mine = {await new_conversation(client, alice) for _ in range(2)}
    await new_conversation(client, bob)
    response = await client.get("/conversations", headers=alice.headers)
    assert response.status_code == 200
    assert {item["id"] for item in response.json()["items"]} == mine


async def test_agents_and_admins_see_every_conversation(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, bob = await person(), await person()
    conversations = {await new_conversation(client, alice), await new_conversation(client, bob)}
    for staff in (await person("agent"), await person("admin")):
        listed = await client.get("/conversations", headers=staff.headers)
        assert {item["id"] for item in listed.json()["items"]} == conversations
        for conversation_id in conversations:
            assert (await conversation_of(client, staff, conversation_id))["id"] == conversation_id
            messages = await client.get(
                f"/conversations/{conversation_id}/messages", headers=staff.headers
            )
            assert messages.status_code == 200


async def test_conversations_are_listed_by_most_recent_activity(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    first = await new_conversation(client, alice, "first")
    second = await new_conversation(client, alice, "second")
    third = await new_conversation(client, alice, "third")
    listed = await client.get("/conversations", headers=alice.headers)
    assert [item["id"] for item in listed.json()["items"]] == [third, second, first]

    # A message is activity: the first conversation moves to the top.
    assert (await send(client, alice, first, '[[reply="ok"]] hi')).status_code == 201
    listed = await client.get("/conversations", headers=alice.headers)
    items = listed.json()["items"]
    assert [item["id"] for item in items] == [first, third, second]
    stamps = [datetime.fromisoformat(item["updated_at"]) for item in items]
    assert stamps == sorted(stamps, reverse=True)


async def test_conversation_pages_walk_every_item_once(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    created = [await new_conversation(client, alice, f"c{i}") for i in range(7)]
    pages = await walk(client, alice, "/conversations", limit=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    walked = [item["id"] for page in pages for item in page]
    assert len(walked) == len(set(walked))
    assert walked == list(reversed(created))


async def test_conversation_pages_of_exactly_limit_end_with_no_cursor(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    for _ in range(2):
        await new_conversation(client, alice)
    response = await client.get("/conversations", params={"limit": 2}, headers=alice.headers)
    assert len(response.json()["items"]) == 2
    assert response.json()["next_cursor"] is None


async def test_list_limit_must_be_between_1_and_100(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    await new_conversation(client, alice)
    for limit in (0, 101, -1):
        response = await client.get(
            "/conversations", params={"limit": limit}, headers=alice.headers
        )
        error = assert_error(response, 422, "VALIDATION_ERROR")
        assert error["details"]
    for limit in (1, 100):
        response = await client.get(
            "/conversations", params={"limit": limit}, headers=alice.headers
        )
        assert response.status_code == 200
        assert len(response.json()["items"]) == 1


async def test_a_bad_cursor_is_400(client: httpx.AsyncClient, person: PartyFactory) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    for cursor in ("not-a-cursor", "eyJ2IjogMX0", "%%%"):
        response = await client.get(
            "/conversations", params={"cursor": cursor}, headers=alice.headers
        )
        assert_error(response, 400, "BAD_REQUEST")
        response = await client.get(
            f"/conversations/{conversation_id}/messages",
            params={"cursor": cursor},
            headers=alice.headers,
        )
        assert_error(response, 400, "BAD_REQUEST")


async def test_list_filters_by_status(client: httpx.AsyncClient, person: PartyFactory) -> None:
    alice = await person()
    open_one = await new_conversation(client, alice)
    waiting = await new_conversation(client, alice)
    resolved = await new_conversation(client, alice)
    await client.post(f"/conversations/{waiting}/handoff", json={}, headers=alice.headers)
    await client.post(f"/conversations/{resolved}/complete", headers=alice.headers)

    async def listed(status: str) -> list[str]:
        response = await client.get(
            "/conversations", params={"status": status}, headers=alice.headers
        )
        assert response.status_code == 200
        return [item["id"] for item in response.json()["items"]]

    assert await listed("open") == [open_one]
    assert await listed("waiting_for_agent") == [waiting]
    assert await listed("resolved") == [resolved]
    assert await listed("with_agent") == []
    bad = await client.get("/conversations", params={"status": "lost"}, headers=alice.headers)
    assert_error(bad, 422, "VALIDATION_ERROR")


# -- messages ----------------------------------------------------------------------------------


async def test_send_message_returns_201_with_both_messages_once_complete(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    response = await send(
        client, alice, conversation_id, '[[reply="Your order ships today."]] Where?', "q-1"
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"user_message", "assistant_message"}
    user, answer = body["user_message"], body["assistant_message"]
    assert set(user) == MESSAGE_FIELDS
    assert set(answer) == MESSAGE_FIELDS
    assert user["role"] == "user"
    assert user["content"] == '[[reply="Your order ships today."]] Where?'
    assert user["author_id"] == alice.id
    assert user["client_message_id"] == "q-1"
    assert user["status"] == "complete"
    assert answer["role"] == "assistant"
    assert answer["status"] == "complete"
    assert answer["content"] == "Your order ships today."
    assert answer["conversation_id"] == conversation_id
    assert answer["token_count"] == 4  # the fake model's pieces are words
    assert answer["sources"] == []
    assert fake_model_of(app).completed_streams == 1


async def test_messages_are_listed_oldest_first(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    for n in range(3):
        response = await send(client, alice, conversation_id, f'[[reply="answer {n}"]] q{n}')
        assert response.status_code == 201
    messages = await list_all_messages(client, alice, conversation_id)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", '[[reply="answer 0"]] q0'),
        ("assistant", "answer 0"),
        ("user", '[[reply="answer 1"]] q1'),
        ("assistant", "answer 1"),
        ("user", '[[reply="answer 2"]] q2'),
        ("assistant", "answer 2"),
    ]
    stamps = [datetime.fromisoformat(m["created_at"]) for m in messages]
    assert stamps == sorted(stamps)


async def test_message_pages_walk_every_message_once_in_order(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    for n in range(4):
        await send(client, alice, conversation_id, f'[[reply="a{n}"]] q{n}')
    everything = await list_all_messages(client, alice, conversation_id)
    pages = await walk(client, alice, f"/conversations/{conversation_id}/messages", limit=3)
    assert [len(page) for page in pages] == [3, 3, 2]
    assert [m["id"] for page in pages for m in page] == [m["id"] for m in everything]


async def test_resending_a_client_message_id_returns_200_with_the_same_messages(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    content = '[[reply="Done."]] Cancel my plan'
    first = await send(client, alice, conversation_id, content, "cancel-plan-1")
    assert first.status_code == 201
    again = await send(client, alice, conversation_id, content, "cancel-plan-1")
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert len(await list_all_messages(client, alice, conversation_id)) == 2
    assert fake_model_of(app).completed_streams == 1  # no second answer


async def test_the_same_client_message_id_in_another_conversation_is_a_new_message(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    one, two = await new_conversation(client, alice), await new_conversation(client, alice)
    assert (await send(client, alice, one, '[[reply="a"]] q', "same")).status_code == 201
    assert (await send(client, alice, two, '[[reply="a"]] q', "same")).status_code == 201


async def test_a_client_message_id_with_other_content_is_409(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    assert (await send(client, alice, conversation_id, '[[reply="a"]] one', "k")).status_code == 201
    response = await send(client, alice, conversation_id, '[[reply="a"]] two', "k")
    assert_error(response, 409, "IDEMPOTENCY_KEY_REUSED")
    assert len(await list_all_messages(client, alice, conversation_id)) == 2


# One pooled connection, and a short wait for it: a test takes it, and the app finds none free.
with_a_one_connection_pool = with_settings(
    database_pool_size=1, database_max_overflow=0, database_pool_timeout_s=0.2
)


async def refused_while_the_pool_is_taken(
    app: FastAPI, request: Awaitable[httpx.Response]
) -> httpx.Response:
    """`request`'s response while every pooled connection is held: a `503` to retry in 1 s."""
    taken = await take_every_connection(app.state.engine)
    try:
        response = await request
    finally:
        await taken.aclose()
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"] == "1"
    return response


@with_a_one_connection_pool
async def test_a_send_when_no_database_connection_comes_free_is_503_to_retry_and_stores_nothing(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await refused_while_the_pool_is_taken(
        app, send(client, alice, conversation_id, '[[reply="Here."]] q', "q-1")
    )
    assert await list_all_messages(client, alice, conversation_id) == []
    # The client's retry is a first send, answered.
    again = await send(client, alice, conversation_id, '[[reply="Here."]] q', "q-1")
    assert again.status_code == 201, again.text
    assert again.json()["assistant_message"]["content"] == "Here."


@with_a_one_connection_pool
async def test_a_read_when_no_database_connection_comes_free_is_503_to_retry(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await refused_while_the_pool_is_taken(
        app, client.get(f"/conversations/{conversation_id}/messages", headers=alice.headers)
    )


async def test_a_model_failure_is_503_with_both_messages_stored(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    response = await send(
        client, alice, conversation_id, '[[reply="one two three four" fail_after=2]] q'
    )
    assert_error(response, 503, "LLM_SERVICE_ERROR")
    messages = await list_all_messages(client, alice, conversation_id)
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "failed"),
    ]
    assert messages[1]["content"] == "one two"  # the partial text is kept


async def test_invalid_message_bodies_are_422(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    path = f"/conversations/{conversation_id}/messages"
    bodies: list[Any] = [
        {},
        {"content": ""},
        {"content": "   "},
        {"content": "x" * 8001},
        {"content": "a NUL \u0000 in it"},  # PostgreSQL's text cannot hold one
        {"content": 42},
        {"content": "hi", "client_message_id": ""},
        {"content": "hi", "client_message_id": "has spaces"},
        {"content": "hi", "client_message_id": "x" * 101},
        {"content": "hi", "role": "assistant"},
        ["hi"],
    ]
    for body in bodies:
        response = await client.post(path, json=body, headers=alice.headers)
        error = assert_error(response, 422, "VALIDATION_ERROR")
        assert error["details"], body
    not_json = await client.post(
        path,
        content=b"{not json",
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    assert_error(not_json, 422, "VALIDATION_ERROR")
    assert await list_all_messages(client, alice, conversation_id) == []


async def test_a_second_send_while_an_answer_streams_is_409(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    first = asyncio.create_task(send(client, alice, conversation_id, "[[hang_after=1]] first"))

    async def streaming() -> bool:
        return any(
            m["role"] == "assistant" and m["status"] == "streaming"
            for m in await list_all_messages(client, alice, conversation_id)
        )

    await eventually(streaming)
    second = await send(client, alice, conversation_id, "second", "second-1")
    assert_error(second, 409, "GENERATION_IN_PROGRESS")

    # Cancel once the model streams, so that cancelling has a stream to stop.
    await eventually(lambda: fake_model_of(app).active_streams == 1)
    cancel = await client.post(f"/conversations/{conversation_id}/cancel", headers=alice.headers)
    assert cancel.status_code == 202
    async with asyncio.timeout(10):
        done = await first
    assert done.status_code == 201
    assert done.json()["assistant_message"]["status"] == "cancelled"
    messages = await list_all_messages(client, alice, conversation_id)
    assert "second" not in [m["content"] for m in messages]
    assert fake_model_of(app).cancelled_streams == 1


async def test_cancel_stores_the_partial_answer_as_cancelled(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    waiting = asyncio.create_task(
        send(client, alice, conversation_id, '[[reply="alpha beta gamma" hang_after=2]] q')
    )
    model = fake_model_of(app)
    engine = app.state.generation_engine
    await eventually(lambda: [len(r.pieces) for r in engine.running.values()] == [2])
    response = await client.post(f"/conversations/{conversation_id}/cancel", headers=alice.headers)
    assert response.status_code == 202
    async with asyncio.timeout(10):
        body = (await waiting).json()
    assert body["assistant_message"]["status"] == "cancelled"
    assert body["assistant_message"]["content"] == "alpha beta"
    assert model.active_streams == 0
    assert model.cancelled_streams == 1


async def test_cancel_with_nothing_running_is_409(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    response = await client.post(f"/conversations/{conversation_id}/cancel", headers=alice.headers)
    assert_error(response, 409, "NOTHING_TO_CANCEL")
    await send(client, alice, conversation_id, '[[reply="done"]] q')
    response = await client.post(f"/conversations/{conversation_id}/cancel", headers=alice.headers)
    assert_error(response, 409, "NOTHING_TO_CANCEL")


# -- handoff -----------------------------------------------------------------------------------


async def handoff(client: httpx.AsyncClient, party: Party, conversation_id: str) -> dict[str, Any]:
    response = await client.post(
        f"/conversations/{conversation_id}/handoff",
        json={"reason": "wants a human"},
        headers=party.headers,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def assign(client: httpx.AsyncClient, agent: Party, conversation_id: str) -> dict[str, Any]:
    response = await client.post(f"/conversations/{conversation_id}/assign", headers=agent.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_handoff_makes_the_conversation_wait_for_an_agent(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    body = await handoff(client, alice, conversation_id)
    assert set(body) == CONVERSATION_FIELDS
    assert body["status"] == "waiting_for_agent"
    assert body["waiting_since"] is not None
    assert body["assigned_agent_id"] is None
    assert (await conversation_of(client, alice, conversation_id))["status"] == "waiting_for_agent"


async def test_handoff_without_a_body(client: httpx.AsyncClient, person: PartyFactory) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    response = await client.post(f"/conversations/{conversation_id}/handoff", headers=alice.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "waiting_for_agent"


async def test_agent_queue_lists_waiting_conversations_longest_waiting_first(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, bob = await person(), await person()
    agent = await person("agent")
    first = await new_conversation(client, alice)
    second = await new_conversation(client, bob)
    third = await new_conversation(client, alice)
    await new_conversation(client, bob)  # open: not in the queue
    for conversation_id in (first, second, third):
        await handoff(client, alice if conversation_id != second else bob, conversation_id)
    # Activity on the oldest waiting one does not move it in the queue.
    assert (await send(client, alice, first, "still there?")).status_code == 201

    response = await client.get("/agent/queue", headers=agent.headers)
    assert response.status_code == 200
    body = response.json()
    assert [item["id"] for item in body["items"]] == [first, second, third]
    assert all(item["status"] == "waiting_for_agent" for item in body["items"])
    assert body["next_cursor"] is None

    pages = await walk(client, agent, "/agent/queue", limit=2)
    assert [[item["id"] for item in page] for page in pages] == [[first, second], [third]]


async def test_agent_queue_is_for_agents_and_admins_only(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, admin = await person(), await person("admin")
    assert_error(await client.get("/agent/queue", headers=alice.headers), 403, "FORBIDDEN")
    assert (await client.get("/agent/queue", headers=admin.headers)).status_code == 200


async def test_customer_messages_get_no_answer_while_waiting_for_an_agent(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    response = await send(client, alice, conversation_id, "hello? anyone?", "w-1")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["assistant_message"] is None
    assert body["user_message"]["role"] == "user"
    messages = await list_all_messages(client, alice, conversation_id)
    assert "assistant" not in {m["role"] for m in messages}
    assert len(fake_model_of(app).requests) == 0


async def test_assign_is_for_agents_only(client: httpx.AsyncClient, person: PartyFactory) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    response = await client.post(f"/conversations/{conversation_id}/assign", headers=alice.headers)
    assert_error(response, 403, "FORBIDDEN")
    assert (await conversation_of(client, alice, conversation_id))["status"] == "waiting_for_agent"


async def test_assign_puts_the_conversation_with_the_agent(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    body = await assign(client, agent, conversation_id)
    assert body["status"] == "with_agent"
    assert body["assigned_agent_id"] == agent.id
    queue = await client.get("/agent/queue", headers=agent.headers)
    assert queue.json()["items"] == []


async def test_customer_messages_get_no_answer_while_with_an_agent(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    await assign(client, agent, conversation_id)
    response = await send(client, alice, conversation_id, "my order is late")
    assert response.status_code == 201
    assert response.json()["assistant_message"] is None
    assert fake_model_of(app).completed_streams == 0


async def test_the_assigned_agents_messages_are_stored_as_agent_messages(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    await assign(client, agent, conversation_id)
    response = await send(client, agent, conversation_id, "Hi, I'm Sam. Let me check.", "a-1")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["assistant_message"] is None
    assert body["user_message"]["role"] == "agent"
    assert body["user_message"]["author_id"] == agent.id
    messages = await list_all_messages(client, alice, conversation_id)
    assert messages[-1]["role"] == "agent"
    assert messages[-1]["content"] == "Hi, I'm Sam. Let me check."


async def test_an_unassigned_agent_may_not_reply(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, sam, kim = await person(), await person("agent"), await person("agent")
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    assert_error(await send(client, sam, conversation_id, "hello"), 403, "FORBIDDEN")
    await assign(client, sam, conversation_id)
    assert_error(await send(client, kim, conversation_id, "me too"), 403, "FORBIDDEN")
    roles = [m["role"] for m in await list_all_messages(client, alice, conversation_id)]
    assert "agent" not in roles


async def test_release_hands_the_conversation_back_to_the_ai(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(client, alice)
    await handoff(client, alice, conversation_id)
    await assign(client, agent, conversation_id)
    denied = await client.post(f"/conversations/{conversation_id}/release", headers=alice.headers)
    assert_error(denied, 403, "FORBIDDEN")

    response = await client.post(f"/conversations/{conversation_id}/release", headers=agent.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "open"
    assert response.json()["assigned_agent_id"] is None

    answered = await send(client, alice, conversation_id, '[[reply="Back again."]] thanks')
    assert answered.status_code == 201
    assert answered.json()["assistant_message"]["content"] == "Back again."


async def test_complete_resolves_the_conversation(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await send(client, alice, conversation_id, '[[reply="ok"]] q')
    before = completed_count("ai_only")
    response = await client.post(
        f"/conversations/{conversation_id}/complete", headers=alice.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "resolved"
    assert (await conversation_of(client, alice, conversation_id))["status"] == "resolved"
    # The outcome is recorded in the background, after the response.
    await eventually(lambda: completed_count("ai_only") == before + 1)


async def test_a_customer_message_reopens_a_resolved_conversation(
    client: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await client.post(f"/conversations/{conversation_id}/complete", headers=alice.headers)
    response = await send(client, alice, conversation_id, '[[reply="Welcome back."]] one more')
    assert response.status_code == 201
    assert response.json()["assistant_message"]["content"] == "Welcome back."
    assert (await conversation_of(client, alice, conversation_id))["status"] == "open"


async def test_sends_are_refused_with_503_once_the_server_drains(
    client: httpx.AsyncClient, person: PartyFactory, app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(client, alice)
    await app.state.generation_engine.drain(asyncio.get_running_loop().time())
    response = await send(client, alice, conversation_id, "anyone?")
    assert_error(response, 503, "SHUTTING_DOWN")
    assert await list_all_messages(client, alice, conversation_id) == []
