"""Conversations and messages

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 08:20:41.925213
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import helpline.kit.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "waiting_for_agent",
                "with_agent",
                "resolved",
                name="conversationstatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("waiting_since", helpline.kit.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("assigned_agent_id", sa.Uuid(), nullable=True),
        sa.Column("handoff_reason", sa.String(length=500), nullable=True),
        sa.Column("first_answer_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("was_handed_over", sa.Boolean(), nullable=False),
        sa.Column("resolved_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["assigned_agent_id"],
            ["users.id"],
            name=op.f("fk_conversations_assigned_agent_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_conversations_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_conversations_assigned_agent_id"), ["assigned_agent_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_conversations_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            "ix_conversations_status_waiting", ["status", "waiting_since", "id"], unique=False
        )
        batch_op.create_index(
            "ix_conversations_user_activity", ["user_id", "updated_at", "id"], unique=False
        )

    op.create_table(
        "messages",
        sa.Column("conversation_id", sa.Uuid(), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "user",
                "assistant",
                "agent",
                "system",
                name="messagerole",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("author_id", sa.Uuid(), nullable=True),
        sa.Column("client_message_id", sa.String(length=100), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "streaming",
                "complete",
                "cancelled",
                "failed",
                name="messagestatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("reply_to_message_id", sa.Uuid(), nullable=True),
        sa.Column("reply_to", sa.String(length=100), nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", helpline.kit.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["author_id"],
            ["users.id"],
            name=op.f("fk_messages_author_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reply_to_message_id"],
            ["messages.id"],
            name=op.f("fk_messages_reply_to_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint(
            "conversation_id",
            "client_message_id",
            name=op.f("uq_messages_conversation_id_client_message_id"),
        ),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_conversation_created",
            ["conversation_id", "created_at", "id"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_messages_created_at"), ["created_at"], unique=False)
        batch_op.create_index(
            "uq_messages_one_streaming_answer",
            ["conversation_id"],
            unique=True,
            sqlite_where=sa.text("status = 'streaming'"),
            postgresql_where=sa.text("status = 'streaming'"),
        )
    op.create_table(
        "token_usage",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_token_usage_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "day", name=op.f("pk_token_usage")),
    )


def downgrade() -> None:
    op.drop_table("token_usage")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_messages_one_streaming_answer",
            sqlite_where=sa.text("status = 'streaming'"),
            postgresql_where=sa.text("status = 'streaming'"),
        )
        batch_op.drop_index(batch_op.f("ix_messages_created_at"))
        batch_op.drop_index("ix_messages_conversation_created")

    op.drop_table("messages")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_user_activity")
        batch_op.drop_index("ix_conversations_status_waiting")
        batch_op.drop_index(batch_op.f("ix_conversations_created_at"))
        batch_op.drop_index(batch_op.f("ix_conversations_assigned_agent_id"))

    op.drop_table("conversations")
