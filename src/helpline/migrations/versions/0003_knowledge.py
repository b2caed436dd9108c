"""Knowledge base (documents, chunks, full-text index, version row) and background jobs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 08:40:00.000000

The full-text structures depend on the database:

- SQLite: an FTS5 table `knowledge_chunks_fts` (Porter stemming) whose rowid is the chunk's
  `search_rowid`, kept in sync with `knowledge_chunks` by triggers, so every way a chunk goes
  away (a cascade from its document, a bulk delete) also leaves the index;
- PostgreSQL: a generated `search_vector tsvector` column (heading path weighted `A`, text `B`)
  with a GIN index. It is not mapped by the ORM models (autogenerate would offer to drop it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import helpline.kit.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_FTS = [
    """
    CREATE VIRTUAL TABLE knowledge_chunks_fts USING fts5(
        headings, body, tokenize = 'porter unicode61 remove_diacritics 2'
    )
    """,
    """
    CREATE TRIGGER knowledge_chunks_fts_insert AFTER INSERT ON knowledge_chunks BEGIN
        INSERT INTO knowledge_chunks_fts (rowid, headings, body)
        VALUES (new.search_rowid, new.heading_path, new.content);
    END
    """,
    """
    CREATE TRIGGER knowledge_chunks_fts_delete AFTER DELETE ON knowledge_chunks BEGIN
        DELETE FROM knowledge_chunks_fts WHERE rowid = old.search_rowid;
    END
    """,
    """
    CREATE TRIGGER knowledge_chunks_fts_update
    AFTER UPDATE OF heading_path, content, search_rowid ON knowledge_chunks BEGIN
        DELETE FROM knowledge_chunks_fts WHERE rowid = old.search_rowid;
        INSERT INTO knowledge_chunks_fts (rowid, headings, body)
        VALUES (new.search_rowid, new.heading_path, new.content);
    END
    """,
]

_POSTGRES_FTS = [
    """
    ALTER TABLE knowledge_chunks ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english', coalesce(heading_path, '')), 'A')
        || setweight(to_tsvector('english', coalesce(content, '')), 'B')
    ) STORED
    """,
    "CREATE INDEX ix_knowledge_chunks_search_vector ON knowledge_chunks USING gin (search_vector)",
]


def _status_enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=16)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "status",
            _status_enum("jobstatus", "queued", "running", "complete", "failed"),
            nullable=False,
        ),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("trace_context", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("started_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_jobs_created_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_created_at"), ["created_at"], unique=False)
        batch_op.create_index("ix_jobs_status_created", ["status", "created_at"], unique=False)

    op.create_table(
        "knowledge_documents",
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("source_url", sa.String(length=2000), nullable=True),
        sa.Column("source_key", sa.String(length=64), nullable=False),
        sa.Column(
            "kind", _status_enum("documentkind", "markdown", "text", "html", "pdf"), nullable=False
        ),
        sa.Column("filename", sa.String(length=255), nullable=True),
        sa.Column(
            "status",
            _status_enum("documentstatus", "queued", "processing", "ready", "failed"),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("source_text", sa.Text(), nullable=True),
        sa.Column("source_bytes", sa.LargeBinary(), nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["users.id"],
            name=op.f("fk_knowledge_documents_created_by_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_documents")),
        sa.UniqueConstraint("source_key", name=op.f("uq_knowledge_documents_source_key")),
    )
    with op.batch_alter_table("knowledge_documents", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_knowledge_documents_created_at"), ["created_at"], unique=False
        )

    op.create_table(
        "knowledge_chunks",
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("heading_path", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_model", sa.String(length=200), nullable=True),
        sa.Column("search_rowid", sa.BigInteger(), nullable=False),
        sa.Column("created_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["knowledge_documents.id"],
            name=op.f("fk_knowledge_chunks_document_id_knowledge_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_chunks")),
        sa.UniqueConstraint("search_rowid", name=op.f("uq_knowledge_chunks_search_rowid")),
    )
    with op.batch_alter_table("knowledge_chunks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_knowledge_chunks_document_position", ["document_id", "position"], unique=False
        )

    state = op.create_table(
        "knowledge_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("updated_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_state")),
    )
    op.bulk_insert(state, [{"id": 1, "version": "initial", "updated_at": datetime.now(UTC)}])

    dialect = op.get_bind().dialect.name
    statements = _SQLITE_FTS if dialect == "sqlite" else _POSTGRES_FTS
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS knowledge_chunks_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS knowledge_chunks_fts")
    op.drop_table("knowledge_state")
    with op.batch_alter_table("knowledge_chunks", schema=None) as batch_op:
        batch_op.drop_index("ix_knowledge_chunks_document_position")
    op.drop_table("knowledge_chunks")
    with op.batch_alter_table("knowledge_documents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_knowledge_documents_created_at"))
    op.drop_table("knowledge_documents")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_created")
        batch_op.drop_index(batch_op.f("ix_jobs_created_at"))
    op.drop_table("jobs")
