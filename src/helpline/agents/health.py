"""The `llm` component of `/health` (SPEC.md: Operations).

`disabled` when no chat model is configured (`LLM_PROVIDER=extractive`), `healthy` with the
latency of a cheap provider call (listing models), `degraded` when the provider cannot be
reached: conversations, handoff to people and the knowledge base keep working without it.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.schemas import ChatModel
from helpline.core.health import CHECK_TIMEOUT_S, ComponentHealth


async def check_llm(request: Request) -> ComponentHealth:
    """Health of the chat model on `request.app.state.chat_model`."""
    chat_model: ChatModel | None = getattr(request.app.state, "chat_model", None)
    if chat_model is None:
        return ComponentHealth(status="disabled")
    started = time.perf_counter()
    try:
        await asyncio.wait_for(chat_model.check(), timeout=CHECK_TIMEOUT_S)
    except TimeoutError:
        return ComponentHealth(
            status="degraded", error=f"The AI model did not answer within {CHECK_TIMEOUT_S:g} s"
        )
    except LLMServiceError as exc:
        return ComponentHealth(status="degraded", error=exc.message)
    except Exception as exc:
        # A check must report, never raise: `/health` gathers every component.
        return ComponentHealth(status="degraded", error=type(exc).__name__)
    latency_ms = (time.perf_counter() - started) * 1000
    return ComponentHealth(status="healthy", latency_ms=round(latency_ms, 2))
