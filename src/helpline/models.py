"""Every table's model, imported so that `metadata` is complete (Alembic, tests)."""

from __future__ import annotations

from helpline.kit.models import Base

metadata = Base.metadata
