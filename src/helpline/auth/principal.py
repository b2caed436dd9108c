"""Who acts, as the services see it: an id and a role, from a `User` row or kept on its own."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from helpline.auth.models import User, UserRole


class Actor(Protocol):
    """What a service needs of whoever acts: a `User` row or a `Principal`."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def role(self) -> UserRole: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """A user's id and role, kept by a long-lived socket instead of the ORM row it came from.

    An ORM instance drags its state, its identity map entry and its session's bookkeeping
    along for as long as it is referenced.
    """

    id: uuid.UUID
    role: UserRole

    @classmethod
    def of(cls, user: User) -> Principal:
        return cls(id=user.id, role=user.role)
