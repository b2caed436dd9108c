"""The garbage collector while the app serves: start-up frozen, young collections rarer."""

from __future__ import annotations

import gc

from helpline.core.config import Settings
from helpline.main import GC_YOUNG_THRESHOLD, create_app


async def test_the_app_freezes_what_start_up_built_and_lets_it_go_at_shutdown(
    settings: Settings,
) -> None:
    before = gc.get_threshold()
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        assert gc.get_freeze_count() > 10_000  # the modules, the app, its engines
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
