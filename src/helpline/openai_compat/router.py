"""`/v1`: OpenAI's chat-completions API, so an unmodified OpenAI SDK talks to the support agent.

Point the SDK at `base_url=<server>/v1` with an API key (`hl_…`) or an access token as `api_key`.
Streaming sends `chat.completion.chunk` events, a last chunk with `finish_reason`, then
`data: [DONE]`. Errors carry OpenAI's `type` and `param` beside `code` and `message`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from helpline.auth.dependencies import CurrentUser
from helpline.core.database import DbSession, release
from helpline.core.errors import error_responses
from helpline.openai_compat import service
from helpline.openai_compat.schemas import ChatCompletion, ChatCompletionRequest, ModelList
from helpline.realtime.dependencies import Engine
from helpline.realtime.router import SSE_HEADERS

router = APIRouter(prefix="/v1", tags=["openai-compatible"])


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(_: CurrentUser) -> ModelList:
    """The models served (the support agent)."""
    return service.list_models()


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "`stream: true`: chunks"},
        **error_responses(400, 401, 404, 422, 429, 503),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    session: DbSession,
    user: CurrentUser,
    engine: Engine,
) -> ChatCompletion | StreamingResponse:
    """Answer the conversation in `messages` (streamed with `stream: true`)."""
    await release(session)  # the answer runs in units of work of its own
    await request.app.state.before_model_call(user)
    sessionmaker = request.app.state.sessionmaker
    result = await service.start_completion(sessionmaker, engine=engine, user=user, request=body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            service.stream_chunks(
                sessionmaker, engine=engine, result=result, include_usage=include_usage
            ),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    return await service.complete(sessionmaker, engine=engine, result=result)
