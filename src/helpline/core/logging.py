"""structlog set-up: console lines in development, JSON with `LOG_FORMAT=json`.

`request_id` (and, once tracing is on, `trace_id`/`span_id`) is bound through contextvars, so
every line logged while a request is handled carries it. Standard-library loggers (uvicorn,
SQLAlchemy, alembic) are routed through the same processors.
"""

from __future__ import annotations

import logging
import logging.config
import re
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
from structlog.types import EventDict, Processor

# Query parameters whose values never reach a log line.
_SECRET_QUERY = re.compile(r"((?:^|[?&])(?:token|access_token|api_key|key)=)[^&\s\"]*", re.I)

EventEnricher = Callable[[Any, str, EventDict], EventDict]
_extra_processors: list[EventEnricher] = []


def redact_url(url: str) -> str:
    """`/chat/ws/1?token=abc` → `/chat/ws/1?token=[redacted]`."""
    return _SECRET_QUERY.sub(r"\1[redacted]", url)


def current_request_id() -> str | None:
    value = structlog.contextvars.get_contextvars().get("request_id")
    return str(value) if value is not None else None


def add_log_enricher(processor: EventEnricher) -> None:
    """Let another module (tracing) add fields to every line, e.g. `trace_id`."""
    if processor not in _extra_processors:
        _extra_processors.append(processor)


def _run_enrichers(logger: Any, name: str, event_dict: EventDict) -> EventDict:
    for processor in _extra_processors:
        event_dict = processor(logger, name, event_dict)
    return event_dict


class RedactSecretsFilter(logging.Filter):
    """Rewrites `?token=…` in records of loggers we do not own (uvicorn's access log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The line as it will be written: a secret may be in the message, in its arguments,
        # or split between them (`"token=%s"`); redacting the message alone would leave a
        # placeholder without its argument, and logging would print that argument instead.
        try:
            message = record.getMessage()
        except Exception:
            # A broken log call (its arguments don't fit its message): logging reports it
            # with both, so each is redacted as it is. Raising here would break the caller.
            if isinstance(record.msg, str):
                record.msg = redact_url(record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(
                    redact_url(arg) if isinstance(arg, str) else arg for arg in record.args
                )
            return True
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def _drop_color_message(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> EventDict:
    event_dict.pop("color_message", None)
    return dict(event_dict)


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    """Configure structlog and the standard library's logging once per process."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _run_enrichers,
        _drop_color_message,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        # Plain tracebacks: rendering rich ones with their locals blocks the event loop for seconds.
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)

    structlog.configure(
        processors=[
            # First: an event below the level costs a level check, not the whole chain.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"redact": {"()": RedactSecretsFilter}},
            "formatters": {
                "structlog": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        renderer,
                    ],
                    "foreign_pre_chain": shared,
                }
            },
            "handlers": {
                "default": {
                    "class": "logging.StreamHandler",
                    "formatter": "structlog",
                    "filters": ["redact"],
                }
            },
            "root": {"handlers": ["default"], "level": level.upper()},
            "loggers": {
                "uvicorn": {"handlers": [], "propagate": True},
                "uvicorn.error": {"handlers": [], "propagate": True},
                # Replaced by the request log of RequestContextMiddleware (redacted URLs).
                "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
                "sqlalchemy.engine": {"level": "WARNING"},
                "httpx": {"level": "WARNING"},
                "aiosqlite": {"level": "WARNING"},
            },
        }
    )
