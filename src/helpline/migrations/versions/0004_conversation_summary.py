"""Conversation memory: the running summary of a conversation's older messages

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:30:00.000000

`summary` holds the agent's running summary of the messages up to `summary_until` (the
`created_at` of the last message folded into it); messages after that are sent verbatim.
Both stay empty until a conversation passes `MEMORY_TOKEN_BUDGET`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import helpline.kit.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("summary", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "summary_until", helpline.kit.models.UTCDateTime(timezone=True), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("summary_until")
        batch_op.drop_column("summary")
