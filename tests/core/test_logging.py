"""Logging set-up: lines at the configured level and above, through one chain of processors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.types import EventDict

from helpline.core import logging as helpline_logging
from helpline.core.logging import add_log_enricher, configure_logging


@pytest.fixture
def enriched_events() -> Iterator[list[str]]:
    """Configure logging for the test (restored afterwards); the events the chain enriched."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    seen: list[str] = []

    def count(_: Any, __: str, event_dict: EventDict) -> EventDict:
        seen.append(str(event_dict.get("event")))
        return event_dict

    add_log_enricher(count)
    try:
        yield seen
    finally:
        helpline_logging._extra_processors.remove(count)
        structlog.configure(**structlog_config)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_an_event_below_the_level_is_dropped_before_the_processors_run(
    enriched_events: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("WARNING")
    log = structlog.get_logger("helpline.test")

    log.info("engine.quiet", answer="dropped")
    log.warning("engine.loud", answer="kept")

    assert enriched_events == ["engine.loud"]
    written = capsys.readouterr().err
    assert "engine.loud" in written
    assert "engine.quiet" not in written


def test_lines_of_other_libraries_go_through_the_same_chain_redacted(
    enriched_events: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", fmt="json")

    logging.getLogger("uvicorn.error").info('"GET /chat/ws/1?token=%s"', "secret-value")
    logging.getLogger("uvicorn.error").debug("below the level")

    written = capsys.readouterr().err
    assert "[redacted]" in written
    assert "secret-value" not in written
    assert "below the level" not in written
    assert len(enriched_events) == 1


@pytest.mark.usefixtures("enriched_events")
def test_a_broken_log_call_does_not_raise_into_its_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", fmt="json")

    broken = "GET /chat/ws/1?token=" + "secret-value" + " %s %s"
    logging.getLogger("uvicorn.error").info(broken, "only one")

    written = capsys.readouterr().err
    assert "secret-value" not in written
    assert "only one" in written  # logging's own report of the broken call, redacted
