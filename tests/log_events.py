"""Capture the structured log events the app writes (through the standard library's root logger)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def captured_log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, dict):
                events.append(dict(record.msg))

    handler = Capture(level=logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield events
    finally:
        root.removeHandler(handler)
