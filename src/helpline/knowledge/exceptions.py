"""Errors of the knowledge base."""

from __future__ import annotations

from helpline.core.errors import AppError, BadRequest, NotFound
from helpline.jobs.exceptions import PermanentJobError


class DocumentNotFound(NotFound):
    code = "DOCUMENT_NOT_FOUND"
    message = "Document not found"


class InvalidDocument(BadRequest):
    """An upload that cannot become a document: empty, binary, undecodable, a broken PDF."""

    code = "INVALID_DOCUMENT"
    message = "The document cannot be read"


class UnsupportedFileType(AppError):
    status_code = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    message = "Upload a .md, .txt, .html or .pdf file"


class UnsupportedUploadType(AppError):
    status_code = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    message = "Send the document as application/json or as multipart/form-data with a `file`"


class DocumentUnreadable(PermanentJobError):
    """Found while ingesting (not at upload): the document fails with this message."""


class EmbeddingsUnavailable(Exception):
    """The embeddings provider failed; transient (the job retries), never shown to customers."""


class EmbeddingsNotInstalled(Exception):
    """`EMBEDDINGS_PROVIDER=local` without the `local-embeddings` extra (raised at start-up)."""
