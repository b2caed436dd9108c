"""Documents, their chunks and the knowledge base's version row.

Full-text structures are not mapped here because they differ per database (created by the
`0003` migration): on SQLite an FTS5 table `knowledge_chunks_fts` kept in sync by triggers on
`knowledge_chunks`, on PostgreSQL a generated `search_vector tsvector` column with a GIN index.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, deferred, mapped_column

from helpline.kit.models import Base, IdMixin, TimestampMixin, enum_column, utcnow

TITLE_MAX_LENGTH = 300
SOURCE_URL_MAX_LENGTH = 2000
FILENAME_MAX_LENGTH = 255
STATE_ROW_ID = 1


class DocumentStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


class DocumentKind(StrEnum):
    MARKDOWN = "markdown"
    TEXT = "text"
    HTML = "html"
    PDF = "pdf"


class Document(IdMixin, TimestampMixin, Base):
    """An uploaded article; re-uploading the same source replaces it in place (same id)."""

    __tablename__ = "knowledge_documents"

    title: Mapped[str] = mapped_column(String(TITLE_MAX_LENGTH))
    source_url: Mapped[str | None] = mapped_column(String(SOURCE_URL_MAX_LENGTH))
    # What makes two uploads "the same document": a hash of the source URL, or of the title
    # when there is none. Unique, so two concurrent uploads cannot both create it.
    source_key: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[DocumentKind] = mapped_column(enum_column(DocumentKind, 16))
    filename: Mapped[str | None] = mapped_column(String(FILENAME_MAX_LENGTH))
    status: Mapped[DocumentStatus] = mapped_column(
        enum_column(DocumentStatus, 16), default=DocumentStatus.QUEUED
    )
    error: Mapped[str | None] = mapped_column(Text)
    chunk_count: Mapped[int] = mapped_column(default=0)
    # Bumped by every upload: an ingestion only stores its chunks if no newer upload came in.
    revision: Mapped[int] = mapped_column(default=1)
    content_hash: Mapped[str] = mapped_column(String(64))
    # The upload as received, for the ingestion job (which takes IDs only): decoded text for
    # Markdown, text and HTML, the raw bytes for PDF. Deferred: lists never need it.
    source_text: Mapped[str | None] = deferred(mapped_column(Text), raiseload=True)
    source_bytes: Mapped[bytes | None] = deferred(mapped_column(LargeBinary), raiseload=True)
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )


class Chunk(IdMixin, Base):
    """A passage of a document: a heading path, its text and (optionally) its embedding."""

    __tablename__ = "knowledge_chunks"
    __table_args__ = (Index("ix_knowledge_chunks_document_position", "document_id", "position"),)

    document_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("knowledge_documents.id", ondelete="CASCADE")
    )
    position: Mapped[int]
    heading_path: Mapped[str] = mapped_column(Text, default="")
    content: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(default=0)
    # float32 little-endian, L2-normalised; NULL when embeddings are off or not computed yet.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    embedding_model: Mapped[str | None] = mapped_column(String(200))
    # The FTS5 rowid of this chunk on SQLite. A UUID primary key has no stable integer rowid
    # (VACUUM renumbers implicit rowids), so each chunk carries a random 62-bit one.
    search_rowid: Mapped[int] = mapped_column(BigInteger, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KnowledgeState(Base):
    """One row whose `version` changes on every write to the chunks.

    Every process keeps an in-memory vector index; reading this row before a search is how it
    learns that a worker, `helpline ingest` or another instance changed the knowledge base.
    A random token rather than a counter, so it can never come back to a value seen before
    (a restored backup, emptied tables).
    """

    __tablename__ = "knowledge_state"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
