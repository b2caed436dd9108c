"""Errors of answerers and model providers."""

from __future__ import annotations

from helpline.core.errors import AppError


class LLMServiceError(AppError):
    """The model provider failed (unreachable, timed out, refused, or broke off mid-stream)."""

    status_code = 503
    code = "LLM_SERVICE_ERROR"
    message = "The AI model is unavailable; try again shortly"


class ConfigurationError(Exception):
    """The LLM settings name something this install cannot build (raised at startup)."""
