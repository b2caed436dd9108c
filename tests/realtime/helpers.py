"""Helpers of the streaming tests: people with tokens, a chat-socket client, an SSE reader, waiting.

Everything here talks to the app from outside (HTTP, WebSocket, SSE), the way a client would.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import httpx
import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from helpline.auth.models import User
from tests.factories import bearer, create_user, login

T = TypeVar("T")

FINAL_TYPES = frozenset({"complete", "cancelled", "failed"})
ANSWER_TYPES = FINAL_TYPES | {"token"}


def with_settings(**overrides: Any) -> pytest.MarkDecorator:
    """Run the test with these settings (the `settings` fixture of this folder takes them)."""
    label = ",".join(f"{key}={value}" for key, value in overrides.items())
    return pytest.mark.parametrize("settings", [overrides], indirect=True, ids=[label])


async def take_every_connection(engine: AsyncEngine) -> AsyncExitStack:
    """Check out `engine`'s connections until its pool has none to give; `aclose()` returns them."""
    taken = AsyncExitStack()
    while True:
        try:
            await taken.enter_async_context(engine.connect())
        except PoolTimeout:
            return taken


def with_send_buffer(size: int) -> pytest.MarkDecorator:
    """Serve the test's live server with a fixed, small kernel send buffer per connection."""
    return pytest.mark.parametrize(
        "server_send_buffer", [size], indirect=True, ids=[f"sndbuf={size}"]
    )


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T | None]], *, within: float = ..., interval: float = ...
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T | None], *, within: float = ..., interval: float = ...
) -> T: ...


async def eventually(
    predicate: Callable[[], Any], *, within: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail after `within` s.

    `predicate` may be a plain function or a coroutine function.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"the condition did not hold within {within} s")
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class Party:
    """A signed-in user: who they are and the access token they use."""

    user: User
    token: str
    tokens: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.user.id)

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


async def sign_in(
    sessionmaker: async_sessionmaker[AsyncSession], http: httpx.AsyncClient, role: str = "customer"
) -> Party:
    """A new user with `role`, signed in through `/auth/token`."""
    async with sessionmaker() as session:
        user = await create_user(session, role=role)
    tokens = await login(http, user.username)
    return Party(user=user, token=str(tokens["access_token"]), tokens=tokens)


async def new_conversation(http: httpx.AsyncClient, owner: Party, title: str = "Help") -> str:
    response = await http.post("/conversations", json={"title": title}, headers=owner.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def list_all_messages(
    http: httpx.AsyncClient, party: Party, conversation_id: str
) -> list[dict[str, Any]]:
    """Every message of the conversation, oldest first (all pages)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        response = await http.get(
            f"/conversations/{conversation_id}/messages", params=params, headers=party.headers
        )
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def stored_message(
    http: httpx.AsyncClient, party: Party, conversation_id: str, message_id: str
) -> dict[str, Any] | None:
    for message in await list_all_messages(http, party, conversation_id):
        if message["id"] == message_id:
            return message
    return None


async def wait_for_status(
    http: httpx.AsyncClient,
    party: Party,
    conversation_id: str,
    message_id: str,
    *statuses: str,
    within: float = 15.0,
) -> dict[str, Any]:
    """Poll the REST messages until the message has one of `statuses`; the message."""

    async def settled() -> dict[str, Any] | None:
        message = await stored_message(http, party, conversation_id, message_id)
        return message if message is not None and message["status"] in statuses else None

    return await eventually(settled, within=within, interval=0.05)


@dataclass
class Answer:
    """An answer as one socket or stream saw it: its `token` frames and its final frame."""

    tokens: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(str(frame["content"]) for frame in self.tokens)

    @property
    def seqs(self) -> list[int]:
        return [int(frame["seq"]) for frame in self.tokens]

    @property
    def message_id(self) -> str:
        frame = self.final or self.tokens[0]
        return str(frame["message_id"])

    def add(self, frame: dict[str, Any]) -> bool:
        """Take an answer frame; True once the answer is over."""
        if frame["type"] == "token":
            self.tokens.append(frame)
            return False
        self.final = frame
        return True


class ChatSocket:
    """A chat WebSocket client: JSON frames in and out, every read bounded in time."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def send(self, **frame: Any) -> None:
        await self.connection.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.connection.send(data)

    async def chat(self, content: str, message_id: str) -> None:
        await self.send(type="chat", content=content, message_id=message_id)

    async def recv(self, within: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            raw = await self.connection.recv()
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def recv_type(self, kind: str, within: float = 10.0) -> dict[str, Any]:
        """The next frame of type `kind`, skipping frames of other types."""
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within=within)
                if frame["type"] == kind:
                    return frame

    async def answer(
        self, within: float = 15.0, already: list[dict[str, Any]] | None = None
    ) -> Answer:
        """The answer frames up to and including the final one (other frames skipped).

        `already`: answer frames of it the test has read itself.
        """
        answer = Answer()
        for frame in already or ():
            answer.add(frame)
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within=within)
                if frame["type"] in ANSWER_TYPES and answer.add(frame):
                    return answer

    async def ping(self, within: float = 10.0) -> None:
        """Send `ping` and wait for its `pong` (frames before it are skipped)."""
        await self.send(type="ping")
        await self.recv_type("pong", within=within)

    async def closed(self, within: float = 10.0) -> tuple[int, str]:
        """Read until the server closes the socket; the code and reason of its close frame."""
        try:
            async with asyncio.timeout(within):
                while True:
                    await self.connection.recv()
        except ConnectionClosed as closed:
            close = closed.rcvd
        assert close is not None, "the server closed the connection without a close frame"
        return close.code, close.reason


def chat_url(ws_url: str, conversation_id: str, token: str | None = None) -> str:
    url = f"{ws_url}/chat/ws/{conversation_id}"
    return f"{url}?token={token}" if token else url


@asynccontextmanager
async def open_socket(
    ws_url: str,
    conversation_id: str,
    token: str | None = None,
    **options: Any,
) -> AsyncIterator[ChatSocket]:
    """A chat socket on the conversation (`options` go to `websockets.connect`)."""
    options.setdefault("open_timeout", 10)
    options.setdefault("close_timeout", 2)
    async with connect(chat_url(ws_url, conversation_id, token), **options) as connection:
        yield ChatSocket(connection)


def small_receive_buffer_socket(host: str, port: int, size: int = 4096) -> socket.socket:
    """A connected TCP socket whose receive buffer is tiny, so a client that stops reading
    pushes back on the server after a few kilobytes rather than megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.connect((host, port))
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    data: dict[str, Any] | None
    comments: tuple[str, ...] = ()

    @property
    def type(self) -> str | None:
        return None if self.data is None else str(self.data["type"])


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a `text/event-stream` body into events (comment-only blocks come as data None)."""
    event_id: str | None = None
    data_lines: list[str] = []
    comments: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data_lines or comments or event_id is not None:
                data = json.loads("\n".join(data_lines)) if data_lines else None
                yield SseEvent(id=event_id, data=data, comments=tuple(comments))
            event_id, data_lines, comments = None, [], []
        elif line.startswith(":"):
            comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data_lines.append(value)


async def collect_sse(response: httpx.Response, within: float = 15.0) -> list[SseEvent]:
    """Every event of the stream until the server ends it."""
    events: list[SseEvent] = []
    async with asyncio.timeout(within):
        async for event in sse_events(response):
            events.append(event)
    return events


def answer_of(events: list[SseEvent]) -> Answer:
    answer = Answer()
    for event in events:
        if event.data is not None and event.type in ANSWER_TYPES:
            answer.add(event.data)
    return answer


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The SPEC error envelope with `status` and `code`; the `error` object."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error
