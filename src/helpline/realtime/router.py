"""Streaming endpoints: the chat WebSocket and the Server-Sent Events streams.

SSE (`POST/GET /conversations/{id}/stream`): each answer event is `id: <message_id>:<seq>` and
`data: <frame JSON>`; other events (the stored user `message`) have no `id`; `: keep-alive`
comments are sent while idle; the stream ends after the answer's final event. A plain
`StreamingResponse` serves it: it measured well ahead of sse-starlette here.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, NamedTuple

import anyio
import structlog
from fastapi import APIRouter, Header, Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from starlette.datastructures import Headers
from starlette.routing import WebSocketRoute

from helpline.auth.dependencies import CurrentUser, WebSocketIdentity, authenticate_websocket
from helpline.conversations import service as conversations_service
from helpline.conversations.dependencies import OwnedConversation
from helpline.conversations.exceptions import AnswerNotFound
from helpline.conversations.models import Message
from helpline.conversations.schemas import MessageCreate
from helpline.core import metrics
from helpline.core.database import DbSession, release
from helpline.core.errors import AppError, BadRequest, Forbidden, NotFound, error_responses
from helpline.core.middleware import request_id_header
from helpline.realtime import service as realtime_service
from helpline.realtime.connection import (
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
)
from helpline.realtime.dependencies import Engine
from helpline.realtime.engine import GenerationEngine
from helpline.realtime.frames import Frame, message_frame
from helpline.realtime.websocket import ChatConnection

log = structlog.get_logger(__name__)

router = APIRouter(tags=["streaming"])

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: don't buffer the stream
    "Connection": "keep-alive",
}
_LAST_EVENT_ID = re.compile(r"^([0-9a-fA-F-]{36}):(\d+)$")


async def chat_websocket(websocket: WebSocket) -> None:
    """The chat socket of a conversation (frames in `helpline.realtime.websocket`).

    A plain Starlette route, served ahead of the middleware stack (`helpline.main.Helpline`):
    whatever wraps it stays alive, frame by frame, for as long as each socket is open.
    """
    connection = await _open_chat(websocket)
    if connection is None:
        return
    registry = websocket.app.state.ws_connections
    registry.add(connection)
    try:
        await connection.run()
    finally:
        registry.discard(connection)


async def _open_chat(websocket: WebSocket) -> ChatConnection | None:
    """Accept and authenticate the socket, find its conversation; None once it is closed.

    A function of its own so that what the handshake loaded (ORM rows, a session) is not kept
    alive by the endpoint's frame for as long as the socket is open.
    """
    app_state = websocket.app.state
    settings = app_state.settings
    # Headers read without caching them on `websocket`, which lives as long as the socket.
    origin = Headers(scope=websocket.scope).get("origin")
    if settings.cors_origins and origin and origin not in settings.cors_origins:
        await websocket.close(code=1008)  # before accepting: the handshake is refused with 403
        return None
    await websocket.accept(headers=request_id_header(websocket.scope))
    async with app_state.ws_handshakes:
        return await _find_chat(websocket)


class Refused(NamedTuple):
    """A handshake refused: the close code and reason."""

    code: int
    reason: str


async def _find_chat(websocket: WebSocket) -> ChatConnection | None:
    """The database part of `_open_chat`: who connects, and to which conversation."""
    app_state = websocket.app.state
    try:
        found = await _lookup_chat(websocket)
    except Exception:
        # The database is unreachable or overloaded: the client may retry.
        log.warning("ws.handshake_failed", exc_info=True)
        found = Refused(CLOSE_TRY_AGAIN_LATER, "Try again later")
    if isinstance(found, Refused):
        await websocket.close(code=found.code, reason=found.reason)
        return None
    return ChatConnection(
        websocket,
        identity=found.identity,
        conversation_id=found.conversation_id,
        owner_id=found.owner_id,
        engine=app_state.generation_engine,
        sessionmaker=app_state.sessionmaker,
        settings=app_state.settings,
        frame_limiter=app_state.ws_frame_limiter,
        before_chat=app_state.before_model_call,
    )


class FoundChat(NamedTuple):
    """Who a socket is for, and its conversation."""

    identity: WebSocketIdentity
    conversation_id: uuid.UUID
    owner_id: uuid.UUID  # the conversation's customer


async def _lookup_chat(websocket: WebSocket) -> FoundChat | Refused:
    """The socket's user and conversation, or why it is refused."""
    try:
        identity = await authenticate_websocket(websocket)
    except AppError:
        return Refused(CLOSE_UNAUTHORIZED, "Unauthorized")
    try:
        conversation_id = uuid.UUID(websocket.path_params["conversation_id"])
    except ValueError:
        return Refused(CLOSE_NOT_FOUND, "Conversation not found")
    try:
        owner_id = await conversations_service.get_conversation_owner(
            websocket.app.state.engine, user=identity.user, conversation_id=conversation_id
        )
    except Forbidden:
        return Refused(CLOSE_FORBIDDEN, "Forbidden")
    except NotFound:
        return Refused(CLOSE_NOT_FOUND, "Conversation not found")
    return FoundChat(identity, conversation_id, owner_id)


# Served by `helpline.main.Helpline` ahead of the middleware stack (unless tracing is on).
websocket_routes = (WebSocketRoute("/chat/ws/{conversation_id}", chat_websocket),)


async def _sse_stream(
    *,
    request: Request,
    engine: GenerationEngine,
    first: Frame | None,
    conversation_id: uuid.UUID,
    message_id: uuid.UUID | None,
    after_seq: int,
    queued_question: Message | None = None,
) -> AsyncIterator[bytes]:
    keepalive = request.app.state.settings.sse_keepalive_s
    metrics.SSE_STREAMS.inc()
    try:
        if first is not None:
            yield first.sse()
        sessionmaker = request.app.state.sessionmaker
        if message_id is not None:
            frames = realtime_service.follow_answer(
                engine=engine,
                sessionmaker=sessionmaker,
                conversation_id=conversation_id,
                message_id=message_id,
                after_seq=after_seq,
            )
        elif queued_question is not None:
            frames = realtime_service.follow_reply(
                engine=engine,
                sessionmaker=sessionmaker,
                conversation_id=conversation_id,
                question=queued_question,
            )
        else:
            return
        iterator = aiter(frames)
        pending: asyncio.Task[Frame] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({pending}, timeout=keepalive)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                try:
                    frame = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                yield frame.sse()
        finally:
            if pending is not None:
                pending.cancel()
                # Let the cancelled `anext` unwind the generator before closing it (`aclose`
                # on a running generator raises). Shielded: the client may have just left, and
                # the response's cancel scope cancels every other await here.
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({pending})
            await frames.aclose()
    finally:
        metrics.SSE_STREAMS.dec()


def _sse_response(stream: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post(
    "/conversations/{conversation_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The answer's events"},
        **error_responses(401, 403, 404, 409, 422, 429, 503),
    },
)
async def stream_message(
    conversation: OwnedConversation,
    body: MessageCreate,
    request: Request,
    session: DbSession,
    user: CurrentUser,
    engine: Engine,
) -> StreamingResponse:
    """Send a message and stream the stored message, then the answer's events (SSE)."""
    settings = request.app.state.settings
    await release(session)  # the send and the stream use units of work of their own
    if user.id == conversation.user_id:
        await request.app.state.before_model_call(user)
    result = await conversations_service.post_message(
        request.app.state.sessionmaker,
        engine=engine,
        queue_when_busy=settings.generation_policy == "queue",
        author=user,
        conversation_id=conversation.id,
        content=body.content,
        client_message_id=body.client_message_id,
    )
    first = message_frame(conversation.id, conversations_service.message_json(result.user_message))
    return _sse_response(
        _sse_stream(
            request=request,
            engine=engine,
            first=first,
            conversation_id=conversation.id,
            message_id=result.answer_id,
            after_seq=0,
            queued_question=result.user_message if result.queued else None,
        )
    )


@router.get(
    "/conversations/{conversation_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The answer's events"},
        **error_responses(400, 401, 403, 404),
    },
)
async def reattach_stream(
    conversation: OwnedConversation,
    request: Request,
    session: DbSession,
    engine: Engine,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    message_id: Annotated[uuid.UUID | None, Query()] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> StreamingResponse:
    """Re-attach to an answer: after `Last-Event-ID` (or `?message_id=&after=`), else the latest."""
    after_seq = 0
    if last_event_id:
        match = _LAST_EVENT_ID.match(last_event_id.strip())
        if match is None:
            raise BadRequest(
                "Last-Event-ID must be `<message_id>:<seq>`", details={"value": last_event_id}
            )
        message_id, after_seq = uuid.UUID(match.group(1)), int(match.group(2))
    elif message_id is not None:
        after_seq = after or 0
    if message_id is None:
        answer = await conversations_service.latest_answer(session, conversation.id)
    else:
        answer = await conversations_service.get_message(session, message_id)
        if answer is not None and answer.conversation_id != conversation.id:
            answer = None
    if answer is None or answer.role != "assistant":
        raise AnswerNotFound()
    return _sse_response(
        _sse_stream(
            request=request,
            engine=engine,
            first=None,
            conversation_id=conversation.id,
            message_id=answer.id,
            after_seq=after_seq,
        )
    )
