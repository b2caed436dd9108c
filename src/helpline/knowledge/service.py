"""The knowledge base's rules: uploads, ingestion, re-embedding, listing, deletion and search.

For other code, the entry points are:

- `search(session_or_sessionmaker, *, query, k)` → `list[SearchResult]` (best first, each
  with a calibrated `relevance` in [0, 1]), or the same method on a `KnowledgeBase`
  (`app.state.knowledge`, passed to answerers by `helpline.agents.factory`);
- `start_knowledge_base(settings, sessionmaker)` / `stop_knowledge_base(kb)` for a process
  that searches or ingests (the app, the job worker, the CLI);
- `ingest_paths(...)` for files on disk (`helpline ingest`, the demo knowledge base).

Ingestion of an upload is a job (`knowledge.tasks`): the request stores the upload and the
job parses, chunks, embeds and indexes it. A re-upload of the same source (same
`source_url`, else same title) keeps the document's id and bumps its `revision`; an
ingestion only stores its chunks if no newer upload arrived meanwhile, and until then the
earlier chunks stay searchable.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.agents.tokens import estimate_tokens
from helpline.core.config import Settings
from helpline.core.database import unit_of_work
from helpline.core.errors import PayloadTooLarge
from helpline.jobs import service as jobs_service
from helpline.jobs.models import Job
from helpline.jobs.queues import JobQueue
from helpline.knowledge import parsing, repository
from helpline.knowledge.chunking import ChunkDraft, chunk_document, embedding_text
from helpline.knowledge.embeddings import Vectors, create_embeddings, to_bytes
from helpline.knowledge.exceptions import DocumentNotFound, DocumentUnreadable, InvalidDocument
from helpline.knowledge.models import TITLE_MAX_LENGTH, Chunk, Document, DocumentStatus
from helpline.knowledge.schemas import DocumentUpload
from helpline.knowledge.search import KnowledgeBase, SearchResult, SessionSource, get_current
from helpline.knowledge.search import set_current as set_current_knowledge_base

log = structlog.get_logger(__name__)

INGEST_JOB = "ingest_document"
REEMBED_JOB = "reembed_all"
REEMBED_BATCH = 64

__all__ = [
    "KnowledgeBase",
    "SearchResult",
    "search",
    "start_knowledge_base",
    "stop_knowledge_base",
]


# --- the process's knowledge base ---------------------------------------------------------------


async def start_knowledge_base(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    warm_up: bool = True,
) -> KnowledgeBase:
    """Retrieval for this process; the embeddings model starts loading if there is content."""
    knowledge = KnowledgeBase(sessionmaker, create_embeddings(settings))
    if not warm_up:
        set_current_knowledge_base(knowledge)
        return knowledge
    try:
        async with sessionmaker() as session:
            has_content = await repository.count_chunks(session) > 0
    except Exception:
        # An unreachable database must not stop the start-up; /health reports it.
        log.warning("knowledge.start_check_failed", exc_info=True)
        has_content = False
    if has_content:
        knowledge.start_warm_up()
    set_current_knowledge_base(knowledge)
    log.info(
        "knowledge.started",
        embeddings=knowledge.embeddings.name,
        model=knowledge.embeddings.model_id,
    )
    return knowledge


async def stop_knowledge_base(knowledge: KnowledgeBase) -> None:
    """Release what `start_knowledge_base` opened."""
    await knowledge.close()
    try:
        if get_current() is knowledge:
            set_current_knowledge_base(None)
    except RuntimeError:
        pass


async def search(
    session_or_sessionmaker: SessionSource | None, *, query: str, k: int = 5
) -> list[SearchResult]:
    """The `k` passages that best answer `query`, best first, in this process's knowledge base."""
    return await get_current().search(session_or_sessionmaker, query=query, k=k)


# --- documents ----------------------------------------------------------------------------------


def source_key(source_url: str | None, title: str) -> str:
    """What identifies "the same document" across uploads: its URL, else its title."""
    if source_url:
        parts = urlsplit(source_url.strip())
        normalized = urlunsplit(
            (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, "")
        )
        basis = f"url:{normalized}"
    else:
        basis = "title:" + " ".join(title.casefold().split())
    return hashlib.sha256(basis.encode()).hexdigest()


def _title_from_filename(filename: str | None) -> str | None:
    if not filename:
        return None
    stem = PurePath(filename).stem.replace("_", " ").replace("-", " ").strip()
    return " ".join(stem.split()) or None


def _clean_title(title: str) -> str:
    title = " ".join(title.split())
    return title[:TITLE_MAX_LENGTH]


async def inspect(upload: DocumentUpload, *, max_bytes: int) -> parsing.InspectedUpload:
    """Check an upload (in a thread: parsing may take a while); 4xx errors for bad input."""
    if upload.data is not None:
        if len(upload.data) > max_bytes:
            raise PayloadTooLarge(f"The file is larger than {max_bytes} bytes")
        kind = parsing.detect_kind(upload.filename, upload.media_type)
        return await asyncio.to_thread(
            parsing.inspect_upload,
            upload.data,
            kind=kind,
            declared_charset=parsing.charset_of(upload.media_type),
        )
    if upload.text is None or not upload.text.strip():
        raise InvalidDocument("The document is empty")
    if len(upload.text.encode()) > max_bytes:
        raise PayloadTooLarge(f"The content is larger than {max_bytes} bytes")
    return await asyncio.to_thread(parsing.inspect_text, upload.text)


async def save_upload(
    session: AsyncSession,
    *,
    upload: DocumentUpload,
    inspected: parsing.InspectedUpload,
    created_by: uuid.UUID | None,
) -> tuple[Document, bool]:
    """Create the document, or replace the one with the same source; (document, created)."""
    title = _clean_title(
        upload.title or inspected.title or _title_from_filename(upload.filename) or "Untitled"
    )
    key = source_key(upload.source_url, title)
    raw = inspected.data if inspected.data is not None else (inspected.text or "").encode()
    content_hash = hashlib.sha256(raw).hexdigest()
    values: dict[str, Any] = {
        "title": title,
        "source_url": upload.source_url,
        "kind": inspected.kind,
        "filename": (PurePath(upload.filename).name[:255] if upload.filename else None),
        "status": DocumentStatus.QUEUED,
        "error": None,
        "content_hash": content_hash,
        "source_text": inspected.text,
        "source_bytes": inspected.data,
    }
    for _ in range(2):
        existing = await repository.lock_document_by_key(session, key)
        if existing is not None:
            for name, value in values.items():
                setattr(existing, name, value)
            existing.revision += 1
            if created_by is not None:
                existing.created_by = created_by
            await session.flush()
            return existing, False
        document = Document(source_key=key, revision=1, chunk_count=0, created_by=created_by)
        for name, value in values.items():
            setattr(document, name, value)
        try:
            # A savepoint: losing a race with a concurrent upload of the same source only
            # undoes this insert, and the loop then replaces the winner's document.
            async with session.begin_nested():
                session.add(document)
                await session.flush()
        except IntegrityError:
            continue
        return document, True
    raise InvalidDocument("The document is being uploaded concurrently; try again")


async def upload_document(
    session: AsyncSession,
    *,
    queue: JobQueue | None,
    upload: DocumentUpload,
    created_by: uuid.UUID | None,
    max_bytes: int,
) -> tuple[Document, Job]:
    """Store an upload and queue its ingestion (after commit); 4xx for unusable input."""
    inspected = await inspect(upload, max_bytes=max_bytes)
    document, created = await save_upload(
        session, upload=upload, inspected=inspected, created_by=created_by
    )
    job = await jobs_service.enqueue(
        session,
        queue,
        name=INGEST_JOB,
        args={"document_id": str(document.id), "revision": document.revision},
        created_by=created_by,
    )
    log.info(
        "knowledge.document_uploaded",
        document_id=str(document.id),
        kind=document.kind.value,
        replaced=not created,
        job_id=str(job.id),
    )
    return document, job


async def list_documents(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> tuple[list[Document], str | None]:
    """Documents, newest first, one keyset page at a time."""
    return await repository.list_documents(session, limit=limit, cursor=cursor)


async def get_document(session: AsyncSession, *, document_id: uuid.UUID) -> Document:
    """A document, or `DocumentNotFound`."""
    document = await repository.get_document(session, document_id)
    if document is None:
        raise DocumentNotFound(f"Document {document_id} not found")
    return document


async def delete_document(session: AsyncSession, *, document_id: uuid.UUID) -> None:
    """Delete a document and its chunks; searches stop finding it at once."""
    if not await repository.delete_document(session, document_id):
        raise DocumentNotFound(f"Document {document_id} not found")
    await repository.bump_version(session)
    log.info("knowledge.document_deleted", document_id=str(document_id))


# --- ingestion ----------------------------------------------------------------------------------


def _new_search_rowid() -> int:
    return secrets.randbits(62) + 1


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A document parsed and chunked, waiting for its vectors."""

    document_id: uuid.UUID
    revision: int
    drafts: list[ChunkDraft]


async def _prepare(
    sessionmaker: async_sessionmaker[AsyncSession], *, document_id: uuid.UUID, revision: int | None
) -> _Prepared | dict[str, Any]:
    """Mark the document `processing`, parse and chunk it (a result dict: nothing to do)."""
    async with unit_of_work(sessionmaker) as session:
        document = await repository.lock_document(session, document_id, with_source=True)
        if document is None:
            return {"document_id": str(document_id), "skipped": "deleted"}
        if revision is not None and document.revision != revision:
            return {"document_id": str(document_id), "skipped": "superseded"}
        revision = document.revision
        document.status = DocumentStatus.PROCESSING
        document.error = None
        kind, title = document.kind, document.title
        text, data = document.source_text, document.source_bytes
    parsed = await asyncio.to_thread(parsing.parse_document, kind, text=text, data=data)
    drafts = chunk_document(parsed, title=title)
    if not drafts:
        raise DocumentUnreadable("The document has no text to index")
    return _Prepared(document_id=document_id, revision=revision, drafts=drafts)


async def _store(
    sessionmaker: async_sessionmaker[AsyncSession],
    prepared: _Prepared,
    vectors: Vectors,
    model_id: str | None,
) -> dict[str, Any]:
    """Replace the document's chunks (unless a newer upload superseded it) and mark it ready."""
    document_id = prepared.document_id
    async with unit_of_work(sessionmaker) as session:
        document = await repository.lock_document(session, document_id)
        if document is None:
            return {"document_id": str(document_id), "skipped": "deleted"}
        if document.revision != prepared.revision:
            return {"document_id": str(document_id), "skipped": "superseded"}
        await repository.delete_chunks(session, document_id)
        chunks = [
            Chunk(
                document_id=document_id,
                position=draft.position,
                heading_path=draft.heading_path,
                content=draft.content,
                token_count=estimate_tokens(draft.content),
                embedding=to_bytes(vectors[index]) if model_id else None,
                embedding_model=model_id,
                search_rowid=_new_search_rowid(),
            )
            for index, draft in enumerate(prepared.drafts)
        ]
        await repository.add_chunks(session, chunks)
        document.status = DocumentStatus.READY
        document.chunk_count = len(chunks)
        document.error = None
        await repository.bump_version(session)
    log.info("knowledge.document_ingested", document_id=str(document_id), chunks=len(chunks))
    return {"document_id": str(document_id), "chunks": len(chunks)}


async def ingest_document(
    sessionmaker: async_sessionmaker[AsyncSession],
    knowledge: KnowledgeBase,
    *,
    document_id: uuid.UUID,
    revision: int | None = None,
) -> dict[str, Any]:
    """Parse, chunk, embed and index one stored upload (the body of the ingestion job).

    Raises `DocumentUnreadable` for content that cannot be indexed (no retry) and anything
    else for transient failures. Returns the job's result.
    """
    prepared = await _prepare(sessionmaker, document_id=document_id, revision=revision)
    if not isinstance(prepared, _Prepared):
        return prepared
    vectors = await knowledge.embeddings.embed_documents(
        [draft.text_for_embedding for draft in prepared.drafts]
    )
    return await _store(sessionmaker, prepared, vectors, knowledge.embeddings.model_id)


async def fail_document(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    document_id: uuid.UUID,
    revision: int | None,
    error: str,
) -> None:
    """Mark a document `failed` with `error` (unless a newer upload replaced it meanwhile).

    Its chunks go too: a failed document is not part of the knowledge base.
    """
    async with unit_of_work(sessionmaker) as session:
        document = await repository.lock_document(session, document_id)
        if document is None or (revision is not None and document.revision != revision):
            return
        had_chunks = document.chunk_count > 0
        await repository.delete_chunks(session, document_id)
        document.status = DocumentStatus.FAILED
        document.error = error
        document.chunk_count = 0
        if had_chunks:
            await repository.bump_version(session)
    log.info("knowledge.document_failed", document_id=str(document_id), error=error)


async def reembed_all(
    sessionmaker: async_sessionmaker[AsyncSession], knowledge: KnowledgeBase
) -> dict[str, Any]:
    """Embed every chunk that has no vector of the current model (after a model change)."""
    model_id = knowledge.embeddings.model_id
    if model_id is None:
        return {"reembedded": 0, "skipped": "embeddings are off"}
    total = 0
    while True:
        async with sessionmaker() as session:
            batch = await repository.chunks_to_embed(
                session, model_id=model_id, limit=REEMBED_BATCH
            )
        if not batch:
            break
        vectors = await knowledge.embeddings.embed_documents(
            [embedding_text(heading, content) for _, heading, content in batch]
        )
        async with unit_of_work(sessionmaker) as session:
            for (chunk_id, _, _), vector in zip(batch, vectors, strict=True):
                await repository.set_embedding(
                    session, chunk_id, embedding=to_bytes(vector), model_id=model_id
                )
            await repository.bump_version(session)
        total += len(batch)
    log.info("knowledge.reembedded", chunks=total, model=model_id)
    return {"reembedded": total, "model": model_id}


async def schedule_reembedding(
    session: AsyncSession, *, knowledge: KnowledgeBase, queue: JobQueue | None
) -> Job | None:
    """Queue `reembed_all` if chunks lack vectors of the current model and none is queued."""
    model_id = knowledge.embeddings.model_id
    if model_id is None:
        return None
    if await repository.count_chunks_to_embed(session, model_id=model_id) == 0:
        return None
    if await jobs_service.has_unfinished(session, name=REEMBED_JOB):
        return None
    return await jobs_service.enqueue(session, queue, name=REEMBED_JOB, args={})


# --- files on disk (CLI, demo) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    path: Path
    status: str  # added | updated | unchanged | failed
    title: str | None = None
    chunks: int = 0
    error: str | None = None
    document_id: uuid.UUID | None = None


def collect_files(paths: Iterable[Path], *, exclude_names: Sequence[str] = ()) -> list[Path]:
    """The supported files among `paths` (folders are walked; hidden entries skipped)."""
    found: list[Path] = []
    excluded = {name.lower() for name in exclude_names}
    for path in paths:
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                relative = candidate.relative_to(path).parts
                if any(part.startswith(".") for part in relative):
                    continue
                if (
                    candidate.is_file()
                    and candidate.suffix.lower() in parsing.EXTENSIONS
                    and candidate.name.lower() not in excluded
                ):
                    found.append(candidate)
        else:
            found.append(path)
    return found


async def _save_file(
    sessionmaker: async_sessionmaker[AsyncSession], path: Path, *, max_bytes: int
) -> IngestOutcome | tuple[uuid.UUID, int, str, bool]:
    """Store one file as a document: (id, revision, title, created), or why not."""
    try:
        data = await asyncio.to_thread(path.read_bytes)
        upload = DocumentUpload(title=None, source_url=None, data=data, filename=path.name)
        inspected = await inspect(upload, max_bytes=max_bytes)
    except OSError as exc:
        return IngestOutcome(path, "failed", error=f"Cannot read the file ({exc.strerror})")
    except (InvalidDocument, PayloadTooLarge) as exc:
        return IngestOutcome(path, "failed", error=exc.message)
    except Exception as exc:  # an unsupported type, or anything else: report it, go on
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return IngestOutcome(path, "failed", error=message)

    async with unit_of_work(sessionmaker) as session:
        raw = inspected.data if inspected.data is not None else (inspected.text or "").encode()
        title = _clean_title(inspected.title or _title_from_filename(path.name) or path.name)
        existing = await repository.get_document_by_key(session, source_key(None, title))
        if (
            existing is not None
            and existing.status == DocumentStatus.READY
            and existing.content_hash == hashlib.sha256(raw).hexdigest()
        ):
            return IngestOutcome(
                path, "unchanged", existing.title, existing.chunk_count, None, existing.id
            )
        document, created = await save_upload(
            session, upload=upload, inspected=inspected, created_by=None
        )
        return document.id, document.revision, document.title, created


async def ingest_paths(
    sessionmaker: async_sessionmaker[AsyncSession],
    knowledge: KnowledgeBase,
    files: Sequence[Path],
    *,
    max_bytes: int,
    on_progress: Callable[[IngestOutcome], None] | None = None,
    batch_files: int = 64,
) -> list[IngestOutcome]:
    """Load `files` now, in this process; a bad file is reported, never stops the rest.

    Files are parsed one by one, but their passages are embedded together, `batch_files`
    files at a time: a model encodes one large batch much faster than many small ones.
    """
    outcomes: list[IngestOutcome] = []
    for first in range(0, len(files), batch_files):
        batch: list[tuple[Path, str, bool, _Prepared]] = []
        for path in files[first : first + batch_files]:
            saved = await _save_file(sessionmaker, path, max_bytes=max_bytes)
            if isinstance(saved, IngestOutcome):
                outcomes.append(saved)
                if on_progress is not None:
                    on_progress(saved)
                continue
            document_id, revision, title, created = saved
            try:
                prepared = await _prepare(sessionmaker, document_id=document_id, revision=revision)
            except DocumentUnreadable as exc:
                await fail_document(
                    sessionmaker, document_id=document_id, revision=revision, error=exc.message
                )
                outcome = IngestOutcome(path, "failed", title, 0, exc.message, document_id)
                outcomes.append(outcome)
                if on_progress is not None:
                    on_progress(outcome)
                continue
            assert isinstance(prepared, _Prepared)  # just saved: neither deleted nor replaced
            batch.append((path, title, created, prepared))
        texts = [draft.text_for_embedding for *_, prepared in batch for draft in prepared.drafts]
        try:
            vectors = await knowledge.embeddings.embed_documents(texts)
        except Exception as exc:
            # The embeddings provider is away: these documents fail with the reason (run the
            # command again later); none is left `processing`.
            error = f"Embedding failed ({type(exc).__name__}: {exc})"
            for path, title, _, prepared in batch:
                await fail_document(
                    sessionmaker,
                    document_id=prepared.document_id,
                    revision=prepared.revision,
                    error=error,
                )
                outcome = IngestOutcome(path, "failed", title, 0, error, prepared.document_id)
                outcomes.append(outcome)
                if on_progress is not None:
                    on_progress(outcome)
            continue
        offset = 0
        for path, title, created, prepared in batch:
            count = len(prepared.drafts)
            result = await _store(
                sessionmaker,
                prepared,
                vectors[offset : offset + count],
                knowledge.embeddings.model_id,
            )
            offset += count
            outcome = IngestOutcome(
                path,
                "added" if created else "updated",
                title,
                int(result.get("chunks", 0)),
                None,
                prepared.document_id,
            )
            outcomes.append(outcome)
            if on_progress is not None:
                on_progress(outcome)
    return outcomes


async def is_empty(session: AsyncSession) -> bool:
    """Whether the knowledge base holds no document at all."""
    return await repository.count_documents(session) == 0


def is_supported_file(path: Path) -> bool:
    return path.suffix.lower() in parsing.EXTENSIONS
