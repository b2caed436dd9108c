"""Knowledge-base payloads (SPEC.md: Knowledge base)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from pydantic import Field, field_validator

from helpline.kit.schemas import Schema
from helpline.knowledge.models import SOURCE_URL_MAX_LENGTH, TITLE_MAX_LENGTH, DocumentStatus

MAX_QUERY_LENGTH = 4000
MAX_K = 50


class DocumentCreate(Schema):
    """A document sent as JSON; `content` is Markdown (plain text is Markdown too)."""

    title: str = Field(min_length=1, max_length=TITLE_MAX_LENGTH)
    content: str = Field(min_length=1)
    source_url: str | None = Field(default=None, max_length=SOURCE_URL_MAX_LENGTH)

    @field_validator("title")
    @classmethod
    def _title_has_text(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("title must not be blank")
        return value

    @field_validator("content")
    @classmethod
    def _content_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content must not be blank")
        return value

    @field_validator("source_url")
    @classmethod
    def _blank_url_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


@dataclass(frozen=True, slots=True)
class DocumentUpload:
    """A document to add, whichever way it came (JSON, a multipart file, the CLI)."""

    title: str | None
    source_url: str | None
    text: str | None = None  # JSON content (Markdown)
    data: bytes | None = None  # a file's bytes
    filename: str | None = None
    media_type: str | None = None


class DocumentRead(Schema):
    id: uuid.UUID
    title: str
    source_url: str | None
    status: DocumentStatus
    chunk_count: int
    error: str | None
    created_at: datetime


class DocumentAccepted(Schema):
    document: DocumentRead
    job_id: uuid.UUID


class SearchResultRead(Schema):
    document_id: uuid.UUID
    title: str
    chunk_id: uuid.UUID
    content: str
    score: float


class SearchResponse(Schema):
    results: list[SearchResultRead]
