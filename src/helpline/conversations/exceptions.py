"""Errors of the conversations domain."""

from __future__ import annotations

import uuid

from helpline.core.errors import Conflict, Forbidden, NotFound, RateLimited


class ConversationNotFound(NotFound):
    code = "CONVERSATION_NOT_FOUND"

    def __init__(self, conversation_id: uuid.UUID) -> None:
        super().__init__(f"Conversation {conversation_id} not found")


class ConversationForbidden(Forbidden):
    message = "This conversation belongs to another user"


class GenerationInProgress(Conflict):
    code = "GENERATION_IN_PROGRESS"
    message = "An answer is still being generated in this conversation; wait or cancel it"


class NothingToCancel(Conflict):
    code = "NOTHING_TO_CANCEL"
    message = "No answer is being generated in this conversation"


class IdempotencyKeyReused(Conflict):
    code = "IDEMPOTENCY_KEY_REUSED"
    message = "This client_message_id was already used with different content"


class InvalidTransition(Conflict):
    code = "CONFLICT"


class NotAssigned(Forbidden):
    message = "Assign the conversation to yourself before replying in it"


class AnswerNotFound(NotFound):
    code = "NOT_FOUND"
    message = "This conversation has no answer yet"


class TokenBudgetExceeded(RateLimited):
    code = "TOKEN_BUDGET_EXCEEDED"
    message = "Your daily token budget is used up; it resets at midnight UTC"
