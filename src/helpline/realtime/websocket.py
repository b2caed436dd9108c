"""One chat WebSocket: its own task reading the client's frames, a writer task sending the server's.

Client → server frames (JSON text):

- `{"type": "chat", "content", "message_id"}` — send a message (idempotent by `message_id`)
- `{"type": "ping"}` — answered with `{"type": "pong"}`
- `{"type": "cancel"}` — stop the answer being generated
- `{"type": "resume", "message_id", "after_seq"}` — replay an answer after `after_seq`, then live
- `{"type": "typing"}` — relayed to the others as `{"type": "typing", "user_id"}`

Server frames are those of `helpline.realtime.frames`. A bad frame gets an `error` frame and the
socket stays open. Close codes: `4001` auth failed, expired or revoked; `4003` not the user's
conversation; `4004` unknown conversation; `4008` slow consumer; `1001` server shutting down.

Fan-out never waits on this socket: the broker drops frames into its bounded `FrameQueue`, and
only this socket's writer waits for it, with a send timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import structlog
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from helpline.auth.dependencies import WebSocketIdentity
from helpline.auth.principal import Actor
from helpline.conversations import service as conversations_service
from helpline.conversations.schemas import ClientMessageId, MessageContent
from helpline.core import metrics
from helpline.core.config import Settings
from helpline.core.database import lookup_session, unavailable_error, unit_of_work
from helpline.core.errors import AppError
from helpline.core.limiter import InProcessStorage
from helpline.realtime import service as realtime_service
from helpline.realtime.connection import (
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    FrameQueue,
    QueueClosed,
    SlowConsumer,
)
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.frames import Frame, dumps, error_data, message_frame, typing_frame

log = structlog.get_logger(__name__)

LAG_SAMPLE_EVERY = 16
EXPIRY_SWEEP_S = 1.0
CLOSE_ALL_WAIT_S = 5.0
CLOSE_FRAME_WAIT_S = 5.0
# While the process is behind (`helpline.realtime.pressure`), a socket lets an answer's pieces
# gather this long after sending one, so that the same text goes out in fewer, larger frames —
# unless whole frames are waiting already: a pause per frame would cap a socket's throughput.
COALESCE_FRAMES_S = 0.04


# The labelled counters of frames sent, by type, and received: looked up once, not per frame.
_FRAMES_OUT: dict[str, Counter] = {}
_FRAMES_IN = metrics.WEBSOCKET_FRAMES.labels(direction="in", type="any")


class ChatFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["chat"]
    content: MessageContent
    message_id: ClientMessageId | None = None


class ResumeFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["resume"]
    message_id: uuid.UUID
    after_seq: int = Field(ge=0)


class SimpleFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["ping", "cancel", "typing"]


ClientFrame = TypeAdapter(
    Annotated[ChatFrame | ResumeFrame | SimpleFrame, Field(discriminator="type")]
)


def handshake_slots(settings: Settings) -> int:
    """How many socket handshakes may do their database work (authentication, the
    conversation) at once; the others wait before allocating anything for it.

    Thousands of sockets connecting at once (a reconnect storm) otherwise each hold a session
    and its queries while waiting for a pooled connection, interleaved with the long-lived
    state of the sockets already open: measured on SQLite, 32.8 KiB per idle socket at 5,000
    rather than 20 (`bench/realtime.py memory`). Half the pool leaves room for the chats.
    """
    return max(1, settings.database_pool_size // 2)


class FrameRateLimiter:
    """Per-connection frame limits, in process (a socket lives on one instance)."""

    def __init__(self, limit: str) -> None:
        self.item = parse(limit)
        self.strategy = MovingWindowRateLimiter(InProcessStorage())

    async def allow(self, key: str) -> bool:
        return await self.strategy.hit(self.item, "ws", key)


class ConnectionRegistry:
    """The chat sockets of this process, to close them by user, login or all at once.

    It also closes sockets whose access token has expired: one sweep a second over the open
    sockets costs less than a timer per socket.
    """

    def __init__(self) -> None:
        self.connections: set[ChatConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._emptied: asyncio.Future[None] | None = None

    def add(self, connection: ChatConnection) -> None:
        self.connections.add(connection)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(EXPIRY_SWEEP_S, self._close_expired)

    def discard(self, connection: ChatConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            if self._sweep is not None:
                self._sweep.cancel()
                self._sweep = None
            if self._emptied is not None and not self._emptied.done():
                self._emptied.set_result(None)

    def _close_expired(self) -> None:
        now = time.time()
        self.close_matching(
            lambda c: c.expires_at is not None and c.expires_at <= now,
            CLOSE_UNAUTHORIZED,
            "Token expired",
        )
        self._sweep = asyncio.get_running_loop().call_later(EXPIRY_SWEEP_S, self._close_expired)

    def close_matching(
        self, predicate: Callable[[ChatConnection], bool], code: int, reason: str
    ) -> int:
        matched = [c for c in self.connections if predicate(c)]
        for connection in matched:
            connection.request_close(code, reason)
        return len(matched)

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket after the frames queued for it; wait (bounded) until all are."""
        for connection in list(self.connections):
            connection.request_close(code, reason, send_queued=True)
        if self.connections:
            self._emptied = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_ALL_WAIT_S):
                    await self._emptied


class ChatConnection:
    """One chat socket.

    The socket's own task (the endpoint's) reads the client's frames; a writer task sends the
    queued frames at the client's pace. The writer exists while there is something to send
    (and for the rest of an answer it is streaming), so an idle socket holds no task of its own.
    """

    __slots__ = (
        "websocket",
        "user",
        "login_id",
        "expires_at",
        "conversation_id",
        "owner_id",
        "engine",
        "sessionmaker",
        "settings",
        "frame_limiter",
        "before_chat",
        "id",
        "queue",
        "_close",
        "_reader",
        "_writer",
        "_sent",
        "_send_queued_first",
        "_send_started",
        "_send_watch",
    )

    def __init__(
        self,
        websocket: WebSocket,
        *,
        identity: WebSocketIdentity,
        conversation_id: uuid.UUID,
        owner_id: uuid.UUID,
        engine: GenerationEngine,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Settings,
        frame_limiter: FrameRateLimiter,
        before_chat: Callable[[Actor], Awaitable[None]] | None = None,
    ) -> None:
        self.websocket = websocket
        self.user = identity.user
        self.login_id = identity.login_id
        self.expires_at = None if identity.expires_at is None else identity.expires_at.timestamp()
        self.conversation_id = conversation_id
        self.owner_id = owner_id  # the conversation's customer
        self.engine = engine
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.frame_limiter = frame_limiter
        self.before_chat = before_chat
        self.id = uuid.uuid4().hex
        self.queue = FrameQueue(settings.ws_send_queue_size, on_ready=self._start_writer)
        self._close: tuple[int, str] | None = None
        self._reader: asyncio.Task[Any] | None = None  # the endpoint's task, while it reads
        self._writer: asyncio.Task[None] | None = None
        self._sent = 0
        self._send_queued_first = False
        # The loop time the send in progress began at (None between sends), and the timer that
        # checks it: armed at most once per send timeout, not once per frame.
        self._send_started: float | None = None
        self._send_watch: asyncio.TimerHandle | None = None

    @property
    def writing(self) -> bool:
        """Whether the socket has a writer task now (it has none while idle)."""
        return self._writer is not None

    def request_close(self, code: int, reason: str, *, send_queued: bool = False) -> None:
        """Close the socket soon (from any task): stops reading and writing, sends the close.

        With `send_queued`, the frames already queued (e.g. an answer's final frame, at
        shutdown) are sent first, within the send timeout.
        """
        first = self._close is None
        if first:
            self._close = (code, reason)
        if send_queued:
            self._send_queued_first = True
            self.queue.close()  # the writer sends what is queued, then stops
        elif self._writer is not None:
            self._writer.cancel()
        if first and self._reader is not None:
            self._reader.cancel()

    def close_slow_consumer(self) -> None:
        """The client stopped taking data: close it with `4008` (it may resume later)."""
        if self._close is None:
            metrics.WEBSOCKET_SLOW_CONSUMERS.inc()
            log.info("ws.slow_consumer", connection=self.id, user_id=str(self.user.id))
        self.request_close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def _on_frame(self, frame: Frame) -> None:
        # Typing indicators go to the other participants only.
        if frame.type == "typing" and frame.data.get("user_id") == str(self.user.id):
            return
        self.queue.put(frame)

    def _send_own(self, data: dict[str, Any]) -> None:
        """A frame for this socket alone (pong, error)."""
        self.queue.put(Frame(data=data, conversation_id=self.conversation_id))

    async def run(self) -> None:
        """Serve the socket until the client leaves or `request_close`; then close it."""
        # Frames are read once every instance's frames of the conversation come here: what a
        # `resume` replays then joins the live ones, and a `pong` tells the client so.
        unsubscribe = await self.engine.subscribe(self.conversation_id, self._on_frame)
        metrics.WEBSOCKET_CONNECTIONS.inc()
        task = asyncio.current_task()
        try:
            if self._close is None:
                self._reader = task
                try:
                    # Read here, not in a method of its own: an idle socket waits in this frame.
                    while True:
                        message = await self.websocket.receive()
                        if message["type"] == "websocket.disconnect":
                            break
                        await self._take(message)
                except asyncio.CancelledError:
                    if self._close is None or task is None:
                        raise  # not ours: the server is cancelling the endpoint
                    task.uncancel()
                finally:
                    self._reader = None
            writer = self._writer
            if writer is not None:
                if self._send_queued_first:
                    await asyncio.wait([writer], timeout=self.settings.ws_send_timeout_s)
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        finally:
            unsubscribe()
            self.queue.close()
            if self._send_watch is not None:
                self._send_watch.cancel()
                self._send_watch = None
            metrics.WEBSOCKET_CONNECTIONS.dec()
            await self._send_close()

    async def _send_close(self) -> None:
        if self._close is None or self.websocket.application_state != WebSocketState.CONNECTED:
            return
        code, reason = self._close
        # A slow client gets its close frame once it reads again (after the backlog the
        # transport still holds); one that never does costs this bounded wait.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(self.settings.ws_send_timeout_s, CLOSE_FRAME_WAIT_S)):
                await self.websocket.close(code=code, reason=reason)

    def _start_writer(self) -> None:
        if self._writer is None and not (self._close is not None and not self._send_queued_first):
            self._writer = asyncio.create_task(self._write_queued(), name=f"ws-write-{self.id}")

    async def _write_queued(self) -> None:
        """Send the queued frames; end once the queue is empty and no answer is mid-stream."""
        websocket = self.websocket
        queue = self.queue
        loop = asyncio.get_running_loop()
        loop_lag = self.engine.loop_lag
        streaming = False
        try:
            while True:
                frame = queue.take()
                if frame is None:
                    if not streaming or queue.closed:
                        return
                    # The answer's next pieces are coming: wait here rather than end and
                    # start a task again for each of them.
                    frame = await queue.get()
                self._send_started = loop.time()
                if self._send_watch is None:
                    self._watch_send(self._send_started)
                await websocket.send_text(frame.encoded())
                self._send_started = None
                self._count_sent(frame)
                streaming = frame.type == "token"
                if streaming and len(queue) < 2 and loop_lag.behind:
                    await asyncio.sleep(COALESCE_FRAMES_S)
        except SlowConsumer:
            self.close_slow_consumer()
        except (QueueClosed, WebSocketDisconnect, RuntimeError):
            return
        finally:
            self._send_started = None
            self._writer = None

    def _watch_send(self, started: float) -> None:
        self._send_watch = asyncio.get_running_loop().call_at(
            started + self.settings.ws_send_timeout_s, self._check_send
        )

    def _check_send(self) -> None:
        """Close the socket if its send in progress is older than the send timeout: a client
        that stopped reading (its kernel buffers full) must not hold its frames forever."""
        self._send_watch = None
        started = self._send_started
        if started is None:
            return
        if asyncio.get_running_loop().time() - started >= self.settings.ws_send_timeout_s:
            self.close_slow_consumer()
        else:
            self._watch_send(started)  # a later send: check it when it is due

    def _count_sent(self, frame: Frame) -> None:
        self._sent += 1
        kind = frame.type
        counter = _FRAMES_OUT.get(kind)
        if counter is None:
            counter = metrics.WEBSOCKET_FRAMES.labels(direction="out", type=kind)
            _FRAMES_OUT[kind] = counter
        counter.inc()
        if kind != "token" or self._sent % LAG_SAMPLE_EVERY == 0:
            metrics.EVENT_DELIVERY_LAG.observe(max(0.0, time.time() - frame.created_at))

    async def _take(self, message: Message) -> None:
        """Check and handle one client frame."""
        text = message.get("text")
        if text is None:
            self._send_own(error_data("BAD_REQUEST", "Frames must be JSON text"))
            return
        _FRAMES_IN.inc()
        max_bytes = self.settings.ws_max_frame_bytes
        if len(text) > max_bytes or len(text.encode()) > max_bytes:
            self._send_own(
                error_data("PAYLOAD_TOO_LARGE", f"Frames are limited to {max_bytes} bytes")
            )
            return
        if not await self.frame_limiter.allow(self.id):
            self._send_own(
                error_data(
                    "RATE_LIMITED",
                    f"Too many frames (limit {self.settings.ws_rate_limit}); slow down",
                )
            )
            return
        await self._handle(text)

    async def _handle(self, text: str) -> None:
        reply_to: str | None = None
        try:
            raw = json.loads(text)
            if isinstance(raw, dict) and isinstance(raw.get("message_id"), str):
                reply_to = raw["message_id"] if raw.get("type") == "chat" else None
            frame = ClientFrame.validate_python(raw)
        except (ValueError, ValidationError) as exc:
            self._send_own(error_data("BAD_REQUEST", _describe(exc), reply_to))
            return
        try:
            if isinstance(frame, ChatFrame):
                await self._chat(frame)
            elif isinstance(frame, ResumeFrame):
                await self._resume(frame)
            elif frame.type == "ping":
                self._send_own({"type": "pong"})
            elif frame.type == "cancel":
                await self._cancel()
            else:
                await self.engine.publish(typing_frame(self.conversation_id, self.user.id))
        except AppError as exc:
            self._send_own(error_data(exc.code, exc.message, reply_to))
        except Exception as exc:
            # Out of reach or of connections, the database is worth a retry: the client is told so.
            if (unavailable := unavailable_error(exc)) is not None:
                log.warning("ws.database_unavailable", frame_type=frame.type, error=str(exc))
                self._send_own(error_data(unavailable.code, unavailable.message, reply_to))
                return
            log.exception("ws.frame_failed", frame_type=frame.type)
            self._send_own(error_data("INTERNAL_ERROR", "The frame could not be handled", reply_to))

    async def _chat(self, frame: ChatFrame) -> None:
        if self.before_chat is not None and self.user.id == self.owner_id:
            await self.before_chat(self.user)
        result = await conversations_service.post_message(
            self.sessionmaker,
            engine=self.engine,
            queue_when_busy=self.settings.generation_policy == "queue",
            author=self.user,
            conversation_id=self.conversation_id,
            content=frame.content,
            client_message_id=frame.message_id,
        )
        if result.created:
            return  # the message frame and the answer reach every socket through the broker
        # A resend: this socket alone gets the stored message and the earlier answer.
        self.queue.put(
            message_frame(
                self.conversation_id, conversations_service.message_json(result.user_message)
            )
        )
        answer = result.assistant_message
        if answer is not None:
            # An ended answer: its final frame alone (it holds the message), not its text again.
            after_seq = (
                self.queue.taken_seq(str(answer.id))
                if answer.status == "streaming"
                else answer.last_seq - 1
            )
            await realtime_service.replay_into(
                self.queue,
                engine=self.engine,
                sessionmaker=self.sessionmaker,
                conversation_id=self.conversation_id,
                message_id=answer.id,
                after_seq=after_seq,
            )

    async def _resume(self, frame: ResumeFrame) -> None:
        async with lookup_session(self.sessionmaker) as session:
            message = await conversations_service.get_message(session, frame.message_id)
        if message is None or message.conversation_id != self.conversation_id:
            self._send_own(
                error_data("NOT_FOUND", f"No answer {frame.message_id} in this conversation")
            )
            return
        if message.role != "assistant":
            self._send_own(error_data("BAD_REQUEST", "Only an assistant answer can be resumed"))
            return
        if message.status != "streaming" and frame.after_seq > message.last_seq:
            self._send_own(
                error_data(
                    "BAD_REQUEST",
                    f"after_seq {frame.after_seq} is past the answer's last event "
                    f"({message.last_seq})",
                )
            )
            return
        await realtime_service.replay_into(
            self.queue,
            engine=self.engine,
            sessionmaker=self.sessionmaker,
            conversation_id=self.conversation_id,
            message_id=frame.message_id,
            after_seq=frame.after_seq,
        )

    async def _cancel(self) -> None:
        async with unit_of_work(self.sessionmaker) as session:
            conversation = await conversations_service.get_conversation(
                session, user=self.user, conversation_id=self.conversation_id
            )
            await conversations_service.cancel_answer(
                session, engine=self.engine, conversation=conversation
            )


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors()[:3]:
            where = ".".join(str(p) for p in error["loc"]) or "frame"
            parts.append(f"{where}: {error['msg']}")
        return "Invalid frame: " + "; ".join(parts)
    return "Frames must be JSON objects with a known `type`"


def encode_error(code: str, message: str) -> str:
    return dumps(error_data(code, message))
