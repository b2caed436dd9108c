"""Every table's model, imported so that `metadata` is complete (Alembic, tests)."""

from __future__ import annotations

import helpline.auth.models  # noqa: F401
import helpline.conversations.models  # noqa: F401
import helpline.jobs.models  # noqa: F401
import helpline.knowledge.models  # noqa: F401
from helpline.kit.models import Base

metadata = Base.metadata
