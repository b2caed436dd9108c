"""The knowledge base REST API (SPEC.md: Knowledge base — agents and admins write, anyone
signed in searches)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from helpline.auth.dependencies import AgentUser, CurrentUser
from helpline.core.database import DbSession
from helpline.core.errors import error_responses
from helpline.jobs.dependencies import Queue
from helpline.kit.schemas import Page
from helpline.knowledge import service
from helpline.knowledge.dependencies import (
    UPLOAD_OPENAPI,
    Knowledge,
    PageCursor,
    PageLimit,
    SearchLimit,
    SearchQuery,
    Upload,
    UploadLimit,
)
from helpline.knowledge.schemas import (
    DocumentAccepted,
    DocumentRead,
    SearchResponse,
    SearchResultRead,
)

router = APIRouter(prefix="/knowledge", tags=["knowledge"])


@router.post(
    "/documents",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DocumentAccepted,
    responses=error_responses(400, 401, 403, 413, 415, 422),
    openapi_extra=UPLOAD_OPENAPI,
)
async def upload_document(
    session: DbSession, user: AgentUser, upload: Upload, queue: Queue, max_bytes: UploadLimit
) -> DocumentAccepted:
    """Add a document, or replace the one with the same source; it is ingested in the background."""
    document, job = await service.upload_document(
        session, queue=queue, upload=upload, created_by=user.id, max_bytes=max_bytes
    )
    return DocumentAccepted(document=DocumentRead.model_validate(document), job_id=job.id)


@router.get(
    "/documents", response_model=Page[DocumentRead], responses=error_responses(400, 401, 403)
)
async def list_documents(
    session: DbSession, user: AgentUser, limit: PageLimit = 20, cursor: PageCursor = None
) -> Page[DocumentRead]:
    """The knowledge base's documents, newest first."""
    del user
    documents, next_cursor = await service.list_documents(session, limit=limit, cursor=cursor)
    return Page[DocumentRead](
        items=[DocumentRead.model_validate(document) for document in documents],
        next_cursor=next_cursor,
    )


@router.get(
    "/documents/{document_id}",
    response_model=DocumentRead,
    responses=error_responses(401, 403, 404),
)
async def get_document(document_id: uuid.UUID, session: DbSession, user: AgentUser) -> DocumentRead:
    """One document, with its ingestion status (and error, if it failed)."""
    del user
    document = await service.get_document(session, document_id=document_id)
    return DocumentRead.model_validate(document)


@router.delete(
    "/documents/{document_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 404),
)
async def delete_document(document_id: uuid.UUID, session: DbSession, user: AgentUser) -> Response:
    """Remove a document and its passages from the knowledge base."""
    del user
    await service.delete_document(session, document_id=document_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/search", response_model=SearchResponse, responses=error_responses(401, 403, 422))
async def search_knowledge(
    session: DbSession,
    user: CurrentUser,
    knowledge: Knowledge,
    q: SearchQuery,
    k: SearchLimit = 5,
) -> SearchResponse:
    """The passages that best match `q`, best first (`score` is comparable within one answer)."""
    del user
    results = await knowledge.search(session, query=q, k=k)
    return SearchResponse(
        results=[
            SearchResultRead(
                document_id=result.document_id,
                title=result.title,
                chunk_id=result.chunk_id,
                content=result.content,
                score=result.score,
            )
            for result in results
        ]
    )
