"""One-time work before the server's workers start (demo content, …)."""

from __future__ import annotations

from helpline.core.config import Settings


async def prepare(settings: Settings) -> None:
    """Run the start-up tasks that must happen once, not once per worker."""
    del settings
