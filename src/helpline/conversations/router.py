"""The conversations REST API (SPEC.md: Conversations)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response, status
from fastapi.responses import JSONResponse

from helpline.agents.exceptions import LLMServiceError
from helpline.auth.dependencies import AgentUser, CurrentUser
from helpline.conversations import service
from helpline.conversations.dependencies import OwnedConversation, PageCursor, PageLimit
from helpline.conversations.models import ConversationStatus, MessageStatus
from helpline.conversations.schemas import (
    ConversationCreate,
    ConversationPage,
    ConversationRead,
    HandoffRequest,
    MessageCreate,
    MessagePage,
    MessageRead,
    SendMessageResponse,
)
from helpline.core.database import DbSession, lookup_session, release
from helpline.core.errors import error_responses
from helpline.realtime import service as realtime_service
from helpline.realtime.dependencies import Engine

router = APIRouter(tags=["conversations"])

_READ_ERRORS = error_responses(401, 403, 404)


@router.post(
    "/conversations",
    status_code=status.HTTP_201_CREATED,
    response_model=ConversationRead,
    responses=error_responses(401, 422),
)
async def create_conversation(
    body: ConversationCreate, session: DbSession, user: CurrentUser
) -> ConversationRead:
    """Start a conversation."""
    conversation = await service.create_conversation(session, user=user, title=body.title)
    return ConversationRead.model_validate(conversation)


@router.get("/conversations", response_model=ConversationPage, responses=error_responses(400, 401))
async def list_conversations(
    session: DbSession,
    user: CurrentUser,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
    status_filter: Annotated[ConversationStatus | None, Query(alias="status")] = None,
) -> ConversationPage:
    """List conversations, most recent activity first (a customer sees only their own)."""
    items, next_cursor = await service.list_conversations(
        session, user=user, status=status_filter, limit=limit, cursor=cursor
    )
    return ConversationPage(
        items=[ConversationRead.model_validate(item) for item in items], next_cursor=next_cursor
    )


@router.get(
    "/conversations/{conversation_id}", response_model=ConversationRead, responses=_READ_ERRORS
)
async def get_conversation(conversation: OwnedConversation) -> ConversationRead:
    """Get a conversation."""
    return ConversationRead.model_validate(conversation)


@router.delete(
    "/conversations/{conversation_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_READ_ERRORS,
)
async def delete_conversation(
    conversation: OwnedConversation, session: DbSession, engine: Engine
) -> Response:
    """Delete a conversation and its messages."""
    await service.delete_conversation(session, engine=engine, conversation=conversation)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/conversations/{conversation_id}/messages",
    response_model=MessagePage,
    responses=error_responses(400, 401, 403, 404),
)
async def list_messages(
    conversation: OwnedConversation,
    session: DbSession,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> MessagePage:
    """List a conversation's messages, oldest first."""
    items, next_cursor = await service.list_messages(
        session, conversation=conversation, limit=limit, cursor=cursor
    )
    return MessagePage(
        items=[MessageRead.model_validate(item) for item in items], next_cursor=next_cursor
    )


@router.post(
    "/conversations/{conversation_id}/messages",
    status_code=status.HTTP_201_CREATED,
    response_model=SendMessageResponse,
    responses={
        200: {"model": SendMessageResponse, "description": "A replay of an earlier send"},
        **error_responses(401, 403, 404, 409, 422, 429, 503),
    },
)
async def send_message(
    conversation: OwnedConversation,
    body: MessageCreate,
    request: Request,
    session: DbSession,
    user: CurrentUser,
    engine: Engine,
) -> JSONResponse:
    """Send a message and wait for the complete answer (no streaming)."""
    settings = request.app.state.settings
    sessionmaker = request.app.state.sessionmaker
    await release(session)  # the send and the wait use units of work of their own
    if user.id == conversation.user_id:
        await request.app.state.before_model_call(user)
    result = await service.post_message(
        sessionmaker,
        engine=engine,
        queue_when_busy=settings.generation_policy == "queue",
        author=user,
        conversation_id=conversation.id,
        content=body.content,
        client_message_id=body.client_message_id,
    )
    assistant = result.assistant_message
    frames = None
    if assistant is not None and assistant.status == MessageStatus.STREAMING:
        frames = realtime_service.follow_answer(
            engine=engine,
            sessionmaker=sessionmaker,
            conversation_id=conversation.id,
            message_id=assistant.id,
        )
    elif result.queued:
        frames = realtime_service.follow_reply(
            engine=engine,
            sessionmaker=sessionmaker,
            conversation_id=conversation.id,
            question=result.user_message,
        )
    if frames is not None:
        final = None
        async for frame in frames:
            final = frame
        if final is not None and final.message_id is not None:
            async with lookup_session(sessionmaker) as session:
                assistant = await service.get_message(session, uuid.UUID(final.message_id))
    response = SendMessageResponse(
        user_message=MessageRead.model_validate(result.user_message),
        assistant_message=None if assistant is None else MessageRead.model_validate(assistant),
    )
    if assistant is not None and assistant.status == MessageStatus.FAILED:
        raise LLMServiceError(
            details={"code": assistant.error_code, **response.model_dump(mode="json")}
        )
    return JSONResponse(
        response.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
    )


@router.post(
    "/conversations/{conversation_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(401, 403, 404, 409),
)
async def cancel_answer(
    conversation: OwnedConversation, session: DbSession, engine: Engine
) -> dict[str, str]:
    """Stop the answer being generated."""
    message_id = await service.cancel_answer(session, engine=engine, conversation=conversation)
    return {"message_id": str(message_id), "status": "cancelling"}


@router.post(
    "/conversations/{conversation_id}/complete",
    response_model=ConversationRead,
    responses=_READ_ERRORS,
)
async def complete_conversation(
    conversation: OwnedConversation,
    session: DbSession,
    user: CurrentUser,
    engine: Engine,
    request: Request,
    background: BackgroundTasks,
) -> ConversationRead:
    """Mark the conversation resolved; its outcome is recorded in the background."""
    conversation = await service.complete(
        session, engine=engine, conversation=conversation, actor=user
    )
    background.add_task(service.record_outcome, request.app.state.sessionmaker, conversation.id)
    return ConversationRead.model_validate(conversation)


@router.post(
    "/conversations/{conversation_id}/handoff",
    response_model=ConversationRead,
    responses=error_responses(401, 403, 404, 409, 422),
)
async def handoff_conversation(
    conversation: OwnedConversation,
    session: DbSession,
    user: CurrentUser,
    engine: Engine,
    body: HandoffRequest | None = None,
) -> ConversationRead:
    """Ask for a human agent; the AI stays silent until the conversation is released."""
    conversation = await service.handoff(
        session,
        engine=engine,
        conversation=conversation,
        actor=user,
        reason=body.reason if body else None,
    )
    return ConversationRead.model_validate(conversation)


@router.post(
    "/conversations/{conversation_id}/assign",
    response_model=ConversationRead,
    responses=error_responses(401, 403, 404, 409),
)
async def assign_conversation(
    conversation: OwnedConversation, session: DbSession, agent: AgentUser, engine: Engine
) -> ConversationRead:
    """Take the conversation as a human agent."""
    conversation = await service.assign(
        session, engine=engine, conversation=conversation, agent=agent
    )
    return ConversationRead.model_validate(conversation)


@router.post(
    "/conversations/{conversation_id}/release",
    response_model=ConversationRead,
    responses=error_responses(401, 403, 404, 409),
)
async def release_conversation(
    conversation: OwnedConversation, session: DbSession, agent: AgentUser, engine: Engine
) -> ConversationRead:
    """Hand the conversation back to the AI."""
    conversation = await service.release(
        session, engine=engine, conversation=conversation, agent=agent
    )
    return ConversationRead.model_validate(conversation)


@router.get("/agent/queue", response_model=ConversationPage, responses=error_responses(401, 403))
async def get_agent_queue(
    session: DbSession, _: AgentUser, limit: PageLimit = 20, cursor: PageCursor = None
) -> ConversationPage:
    """Conversations waiting for a human agent, longest waiting first."""
    items, next_cursor = await service.agent_queue(session, limit=limit, cursor=cursor)
    return ConversationPage(
        items=[ConversationRead.model_validate(item) for item in items], next_cursor=next_cursor
    )
