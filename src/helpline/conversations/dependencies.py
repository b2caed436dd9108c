"""Load-or-404 dependencies of the conversations domain."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Query

from helpline.auth.dependencies import CurrentUser
from helpline.conversations import service
from helpline.conversations.models import Conversation
from helpline.core.database import DbSession


async def get_owned_conversation(
    conversation_id: uuid.UUID, session: DbSession, user: CurrentUser
) -> Conversation:
    """The conversation in the path, if the caller may see it (403 / 404 otherwise)."""
    return await service.get_conversation(session, user=user, conversation_id=conversation_id)


OwnedConversation = Annotated[Conversation, Depends(get_owned_conversation)]

PageLimit = Annotated[int, Query(ge=1, le=100, description="Items per page (1-100).")]
PageCursor = Annotated[
    str | None, Query(max_length=512, description="`next_cursor` of the previous page.")
]
