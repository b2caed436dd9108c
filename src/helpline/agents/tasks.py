"""The agent's background jobs.

- `summarize_conversation` `{"conversation_id"}`: fold a conversation's older messages into its
  running summary (`helpline.agents.memory`), queued when a stored answer takes the verbatim
  part of the conversation past `MEMORY_TOKEN_BUDGET`. It reads the messages, asks the chat
  model for the summary outside any transaction, and stores it only if no other summary was
  stored meanwhile; a job that finds the conversation within budget again does nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from helpline.agents import memory
from helpline.agents.factory import create_chat_model
from helpline.agents.tokens import estimate_tokens
from helpline.conversations import service as conversations_service
from helpline.core.database import unit_of_work
from helpline.jobs.exceptions import PermanentJobError
from helpline.jobs.registry import JobContext, task


@task(memory.SUMMARY_JOB, max_attempts=3)
async def summarize_conversation(ctx: JobContext, args: Mapping[str, Any]) -> dict[str, Any]:
    conversation_id = uuid.UUID(str(args["conversation_id"]))
    budget = ctx.settings.memory_token_budget
    async with unit_of_work(ctx.sessionmaker) as session:
        fold = await conversations_service.memory_to_fold(
            session,
            conversation_id=conversation_id,
            budget=budget,
            keep_tokens=memory.keep_tokens(budget),
        )
    if fold is None:
        return {"folded": 0, "saved": False}
    chat_model = create_chat_model(ctx.settings)
    if chat_model is None:
        raise PermanentJobError(
            f"LLM_PROVIDER={ctx.settings.llm_provider} has no chat model to summarise with"
        )
    try:
        summary = await memory.summarize(chat_model, previous=fold.summary, messages=fold.messages)
    finally:
        await chat_model.aclose()
    async with unit_of_work(ctx.sessionmaker) as session:
        saved = await conversations_service.save_summary(session, fold=fold, summary=summary)
    return {
        "folded": len(fold.messages),
        "saved": saved,
        "summary_tokens": estimate_tokens(summary),
    }
