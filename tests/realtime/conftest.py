"""Fixtures of the realtime tests (shared with the conversations tests)."""

from tests.realtime.fixtures import (
    fake_model,
    http,
    live_app,
    live_db,
    live_server,
    person,
    server_send_buffer,
    settings,
)

__all__ = [
    "fake_model",
    "http",
    "live_app",
    "live_db",
    "live_server",
    "person",
    "server_send_buffer",
    "settings",
]
