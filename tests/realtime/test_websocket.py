"""The chat WebSocket (SPEC.md: WebSocket), with a real client against the app under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import event
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from helpline.agents.providers.fake import FakeChatModel
from helpline.auth.security import TokenCodec, new_jti
from helpline.kit.models import utcnow
from tests.realtime.fixtures import PartyFactory
from tests.realtime.helpers import (
    Answer,
    ChatSocket,
    Party,
    eventually,
    list_all_messages,
    new_conversation,
    open_socket,
    small_receive_buffer_socket,
    stored_message,
    take_every_connection,
    wait_for_status,
    with_send_buffer,
    with_settings,
)
from tests.servers import LiveServer

pytestmark = pytest.mark.slow

TOKEN_FIELDS = {"type", "message_id", "reply_to", "seq", "content"}


async def expect_error(socket: ChatSocket, code: str) -> dict[str, Any]:
    """The next frame is an `error` with `code`, and the socket still answers `ping`."""
    frame = await socket.recv()
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["message"]
    await socket.send(type="ping")
    assert await socket.recv() == {"type": "pong"}
    return frame


# -- authentication and authorisation ----------------------------------------------------------


async def test_a_socket_without_a_token_is_closed_with_4001(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id) as socket:
        assert await socket.closed() == (4001, "Unauthorized")


async def test_a_socket_with_a_bad_token_is_closed_with_4001(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    for token in ("not-a-token", alice.token + "x", "hl_not_a_key"):
        async with open_socket(live_server.ws_url, conversation_id, token) as socket:
            assert await socket.closed() == (4001, "Unauthorized")


async def test_a_bearer_header_authenticates_the_socket(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(
        live_server.ws_url, conversation_id, additional_headers=alice.headers
    ) as socket:
        await socket.send(type="ping")
        assert await socket.recv() == {"type": "pong"}


async def test_an_api_key_opens_its_owners_conversations_only(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, bob = await person(), await person()
    conversation_id = await new_conversation(http, alice)
    created = await http.post("/auth/api-keys", headers=alice.headers, json={"name": "app"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    async with open_socket(live_server.ws_url, conversation_id, key) as socket:
        await socket.chat('[[reply="Answered by key."]] q', "by-key")
        answer = await socket.answer()
    assert answer.text == "Answered by key."
    assert answer.final is not None
    assert answer.final["type"] == "complete"
    async with open_socket(live_server.ws_url, await new_conversation(http, bob), key) as socket:
        code, _ = await socket.closed()
    assert code == 4003


async def test_another_customers_conversation_is_closed_with_4003(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, mallory = await person(), await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, mallory.token) as socket:
        code, _ = await socket.closed()
    assert code == 4003


async def test_an_unknown_conversation_is_closed_with_4004(
    live_server: LiveServer, person: PartyFactory
) -> None:
    alice = await person()
    for conversation_id in (str(uuid.uuid4()), "not-a-uuid"):
        async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
            code, _ = await socket.closed()
        assert code == 4004


@with_settings(cors_origins=["https://app.example.com"])
async def test_a_foreign_origin_is_refused_at_the_handshake(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    with pytest.raises(InvalidStatus) as refused:
        async with open_socket(
            live_server.ws_url,
            conversation_id,
            alice.token,
            origin=Origin("https://evil.example.com"),
        ):
            pass
    assert refused.value.response.status_code == 403

    async with open_socket(
        live_server.ws_url,
        conversation_id,
        alice.token,
        origin=Origin("https://app.example.com"),
    ) as socket:
        await socket.send(type="ping")
        assert await socket.recv() == {"type": "pong"}


async def test_a_deactivated_users_socket_is_closed_with_4001(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, admin = await person(), await person("admin")
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.ping()
        response = await http.patch(
            f"/admin/users/{alice.id}", json={"is_active": False}, headers=admin.headers
        )
        assert response.status_code == 200, response.text
        code, _ = await socket.closed()
    assert code == 4001


async def test_a_revoked_logins_socket_is_closed_with_4001_and_other_logins_stay(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    other_login = await http.post(
        "/auth/token", data={"username": alice.user.username, "password": "correct-horse-battery"}
    )
    other_token = other_login.json()["access_token"]
    sessions = await http.get("/auth/sessions", headers=alice.headers)
    (first_login,) = [item["id"] for item in sessions.json()["items"] if item["current"]]

    async with (
        open_socket(live_server.ws_url, conversation_id, alice.token) as revoked,
        open_socket(live_server.ws_url, conversation_id, other_token) as kept,
    ):
        await revoked.ping()
        await kept.ping()
        response = await http.delete(
            f"/auth/sessions/{first_login}", headers={"Authorization": f"Bearer {other_token}"}
        )
        assert response.status_code == 204, response.text
        code, _ = await revoked.closed()
        assert code == 4001
        await kept.send(type="ping")
        assert await kept.recv() == {"type": "pong"}


async def test_a_socket_is_closed_with_4001_when_its_token_expires(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory, live_app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    claims = jwt.decode(alice.token, options={"verify_signature": False})
    codec = TokenCodec.from_settings(live_app.state.settings, live_app.state.jwt_secret)
    now = utcnow()
    short_lived = codec.encode(
        token_type="access",
        user_id=alice.user.id,
        login_id=uuid.UUID(claims["sid"]),
        jti=new_jti(),
        issued_at=now,
        expires_at=now + timedelta(seconds=2),
    )
    async with open_socket(live_server.ws_url, conversation_id, short_lived) as socket:
        await socket.ping()  # valid when it connected
        code, _ = await socket.closed()
    assert code == 4001


async def test_the_handshake_echoes_the_request_id(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    headers = {"X-Request-ID": "support-widget-42"}
    async with open_socket(
        live_server.ws_url, conversation_id, alice.token, additional_headers=headers
    ) as socket:
        response = socket.connection.response
        assert response is not None
        assert response.headers["X-Request-ID"] == "support-widget-42"
        await socket.ping()


async def test_a_handshake_looks_up_by_driver_statements_one_connection_at_a_time(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    """Who connects and to which conversation: a statement on the driver each, nothing
    through SQLAlchemy's ORM, each on a pooled connection of its own, never two held at once."""
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.ping()  # the login is known now: later handshakes need not look it up
    database = live_server.server.config.app.state.engine.sync_engine
    pool: list[str] = []
    through_sqlalchemy: list[str] = []

    def checked_out(*_: object) -> None:
        pool.append("out")

    def checked_in(*_: object) -> None:
        pool.append("in")

    def executed(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        through_sqlalchemy.append(statement)

    listeners = (
        ("checkout", checked_out),
        ("checkin", checked_in),
        ("before_cursor_execute", executed),
    )
    for name, listener in listeners:
        event.listen(database, name, listener)
    try:
        async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
            await socket.ping()
    finally:
        for name, listener in listeners:
            event.remove(database, name, listener)
    assert pool == ["out", "in", "out", "in"]
    assert through_sqlalchemy == []


@with_settings(database_pool_size=2)  # one handshake at a time does its database work
async def test_sockets_connecting_at_once_all_get_in_past_the_handshake_slots(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with contextlib.AsyncExitStack() as stack:
        sockets = await asyncio.gather(
            *(
                stack.enter_async_context(
                    open_socket(live_server.ws_url, conversation_id, alice.token)
                )
                for _ in range(20)
            )
        )
        await asyncio.gather(*(socket.ping() for socket in sockets))
        await sockets[0].chat("[[tokens=3]] Hello?", "msg-1")
        for socket in sockets:
            stored = await socket.recv_type("message")
            assert stored["message"]["client_message_id"] == "msg-1"
            assert (await socket.answer()).final is not None


# -- chatting ----------------------------------------------------------------------------------


async def test_a_socket_keeps_a_writer_task_only_while_it_has_frames_to_send(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory, live_app: FastAPI
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    registry = live_app.state.ws_connections
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await eventually(lambda: len(registry.connections) == 1)
        (connection,) = registry.connections
        assert not connection.writing  # an idle socket: no task of its own
        await socket.chat("[[tokens=20 delay_ms=20]] Where is my parcel?", "msg-1")
        await socket.recv_type("message")
        first = await socket.recv_type("token")
        assert connection.writing  # mid-answer, between pieces
        answer = await socket.answer(already=[first])
        assert answer.final is not None
        assert answer.final["type"] == "complete"
        assert answer.text == answer.final["message"]["content"]
        await eventually(lambda: not connection.writing)
        await socket.ping()  # the next frame starts a writer again
        await eventually(lambda: not connection.writing)


async def test_chat_streams_the_message_then_numbered_tokens_then_complete(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        content = "[[tokens=8 delay_ms=10]] Where is my parcel?"
        await socket.chat(content, "msg-1")
        stored = await socket.recv()
        assert stored["type"] == "message"
        assert set(stored) == {"type", "message"}
        assert stored["message"]["role"] == "user"
        assert stored["message"]["content"] == content
        assert stored["message"]["client_message_id"] == "msg-1"
        assert stored["message"]["author_id"] == alice.id

        answer = Answer()
        while not answer.add(await socket.recv()):
            pass
    # A frame per piece while the server keeps up; a busy server joins pieces (fewer frames,
    # and `seq` may jump), the text never has a gap.
    assert answer.seqs == sorted(set(answer.seqs))
    for frame in answer.tokens:
        assert set(frame) == TOKEN_FIELDS
        assert frame["reply_to"] == "msg-1"
    assert len({frame["message_id"] for frame in answer.tokens}) == 1
    final = answer.final
    assert final is not None
    assert final["type"] == "complete"
    assert final["seq"] == answer.seqs[-1] + 1
    assert final["reply_to"] == "msg-1"
    assert final["message_id"] == answer.tokens[0]["message_id"]
    assert final["message"]["id"] == final["message_id"]
    assert final["message"]["role"] == "assistant"
    assert final["message"]["status"] == "complete"
    assert final["message"]["content"] == answer.text
    usage = final["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens"}
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 8
    messages = await list_all_messages(http, alice, conversation_id)
    assert messages[-1] == final["message"]


async def test_every_socket_of_the_conversation_gets_the_same_frames(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    async with (
        open_socket(url, conversation_id, alice.token) as tab_one,
        open_socket(url, conversation_id, alice.token) as tab_two,
        open_socket(url, conversation_id, agent.token) as agent_socket,
    ):
        for socket in (tab_one, tab_two, agent_socket):
            await socket.ping()  # all three are subscribed
        await tab_one.chat("[[tokens=12 delay_ms=5]] hello", "fan-1")
        seen = []
        for socket in (tab_one, tab_two, agent_socket):
            message = await socket.recv()
            answer = await socket.answer()
            seen.append((message, answer))
    (message, answer), *others = seen
    assert message["type"] == "message"
    assert answer.final is not None
    for other_message, other_answer in others:
        assert other_message == message
        assert other_answer.text == answer.text
        assert other_answer.final == answer.final
    assert answer.final["message"]["content"] == answer.text


async def test_a_message_sent_over_rest_is_streamed_to_the_open_sockets(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.ping()
        response = await http.post(
            f"/conversations/{conversation_id}/messages",
            json={"content": '[[reply="From REST."]] q', "client_message_id": "rest-1"},
            headers=alice.headers,
        )
        assert response.status_code == 201
        message = await socket.recv()
        answer = await socket.answer()
    body = response.json()
    assert message == {"type": "message", "message": body["user_message"]}
    assert answer.final is not None
    assert answer.text == "From REST."
    assert answer.final["reply_to"] == "rest-1"
    assert answer.final["message"] == body["assistant_message"]


async def test_an_answer_is_stored_complete_after_its_client_disconnects(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat("[[tokens=30 delay_ms=20]] long answer please", "leave-1")
        await socket.recv_type("token")
    # The client has gone; the answer goes on to its end.
    answer = await eventually(
        lambda: _latest_answer(http, alice, conversation_id), within=20, interval=0.1
    )
    stored = await wait_for_status(http, alice, conversation_id, answer["id"], "complete")
    assert len(stored["content"].split()) == 30
    assert stored["token_count"] == 30


async def _latest_answer(
    http: httpx.AsyncClient, party: Party, conversation_id: str
) -> dict[str, Any] | None:
    answers = [
        m for m in await list_all_messages(http, party, conversation_id) if m["role"] == "assistant"
    ]
    return answers[-1] if answers else None


async def test_resume_after_seq_n_yields_exactly_the_rest_of_an_ended_answer(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    async with open_socket(url, conversation_id, alice.token) as first:
        await first.chat("[[tokens=10 delay_ms=5]] q", "r-1")
        full = await first.answer()
    assert full.final is not None
    seen = [frame for frame in full.tokens if frame["seq"] <= 4]
    text_seen = "".join(frame["content"] for frame in seen)
    last_seen = seen[-1]["seq"]

    async with open_socket(url, conversation_id, alice.token) as second:
        await second.send(type="resume", message_id=full.message_id, after_seq=last_seen)
        rest = await second.answer()
    assert rest.final is not None
    assert all(seq > last_seen for seq in rest.seqs)
    assert text_seen + rest.text == full.final["message"]["content"]
    assert rest.final["seq"] == full.final["seq"]
    assert rest.final["message"] == full.final["message"]


async def test_resume_mid_stream_joins_replay_and_live_frames_without_gap_or_duplicate(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    async with open_socket(url, conversation_id, alice.token) as first:
        await first.chat("[[tokens=60 delay_ms=10]] q", "mid-1")
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["seq"] < 5:
            frame = await first.recv()
            if frame["type"] == "token":
                seen.append(frame)
    # The first socket is gone after seq >= 5; a new one resumes while the answer streams.
    message_id = seen[0]["message_id"]
    last_seen = seen[-1]["seq"]
    async with open_socket(url, conversation_id, alice.token) as second:
        await second.send(type="resume", message_id=message_id, after_seq=last_seen)
        rest = await second.answer()
    assert rest.final is not None
    assert rest.final["type"] == "complete"
    assert rest.tokens, "the answer was still streaming: the resume must have had text to send"
    assert rest.seqs == sorted(set(rest.seqs))
    assert rest.seqs[0] > last_seen
    full_text = rest.final["message"]["content"]
    assert "".join(frame["content"] for frame in seen) + rest.text == full_text
    assert len(full_text.split()) == 60


@with_send_buffer(16384)
async def test_a_client_that_falls_behind_gets_merged_tokens_without_a_gap_and_can_resume(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    # Tiny buffers on both ends and no compression: the server's writes to it back up at once.
    behind = small_receive_buffer_socket("127.0.0.1", live_server.port)
    async with open_socket(
        url, conversation_id, alice.token, sock=behind, max_queue=1, compression=None
    ) as slow:
        await slow.ping()
        await slow.chat("[[tokens=6000]] " + "w" * 150, "merge-1")
        # Read nothing while the answer is generated: its tokens pile up for this client.
        answer_row = await eventually(
            lambda: _latest_answer(http, alice, conversation_id), within=20, interval=0.1
        )
        stored = await wait_for_status(http, alice, conversation_id, answer_row["id"], "complete")
        await slow.recv_type("message")
        merged = await slow.answer()
    assert merged.final is not None
    assert merged.text == stored["content"]
    assert merged.seqs == sorted(set(merged.seqs))
    jumps = [b - a for a, b in zip(merged.seqs, merged.seqs[1:], strict=False)]
    assert any(jump > 1 for jump in jumps), "no frames were merged"
    assert len(merged.text.split()) == 6000
    assert merged.final["seq"] == merged.seqs[-1] + 1

    # Resuming after the seq of a merged frame yields exactly the text after it.
    cut = next(i for i, jump in enumerate(jumps) if jump > 1) + 1
    last_seen = merged.seqs[cut]
    text_seen = "".join(frame["content"] for frame in merged.tokens[: cut + 1])
    async with open_socket(url, conversation_id, alice.token) as again:
        await again.send(type="resume", message_id=merged.message_id, after_seq=last_seen)
        rest = await again.answer(within=30)
    assert text_seen + rest.text == stored["content"]


async def test_cancel_stops_the_model_and_tells_every_socket(
    live_server: LiveServer,
    http: httpx.AsyncClient,
    person: PartyFactory,
    fake_model: FakeChatModel,
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    async with (
        open_socket(url, conversation_id, alice.token) as one,
        open_socket(url, conversation_id, alice.token) as two,
    ):
        await two.ping()
        await one.chat("[[tokens=500 delay_ms=10]] tell me everything", "c-1")
        first = await one.recv_type("token")
        await one.send(type="cancel")
        answers = [await one.answer(already=[first]), await two.answer()]
    for answer in answers:
        assert answer.final is not None
        assert answer.final["type"] == "cancelled"
        assert answer.final["reply_to"] == "c-1"
        assert answer.final["message"]["status"] == "cancelled"
    partial = answers[0].final["message"]["content"]  # type: ignore[index]
    assert answers[1].final == answers[0].final
    assert partial.startswith(answers[0].text)
    assert 0 < len(partial.split()) < 500
    stored = await wait_for_status(http, alice, conversation_id, answers[0].message_id, "cancelled")
    assert stored["content"] == partial
    # The provider's stream was closed, not left running in the background.
    assert fake_model.cancelled_streams == 1
    assert fake_model.active_streams == 0
    assert fake_model.completed_streams == 0


async def test_cancel_with_nothing_running_is_an_error_and_the_socket_stays_usable(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.send(type="cancel")
        await expect_error(socket, "NOTHING_TO_CANCEL")
        await socket.chat('[[reply="still here"]] q', "after-cancel")
        answer = await socket.answer()
    assert answer.final is not None
    assert answer.final["message"]["content"] == "still here"


async def test_a_model_failure_mid_stream_sends_failed_and_keeps_the_partial_text(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat('[[reply="one two three four five" fail_after=3]] q', "f-1")
        answer = await socket.answer()
        await socket.ping()  # the socket outlives the failure
    final = answer.final
    assert final is not None
    assert final["type"] == "failed"
    assert final["code"] == "LLM_SERVICE_ERROR"
    assert final["detail"]
    assert final["reply_to"] == "f-1"
    assert final["seq"] == answer.seqs[-1] + 1
    assert answer.text == "one two three"
    assert final["message"]["status"] == "failed"
    assert final["message"]["content"] == "one two three"
    stored = await stored_message(http, alice, conversation_id, final["message_id"])
    assert stored is not None
    assert stored["status"] == "failed"
    assert stored["content"] == "one two three"


@contextlib.asynccontextmanager
async def every_connection_taken(live_server: LiveServer, live_app: FastAPI) -> AsyncIterator[None]:
    """The server's database pool, emptied for the block (in the server's own event loop)."""
    taken = await live_server.run_in_server(take_every_connection(live_app.state.engine))
    try:
        yield
    finally:
        await live_server.run_in_server(taken.aclose())


@with_settings(database_pool_timeout_s=0.2)
async def test_a_chat_when_no_database_connection_comes_free_gets_an_error_to_retry(
    live_server: LiveServer, live_app: FastAPI, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        async with every_connection_taken(live_server, live_app):
            await socket.chat('[[reply="Here."]] q', "q-1")
            error = await socket.recv_type("error")
        assert error["code"] == "SERVICE_UNAVAILABLE"
        assert error["reply_to"] == "q-1"
        # The socket stays open, and the client's retry is answered.
        await socket.chat('[[reply="Here."]] q', "q-1")
        stored = await socket.recv_type("message")
        assert stored["message"]["client_message_id"] == "q-1"
        answer = await socket.answer()
        assert answer.final is not None
        assert answer.final["message"]["content"] == "Here."


@with_settings(database_pool_timeout_s=0.2)
async def test_a_handshake_when_no_database_connection_comes_free_is_closed_to_retry_later(
    live_server: LiveServer, live_app: FastAPI, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.ping()  # the login's revocation is known now: only the lookups remain
    async with (
        every_connection_taken(live_server, live_app),
        open_socket(live_server.ws_url, conversation_id, alice.token) as socket,
    ):
        refused = await socket.closed()
    assert refused == (1013, "Try again later")
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.ping()


async def test_a_second_chat_while_an_answer_streams_is_refused_with_generation_in_progress(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat("[[hang_after=1]] first", "busy-1")
        await socket.recv_type("token")
        await socket.chat("second", "busy-2")
        error = await socket.recv_type("error")
        assert error["code"] == "GENERATION_IN_PROGRESS"
        assert error["reply_to"] == "busy-2"
        await socket.send(type="cancel")
        answer = await socket.answer()
        assert answer.final is not None
        assert answer.final["type"] == "cancelled"
    contents = [m["content"] for m in await list_all_messages(http, alice, conversation_id)]
    assert "second" not in contents


async def test_an_idempotent_resend_gets_the_stored_message_and_the_final_frame(
    live_server: LiveServer,
    http: httpx.AsyncClient,
    person: PartyFactory,
    fake_model: FakeChatModel,
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    content = '[[reply="Your refund is on its way."]] refund?'
    async with open_socket(url, conversation_id, alice.token) as socket:
        await socket.chat(content, "dup-1")
        original_message = await socket.recv()
        original = await socket.answer()

    async with (
        open_socket(url, conversation_id, alice.token) as resender,
        open_socket(url, conversation_id, alice.token) as bystander,
    ):
        await bystander.ping()
        await resender.chat(content, "dup-1")
        assert await resender.recv() == original_message
        replay = await resender.recv()
        assert replay == original.final
        await resender.send(type="ping")
        assert await resender.recv() == {"type": "pong"}  # nothing more came
        await bystander.send(type="ping")
        assert await bystander.recv() == {"type": "pong"}  # the others got nothing
    assert len(await list_all_messages(http, alice, conversation_id)) == 2
    assert fake_model.completed_streams == 1


async def test_a_resend_on_the_same_socket_gets_the_message_and_final_frame_again(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    content = '[[reply="Done."]] close my account'
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat(content, "same-1")
        message = await socket.recv()
        original = await socket.answer()
        await socket.chat(content, "same-1")
        assert await socket.recv() == message
        assert await socket.recv() == original.final
    assert len(await list_all_messages(http, alice, conversation_id)) == 2


async def test_a_resend_while_the_answer_streams_reattaches_the_socket(
    live_server: LiveServer,
    http: httpx.AsyncClient,
    person: PartyFactory,
    fake_model: FakeChatModel,
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    content = "[[tokens=40 delay_ms=10]] q"
    async with open_socket(url, conversation_id, alice.token) as socket:
        await socket.chat(content, "again-1")
        first = await socket.recv_type("token")
        await socket.chat(content, "again-1")
        answer = await socket.answer(already=[first])
    assert answer.final is not None
    assert answer.final["type"] == "complete"
    assert answer.seqs == sorted(set(answer.seqs))  # no frame twice
    assert answer.text == answer.final["message"]["content"]
    assert len(await list_all_messages(http, alice, conversation_id)) == 2
    assert fake_model.completed_streams == 1


async def test_typing_is_relayed_to_the_other_participants_only(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    async with (
        open_socket(url, conversation_id, alice.token) as customer,
        open_socket(url, conversation_id, agent.token) as staff,
    ):
        await staff.ping()
        await customer.send(type="typing")
        assert await staff.recv() == {"type": "typing", "user_id": alice.id}
        await customer.send(type="ping")
        assert await customer.recv() == {"type": "pong"}  # no echo of its own typing
        await staff.send(type="typing")
        assert await customer.recv() == {"type": "typing", "user_id": agent.id}


# -- bad input ---------------------------------------------------------------------------------


@with_settings(ws_rate_limit="1000/second")
async def test_a_frame_that_is_not_json_is_a_bad_request(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        for raw in ("{not json", "[1, 2]", '"chat"', "null"):
            await socket.send_raw(raw)
            await expect_error(socket, "BAD_REQUEST")
        # Nothing was lost: the socket still chats.
        await socket.chat('[[reply="fine"]] q', "ok-1")
        assert (await socket.answer()).text == "fine"


@with_settings(ws_rate_limit="1000/second")
async def test_an_unknown_frame_type_is_a_bad_request(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.send(type="shout", content="hello")
        await expect_error(socket, "BAD_REQUEST")
        await socket.send(content="no type at all")
        await expect_error(socket, "BAD_REQUEST")


@with_settings(ws_rate_limit="1000/second")
async def test_a_chat_frame_with_a_missing_or_bad_field_is_a_bad_request(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.send(type="chat", message_id="no-content")
        error = await expect_error(socket, "BAD_REQUEST")
        assert error["reply_to"] == "no-content"
        await socket.send(type="chat", content="   ", message_id="blank")
        await expect_error(socket, "BAD_REQUEST")
        await socket.send(type="chat", content="x" * 8001, message_id="too-long")
        await expect_error(socket, "BAD_REQUEST")
        await socket.send(type="chat", content="a NUL \u0000 in it", message_id="nul")
        await expect_error(socket, "BAD_REQUEST")
        await socket.send(type="chat", content="hi", message_id="has spaces")
        await expect_error(socket, "BAD_REQUEST")
    assert await list_all_messages(http, alice, conversation_id) == []


@with_settings(ws_max_frame_bytes=1024, ws_rate_limit="1000/second")
async def test_an_oversized_frame_is_payload_too_large(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat("x" * 2000, "big-1")
        await expect_error(socket, "PAYLOAD_TOO_LARGE")
        await socket.chat("é" * 600, "big-2")  # 600 characters, 1,200 bytes
        await expect_error(socket, "PAYLOAD_TOO_LARGE")
    assert await list_all_messages(http, alice, conversation_id) == []


@with_settings(ws_rate_limit="1000/second")
async def test_resume_with_a_bad_seq_is_a_bad_request(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat('[[reply="a b c"]] q', "seq-1")
        answer = await socket.answer()
        assert answer.final is not None
        for after_seq in (-1, "three", None, answer.final["seq"] + 5):
            await socket.send(type="resume", message_id=answer.message_id, after_seq=after_seq)
            await expect_error(socket, "BAD_REQUEST")
        await socket.send(type="resume", message_id="not-a-uuid", after_seq=0)
        await expect_error(socket, "BAD_REQUEST")


@with_settings(ws_rate_limit="1000/second")
async def test_resume_of_an_unknown_answer_is_not_found(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, bob = await person(), await person()
    conversation_id = await new_conversation(http, alice)
    bobs_conversation = await new_conversation(http, bob)
    response = await http.post(
        f"/conversations/{bobs_conversation}/messages",
        json={"content": '[[reply="private"]] q'},
        headers=bob.headers,
    )
    bobs_answer = response.json()["assistant_message"]["id"]
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.send(type="resume", message_id=str(uuid.uuid4()), after_seq=0)
        await expect_error(socket, "NOT_FOUND")
        # Another conversation's answer is unknown here too: nothing of it is replayed.
        await socket.send(type="resume", message_id=bobs_answer, after_seq=0)
        await expect_error(socket, "NOT_FOUND")


@with_settings(ws_rate_limit="1000/second")
async def test_a_binary_frame_is_a_bad_request(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.send_raw(b'{"type": "ping"}')
        await expect_error(socket, "BAD_REQUEST")


@with_settings(ws_rate_limit="3/minute")
async def test_too_many_frames_are_rate_limited_and_the_socket_stays_open(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        for _ in range(5):
            await socket.send(type="ping")
        frames = [await socket.recv() for _ in range(5)]
    assert frames[:3] == [{"type": "pong"}] * 3
    for frame in frames[3:]:
        assert frame["type"] == "error"
        assert frame["code"] == "RATE_LIMITED"


@with_settings(token_budget_daily=20)
async def test_a_chat_past_the_daily_token_budget_gets_an_error_frame_and_no_answer(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        await socket.chat("[[tokens=30]] a long one", "within-budget")
        assert (await socket.answer()).final is not None
        await socket.chat("and another", "past-budget")
        refused = await expect_error(socket, "TOKEN_BUDGET_EXCEEDED")
    assert refused["reply_to"] == "past-budget"
    contents = [m["content"] for m in await list_all_messages(http, alice, conversation_id)]
    assert "and another" not in contents


def frames_counted(direction: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "helpline_websocket_frames_total", {"direction": direction, "type": kind}
    )
    return value or 0.0


async def test_frames_in_and_out_are_counted_in_the_metrics(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    received, pongs = frames_counted("in", "any"), frames_counted("out", "pong")
    async with open_socket(live_server.ws_url, conversation_id, alice.token) as socket:
        for _ in range(3):
            await socket.send(type="ping")
            assert await socket.recv() == {"type": "pong"}
    assert frames_counted("in", "any") == received + 3
    assert frames_counted("out", "pong") == pongs + 3


# -- slow consumers ----------------------------------------------------------------------------


def slow_consumers_closed() -> float:
    """How many sockets the server has closed as slow consumers (it runs in this process)."""
    value = REGISTRY.get_sample_value("helpline_websocket_slow_consumer_disconnects_total")
    return value or 0.0


@with_send_buffer(16384)
@with_settings(ws_send_timeout_s=0.5, ws_send_queue_size=8)
async def test_a_client_that_stops_reading_is_closed_with_4008_and_the_others_get_every_token(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice = await person()
    conversation_id = await new_conversation(http, alice)
    url = live_server.ws_url
    # Tiny buffers on both ends and no compression: the stuck client pushes back at once.
    stuck_sock = small_receive_buffer_socket("127.0.0.1", live_server.port)
    before = slow_consumers_closed()
    async with (
        open_socket(
            url, conversation_id, alice.token, sock=stuck_sock, max_queue=1, compression=None
        ) as stuck,
        open_socket(url, conversation_id, alice.token) as reader,
    ):
        await stuck.ping()
        await reader.ping()
        # More text than the stuck socket's buffers hold, however few frames it goes out in.
        await reader.chat("[[tokens=20000]] " + "z" * 190, "flood-1")
        # The reader reads all along (a client of the websockets library stops reading its
        # socket once its own queue is full, and would be a slow consumer too).
        reading = asyncio.create_task(reader.answer(within=60))
        # The stuck client reads nothing until the server has given up on it...
        await eventually(lambda: slow_consumers_closed() > before, interval=0.01)
        # ...then it finds what the server managed to send, and the close frame.
        assert await stuck.closed() == (4008, "slow consumer")
        answer = await reading
    assert answer.final is not None
    assert answer.final["type"] == "complete"
    assert answer.text == answer.final["message"]["content"]
    assert answer.seqs == sorted(set(answer.seqs))
    assert len(answer.text.split()) == 20000


# -- handoff over the socket -------------------------------------------------------------------


async def test_status_frames_reach_every_socket(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(http, alice)
    base = f"/conversations/{conversation_id}"
    async with (
        open_socket(live_server.ws_url, conversation_id, alice.token) as customer,
        open_socket(live_server.ws_url, conversation_id, agent.token) as staff,
    ):
        await customer.ping()
        await staff.ping()
        steps = [
            (alice, "handoff", "waiting_for_agent", None),
            (agent, "assign", "with_agent", agent.id),
            (agent, "release", "open", None),
            (alice, "complete", "resolved", None),
        ]
        for actor, action, status, assigned in steps:
            response = await http.post(f"{base}/{action}", headers=actor.headers)
            assert response.status_code == 200, response.text
            for socket in (customer, staff):
                frame = await socket.recv_type("status")
                assert frame == {
                    "type": "status",
                    "status": status,
                    "assigned_agent_id": assigned,
                }


async def test_a_customer_chat_reopens_a_resolved_conversation_for_every_socket(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(http, alice)
    complete = await http.post(f"/conversations/{conversation_id}/complete", headers=alice.headers)
    assert complete.status_code == 200
    url = live_server.ws_url
    async with (
        open_socket(url, conversation_id, alice.token) as customer,
        open_socket(url, conversation_id, agent.token) as staff,
    ):
        await staff.ping()
        await customer.chat('[[reply="Welcome back."]] one more thing', "reopen-1")
        for socket in (customer, staff):
            assert (await socket.recv())["type"] == "message"
            assert await socket.recv() == {
                "type": "status",
                "status": "open",
                "assigned_agent_id": None,
            }
            answer = await socket.answer()
            assert answer.final is not None
            assert answer.final["message"]["content"] == "Welcome back."


async def test_the_assigned_agents_message_reaches_the_customer_as_an_agent_message(
    live_server: LiveServer,
    http: httpx.AsyncClient,
    person: PartyFactory,
    fake_model: FakeChatModel,
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(http, alice)
    base = f"/conversations/{conversation_id}"
    assert (await http.post(f"{base}/handoff", headers=alice.headers)).status_code == 200
    assert (await http.post(f"{base}/assign", headers=agent.headers)).status_code == 200
    url = live_server.ws_url
    async with (
        open_socket(url, conversation_id, alice.token) as customer,
        open_socket(url, conversation_id, agent.token) as staff,
    ):
        await customer.ping()
        await staff.chat("Hi, this is Sam from support.", "agent-1")
        frame = await customer.recv()
        assert frame["type"] == "message"
        assert frame["message"]["role"] == "agent"
        assert frame["message"]["author_id"] == agent.id
        assert frame["message"]["content"] == "Hi, this is Sam from support."
        assert (await staff.recv())["message"] == frame["message"]

        # The customer's reply is relayed to the agent, and the AI stays silent.
        await customer.chat("Thanks Sam!", "cust-1")
        relayed = await staff.recv()
        assert relayed["type"] == "message"
        assert relayed["message"]["role"] == "user"
        assert (await customer.recv())["type"] == "message"
        await customer.send(type="ping")
        assert await customer.recv() == {"type": "pong"}
    assert len(fake_model.requests) == 0


async def test_an_unassigned_agents_chat_is_refused(
    live_server: LiveServer, http: httpx.AsyncClient, person: PartyFactory
) -> None:
    alice, agent = await person(), await person("agent")
    conversation_id = await new_conversation(http, alice)
    async with open_socket(live_server.ws_url, conversation_id, agent.token) as staff:
        await staff.chat("I'll butt in", "agent-x")
        error = await staff.recv()
        assert error["type"] == "error"
        assert error["code"] == "FORBIDDEN"
        assert error["reply_to"] == "agent-x"
    assert await list_all_messages(http, alice, conversation_id) == []
