"""SQL for documents, chunks, the version row and full-text search (SQLite FTS5 / PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from helpline.kit.models import utcnow
from helpline.kit.pagination import paginate, split_page
from helpline.knowledge.models import STATE_ROW_ID, Chunk, Document, KnowledgeState

# Heading paths weigh more than body text: they name the topic in a customer's words.
_FTS5_RANK = "bm25(knowledge_chunks_fts, 2.5, 1.0)"

_SQLITE_SEARCH = text(
    f"""
    SELECT c.id AS chunk_id, {_FTS5_RANK} AS rank
    FROM knowledge_chunks_fts
    JOIN knowledge_chunks AS c ON c.search_rowid = knowledge_chunks_fts.rowid
    WHERE knowledge_chunks_fts MATCH :query
    ORDER BY rank
    LIMIT :limit
    """
)
_POSTGRES_SEARCH = text(
    """
    SELECT c.id AS chunk_id, ts_rank_cd(c.search_vector, q.query) AS rank
    FROM knowledge_chunks AS c, to_tsquery('english', :query) AS q(query)
    WHERE c.search_vector @@ q.query
    ORDER BY rank DESC
    LIMIT :limit
    """
)


@dataclass(frozen=True, slots=True)
class IndexRow:
    """What the in-memory index keeps of a chunk."""

    chunk_id: uuid.UUID
    document_id: uuid.UUID
    heading_path: str
    content: str
    embedding: bytes | None
    embedding_model: str | None


@dataclass(frozen=True, slots=True)
class ChunkHit:
    """A chunk as search returns it, with its document's title."""

    chunk_id: uuid.UUID
    document_id: uuid.UUID
    title: str
    source_url: str | None
    heading_path: str
    content: str
    position: int


# --- documents ----------------------------------------------------------------------------------


async def get_document(session: AsyncSession, document_id: uuid.UUID) -> Document | None:
    return await session.get(Document, document_id)


async def take_write_lock(session: AsyncSession) -> None:
    """On SQLite, take the database's write lock now, before the reads of an update.

    SQLite has no row locks (`FOR UPDATE` is ignored) and begins a transaction only at its
    first write; writing first makes the reads that follow see data no one else can change
    until this transaction ends, as `SELECT … FOR UPDATE` does on PostgreSQL.
    """
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(
            update(KnowledgeState)
            .where(KnowledgeState.id == STATE_ROW_ID)
            .values(id=KnowledgeState.id)
        )


async def lock_document(
    session: AsyncSession, document_id: uuid.UUID, *, with_source: bool = False
) -> Document | None:
    """Load a document for an update (row lock on PostgreSQL), its upload too if asked."""
    await take_write_lock(session)
    statement = select(Document).where(Document.id == document_id).with_for_update()
    if with_source:
        statement = statement.options(undefer(Document.source_text), undefer(Document.source_bytes))
    result = await session.execute(statement.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


async def lock_document_by_key(session: AsyncSession, source_key: str) -> Document | None:
    await take_write_lock(session)
    statement = select(Document).where(Document.source_key == source_key).with_for_update()
    result = await session.execute(statement.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


async def get_document_by_key(session: AsyncSession, source_key: str) -> Document | None:
    result = await session.execute(select(Document).where(Document.source_key == source_key))
    return result.scalar_one_or_none()


async def list_documents(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> tuple[list[Document], str | None]:
    statement = paginate(
        select(Document),
        sort_column=Document.created_at,
        id_column=Document.id,
        cursor=cursor,
        limit=limit,
        direction="desc",
    )
    rows = list((await session.execute(statement)).scalars().all())
    return split_page(rows, limit=limit, sort_attr="created_at")


async def delete_document(session: AsyncSession, document_id: uuid.UUID) -> bool:
    """Delete a document; its chunks go with it (and, through triggers, their FTS rows)."""
    await take_write_lock(session)
    # Chunks explicitly first: the FTS5 triggers fire on them whatever the FK settings.
    await session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    result = await session.execute(delete(Document).where(Document.id == document_id))
    return bool(getattr(result, "rowcount", 0))


async def count_documents(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(Document)) or 0)


# --- chunks -------------------------------------------------------------------------------------


async def delete_chunks(session: AsyncSession, document_id: uuid.UUID) -> None:
    await session.execute(delete(Chunk).where(Chunk.document_id == document_id))


async def add_chunks(session: AsyncSession, chunks: Sequence[Chunk]) -> None:
    session.add_all(chunks)
    await session.flush()


async def count_chunks(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(Chunk)) or 0)


async def load_index_rows(session: AsyncSession) -> list[IndexRow]:
    """Every chunk, for the in-memory index."""
    statement = select(
        Chunk.id,
        Chunk.document_id,
        Chunk.heading_path,
        Chunk.content,
        Chunk.embedding,
        Chunk.embedding_model,
    ).order_by(Chunk.document_id, Chunk.position)
    result = await session.execute(statement)
    return [IndexRow(*row) for row in result.all()]


async def get_chunk_hits(session: AsyncSession, chunk_ids: Sequence[uuid.UUID]) -> list[ChunkHit]:
    """The chunks `chunk_ids` with their documents' titles (in no particular order)."""
    if not chunk_ids:
        return []
    statement = (
        select(
            Chunk.id,
            Chunk.document_id,
            Document.title,
            Document.source_url,
            Chunk.heading_path,
            Chunk.content,
            Chunk.position,
        )
        .join(Document, Document.id == Chunk.document_id)
        .where(Chunk.id.in_(list(chunk_ids)))
    )
    result = await session.execute(statement)
    return [ChunkHit(*row) for row in result.all()]


async def chunks_to_embed(
    session: AsyncSession, *, model_id: str, limit: int
) -> list[tuple[uuid.UUID, str, str]]:
    """Chunks without a vector of `model_id`: (id, heading path, text)."""
    statement = (
        select(Chunk.id, Chunk.heading_path, Chunk.content)
        .where(or_(Chunk.embedding_model.is_(None), Chunk.embedding_model != model_id))
        .order_by(Chunk.id)
        .limit(limit)
    )
    result = await session.execute(statement)
    return [(row[0], row[1], row[2]) for row in result.all()]


async def count_chunks_to_embed(session: AsyncSession, *, model_id: str) -> int:
    statement = (
        select(func.count())
        .select_from(Chunk)
        .where(or_(Chunk.embedding_model.is_(None), Chunk.embedding_model != model_id))
    )
    return int(await session.scalar(statement) or 0)


async def set_embedding(
    session: AsyncSession, chunk_id: uuid.UUID, *, embedding: bytes, model_id: str
) -> None:
    await session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id)
        .values(embedding=embedding, embedding_model=model_id)
    )


# --- version ------------------------------------------------------------------------------------


async def read_version(session: AsyncSession) -> str | None:
    return await session.scalar(
        select(KnowledgeState.version).where(KnowledgeState.id == STATE_ROW_ID)
    )


async def bump_version(session: AsyncSession) -> str:
    """Give the knowledge base a new version (an upsert: the row may have been removed)."""
    version = uuid.uuid4().hex
    await session.execute(
        text(
            "INSERT INTO knowledge_state (id, version, updated_at) VALUES (:id, :version, :now) "
            "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
            "updated_at = excluded.updated_at"
        ).bindparams(id=STATE_ROW_ID, version=version, now=_db_now(session)),
    )
    return version


def _db_now(session: AsyncSession) -> object:
    now = utcnow()
    # Plain SQL bypasses the UTCDateTime type: store what it would (naive UTC on SQLite).
    if session.get_bind().dialect.name == "sqlite":
        return now.replace(tzinfo=None)
    return now


# --- full-text search ---------------------------------------------------------------------------


def fts5_query(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of `terms`; each is quoted, so no FTS5 syntax gets through."""
    quoted = []
    for term in terms:
        cleaned = term.replace('"', " ").replace("'", " ").strip()
        if cleaned:
            quoted.append(f'"{cleaned}"')
    return " OR ".join(quoted)


def tsquery(terms: Sequence[str]) -> str:
    """A `to_tsquery` string OR-ing `terms`.

    `plainto_tsquery` and `websearch_to_tsquery` AND every word, which a long customer message
    never satisfies. Terms are reduced to letters and digits, so no tsquery syntax gets through.
    """
    cleaned = []
    for term in terms:
        word = "".join(char for char in term if char.isalnum())
        if word:
            cleaned.append(f"'{word}'")
    return " | ".join(cleaned)


async def fulltext_search(
    session: AsyncSession, terms: Sequence[str], *, limit: int
) -> list[tuple[uuid.UUID, float]]:
    """Chunks matching any of `terms`, best first: (chunk id, score, higher is better)."""
    if session.get_bind().dialect.name == "sqlite":
        query = fts5_query(terms)
        if not query:
            return []
        result = await session.execute(_SQLITE_SEARCH, {"query": query, "limit": limit})
        # bm25() is lower for better matches.
        return [(_as_uuid(row.chunk_id), -float(row.rank)) for row in result]
    query = tsquery(terms)
    if not query:
        return []
    result = await session.execute(_POSTGRES_SEARCH, {"query": query, "limit": limit})
    return [(_as_uuid(row.chunk_id), float(row.rank)) for row in result]


def _as_uuid(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes):
        return uuid.UUID(bytes=value)
    return uuid.UUID(str(value))
