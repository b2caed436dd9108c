"""Dependencies of the knowledge base routes: the upload (JSON or multipart) and retrieval."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from helpline.knowledge.exceptions import UnsupportedUploadType
from helpline.knowledge.schemas import DocumentCreate, DocumentUpload
from helpline.knowledge.search import KnowledgeBase

FORM_TEXT_MAX_LENGTH = 2000


def _form_text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": "Must be text, not a file", "type": "string_type"}]
        )
    value = value.strip()
    if len(value) > FORM_TEXT_MAX_LENGTH:
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": "Too long", "type": "string_too_long"}]
        )
    return value or None


async def get_document_upload(request: Request) -> DocumentUpload:
    """The document in the request: a JSON body, or a multipart form with a `file` field."""
    content_type = request.headers.get("content-type", "")
    essence = content_type.split(";", 1)[0].strip().lower()
    if essence == "application/json" or essence.endswith("+json"):
        body = await request.body()
        try:
            document = DocumentCreate.model_validate_json(body or b"null")
        except ValidationError as exc:
            errors = [
                {**error, "loc": ("body", *error.get("loc", ()))}
                for error in exc.errors(include_url=False)
            ]
            raise RequestValidationError(errors, body=body) from exc
        return DocumentUpload(
            title=document.title, source_url=document.source_url, text=document.content
        )
    if essence == "multipart/form-data":
        async with request.form(max_files=1, max_fields=10) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise RequestValidationError(
                    [{"loc": ("body", "file"), "msg": "Field required", "type": "missing"}]
                )
            title = _form_text(form.get("title"), "title")
            source_url = _form_text(form.get("source_url"), "source_url")
            data = await upload.read()
            return DocumentUpload(
                title=title,
                source_url=source_url,
                data=data,
                filename=upload.filename,
                media_type=upload.content_type,
            )
    raise UnsupportedUploadType()


def get_knowledge(request: Request) -> KnowledgeBase:
    knowledge: KnowledgeBase = request.app.state.knowledge
    return knowledge


def get_upload_limit(request: Request) -> int:
    return int(request.app.state.settings.max_upload_bytes)


Upload = Annotated[DocumentUpload, Depends(get_document_upload)]
Knowledge = Annotated[KnowledgeBase, Depends(get_knowledge)]
UploadLimit = Annotated[int, Depends(get_upload_limit)]
PageLimit = Annotated[int, Query(ge=1, le=100, description="Items per page (1-100).")]
PageCursor = Annotated[
    str | None, Query(max_length=512, description="`next_cursor` of the previous page.")
]
SearchQuery = Annotated[str, Query(min_length=1, max_length=4000, description="What to look for.")]
SearchLimit = Annotated[int, Query(ge=1, le=50, description="How many passages (1-50).")]

UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DocumentCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A .md, .txt, .html or .pdf file.",
                        },
                        "title": {"type": "string", "description": "Defaults to the file's own."},
                        "source_url": {"type": "string"},
                    },
                }
            },
        },
    }
}
