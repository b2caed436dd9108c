"""Server-Sent Events (SPEC.md: Conversations, Server-Sent Events frames), with httpx streaming
against the app under uvicorn."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import httpx
import pytest

from tests.realtime.fixtures import PartyFactory
from tests.realtime.helpers import (
    Party,
    SseEvent,
    answer_of,
    assert_error,
    collect_sse,
    eventually,
    list_all_messages,
    new_conversation,
    sse_events,
    wait_for_status,
    with_settings,
)

pytestmark = pytest.mark.slow


def stream_path(conversation_id: str) -> str:
    return f"/conversations/{conversation_id}/stream"


async def post_stream(
    http: httpx.AsyncClient, party: Party, conversation_id: str, content: str, client_id: str
) -> list[SseEvent]:
    """Send a message through `POST …/stream` and read the whole stream."""
    async with http.stream(
        "POST",
        stream_path(conversation_id),
        json={"content": content, "client_message_id": client_id},
        headers=party.headers,
    ) as response:
        assert response.status_code == 200
        return await collect_sse(response)


async def get_stream(
    http: httpx.AsyncClient,
    party: Party,
    conversation_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> list[SseEvent]:
    async with http.stream(
        "GET",
        stream_path(conversation_id),
        headers={**party.headers, **(headers or {})},
        params=params,
    ) as response:
        assert response.status_code == 200
        return await collect_sse(response)


def check_answer_ids(events: list[SseEvent]) -> None:
    """Answer events carry `id: <message_id>:<seq>`; other events no id."""
    for event in events:
        assert event.data is not None
        if event.type in {"token", "complete", "cancelled", "failed"}:
            assert event.id == f"{event.data['message_id']}:{event.data['seq']}"
        else:
            assert event.id is None


async def test_post_stream_sends_the_message_then_the_answer_and_ends(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with http.stream(
        "POST",
        stream_path(conversation_id),
        json={"content": "[[tokens=6]] Where is my parcel?", "client_message_id": "s-1"},
        headers=alice.headers,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = await collect_sse(response)
    check_answer_ids(events)
    first = events[0]
    assert first.id is None
    assert first.data is not None
    assert first.data["type"] == "message"
    assert first.data["message"]["role"] == "user"
    assert first.data["message"]["client_message_id"] == "s-1"
    answer = answer_of(events)
    assert answer.final is not None
    assert events[-1].data == answer.final  # the stream ends right after the final event
    assert answer.final["type"] == "complete"
    assert answer.seqs == sorted(set(answer.seqs))
    assert answer.final["seq"] > answer.seqs[-1]
    assert answer.final["message"]["content"] == answer.text
    assert len(answer.text.split()) == 6
    assert answer.final["usage"]["completion_tokens"] == 6
    assert all(frame["reply_to"] == "s-1" for frame in answer.tokens)


async def test_post_stream_with_no_answer_due_ends_after_the_message(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    handoff = await http.post(f"/conversations/{conversation_id}/handoff", headers=alice.headers)
    assert handoff.status_code == 200
    events = await post_stream(http, alice, conversation_id, "a human please", "h-1")
    assert [event.type for event in events] == ["message"]
    assert events[0].data is not None
    assert events[0].data["message"]["content"] == "a human please"


async def test_post_stream_refuses_bad_bodies_and_strangers(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, mallory = await person(), await person()
    conversation_id = await new_conversation(http, alice)
    path = stream_path(conversation_id)
    response = await http.post(path, json={"content": ""}, headers=alice.headers)
    assert_error(response, 422, "VALIDATION_ERROR")
    response = await http.post(path, json={"content": "hi"}, headers=mallory.headers)
    assert_error(response, 403, "FORBIDDEN")
    response = await http.post(path, json={"content": "hi"})
    assert_error(response, 401, "NOT_AUTHENTICATED")
    assert await list_all_messages(http, alice, conversation_id) == []


async def test_get_stream_after_last_event_id_replays_exactly_the_rest(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    full = answer_of(
        await post_stream(http, alice, conversation_id, "[[tokens=9 delay_ms=5]] q", "l-1")
    )
    assert full.final is not None
    seen = full.tokens[: len(full.tokens) // 2]
    last = f"{full.message_id}:{seen[-1]['seq']}"

    events = await get_stream(http, alice, conversation_id, headers={"Last-Event-ID": last})
    check_answer_ids(events)
    rest = answer_of(events)
    assert rest.final is not None
    assert events[-1].data == rest.final
    assert all(seq > seen[-1]["seq"] for seq in rest.seqs)
    assert "".join(f["content"] for f in seen) + rest.text == full.final["message"]["content"]
    assert rest.final["message"] == full.final["message"]


async def test_get_stream_with_message_id_and_after_replays_exactly_the_rest(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    full = answer_of(
        await post_stream(http, alice, conversation_id, "[[tokens=7 delay_ms=5]] q", "p-1")
    )
    assert full.final is not None
    after = full.tokens[len(full.tokens) // 2]["seq"]
    events = await get_stream(
        http, alice, conversation_id, params={"message_id": full.message_id, "after": after}
    )
    rest = answer_of(events)
    expected = "".join(f["content"] for f in full.tokens if f["seq"] > after)
    assert rest.text == expected
    assert rest.final is not None
    assert rest.final["type"] == "complete"


async def test_get_stream_after_the_final_event_has_nothing_more(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    full = answer_of(await post_stream(http, alice, conversation_id, "[[tokens=3]] q", "e-1"))
    assert full.final is not None
    last = f"{full.message_id}:{full.final['seq']}"
    events = await get_stream(http, alice, conversation_id, headers={"Last-Event-ID": last})
    assert events == []


async def test_a_client_that_reconnects_mid_answer_gets_the_rest_without_gap_or_duplicate(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    seen: list[SseEvent] = []
    async with http.stream(
        "POST",
        stream_path(conversation_id),
        json={"content": "[[tokens=40 delay_ms=15]] q", "client_message_id": "m-1"},
        headers=alice.headers,
    ) as response:
        async for event in sse_events(response):
            if event.type == "token":
                seen.append(event)
            if len(seen) == 5:
                break  # the connection drops here
    last_id = seen[-1].id
    assert last_id is not None

    events = await get_stream(http, alice, conversation_id, headers={"Last-Event-ID": last_id})
    rest = answer_of(events)
    assert rest.final is not None
    assert rest.final["type"] == "complete"
    assert rest.tokens, "the answer was still streaming: there was text left to send"
    before = "".join(str(event.data["content"]) for event in seen if event.data)
    assert before + rest.text == rest.final["message"]["content"]
    assert len(rest.final["message"]["content"].split()) == 40


async def test_get_stream_without_an_id_follows_the_answer_in_progress_from_its_start(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    sending = asyncio.create_task(
        http.post(
            f"/conversations/{conversation_id}/messages",
            json={"content": "[[tokens=30 delay_ms=15]] q"},
            headers=alice.headers,
        )
    )

    async def streaming() -> bool:
        messages = await list_all_messages(http, alice, conversation_id)
        return any(m["status"] == "streaming" for m in messages)

    await eventually(streaming)
    events = await get_stream(http, alice, conversation_id)
    answer = answer_of(events)
    assert answer.final is not None
    assert answer.final["message"]["status"] == "complete"
    assert answer.text == answer.final["message"]["content"]
    assert len(answer.text.split()) == 30
    async with asyncio.timeout(15):
        assert (await sending).status_code == 201


async def test_get_stream_without_an_id_replays_the_last_answer_then_ends(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    await post_stream(http, alice, conversation_id, '[[reply="first answer"]] one', "o-1")
    second = answer_of(
        await post_stream(http, alice, conversation_id, '[[reply="second answer"]] two', "o-2")
    )
    events = await get_stream(http, alice, conversation_id)
    replayed = answer_of(events)
    assert replayed.final is not None
    assert replayed.message_id == second.message_id
    assert replayed.text == "second answer"
    assert replayed.final["message"]["content"] == "second answer"


async def test_get_stream_of_a_conversation_without_an_answer_is_404(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    response = await http.get(stream_path(conversation_id), headers=alice.headers)
    assert_error(response, 404, "NOT_FOUND")
    response = await http.get(
        stream_path(conversation_id),
        params={"message_id": str(uuid.uuid4()), "after": 0},
        headers=alice.headers,
    )
    assert_error(response, 404, "NOT_FOUND")


async def test_a_bad_last_event_id_is_400(http: httpx.AsyncClient, person: PartyFactory) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    await post_stream(http, alice, conversation_id, '[[reply="ok"]] q', "b-1")
    for value in ("garbage", str(uuid.uuid4()), f"{uuid.uuid4()}:x", f"{uuid.uuid4()}:-1"):
        response = await http.get(
            stream_path(conversation_id), headers={**alice.headers, "Last-Event-ID": value}
        )
        assert_error(response, 400, "BAD_REQUEST")


async def test_another_customers_stream_is_403(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, mallory = await person(), await person()
    conversation_id = await new_conversation(http, alice)
    await post_stream(http, alice, conversation_id, '[[reply="private"]] q', "x-1")
    response = await http.get(stream_path(conversation_id), headers=mallory.headers)
    assert_error(response, 403, "FORBIDDEN")


@with_settings(sse_keepalive_s=0.1)
async def test_keep_alive_comments_are_sent_while_the_answer_pauses(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    events = await post_stream(
        http, alice, conversation_id, "[[tokens=3 delay_ms=600]] slowly please", "k-1"
    )
    keepalives = [event for event in events if event.data is None]
    assert len(keepalives) >= 3
    assert all(event.comments == ("keep-alive",) for event in keepalives)
    assert all(event.id is None for event in keepalives)
    answer = answer_of(events)
    assert answer.final is not None
    assert len(answer.text.split()) == 3
    # Comments come between the answer's events, not only at the end.
    kinds = [event.type for event in events]
    first_token = kinds.index("token")
    assert None in kinds[first_token : kinds.index("complete")]


async def test_a_client_disconnecting_mid_stream_does_not_stop_the_answer(
    http: httpx.AsyncClient, person: PartyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    message_id: str | None = None
    async with http.stream(
        "POST",
        stream_path(conversation_id),
        json={"content": "[[tokens=30 delay_ms=20]] q", "client_message_id": "d-1"},
        headers=alice.headers,
    ) as response:
        async for event in sse_events(response):
            if event.type == "token" and event.data is not None:
                message_id = str(event.data["message_id"])
                break  # gone after the first piece
    assert message_id is not None
    stored = await wait_for_status(
        http, alice, conversation_id, message_id, "complete", "cancelled", "failed"
    )
    assert stored["status"] == "complete"
    assert len(stored["content"].split()) == 30
    # Leaving is ordinary for a stream: nothing failed on the server's side.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
